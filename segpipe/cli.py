"""The ``segpipe`` command line.

``segpipe fit|validate|test`` are LightningCLI subcommands (``--config``, ``--print_config``, any
``--trainer.*``/``--model.*``/``--data.*`` override; :mod:`segpipe.lightning_cli`). The other
subcommands are segpipe's own and register themselves in :data:`COMMANDS`. Each command imports
only what it uses: this module loads neither torch nor Lightning, so ``segpipe --help``,
``segpipe predict --help`` and a usage error answer at once.
"""

from __future__ import annotations

import difflib
import importlib
import re
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from segpipe.runtime import tune_allocator

__all__ = ["COMMANDS", "main", "usage"]

def _lazy(module: str, function: str = "main") -> Callable[[list[str]], int]:
    """A subcommand whose module is imported only when it runs (keeps start-up fast)."""

    def run(argv: list[str]) -> int:
        return getattr(importlib.import_module(module), function)(argv)

    run.__qualname__ = f"{module}.{function}"
    return run


#: segpipe's own subcommands: name -> function taking the remaining argv, returning an exit code.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "predict": _lazy("segpipe.predict.command"),
    "export": _lazy("segpipe.predict.export"),
    "check-data": _lazy("segpipe.data.doctor"),
    "crossval": _lazy("segpipe.crossval"),
    "demo": _lazy("segpipe.demos"),
}


#: One line per subcommand for ``segpipe --help``.
_SUMMARY: dict[str, str] = {
    "fit": "train a model (LightningCLI: --config, --trainer.*, --model.*, --data.*)",
    "validate": "score a checkpoint on the val split",
    "test": "score a checkpoint on the test split; writes test_metrics.json and report.md",
    "predict": "masks for images or GeoTIFFs from a checkpoint (or an ONNX export) alone",
    "export": "export a checkpoint to ONNX with a preprocessing sidecar",
    "check-data": "check a data set before training: pairs, encodings, classes, statistics",
    "crossval": "pool the per-case test scores of k-fold runs (--data.fold) into one figure",
    "demo": "the brain-MRI (offline) and driving-scene (CamVid) demos",
}


def usage() -> str:
    """``segpipe --help``: one usage, one line per subcommand."""
    names = ["fit", "validate", "test", *COMMANDS]
    width = max(map(len, names))
    lines = [f"usage: segpipe {{{','.join(names)}}} [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {_SUMMARY.get(name, '')}" for name in names]
    lines += ["", "`segpipe COMMAND --help` shows a command's options."]
    return "\n".join(lines) + "\n"


def _short_parse_error(text: str) -> str:
    """jsonargparse's error in one line: the key and the first cause, without the listing of
    union types it tried."""
    lines = text.rstrip().splitlines()
    if not lines:
        return text
    head = lines[0].strip()
    if head.startswith("Call to compute_fn of link") and " failed: " in head:
        return head.rsplit(" failed: ", 1)[1]  # the reason, not the link's arguments
    for i, line in enumerate(lines[1:], start=1):
        stripped = line.lstrip()
        if not stripped.startswith("- ") or "Expected a <class 'NoneType'>" in stripped:
            continue
        indent = len(line) - len(stripped)
        cause = [stripped[2:]]
        for more in lines[i + 1 :]:
            if len(more) - len(more.lstrip()) <= indent:
                break
            cause.append(more.strip())
        key = head.split(":", 1)[0] if head.startswith("Parser key") else head
        return " ".join(f"{key}: {' '.join(cause)}".split())
    return " ".join(text.split())


def _show_segpipe_messages() -> None:
    """Print segpipe's own INFO messages (e.g. the tiling an ONNX export records) on stderr, as
    Lightning prints its own; a program that configured logging itself keeps its setup."""
    import logging

    root, ours = logging.getLogger(), logging.getLogger("segpipe")
    if root.handlers or ours.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (``segpipe ... | head``)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll, or no real file (a test's capture)
        return False


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``segpipe`` console script."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe (a loader worker's): a real error
        # The reader stopped reading (`| head`): end quietly, as cat and grep do, instead of
        # a traceback; output still buffered goes nowhere.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(argv: Sequence[str] | None) -> Any:
    args = list(sys.argv[1:] if argv is None else argv)
    tune_allocator()
    # Lightning (2.6) builds torch's deprecated LeafSpec in every batch transfer; torch's
    # warning names Lightning's file and nothing a user can change, once per command.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    _show_segpipe_messages()
    args = _shipped_configs(args)
    if args and args[0] in {"--version", "-V"}:
        from segpipe import __version__

        print(f"segpipe {__version__}")
        return 0
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]](args[1:])
    if not args or args[0] in {"-h", "--help"}:
        print(usage(), end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] not in {"fit", "validate", "test"}:
        close = difflib.get_close_matches(args[0], [*_SUMMARY], n=1)
        hint = f"; did you mean `segpipe {close[0]}`?" if close else ""
        print(f"segpipe: error: unknown command {args[0]!r}{hint} (see `segpipe --help`)",
              file=sys.stderr)
        return 2
    from jsonargparse import ArgumentError

    from segpipe.lightning_cli import run_cli  # Lightning only for these commands

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        run_cli(args)
    except SIGTERMException:  # SLURM, Kubernetes, docker stop, timeout: not a finished run
        from segpipe.lightning_cli import interrupted_fit_line, is_rank_zero

        if is_rank_zero():  # every process of a DDP run stops: one line
            print(f"segpipe {args[0]}: stopped by SIGTERM before it finished"
                  + (f"; {interrupted_fit_line()}" if args[0] == "fit" else ""), file=sys.stderr)
        return 128 + signal.SIGTERM
    except SystemExit as exc:  # Lightning exits with 1 after Ctrl-C, as after a crash
        from segpipe.lightning_cli import interrupted_fit_line, is_rank_zero, was_interrupted

        if exc.code != 1 or not was_interrupted():
            raise
        if is_rank_zero():
            print(f"segpipe {args[0]}: stopped by Ctrl-C (SIGINT) before it finished"
                  + (f"; {interrupted_fit_line()}" if args[0] == "fit" else ""), file=sys.stderr)
        return 128 + signal.SIGINT
    except ArgumentError as exc:  # a mistake on the command line or in the config
        message = _short_parse_error(str(exc))
        found = re.search(r"does not accept option '([\w.]+)'", message)
        if found:  # a key of a config file: which file
            message += _config_setting(args, found.group(1))
        message += _did_you_mean(message)
        if "unexpected keyword argument 'linked_targets'" in message:  # jsonargparse's
            message = (f"{message.split(':', 1)[0]}: give an nn.Module class; a function that "
                       "builds the network (such as torchvision's fcn_resnet50) cannot take "
                       "the num_classes and in_channels the data section links into it: wrap "
                       "it in a class whose __init__ takes them")
        if "mask_values" in message and re.search(
                r"invalid literal for int\(\) with base 10: '-?\d+:-?\d+'", message):
            # YAML reads {0:0, 1:1} as keys "0:0" and 61 (a base-60 number), values None
            given = re.search(r"Given value: (\{.*?\})", message)
            message = (f"data.mask_values {given.group(1) if given else ''} has keys without "
                       "values: YAML needs a space after each colon, --data.mask_values "
                       "'{0: 0, 255: 1}' (without one, 1:1 reads as the number 61)")
        if '"<unicode string>"' in message:  # a YAML error of a config file: which one
            message = message.replace('"<unicode string>"', _unreadable_config(args))
        if "class_path 'torch.nn.Module'" in message:
            message = _option_before_its_class(args) or message
        if re.search(r"arguments are required: \w+\.model\.net\b", message):
            message += _network_from_a_run(args)
        if "Expected a <class 'str'>" in message and "Got value:" in message:
            # a case or class named 010 is read as the octal number 8, 1e3 as 1000.0
            message += (" (YAML reads unquoted names such as 010 or 1e3 as numbers: quote them,"
                        " e.g. --data.val_cases \"['010']\")")
        print(f"segpipe {args[0]}: error: {message} (see `segpipe {args[0]} --help`)",
              file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - user errors in one line, the rest re-raised
        user = user_error(exc)
        if user is None:
            raise
        print(f"segpipe: error: {user}", file=sys.stderr)
        return 2
    return 0


def _unreadable_config(args: Sequence[str]) -> str:
    """The first ``--config`` file YAML cannot read (its errors say ``"<unicode string>"``),
    or ``"a --config file"``."""
    import yaml

    from segpipe.argparsing import option_at

    for path in (v for i in range(len(args)) if (v := option_at(list(args), i, "--config"))):
        try:
            with open(path, encoding="utf-8") as fh:
                yaml.safe_load(fh)
        except yaml.YAMLError:
            return path
        except (OSError, UnicodeDecodeError):
            continue
    return "a --config file"


def _config_setting(args: Sequence[str], dotted: str) -> str:
    """``" (set in FILE)"`` for the last ``--config`` file that sets ``dotted``, else ``""``."""
    from segpipe.lightning_cli import _ABSENT, _config_at, _lookup

    found = ""
    for i in range(len(args)):
        config = _config_at(args, i)
        if config is not None and _lookup(config[1], dotted) is not _ABSENT:
            found = f" (set in {config[0]})"
    return found


def _option_before_its_class(args: Sequence[str]) -> str | None:
    """For jsonargparse's "Problem with given class_path 'torch.nn.Module'": an option of the
    network typed before the ``--config`` that chooses it (a class the user never wrote), or
    None."""
    first_config = next((i for i, a in enumerate(args)
                         if a == "--config" or str(a).startswith("--config=")), None)
    if first_config is None:
        return None
    early = [str(a).split("=", 1)[0] for a in args[:first_config]
             if str(a).startswith("--model.net.")]
    if not early:
        return None
    return (f"{early[0]} comes before the --config that chooses model.net, so it had no "
            "network to apply to: put --config first")


def _shipped_configs(args: list[str]) -> list[str]:
    """``args`` with each ``--config configs/NAME.yaml`` that does not exist here replaced by
    the shipped copy (a pip install has no ``configs/`` folder; the README's commands then
    failed with "File does not exist")."""
    from segpipe.argparsing import option_at
    from segpipe.configs import resolve

    out = list(args)
    for i, arg in enumerate(out):
        value = option_at(out, i, "--config")
        if value is None:
            continue
        at, prefix = (i + 1, "") if arg == "--config" else (i, "--config=")
        shipped = resolve(value)
        if shipped is not None:
            print(f"segpipe: {value}: no such file here; using the one shipped with segpipe, "
                  f"{shipped}", file=sys.stderr)
            out[at] = prefix + shipped
    return out


def user_error(exc: BaseException) -> str | None:
    """The one-line message of an error from ``segpipe fit|validate|test`` that the user can
    fix (:data:`segpipe.lightning_cli.USER_ERRORS`, a full disk, and the library errors
    translated below), or None for a bug, whose traceback should show."""
    from segpipe.lightning_cli import USER_ERRORS

    user = _user_error(exc, USER_ERRORS)
    if user is None:
        user = (_disk_full(exc) or _one_value_batchnorm(exc) or _loader_worker_error(exc)
                or _several_loaders(exc) or _cpu_devices(exc))
    if user is None:
        return None
    text = str(user)
    if text.startswith("No supported gpu backend found"):  # Lightning's, without the fix
        text += (" (torch sees no CUDA GPU here): give --trainer.accelerator cpu, or auto to "
                 "use a GPU where there is one")
    return text


#: The classes whose options the top-level sections take (for suggestions).
_SECTION_CLASSES = {"trainer": "lightning.pytorch.Trainer",
                    "model": "segpipe.tasks.SegmentationTask",
                    "data": "segpipe.data.SegmentationDataModule",
                    "checkpoint": "lightning.pytorch.callbacks.ModelCheckpoint"}


def _option_names(class_path: str) -> list[str]:
    """The keyword arguments of the class ``class_path`` names ([] if it cannot be read)."""
    from segpipe.argparsing import class_parameters

    return [p.name for p in class_parameters(class_path).values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _did_you_mean(message: str) -> str:
    """``"; did you mean --trainer.max_epochs?"`` for a misspelt option jsonargparse refused
    (an unrecognised ``--section.key``, or an ``Option 'key' is not accepted`` by the class a
    ``class_path`` names), else ``""``."""
    import re

    # on the command line (--trainer.max_epoch) or in a config file (trainer: {max_epoch: 1})
    found = re.search(r"(?:unrecognized arguments: (--)|does not accept option ')(\w+)\.([\w.]+)",
                      message)
    if found:
        # --model.optimzer.init_args.lr: the misspelt name is the first after the section
        dashes, section, dotted = found.groups()
        key, dot, rest = dotted.partition(".")
        close = _close_name(key, _option_names(_SECTION_CLASSES.get(section, "")))
        return f"; did you mean {dashes or ''}{section}.{close}{dot}{rest}?" if close else ""
    option = re.search(r"Option '(\w+)[\w.]*' is not accepted", message)  # a.b: a dict's key
    class_path = re.search(r"class_path[ =]'([\w.]+)'", message)
    if option and class_path:
        key, names = option.group(1), _option_names(class_path.group(1))
        if "smp_kwargs" in names and key in _smp_arch_arguments():  # SmpModel: smp's own
            from segpipe.models.smp import REFUSED_ARGUMENTS

            if key in REFUSED_ARGUMENTS:
                return f"; {REFUSED_ARGUMENTS[key]}"
            return (f"; an argument of the smp architecture goes in smp_kwargs: "
                    f"--model.net.init_args.smp_kwargs '{{{key}: VALUE}}' (YAML: init_args: "
                    f"{{smp_kwargs: {{{key}: VALUE}}}})")
        close = _close_name(key, names)
        return f"; did you mean {close!r}?" if close else ""
    return ""


def _smp_arch_arguments() -> set[str]:
    """The argument names of every segmentation-models-pytorch architecture (an error path:
    smp is imported only here)."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        return set()
    names: set[str] = set()
    for arch in getattr(smp, "MODEL_ARCHITECTURES_MAPPING", {}).values():
        names.update(_option_names(f"{arch.__module__}.{arch.__qualname__}"))
    return names


def _network_from_a_run(args: Sequence[str]) -> str:
    """For ``model.net`` missing on a command that has ``--ckpt_path``: the network and the data
    settings come from the run's config (the checkpoint's model settings then replace the
    config's), with the one found beside the checkpoint when there is one."""
    from pathlib import Path

    from segpipe.argparsing import command_line_value

    ckpt = command_line_value(args, "--ckpt_path")
    if not ckpt:
        return ("; give the config the model was trained with: --config RUN/config.yaml "
                "(segpipe fit keeps it in its trainer.default_root_dir or log folder)")
    file = Path(ckpt).expanduser().resolve()
    run = file.parent.parent  # RUN/checkpoints/x.ckpt
    try:
        written = file.stat().st_mtime
    except OSError:
        written = float("inf")
    # the fit's config was written before its checkpoints; later tests write theirs after
    found = sorted(run.glob("config.yaml")) + sorted(
        (p for p in run.glob("*/version_*/config.yaml") if p.stat().st_mtime <= written),
        key=lambda p: p.stat().st_mtime)[-1:]
    where = f" (beside this checkpoint: --config {found[0]})" if found else (
        " (segpipe fit keeps it in its trainer.default_root_dir or log folder)")
    return (f"; the network and the data settings come from the config the model was trained "
            f"with: give it with --ckpt_path{where}, and the checkpoint's model settings are "
            "used")


def _disk_full(exc: BaseException) -> str | None:
    """One line for a full disk met outside segpipe's own writes (a logger's event file or
    metrics.csv, written far more often than checkpoints: it ended in a TensorBoard
    ValueError), or None when the disk is not full."""
    from segpipe.fileio import is_disk_full

    if not is_disk_full(exc):
        return None
    where = next((str(e.filename) for e in _chain(exc)
                  if isinstance(e, OSError) and e.filename), None)
    return (f"the disk is full{f' (writing {where})' if where else ''}: free space there, or "
            "point trainer.default_root_dir (logs) and checkpoint.dirpath at a disk with room; "
            "the checkpoints written before are intact (--ckpt_path last resumes)")


def _loader_worker_error(exc: BaseException) -> str | None:
    """A bad file met in a DataLoader worker (``data.check_data false``): torch re-raises
    segpipe's ImageReadError as a RuntimeError holding the worker's traceback; its last line
    is the message (file, reason, fix). None for anything else."""
    for e in _chain(exc):
        text = str(e).rstrip()
        if isinstance(e, RuntimeError) and "in DataLoader worker process" in text:
            last = text.splitlines()[-1]
            prefix = "segpipe.data.io.ImageReadError: "
            if last.startswith(prefix):
                return last[len(prefix):]
    return None


def _cpu_devices(exc: BaseException) -> str | None:
    """Lightning's TypeError for ``--trainer.devices -1`` or ``[0]`` on a CPU (a traceback):
    GPU selections, where the CPU takes a number of processes."""
    for e in _chain(exc):
        text = str(e)
        if isinstance(e, TypeError) and "`devices` selected with `CPUAccelerator`" in text:
            return ("--trainer.devices on a CPU is a number of processes (1, or 2 or more with "
                    "--trainer.strategy ddp); -1 and lists such as [0] select GPUs, and this fit "
                    "runs on the CPU: give --trainer.devices 1 (or auto)")
    return None


def _close_name(key: str, names: Sequence[str]) -> str | None:
    """The option ``key`` was meant to be: the one it begins (``max_ep``: ``max_epochs``), else
    the closest by spelling."""
    begun = [n for n in names if n.startswith(key)]
    if len(begun) == 1:
        return begun[0]
    close = difflib.get_close_matches(key, names, n=1)
    return close[0] if close else None


def _several_loaders(exc: BaseException) -> str | None:
    """Lightning's "You provided multiple `test_dataloader`, but no `dataloader_idx` argument"
    for a data module of the user's that gives several: segpipe's task scores one."""
    for e in _chain(exc):
        text = str(e)
        if isinstance(e, RuntimeError) and text.startswith("You provided multiple `") and (
                "dataloader_idx" in text):
            kind = text.split("`", 2)[1]
            return (f"the data module gives several {kind}s; segpipe's task scores one: "
                    "combine them into one (torch.utils.data.ConcatDataset) or score each in "
                    "its own run")
    return None


def _one_value_batchnorm(exc: BaseException) -> str | None:
    """One line for torch's "Expected more than 1 value per channel when training": a
    BatchNorm after a whole-image pooling (DeepLabV3's ASPP, PSPNet's pyramid) at
    ``data.batch_size`` 1 fails at the first step whatever the crop; None otherwise."""
    for e in _chain(exc):
        text = str(e)
        if isinstance(e, ValueError) and text.startswith("Expected more than 1 value per channel"):
            shape = text.rsplit("input size ", 1)[-1]
            return (f"a BatchNorm layer of the network got one value per channel in training "
                    f"(input {shape}): it cannot normalise a single value, as after a pooling "
                    "of the whole image (DeepLabV3's ASPP, PSPNet) at data.batch_size 1 or in "
                    "a batch of one image; use data.batch_size 2 or more and 2 or more "
                    "training images (or a larger data.crop_size)")
    return None


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _user_error(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """``exc`` or the error it was raised while handling, if one of ``kinds``
    (:data:`segpipe.lightning_cli.USER_ERRORS`).

    When a run fails, Lightning finalises the loggers; on a full disk that raises again and
    would hide the checkpoint error that stopped the run.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


if __name__ == "__main__":
    sys.exit(main())
