"""``segpipe fit|validate|test``: LightningCLI with segpipe's checkpointing, data→model links and
one-line user errors.

Imported only by these commands (:func:`segpipe.cli.main` dispatches), so ``segpipe predict``,
``segpipe --help`` and the others start without loading Lightning's CLI, jsonargparse's type
system or the task.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import re
import sys
import time
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from segpipe.argparsing import command_line_value, option_at
from segpipe.helpformat import HelpFormatter
from segpipe.callbacks import (
    PARTIAL_SUFFIX,
    SynchronisedSigterm,
    CheckpointWriteError,
    LastCheckpoint,
    TestMetricsWriter,
    UnsafeCheckpointError,
    install_safe_checkpoint_io,
    load_checkpoint_file,
)
from segpipe.data.checks import DataCheckError
from segpipe.data.io import ImageReadError
from segpipe.data.datasets import LAYOUT_HELP, DataRootError, DataSplitError
from segpipe.data.spec import DataSpec, reads_leading_bands, recorded_spec
from segpipe.errors import ConfigError
from segpipe.fileio import (
    TMP_PREFIX,
    DiskFullError,
    OutputDirError,
    check_output_dir,
    is_stale_temporary,
)
from segpipe.models.base import ModelArgumentError
from segpipe.models.batchnorm import BatchNormAdaptError
from segpipe.models.smp import PretrainedWeightsUnavailableError
from segpipe.runtime import default_precision, fit_threads_to_cpus, tune_allocator
from segpipe.tasks.finetune import TransferLearningError
from segpipe.tasks.schedules import AnnealToDeadline, LateCrop
from segpipe.tasks.segmentation import EVALUATION_OPTIONS, SegmentationTask, check_spec_fits
from segpipe.tracking import (
    TestFigures,
    ThrottledProgressBar,
    ValidationImages,
    default_loggers,
    next_version,
    quiet_disk_full_in_threads,
)

__all__ = [
    "USER_ERRORS",
    "CheckpointNotFoundError",
    "SegpipeCLI",
    "resolve_checkpoint_alias",
    "run_cli",
]

#: The data module used when ``data:`` names no ``class_path``.
_DEFAULT_DATA = "segpipe.data.SegmentationDataModule"
#: The names a config may give segpipe's own data module by.
_SEGPIPE_DATA_PATHS = (_DEFAULT_DATA, "SegmentationDataModule",
                       "segpipe.data.datamodule.SegmentationDataModule")

#: ``data.*`` options that make up the data spec linked into ``model.data_spec``.
_SPEC_ARGS = ("num_classes", "class_names", "class_colors", "ignore_index", "in_channels", "bands",
              "mean", "std", "eval_resize")


def _data_spec(*values: Any) -> dict[str, Any]:
    """``model.data_spec`` from the ``data.*`` options of :data:`_SPEC_ARGS` (checked)."""
    return DataSpec.create(**dict(zip(_SPEC_ARGS, values))).to_dict()


#: Task options that belong to the command that runs, never taken from ``--ckpt_path``'s
#: hyperparameters: how it evaluates (:data:`EVALUATION_OPTIONS`), compiles, lays out memory
#: and logs, none of which the trained weights depend on.
_THIS_RUNS = (*EVALUATION_OPTIONS, "compile", "channels_last", "log_train_metrics")


def _plain(value: Any) -> Any:
    """A setting's value with tuples as lists and namespaces as dicts, for comparing."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same_setting(a: Any, b: Any) -> bool:
    return _plain(a) == _plain(b)


def _shown(value: Any) -> str:
    """A setting's value as it would be typed after ``--model.KEY``."""
    value = _plain(value)
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _settings_given(model: Any, defaults: Any) -> dict[str, Any]:
    """The ``model.*`` settings a command set (in a config or on the command line): those that
    differ from the parser's defaults, flattened (``net.init_args.depth``), without the data
    spec, which the data section sets and the checkpoint checks are about."""
    defaults = defaults if defaults is not None and hasattr(defaults, "get") else {}
    given = {}
    for key, value in model.items():
        default = defaults.get(key)
        if default is None and key.startswith("net.init_args."):  # not in the parser's defaults
            default = _class_default(model.get("net.class_path"), key.rpartition(".")[2])
        if not key.startswith("data_spec") and not _same_setting(value, default):
            given[key] = value
    return given


def _class_default(class_path: Any, name: str) -> Any:
    """The default of argument ``name`` of the class ``class_path`` names (None if none): the
    network's own defaults, which the parser's defaults for ``model`` do not hold (a resume
    that did not give ``dropout`` was told it gave 0.0, UNet's default)."""
    import inspect

    from segpipe.argparsing import class_parameters

    param = class_parameters(class_path).get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _config_at(argv: Sequence[str], i: int) -> tuple[str, Any] | None:
    """``(path, YAML content)`` of the ``--config`` file given at ``argv[i]``; None when
    ``argv[i]`` gives none, or the file cannot be read (the parser reports it itself)."""
    import yaml

    path = option_at(argv, i, "--config")
    if path is None:
        return None
    try:
        return path, yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None


#: :func:`_lookup`'s answer for a key a config does not set.
_ABSENT = object()


def _lookup(values: Any, dotted: str) -> Any:
    """The value a config's YAML content sets for ``dotted`` (``trainer.max_epochs``), or
    :data:`_ABSENT`."""
    node = values
    for part in dotted.split("."):
        node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
    return node


def _overridden_by_a_later_config(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``(option, config)`` for each option typed before a ``--config`` file that sets it too.

    jsonargparse applies options and config files in their order, so ``--trainer.max_epochs 1
    --config my.yaml`` trained for the file's epochs, into the file's run folder, in silence.
    (``--ckpt_path`` holds wherever it is typed:
    :func:`~segpipe.argparsing.command_line_value`.)"""
    found: dict[str, str] = {}  # each option with the last file that sets it
    for i in range(len(argv)):
        config = _config_at(argv, i)
        if config is None:
            continue
        path, values = config
        for arg in argv[:i]:
            option = str(arg).split("=", 1)[0]
            if not option.startswith("--") or option in ("--config", "--ckpt_path"):
                continue
            if any(_lookup(values, key) is not _ABSENT for key in _spellings(option[2:])):
                found[option] = str(path)
    return list(found.items())


def _spellings(dotted: str) -> list[str]:
    """``dotted`` and the ways a config file may write it: ``model.optimizer.lr`` is
    ``model.optimizer.init_args.lr`` in a file that gives the class (``class_path``)."""
    parts = dotted.split(".")
    out = [dotted]
    for k in range(1, len(parts)):
        if "init_args" not in parts[:k + 1]:
            out.append(".".join([*parts[:k], "init_args", *parts[k:]]))
    return out


#: The topmost output folders this command is about to create (see :func:`_remove_empty_folders`).
_MADE_DIRS: list[Path] = []


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (None if it exists)."""
    folder = folder.expanduser().absolute()
    if folder.exists():
        return None
    top = folder
    for parent in folder.parents:
        if parent.exists():
            break
        top = parent
    return top


#: The config files a command saves into its run's log folder (:class:`_RunConfigCallback`).
_RUN_CONFIG_NAMES = {"config.yaml", "validate_config.yaml", "test_config.yaml"}


def _remove_empty_folders(tops: Sequence[Path]) -> None:
    """Remove the folder trees in ``tops`` that hold no file: the run folder and checkpoint
    folder a failed command created before it wrote anything (a typo in an option, weights that
    cannot be fetched, bad data). Anything with a file in it stays, but for TensorBoard event
    files that hold nothing but their header: Lightning opens them before the data module's
    setup, so a fit stopped by the data check left one, and the next run became version_1;
    and for a folder that holds the command's saved config alone (a test refused at its start,
    after Lightning saved it)."""
    for top in tops:
        if not top.is_dir():
            continue
        for here, _, files in sorted(os.walk(top), key=lambda w: -len(Path(w[0]).parts)):
            for name in files:
                if name.startswith("events.out.tfevents.") and _event_records(Path(here, name)) <= 1:
                    Path(here, name).unlink(missing_ok=True)
            left = set(os.listdir(here)) if os.path.isdir(here) else set()
            if left and left <= _RUN_CONFIG_NAMES:  # the command's config alone: it ran nothing
                for name in left:
                    Path(here, name).unlink(missing_ok=True)
            try:
                Path(here).rmdir()  # only empty ones go
            except OSError:
                pass


def _event_records(path: Path) -> int:
    """The number of records in a TensorBoard event file (TFRecord framing: a little-endian
    uint64 length, its CRC, the data, the data's CRC); a large number when it cannot be read."""
    import struct

    count = 0
    try:
        with open(path, "rb") as fh:
            while True:
                head = fh.read(12)
                if not head:
                    return count
                if len(head) < 12:
                    return 1 << 30
                (length,) = struct.unpack("<Q", head[:8])
                fh.seek(length + 4, os.SEEK_CUR)
                count += 1
                if count > 1:
                    return count
    except OSError:
        return 1 << 30


class CheckpointNotFoundError(FileNotFoundError):
    """``--ckpt_path best|last`` names a checkpoint the run folder does not hold."""


def _data_section(cfg: Any) -> tuple[str, Any]:
    """``(class_path, init_args)`` of a command's ``data`` section (segpipe's data module when
    the config names none; its arguments may stand directly under ``data:``)."""
    data = cfg.get("data")
    if data is None or not hasattr(data, "get"):
        return _DEFAULT_DATA, {}
    return str(data.get("class_path") or _DEFAULT_DATA), data.get("init_args", data)


def _is_segpipe_data_module(class_path: str) -> bool:
    """Whether ``class_path`` names segpipe's :class:`~segpipe.data.SegmentationDataModule` (or
    a subclass of it), whose ``root`` and ``layout`` :meth:`SegpipeCLI._check_data_root` knows."""
    if class_path in _SEGPIPE_DATA_PATHS:
        return True
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except Exception:  # noqa: BLE001 - an unimportable class is jsonargparse's to report
        return False
    from segpipe.data import SegmentationDataModule

    return isinstance(cls, type) and issubclass(cls, SegmentationDataModule)


def _checkpoint_dir(cfg: Any) -> Path:
    """The run's checkpoint folder: ``checkpoint.dirpath``, else ``<default_root_dir>/checkpoints``."""
    if cfg.checkpoint.get("dirpath"):
        return Path(cfg.checkpoint.dirpath)
    return Path(cfg.trainer.default_root_dir or ".") / "checkpoints"


#: Path options whose ``~`` segpipe expands (a shell leaves it as it is in a config file, and
#: in ``--option=~/x``): Lightning and the run-folder logic took it for a folder named "~".
_HOME_PATHS = ("trainer.default_root_dir", "checkpoint.dirpath", "ckpt_path", "model.init_from")


def _expand_home(cfg: Any) -> None:
    """Expand a leading ``~`` in the path options of :data:`_HOME_PATHS` (``data.root`` is
    expanded by the data module)."""
    for key in _HOME_PATHS:
        try:
            value = cfg[key]
        except (KeyError, TypeError, AttributeError):
            continue
        if isinstance(value, str) and value.startswith("~"):
            cfg[key] = os.path.expanduser(value)


def resolve_checkpoint_alias(alias: str, ckpt_dir: Path, weights_only: bool = True) -> str:
    """Turn ``--ckpt_path best`` or ``last`` into a file of the run in ``ckpt_dir``.

    ``best`` is the best model recorded in ``last.ckpt``'s checkpoint-callback state (written
    after every validation); when that is missing or moved, the newest other ``*.ckpt`` file;
    for a run trained without validation (``data.train_on_val``), ``last.ckpt`` itself.

    Args:
        alias: ``"best"`` or ``"last"``.
        ckpt_dir: The run's checkpoint folder.
        weights_only: Safe loading of ``last.ckpt`` when it is read for the best model's path.

    Returns:
        The checkpoint file's path.

    Raises:
        CheckpointNotFoundError: When the folder holds no such checkpoint; the message says what
            to run.
    """
    last = ckpt_dir / "last.ckpt"
    if alias == "best":
        if last.is_file():
            state = load_checkpoint_file(last, map_location="cpu", weights_only=weights_only)
            for key, cb_state in (state.get("callbacks") or {}).items():
                best = cb_state.get("best_model_path") if key.startswith("ModelCheckpoint") else None
                if best and (ckpt_dir / Path(best).name).is_file():  # also when the run was moved
                    return str(ckpt_dir / Path(best).name)
                if best and Path(best).is_file():
                    return str(best)
            if any(isinstance(v, dict) and v.get("trained_on_val") for v in state.values()):
                rank_zero_info(f"--ckpt_path best: {last} (trained without validation, on "
                               "data.train_on_val, so its last checkpoint is the model)")
                return str(last)
        others = sorted(
            (p for p in ckpt_dir.glob("*.ckpt") if not p.name.startswith(("last", TMP_PREFIX))),
            key=lambda p: p.stat().st_mtime,
        )
        if others:
            return str(others[-1])
    elif last.is_file():
        return str(last)
    raise CheckpointNotFoundError(
        f"--ckpt_path {alias}: no {alias} checkpoint in {ckpt_dir}. Train first with "
        "`segpipe fit` and the same --config/--trainer.default_root_dir (or checkpoint.dirpath), "
        "or pass the checkpoint file itself."
    )


#: Errors ``main`` reports as one ``segpipe: error: ...`` line (exit code 2), not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,  # an option's value, named with what it accepts (task, data, schedule, ...)
    ModelArgumentError,  # the same for a network's init_args (segpipe.models imports no segpipe)
    DataCheckError,  # the pre-flight check: every problem file, with the fix
    DataRootError,  # data.root missing or not in the layout's shape
    DataSplitError,  # a split the stage needs is missing or empty
    DiskFullError,  # metrics, reports (checkpoints: CheckpointWriteError)
    CheckpointNotFoundError,
    CheckpointWriteError,
    OutputDirError,
    UnsafeCheckpointError,
    PretrainedWeightsUnavailableError,  # named encoder weights neither cached nor downloadable
    TransferLearningError,  # init_from unusable; resuming with other param groups than saved
    BatchNormAdaptError,  # model.bn_adapt outside [0, 1], or a network without BatchNorm
    MisconfigurationException,  # Lightning's checks of trainer options (devices, max_time, ...)
    ImageReadError,  # a bad file met in training with data.check_data false: named, with the fix
)


def _next_earlier_dir(ckpt_dir: Path) -> Path:
    """``ckpt_dir/earlier-K`` for the first K not taken."""
    k = 1
    while (ckpt_dir / f"earlier-{k}").exists():
        k += 1
    return ckpt_dir / f"earlier-{k}"


def _move_checkpoints(paths: list[Path], ckpt_dir: Path, dest: Path | None = None) -> Path:
    """Move ``paths`` into ``dest`` when it is given and free, else into the next free
    ``ckpt_dir/earlier-K``; return that folder."""
    dest = dest if dest is not None and not dest.exists() else _next_earlier_dir(ckpt_dir)
    dest.mkdir()
    for path in paths:
        path.rename(dest / path.name)
    return dest


def earlier_checkpoints_dest(ckpt_dir: Path) -> Path | None:
    """Where :func:`set_aside_earlier_checkpoints` will move ``ckpt_dir``'s checkpoints, or None
    when it holds none."""
    if not any(p.is_file() for p in ckpt_dir.glob("*.ckpt")):
        return None
    return _next_earlier_dir(ckpt_dir)


def set_aside_earlier_checkpoints(ckpt_dir: Path, dest: Path | None = None) -> Path | None:
    """Move the checkpoints of an earlier ``fit`` in ``ckpt_dir`` into ``ckpt_dir/earlier-K``.

    A new run in the same folder would otherwise overwrite the earlier run's ``last.ckpt``
    (its resume point) and leave its ``best-*`` beside the new run's, where ``--ckpt_path best``
    could pick either. Moved, both runs are whole: ``best``/``last`` mean the new run's, and
    the earlier one resumes from ``earlier-K/last.ckpt``. The CLI moves them when training
    starts (:class:`_SetAsideCheckpoints`), so a run stopped by a bad option value or bad
    data leaves them where they were.

    Args:
        ckpt_dir: The run's checkpoint folder.
        dest: The folder to move them to (:func:`earlier_checkpoints_dest`'s), or None for the
            next free ``earlier-K``.

    Returns:
        The folder they were moved to, or None when there were none.
    """
    earlier = sorted(p for p in ckpt_dir.glob("*.ckpt") if p.is_file())
    if not earlier:
        return None
    dest = _move_checkpoints(earlier, ckpt_dir, dest)
    if (dest / "last.ckpt").is_file():
        how = (f"to resume that run instead: --ckpt_path {dest / 'last.ckpt'} "
               f"--checkpoint.dirpath {dest}")
    else:  # killed before its first last.ckpt: weights, no resumable state
        how = ("that run left no last.ckpt to resume; its weights can start a new run: "
               f"--model.init_from {dest / earlier[0].name}")
    rank_zero_info(
        f"{ckpt_dir} held {len(earlier)} checkpoint(s) of an earlier fit; moved them to {dest} so "
        f"that this run's best and last are its own ({how})")
    return dest


def set_aside_unrecorded_checkpoints(ckpt_dir: Path, resume: Path, weights_only: bool = True) -> Path | None:
    """Move checkpoints a killed run wrote after its resume point into ``ckpt_dir/earlier-K``.

    A run killed after a new ``best-*`` file was written but before ``last.ckpt`` was updated
    leaves that file behind: the resumed run does not know it (``last.ckpt`` names the
    previous best), so it would stay beside the resumed run's own best forever (``save_top_k``
    never removes it, and a glob of ``best-*.ckpt`` finds two). Files in ``ckpt_dir`` newer than
    ``resume`` and not recorded in its checkpoint callbacks' state are moved, not deleted.

    Args:
        ckpt_dir: The run's checkpoint folder.
        resume: The checkpoint the fit resumes from.
        weights_only: Safe loading of ``resume`` when its callback state is read.

    Returns:
        The folder they were moved to, or None when there were none.
    """
    try:
        if resume.resolve().parent != ckpt_dir.resolve():
            return None
        since = resume.stat().st_mtime
        newer = [p for p in ckpt_dir.glob("*.ckpt") if p.is_file() and p.name != resume.name
                 and not p.name.startswith(TMP_PREFIX) and p.stat().st_mtime > since]
    except OSError:
        return None
    if not newer:
        return None
    state = load_checkpoint_file(resume, map_location="cpu", weights_only=weights_only)
    recorded: set[str] = set()
    for cb_state in (state.get("callbacks") or {}).values():
        if isinstance(cb_state, dict):
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if cb_state.get(key):
                    recorded.add(Path(cb_state[key]).name)
            recorded.update(Path(k).name for k in (cb_state.get("best_k_models") or {}))
    unrecorded = [p for p in newer if p.name not in recorded]
    if not unrecorded:
        return None
    dest = _move_checkpoints(unrecorded, ckpt_dir)
    names = ", ".join(p.name for p in unrecorded)
    rank_zero_info(
        f"{names} in {ckpt_dir} was written after {resume.name} by the run that stopped, and "
        f"{resume.name} does not know it; moved to {dest} (this run retrains from "
        f"{resume.name} and keeps its own best)")
    return dest


class _RunConfigCallback(SaveConfigCallback):
    """Lightning's ``config.yaml`` writer, into the run's own folder
    (:func:`~segpipe.tracking.run_output_dir`): with MLflow or W&B, ``trainer.log_dir`` is the
    store every run shares, where each run overwrote the last one's config. Without a logger,
    ``validate`` and ``test`` write ``validate_config.yaml``/``test_config.yaml`` beside the
    fit's ``config.yaml``."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if self.already_saved:
            return
        from segpipe.tracking import run_output_dir

        out = run_output_dir(trainer)
        name = self.config_filename
        stage = str(getattr(stage, "value", stage))  # Lightning may pass its TrainerFn
        if trainer.logger is None and stage != "fit":
            # Without a logger every command writes into default_root_dir: a test's config
            # replaced the fit's there.
            name = f"{stage}_{name}"
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(out / name), skip_none=False,
                             overwrite=self.overwrite, multifile=self.multifile)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class _FitLock(Callback):
    """A file in the checkpoint folder that names the fit writing there (machine and process,
    as temporary files name theirs), so that a second fit into the same folder (a job started
    twice, a requeued job whose old process still runs) stops instead of moving the live run's
    checkpoints aside while both keep writing ``last.ckpt`` (two started at the same moment
    both stop, neither writes). Taken when the fit sets up (after
    the data check, before any checkpoint moves), touched every :attr:`REFRESH_S` seconds while
    it trains or validates, removed when it ends or fails. A killed fit's is stale: at once on
    its own machine (its process is gone), after :attr:`STALE_S` unchanged seconds from another
    machine sharing the folder (:func:`~segpipe.fileio.is_stale_temporary`)."""

    SUFFIX = "-fit.lock"
    REFRESH_S = 60.0
    STALE_S = 300.0

    def __init__(self, ckpt_dir: Path) -> None:
        self.ckpt_dir = ckpt_dir
        self.path: Path | None = None
        self._touched = 0.0

    def _other_fit(self) -> str | None:
        """The message naming another live fit's lock, or None (stale locks are removed)."""
        from segpipe.fileio import own_temporary_prefix

        mine = own_temporary_prefix()
        for lock in self.ckpt_dir.glob(f"{TMP_PREFIX}*{self.SUFFIX}"):
            if lock.name.startswith(mine):
                continue
            if is_stale_temporary(lock, self.STALE_S):
                lock.unlink(missing_ok=True)
                continue
            try:
                owner = lock.read_text().split()
            except OSError:
                owner = []
            who = f"process {owner[1]} on {owner[0]}" if len(owner) == 2 else "another process"
            return (f"another segpipe fit ({who}) is writing checkpoints to {self.ckpt_dir} "
                    f"(its lock: {lock.name}); wait for it to end, or give this run another "
                    "--trainer.default_root_dir (or --checkpoint.dirpath)")
        return None

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self.path is not None:
            return
        import socket

        from segpipe.fileio import _temp_name

        error = None
        if trainer.is_global_zero:
            # Lock first, then look for others: two fits started together each see the other's
            # lock and both stop, where looking first let both pass and both write.
            self.path = self.ckpt_dir / _temp_name(TMP_PREFIX, self.SUFFIX)
            self.path.write_text(f"{socket.gethostname()} {os.getpid()}\n")
            self._touched = time.monotonic()
            error = self._other_fit()
            if error:
                self._release()
        error = trainer.strategy.broadcast(error)  # every rank stops, none waits on the others
        if error:
            raise OutputDirError(error)

    def _refresh(self) -> None:
        if self.path is not None and time.monotonic() - self._touched > self.REFRESH_S:
            self._touched = time.monotonic()
            try:
                os.utime(self.path)  # alive, for fits on other machines sharing the folder
            except OSError:
                pass

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._refresh()

    def on_validation_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._refresh()  # a validation longer than STALE_S must not make the lock look stale

    def _release(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def teardown(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        self._release()


class _MonitorNames(Callback):
    """Refuse a ``checkpoint.monitor`` or a ReduceLROnPlateau's ``monitor`` that validation does
    not log (``val/miou``) once the sanity check has validated, before the first epoch: Lightning
    found it only at the first epoch's end, with a hint about ``self.log``, and lost the epoch
    (no ``last.ckpt``)."""

    def on_sanity_check_end(self, trainer: Trainer, pl_module: Any) -> None:
        from segpipe.metrics import validation_metric_names

        names = getattr(pl_module, "class_names", None)
        known = set(trainer.callback_metrics)
        if names:
            known |= validation_metric_names(names)
        watched = [("checkpoint.monitor" if i == 0 else "a ModelCheckpoint's monitor", cb.monitor)
                   for i, cb in enumerate(trainer.checkpoint_callbacks)
                   if isinstance(cb, ModelCheckpoint) and cb.monitor]
        watched += [("model.lr_scheduler.monitor" if getattr(c.scheduler, "monitor", None)
                     else "model.monitor (ReduceLROnPlateau's metric)", c.monitor)
                    for c in trainer.lr_scheduler_configs if c.monitor]
        for option, monitor in watched:
            if not str(monitor).startswith("val/") or monitor in known:
                continue  # train/ metrics appear only once training logs them
            import difflib

            close = difflib.get_close_matches(monitor, sorted(known), n=1, cutoff=0.7) or \
                [k for k in sorted(known) if k.lower() == str(monitor).lower()]
            hint = f"did you mean {close[0]}? " if close else ""
            plain = sorted(k for k in known if k.startswith("val/") and k.count("/") == 1)
            raise ConfigError(
                f"{option} {monitor} is not a metric validation logs; {hint}it logs "
                f"{', '.join(plain)}"
                " (the *_mean_over_cases ones when images belong to cases) and, per class, "
                "val/IoU/<class>, val/Dice/<class>")


class _SetAsideCheckpoints(Callback):
    """Move an earlier run's checkpoints (a new fit) or the ones a killed run wrote after its
    resume point (a resumed fit) into ``earlier-K``, when training starts: after every option,
    the data and the model were checked, before ``model.init_from`` is read."""

    def __init__(self, ckpt_dir: Path, dest: Path | None = None, resume: Path | None = None,
                 weights_only: bool = True) -> None:
        self.ckpt_dir, self.dest, self.resume, self.weights_only = ckpt_dir, dest, resume, weights_only

    def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            if self.resume is not None:
                set_aside_unrecorded_checkpoints(self.ckpt_dir, self.resume, self.weights_only)
            else:
                set_aside_earlier_checkpoints(self.ckpt_dir, self.dest)
        # Every process reads model.init_from (moved with the others) after the move.
        trainer.strategy.barrier("segpipe-set-aside-checkpoints")


def _checkpoint_bytes(model: torch.nn.Module) -> int:
    """Rough size of one checkpoint: weights, two optimiser moments per weight, buffers."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return 3 * params + buffers + 2**20


#: Network options the CLI sets from the data section (``link_arguments``).
_LINKED_NET_ARGS = ("num_classes", "in_channels")


def _given_raw(argv: list[str], dotted: str) -> tuple[Any, str] | None:
    """The value of option ``dotted`` (``trainer.limit_train_batches``) as written on the
    command line (a string) or in a ``--config`` file (as YAML reads it), with where; the later
    one where several give it. None when none does. It tells apart what jsonargparse's types
    merge: a value given for a link's target (dropped without a word), an integer read as a
    float."""
    found: tuple[Any, str] | None = None
    for i in range(len(argv)):
        value = option_at(argv, i, f"--{dotted}")
        if value is not None:
            found = (value, "the command line")
        config = _config_at(argv, i)
        given = _ABSENT if config is None else _lookup(config[1], dotted)
        if config is not None and given is not _ABSENT:
            found = (given, config[0])
    return found


def _given_net_links(argv: list[str]) -> dict[str, tuple[str, str]]:
    """``model.net.init_args.num_classes``/``in_channels`` as given on the command line or in
    a ``--config`` file, ``{key: (value, where)}`` (the later one where both are): jsonargparse
    drops a value given for a link's target without a word."""
    found: dict[str, tuple[str, str]] = {}
    for key in _LINKED_NET_ARGS:
        given = _given_raw(argv, f"model.net.init_args.{key}")
        if given is not None:
            found[key] = (str(given[0]), given[1])
    return found


def _one_batch_limits(cfg: Any, argv: list[str]) -> list[str]:
    """The ``trainer.limit_*_batches`` given as the integer 1: one batch in Lightning (an int
    counts batches, a float is a fraction), but Lightning types them ``float | int`` and
    jsonargparse reads 1 as the float 1.0, every batch (the Trainer is given these as 1)."""
    trainer = cfg.get("trainer")
    if trainer is None or not hasattr(trainer, "get"):
        return []
    keys = []
    for stage in ("train", "val", "test", "predict"):
        key = f"limit_{stage}_batches"
        value = trainer.get(key)
        if not isinstance(value, float) or value != 1.0:
            continue
        given = _given_raw(argv, f"trainer.{key}")
        raw = given[0] if given is not None else None
        if (isinstance(raw, int) and not isinstance(raw, bool) and raw == 1) or (
                isinstance(raw, str) and raw.strip() == "1"):
            keys.append(key)
    return keys


def _check_net_links(cfg: Any, argv: list[str]) -> None:
    """Refuse a ``model.net.init_args.num_classes``/``in_channels`` that differs from the data
    section's, which the CLI links into the network and which would silently win (a 5-class
    head asked for, a 2-class one trained; a 1-channel net asked for on grey images, a
    3-channel one built)."""
    data = cfg.get("data")
    init = data.get("init_args") if data is not None and hasattr(data, "get") else None
    if init is None or not hasattr(init, "get"):
        return
    for key, (value, where) in _given_net_links(argv).items():
        linked = init.get(key)
        if linked is None or str(value).strip() == str(linked):
            continue
        if key == "num_classes" and str(value).strip() == "1":  # a single-logit binary head
            raise ConfigError(
                f"model.net.init_args.num_classes=1 (in {where}): segpipe's networks give one "
                f"logit per class, background included, so a binary task is data.num_classes 2 "
                f"(softmax over two logits); leave model.net.init_args.num_classes out: the "
                f"CLI sets it from data.num_classes ({linked})")
        raise ConfigError(
            f"model.net.init_args.{key}={value} (in {where}) is set from data.{key}, which is "
            f"{linked}: the CLI links it into the network; give --data.{key} {value} (or "
            f"data: {key}: {value} in the config) instead")


def _logger_dirs(logger: Any) -> list[str]:
    """``save_dir`` of configured loggers (class_path/init_args), when given. MLflow's is
    left to :func:`_check_loggers`: it is a store only without a tracking URI (its default,
    ``./mlruns``, would otherwise be made in the working folder and never used)."""
    items = logger if isinstance(logger, list) else [logger]
    out = []
    for item in items:
        if str(getattr(item, "class_path", "") or "").rsplit(".", 1)[-1] == "MLFlowLogger":
            continue
        init = getattr(item, "init_args", None)
        save_dir = getattr(init, "save_dir", None) if init is not None else None
        if save_dir:
            out.append(str(save_dir))
    return out


#: Logger classes whose package a normal install lacks: the install command that brings it.
_LOGGER_PACKAGES = {"MLFlowLogger": ("mlflow", "pip install 'segpipe[tracking]'"),
                    "WandbLogger": ("wandb", "pip install wandb"),
                    "CometLogger": ("comet_ml", "pip install comet-ml"),
                    "NeptuneLogger": ("neptune", "pip install neptune")}


def _check_mlflow_class_names(class_names: Sequence[str] | None) -> None:
    """MLflow takes metric names of ``[A-Za-z0-9_/. -]`` only, and Lightning's MLFlowLogger
    drops every other character: a class named in another script became ``val/Dice/``, which
    mlflow refused at the first validation (the epoch lost, a traceback), and names alike
    but for such characters merged into one metric."""
    if not class_names:
        return
    keys: dict[str, str] = {}
    for name in map(str, class_names):
        key = re.sub(r"[^a-zA-Z0-9_/. -]+", "", name)
        if not key.strip() or key in keys:
            why = ("has no character MLflow keeps in a metric name" if not key.strip() else
                   f"logs under the same metric name as {keys[key]!r} ({key!r})")
            raise ConfigError(
                f"data.class_names: {name!r} {why}: MLflow takes letters A-Z, digits and "
                "_/. - only, and Lightning's MLFlowLogger drops the rest; give the classes such "
                "names (e.g. data.class_names [background, plant, building]) or use another "
                "logger (TensorBoard and CSV keep them)")
        keys[key] = name


def _check_loggers(logger: Any, class_names: Sequence[str] | None = None) -> None:
    """A logger whose package is missing, an MLflow file store that cannot be written or is
    not allowed, or class names MLflow cannot log: one line each, before anything is built
    (Lightning's own messages come after about 100 lines of jsonargparse traceback)."""
    items = logger if isinstance(logger, list) else [logger]
    for item in items:
        class_path = str(getattr(item, "class_path", "") or "")
        name = class_path.rsplit(".", 1)[-1]
        if name in _LOGGER_PACKAGES:
            package, install = _LOGGER_PACKAGES[name]
            if importlib.util.find_spec(package) is None:
                raise ConfigError(f"--trainer.logger {name} needs the {package} package: {install}")
        if name != "MLFlowLogger":
            continue
        # mlflow 3 looks up its telemetry server (config.mlflow-telemetry.io) even for a run in
        # a local folder: off unless the user asks for it (MLFLOW_DISABLE_TELEMETRY=false)
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        _check_mlflow_class_names(class_names)
        init = getattr(item, "init_args", None)
        save_dir = getattr(init, "save_dir", None) or "./mlruns"
        uri = str(getattr(init, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI", "")
                  or f"file:{save_dir}")
        if uri.startswith("file:"):
            path = uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):]
            check_output_dir(path, "the MLflow store", "trainer.logger.init_args.tracking_uri")
            if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("1", "true"):
                raise ConfigError(
                    f"MLflow's file store ({uri}) needs MLFLOW_ALLOW_FILE_STORE=true in the "
                    "environment (mlflow keeps it in maintenance mode); set it, or give "
                    "--trainer.logger.init_args.tracking_uri a server or sqlite:///mlflow.db")


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (before Lightning sets up; launchers set these variables)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class SegpipeCLI(LightningCLI):
    """LightningCLI with segpipe's checkpointing, metric writer and data→model links.

    On top of LightningCLI: checkpoints are written atomically and read with
    ``weights_only=True`` (:class:`~segpipe.callbacks.SafeCheckpointIO`; ``--weights_only
    false`` opts into a full unpickle of trusted files; unset means true), and the output
    folders are checked for write access and room before anything is built. Only public
    LightningCLI hooks are overridden.
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict is segpipe's own command (it works from a checkpoint alone).
        return {k: v for k, v in LightningCLI.subcommands().items() if k in {"fit", "validate", "test"}}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any],
                     subparser_kwargs: dict[str, Any]) -> None:
        """LightningCLI's parsers, with safe loading of ``--ckpt_path`` as the shown default."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:
            for sub in self.subcommands():
                if "weights_only" in inspect.signature(getattr(self.trainer_class, sub)).parameters:
                    self.parser.set_defaults({f"{sub}.weights_only": True})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then read ``--ckpt_path``'s hyperparameters with segpipe's loading rules.

        LightningCLI (privately) re-reads the checkpoint named by ``ckpt_path`` after parsing,
        always with ``weights_only=True`` and letting torch's long unpickling error through.
        Here, with public hooks only: ``best``/``last`` in a new ``test``/``validate`` process
        resolve to the run's files, a refused file raises
        :class:`~segpipe.callbacks.UnsafeCheckpointError` naming it, ``--weights_only false`` is
        honoured for trusted files, and the hyperparameters are merged into the config. The
        path is then held back from Lightning's re-reading and handed to the trainer again in
        :meth:`before_instantiate_classes`.
        """
        super().parse_arguments(parser, args)
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, (list, tuple)):
            for option, config in _overridden_by_a_later_config([str(a) for a in argv]):
                rank_zero_warn(
                    f"{option} comes before --config {config}, which sets it too, so the "
                    "file's value is used (an option overrides only the config files given "
                    "before it): put --config first")
        self._ckpt_path: str | None = None
        self._ckpt_bands: list[int] | None = None  # the checkpoint's data.bands, if any
        self._resumes_last = False  # fit --ckpt_path last, with a last.ckpt to resume from
        if not self.config.get("subcommand"):
            return
        cfg = self.config[self.config.subcommand]
        _expand_home(cfg)
        if "ckpt_path" not in cfg:
            return
        given = (command_line_value([str(a) for a in argv], "--ckpt_path")
                 if isinstance(argv, (list, tuple)) else None)
        if given is not None:  # over a config given after it: a run's config.yaml says null
            cfg.ckpt_path = None if given.lower() in ("", "null", "none") else given
        if self.config.subcommand == "fit" and cfg.get("ckpt_path") == "last":
            self._resumes_last = (_checkpoint_dir(cfg) / "last.ckpt").is_file()
        weights_only = cfg.get("weights_only") is not False
        if self._resumes_last:  # the run's settings, as from the same file named by its path
            self._merge_checkpoint_settings(parser, _checkpoint_dir(cfg) / "last.ckpt",
                                            weights_only)
            return
        if self.config.subcommand != "fit" and cfg.get("ckpt_path") in ("best", "last"):
            # In a new process Lightning knows no best model; find the run's files instead.
            cfg.ckpt_path = resolve_checkpoint_alias(cfg.ckpt_path, _checkpoint_dir(cfg), weights_only)
        ckpt_path = cfg.get("ckpt_path")
        if (self.config.subcommand in ("validate", "test") and ckpt_path in (None, "")
                and not (cfg.get("model") or {}).get("init_from")):
            rank_zero_warn(
                f"{self.config.subcommand} without --ckpt_path scores the network as the config "
                "builds it, with untrained weights; give --ckpt_path best, last or a .ckpt file "
                "(or --model.init_from FILE)")
        if self.config.subcommand == "fit" and ckpt_path == "best":
            raise CheckpointNotFoundError(
                "fit --ckpt_path best: a fit resumes a run from its last state; use --ckpt_path "
                "last (or a .ckpt file), or --model.init_from BEST.ckpt to start a new run from "
                "a best checkpoint's weights")
        if ckpt_path in (None, "", "last", "hpc") or str(ckpt_path).startswith("registry") \
                or "://" in str(ckpt_path):  # Lightning reads remote checkpoints (s3://, https://)
            return
        if not Path(ckpt_path).is_file():
            where = "is a folder" if Path(ckpt_path).is_dir() else "does not exist"
            raise CheckpointNotFoundError(
                f"--ckpt_path {ckpt_path} {where}; give a .ckpt file, or best / last for the "
                "run in --trainer.default_root_dir")
        self._merge_checkpoint_settings(parser, Path(ckpt_path), weights_only)
        self._ckpt_path = str(ckpt_path)
        self.config[self.config.subcommand].ckpt_path = None  # restored before instantiation

    def _merge_checkpoint_settings(self, parser: LightningArgumentParser, ckpt_path: Path,
                                   weights_only: bool) -> None:
        """Take the model's settings from the checkpoint's hyperparameters, as LightningCLI
        does: a test scores the network that was trained, a resumed fit goes on as its run
        began (its optimiser state is restored anyway). A setting this command gave otherwise
        (in its config or on the command line) is not used, and is named in one warning with
        the way to use it: a new run from the checkpoint's weights (``--model.init_from``).
        The options of :data:`_THIS_RUNS` are this command's, never the checkpoint's."""
        sub = self.config.subcommand
        # Only the hyperparameters are needed: the weights are mapped, not read (the trainer
        # reads them when it restores the run).
        ckpt = load_checkpoint_file(ckpt_path, map_location="cpu", weights_only=weights_only,
                                    mmap=True)
        spec = (ckpt.get("hyper_parameters") or {}).get("data_spec")
        self._ckpt_bands = spec.get("bands") if isinstance(spec, Mapping) else None
        # Another class or channel count first: merged with this run's data, the checkpoint's
        # class_weights were refused as "4 values but 3 classes", which no option given fixes.
        data = self.config[sub].get("data") or {}
        data = data.get("init_args") or data  # segpipe's or another class_path's arguments
        check_spec_fits(recorded_spec(ckpt.get("hyper_parameters"),
                                      ckpt.get("datamodule_hyper_parameters")),
                        data.get("num_classes"), data.get("in_channels"))
        hparams = dict(ckpt.get("hyper_parameters", {}) or {})
        hparams.pop("_instantiator", None)
        for name in _THIS_RUNS:
            hparams.pop(name, None)
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        if not hparams:
            return
        given = _settings_given(self.config[sub].model,
                                self._subcommand_parsers[sub].get_defaults().get("model"))
        try:
            self.config = parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing of the hyperparameters in {ckpt_path} failed!\n")
            raise
        merged = self.config[sub].model
        replaced = {key: (value, merged.get(key)) for key, value in given.items()
                    if key in merged and not _same_setting(merged.get(key), value)}
        if replaced:
            shown = "; ".join(f"model.{key} {_shown(now)} (given: {_shown(was)})"
                              for key, (was, now) in replaced.items())
            fix = (f"to train with other settings, start a new run from its weights with "
                   f"--model.init_from {ckpt_path}" if sub == "fit" else
                   "the checkpoint's are those it was trained with")
            rank_zero_warn(f"--ckpt_path {ckpt_path}: {sub} uses the checkpoint's settings "
                           f"where this command gave others: {shown}; {fix}")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/mIoU",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": _BEST_FILENAME,
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(TestMetricsWriter, "metrics_writer")
        # The data section states classes and input once: the network gets its num_classes and
        # in_channels from there, the task the whole spec (saved in every checkpoint).
        # Any LightningDataModule may be given (``data.class_path``); segpipe's is the default,
        # so configs may give its arguments directly under ``data:``.
        parser.set_defaults({"data": {"class_path": _DEFAULT_DATA}})
        parser.link_arguments("data.init_args.num_classes", "model.net.init_args.num_classes")
        parser.link_arguments("data.init_args.in_channels", "model.net.init_args.in_channels")
        parser.link_arguments(tuple(f"data.init_args.{k}" for k in _SPEC_ARGS),
                              "model.data_spec", compute_fn=_data_spec)

    def _set_seed(self) -> None:
        """``seed_everything: true`` draws a random seed, as its help says (Lightning's seeds 0
        without ``PL_GLOBAL_SEED``, so two "random" runs were the same); the seed drawn is
        saved in the run's config.yaml. DDP's processes read it from ``PL_GLOBAL_SEED``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("seed_everything") is True and "PL_GLOBAL_SEED" not in os.environ:
            import random

            config["seed_everything"] = random.SystemRandom().randrange(2**31)
            rank_zero_info(f"seed_everything true: seed {config['seed_everything']}")
        super()._set_seed()

    def before_instantiate_classes(self) -> None:
        self._set_aside: _SetAsideCheckpoints | None = None  # see _check_outputs
        self._init_from: str | None = None  # a new fit's model.init_from, see _check_outputs
        self._fit_lock: _FitLock | None = None  # see _check_outputs
        # Checkpoints live in one unversioned folder per run root so `--ckpt_path last` finds them.
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else self.config
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = str(_checkpoint_dir(cfg))
        if "weights_only" in cfg and cfg.weights_only is None:
            cfg.weights_only = True  # safe loading of --ckpt_path; false opts out
        if getattr(self, "_ckpt_path", None):
            cfg.ckpt_path = self._ckpt_path  # held back in parse_arguments
        last = Path(cfg.checkpoint.dirpath) / "last.ckpt"
        if subcommand == "fit" and cfg.get("ckpt_path") == "last" and not last.is_file():
            # Lightning would start over with a hint about ModelCheckpoint(save_last=True).
            earlier = sorted(last.parent.glob("earlier-*/last.ckpt"),
                             key=lambda p: p.stat().st_mtime)
            hint = (f" (the newest earlier run there resumes with --ckpt_path {earlier[-1]} "
                    f"--checkpoint.dirpath {earlier[-1].parent})" if earlier else "")
            rank_zero_info(
                f"--ckpt_path last: no {last} yet, so this fit starts a new run (as a requeued "
                "job's first start does); if you meant to resume, check "
                f"--trainer.default_root_dir{hint}")
            cfg.ckpt_path = None
        self._check_bands_given(cfg, subcommand)
        if subcommand == "validate":
            model = cfg.get("model")
            asked = [f"--model.{key} {model.get(key)}" for key in ("test_tta", "test_tta_scales", "bn_adapt")
                     if model is not None and hasattr(model, "get") and model.get(key)]
            if asked:
                rank_zero_warn(
                    f"{' and '.join(asked)} {'apply' if len(asked) > 1 else 'applies'} to "
                    "segpipe test only: validate scores the "
                    "plain model, as training's validation does; run segpipe test for those "
                    "figures (on a data root without a test split it scores the val split)")
        self._split_step_checkpoint(cfg)
        _name_monitored_metric(cfg.checkpoint)
        _checkpoint_mode(cfg.checkpoint, sys.argv[1:])
        _check_net_links(cfg, sys.argv[1:])
        self._one_batch = _one_batch_limits(cfg, sys.argv[1:])
        self._check_nulls(cfg)
        if subcommand == "fit":
            _check_bounded(cfg.get("trainer"))
        self._check_data_root(cfg)
        self._check_outputs(cfg, subcommand)

    def _check_bands_given(self, cfg: Any, subcommand: str | None) -> None:
        """A validate or test of a checkpoint trained on some of its files' bands needs
        ``data.bands``: without it the files' own bands were read (and the check's fix
        suggested the first ones, which scored as wrong bands do)."""
        bands = getattr(self, "_ckpt_bands", None)
        if subcommand not in ("validate", "test") or not bands or reads_leading_bands(bands):
            return  # none, or the files' own first bands: reading them all is the same
        class_path, args = _data_section(cfg)
        if class_path not in _SEGPIPE_DATA_PATHS:
            return  # a data module of the user's own (a subclass too) may choose its bands
        if args.get("bands") is None:
            shown = "[" + ", ".join(str(int(b)) for b in bands) + "]"
            raise ConfigError(
                f"the checkpoint was trained on bands {shown} of its files (data.bands), but "
                f"this {subcommand} gives no data.bands: pass --data.bands '{shown}' (or, for "
                "files whose bands lie otherwise, the bands of these files that hold the same "
                "data), or the run's config.yaml")

    @staticmethod
    def _check_nulls(cfg: Any) -> None:
        """A ``null`` for an option of segpipe's data module or task that takes none: one line
        naming it and its default, not a traceback from deep in the constructor."""
        from segpipe.data import SegmentationDataModule
        from segpipe.tasks import SegmentationTask

        sections = [("data", cfg.get("data"), SegmentationDataModule),
                    ("model", cfg.get("model"), SegmentationTask)]
        for prefix, section, cls in sections:
            if section is None or not hasattr(section, "get"):
                continue
            args = section.get("init_args", section)
            class_path = section.get("class_path")
            if class_path is not None and prefix == "data" and not _is_segpipe_data_module(
                    str(class_path)):
                continue
            if class_path is not None and prefix == "model" and str(class_path).rsplit(
                    ".", 1)[-1] != "SegmentationTask":
                continue
            try:
                hints = typing.get_type_hints(cls.__init__)
            except Exception:  # noqa: BLE001 - an annotation that does not resolve: no check
                continue
            params = inspect.signature(cls.__init__).parameters
            for name, param in params.items():
                hint = hints.get(name)
                if hint is None or args.get(name, param.default) is not None:
                    continue
                if param.default is None or type(None) in typing.get_args(hint) or hint is Any:
                    continue
                raise ConfigError(
                    f"{prefix}.{name} cannot be null; give a value "
                    f"(its default is {param.default!r})" if param.default is not
                    inspect.Parameter.empty else f"{prefix}.{name} cannot be null; give a value")

    @staticmethod
    def _check_data_root(cfg: Any) -> None:
        """Stop before anything is built when ``data.root`` is not there (the first mistake a
        newcomer makes: a config's placeholder root)."""
        data = cfg.get("data")
        class_path = data.get("class_path") if data is not None and hasattr(data, "get") else None
        if class_path is not None and not _is_segpipe_data_module(str(class_path)):
            return  # a module of the user's (torchgeo's may create its root on download)
        data = data.get("init_args") if data is not None and hasattr(data, "get") else None
        root = data.get("root") if data is not None and hasattr(data, "get") else None
        if root is None or Path(str(root)).expanduser().is_dir():
            return
        layout = data.get("layout") or "folder"
        raise DataRootError(
            f"data root {root} does not exist or is not a folder; the {layout!r} layout expects "
            f"{LAYOUT_HELP.get(layout, 'its folders there')}. Set --data.root to the folder that "
            "holds the data."
        )

    def _split_step_checkpoint(self, cfg: Any) -> None:
        """Hand ``checkpoint.save_last`` (and ``every_n_train_steps``) to :class:`LastCheckpoint`.

        Lightning 2.6's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when the
        monitored metric improves, and ``every_n_train_steps`` would stop its epoch-end saves and
        rank ``best-*`` by the val metric of the previous epoch. So with a monitor, the
        ``checkpoint`` callback keeps choosing ``best-*`` after each validation and segpipe's
        :class:`~segpipe.callbacks.LastCheckpoint` writes ``last.ckpt`` after every validation
        and every ``every_n_train_steps`` steps. The options are switched off for the
        instantiated ``ModelCheckpoint`` only; the saved ``config.yaml`` keeps them as given.
        """
        ck = cfg.checkpoint
        self._last_checkpoint: dict[str, Any] | None = None
        if ck.get("save_last") is not True or ck.get("monitor") is None:
            return  # "link", off, or no monitor: Lightning's own behaviour
        steps = ck.get("every_n_train_steps")
        if steps and (ck.get("every_n_epochs") is not None or ck.get("train_time_interval") is not None):
            return  # a custom trigger combination: leave it to Lightning
        self._last_checkpoint = {"save_last": True, "every_n_train_steps": steps}
        ck.save_last = False
        ck.every_n_train_steps = None

    def _check_outputs(self, cfg: Any, subcommand: str | None) -> None:
        """Fail before anything is built when an output folder cannot be written."""
        root = cfg.trainer.default_root_dir or "."
        for folder in (root, cfg.checkpoint.dirpath):  # removed again if the command fails empty
            top = _first_missing(Path(folder)) if folder else None
            if top is not None:
                _MADE_DIRS.append(top)
        check_output_dir(root, "logs, configs and metrics", "trainer.default_root_dir")
        if is_rank_zero():
            # Unfinished metric/report writes of a killed run (not a live process's).
            for stale in Path(root).glob(f"lightning_logs/version_*/{TMP_PREFIX}*"):
                try:
                    if is_stale_temporary(stale):
                        stale.unlink()
                except OSError:
                    pass
        _check_loggers(cfg.trainer.get("logger"), _data_section(cfg)[1].get("class_names"))
        for save_dir in _logger_dirs(cfg.trainer.get("logger")):
            check_output_dir(save_dir, "logs", "trainer.logger.init_args.save_dir")
        logs = Path(root) / "lightning_logs"  # the default loggers' version_N go in there
        if cfg.trainer.get("logger") in (None, True) and logs.is_dir():
            check_output_dir(logs, "logs", "trainer.default_root_dir")
        if subcommand in (None, "fit"):
            ckpt_dir = check_output_dir(cfg.checkpoint.dirpath, "checkpoints", "checkpoint.dirpath")
            if is_rank_zero():
                # Leftovers of checkpoint writes that a killed run did not finish (a live
                # fit's, writing into the same folder, are kept).
                for stale in ckpt_dir.glob(f"{TMP_PREFIX}*{PARTIAL_SUFFIX}"):
                    if is_stale_temporary(stale):
                        stale.unlink(missing_ok=True)
            if cfg.trainer.get("fast_dev_run"):
                return  # a smoke test writes no checkpoint: no lock, and the run's stay put
            self._fit_lock = _FitLock(ckpt_dir)  # on every rank: its verdict is broadcast
            # Earlier checkpoints are moved when training starts (a bad option value or bad
            # data stops the run before, and leaves them where they are). Every process makes
            # the same decision (they all start before the move), so each reads init_from
            # where the file will be; rank 0 moves them.
            if cfg.get("ckpt_path") is None:  # a new run, not a resumed one
                dest = earlier_checkpoints_dest(ckpt_dir)
                self._init_from = cfg.get("model", {}).get("init_from")  # checked before the move
                init = self._init_from if dest else None
                if init and Path(init).resolve().parent == ckpt_dir.resolve():
                    cfg.model.init_from = str(dest / Path(init).name)  # it moves too
                if dest is not None:
                    self._set_aside = _SetAsideCheckpoints(ckpt_dir, dest=dest)
            else:
                resume = ckpt_dir / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
                other = ckpt_dir / "last.ckpt"
                if resume.is_file() and resume.resolve().parent != ckpt_dir.resolve() \
                        and other.is_file():
                    raise OutputDirError(
                        f"--ckpt_path {resume} resumes a run kept in {resume.parent}, but this fit "
                        f"writes its checkpoints to {ckpt_dir}, whose last.ckpt is another run's "
                        f"and would be overwritten; add --checkpoint.dirpath {resume.parent} to "
                        "continue that run in its own folder")
                if resume.is_file():
                    self._set_aside = _SetAsideCheckpoints(
                        ckpt_dir, resume=resume, weights_only=cfg.get("weights_only") is not False)

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; with ``--ckpt_path`` the network's pretrained encoder
        weights are not read (the checkpoint's weights replace them), so testing or resuming
        works on a machine without the weights cache."""
        if getattr(self, "_ckpt_path", None) or getattr(self, "_resumes_last", False):
            from segpipe.models.smp import no_pretrained_weights

            with no_pretrained_weights():
                super().instantiate_classes()
        else:
            super().instantiate_classes()

    def after_instantiate_classes(self) -> None:
        """Check a new fit's ``model.init_from`` against the built network (mapped, not read),
        so that a missing, unreadable or unfitting file stops the fit before an earlier run's
        checkpoints are set aside; the weights are loaded when training starts."""
        super().after_instantiate_classes()
        init = getattr(self, "_init_from", None)
        net = getattr(self.model, "net", None)
        if init and isinstance(net, torch.nn.Module):
            from segpipe.tasks.finetune import load_init_from

            load_init_from(net, init, dry_run=True)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with :class:`~segpipe.callbacks.SafeCheckpointIO` for checkpoints and,
        for ``checkpoint.save_last``, a :class:`~segpipe.callbacks.LastCheckpoint`."""
        last = getattr(self, "_last_checkpoint", None)
        if last:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            for key, value in last.items():  # the saved config.yaml shows the options as given
                cfg.checkpoint[key] = value
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if cfg.trainer.get("logger") in (None, True) and "logger" not in kwargs:
            root = cfg.trainer.default_root_dir or "."
            version = None
            if is_rank_zero():  # reserved; removed again if the command fails before it logs
                logs = Path(root) / "lightning_logs"
                top = _first_missing(logs)
                version = next_version(root, reserve=True)
                top = top or (logs / f"version_{version}").expanduser().absolute()
                if not any(top.is_relative_to(d) for d in _MADE_DIRS):
                    _MADE_DIRS.append(top)
            kwargs["logger"] = default_loggers(root, version)
        for key in getattr(self, "_one_batch", ()):  # jsonargparse made these 1.0: all
            kwargs.setdefault(key, 1)
        trainer = super().instantiate_trainer(**kwargs)
        install_safe_checkpoint_io(trainer)
        for logger in trainer.loggers:
            if type(logger).__name__ == "MLFlowLogger" and getattr(logger, "_run_name", "") is None:
                # mlflow draws its random run names after seed_everything: every run the same
                logger._run_name = (f"{self.subcommand or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
                                    f"-{os.getpid()}")
        set_aside = getattr(self, "_set_aside", None)
        if set_aside is not None:  # first, before TransferLearning reads model.init_from
            trainer.callbacks.insert(0, set_aside)
        lock = getattr(self, "_fit_lock", None)
        if lock is not None:  # first: it must stop a second fit before anything is moved
            trainer.callbacks.insert(0, lock)
        for i, callback in enumerate(trainer.callbacks):
            # Lightning's default bar (or one configured with its defaults): refreshed by time
            # instead of after every step, so the host does not wait for the GPU at each step.
            default_bar = type(callback) is TQDMProgressBar and callback.refresh_rate == 1
            if default_bar and callback.process_position == 0:
                trainer.callbacks[i] = ThrottledProgressBar()
        # before LearningRateMonitor: it logs the rate AnnealToDeadline sets for the step
        trainer.callbacks.append(AnnealToDeadline())  # plans DeadlineCosineLR's schedule
        if trainer.loggers:  # training you can watch: learning rate and val/test pictures
            trainer.callbacks.extend(  # unless configured in trainer.callbacks
                kind() for kind in (LearningRateMonitor, ValidationImages, TestFigures)
                if not any(isinstance(c, kind) for c in trainer.callbacks))
        trainer.callbacks.append(_InterruptRecorder())  # Ctrl-C: say what was kept, exit 130
        sigterm = SynchronisedSigterm()  # SIGTERM stops every DDP process at the same step
        sigterm.install(trainer)
        trainer.callbacks.append(sigterm)
        trainer.callbacks.append(LateCrop())  # data.late_crop_size, at its point of that plan
        trainer.callbacks.append(_MonitorNames())  # a misspelt monitor, before the first epoch
        if last:
            main_ckpt = self._get(self.config_init, "checkpoint")
            trainer.callbacks.append(
                LastCheckpoint(
                    main_ckpt.dirpath,
                    every_n_train_steps=last["every_n_train_steps"],
                    save_weights_only=main_ckpt.save_weights_only,
                )
            )
        return trainer

    def before_fit(self) -> None:
        """Check that the checkpoint folder has room for the checkpoints of this model, and
        switch validation off for a data module that trains on its val split
        (``data.train_on_val``)."""
        callbacks = [cb for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        dirs = [Path(cb.dirpath) for cb in callbacks if cb.dirpath is not None]
        _FIT_RECORD.update(started=True, resumed=bool(cfg.get("ckpt_path")),
                           before={d: _mtime(d / "last.ckpt") for d in dirs})
        if getattr(self.datamodule, "validates", True) is False:
            self.trainer.limit_val_batches = 0
            self.trainer.num_sanity_val_steps = 0
            for cb in callbacks:  # nothing to rank by: last.ckpt (LastCheckpoint) is the model
                if cb.monitor is not None and cb.monitor.startswith("val"):
                    cb.save_top_k = 0
            rank_zero_info("No validation (data.train_on_val): checkpoints are last.ckpt only, "
                           "and --ckpt_path best means it")
        need = 2 * _checkpoint_bytes(self.model)
        for cb in callbacks:
            if cb.dirpath is not None:
                check_output_dir(cb.dirpath, "checkpoints", "checkpoint.dirpath", need_bytes=need)


#: What an interrupted fit can say of its checkpoints (see :func:`interrupted_fit_line`).
_FIT_RECORD: dict[str, Any] = {}


def _mtime(path: Path) -> int | None:
    """``path``'s modification time in nanoseconds, or None when it is not there."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


class _InterruptRecorder(Callback):
    """Notes a Ctrl-C (Lightning shuts down and exits with 1, as after a crash), so that the
    command can say what was kept and exit with 130 (:func:`was_interrupted`)."""

    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            _FIT_RECORD["interrupted"] = True


def was_interrupted() -> bool:
    """Whether the last command run here was stopped by Ctrl-C (SIGINT)."""
    return bool(_FIT_RECORD.get("interrupted"))


def interrupted_fit_line() -> str:
    """What a ``fit`` stopped by a signal keeps: its ``last.ckpt``, the checkpoint it resumed
    from, or nothing yet (it said "the last checkpoint written is intact" when there was none,
    and an earlier run's had been moved to ``earlier-K`` by then)."""
    if not _FIT_RECORD.get("started"):  # stopped before training was set up: nothing written
        return "nothing was trained or written; rerun the same command"
    for folder, before in _FIT_RECORD.get("before", {}).items():
        now = _mtime(folder / "last.ckpt")  # changed, not "newer than our clock": on NFS
        if now is not None and now != before:  # the server's clock may lag the node's
            return f"{folder / 'last.ckpt'} is intact: resume with --ckpt_path last"
    if _FIT_RECORD.get("resumed"):
        return "the checkpoint it resumed from is intact: resume with --ckpt_path last again"
    return "no checkpoint of this run was written yet: rerun the same command to start over"


#: The best checkpoint's file name, with the metric it was selected on (the default monitor).
_BEST_FILENAME = "best-epoch{epoch:03d}-mIoU{val/mIoU:.4f}"


def _check_bounded(trainer: Any) -> None:
    """Say when nothing ends a fit: Lightning then trains 1000 epochs (the shipped configs
    leave ``max_epochs`` null and budget ``max_time``, so ``--trainer.max_time null`` alone
    does it)."""
    if trainer is None or not hasattr(trainer, "get"):
        return
    steps = trainer.get("max_steps")
    if trainer.get("max_time") is None and trainer.get("max_epochs") is None and \
            (steps is None or steps < 0) and not trainer.get("fast_dev_run"):
        rank_zero_warn(
            "no trainer.max_time, max_epochs or max_steps ends this fit: Lightning trains "
            "1000 epochs (and a schedule plans over them); give one, e.g. --trainer.max_time "
            "00:00:30:00 or --trainer.max_epochs 100")


def _checkpoint_mode(checkpoint: Any, argv: list[str]) -> None:
    """Give ``checkpoint.mode`` the direction of ``checkpoint.monitor`` when it was not given:
    ``--checkpoint.monitor val/loss`` kept the default ``max`` (for val/mIoU), so ``best`` was
    the epoch of the largest loss. A mode given against the metric's direction is warned of."""
    from segpipe.metrics import monitor_mode

    monitor = checkpoint.get("monitor")
    wanted = monitor_mode(monitor) if monitor else None
    if wanted is None or checkpoint.get("mode") == wanted:
        return
    if _given_raw(argv, "checkpoint.mode") is None:
        checkpoint.mode = wanted
        rank_zero_info(f"checkpoint.mode {wanted}: checkpoint.monitor {monitor} is "
                       f"{'smaller' if wanted == 'min' else 'larger'} when the model is better")
    else:
        rank_zero_warn(
            f"checkpoint.mode {checkpoint.get('mode')} keeps the checkpoint whose {monitor} is "
            f"the {'largest' if wanted == 'min' else 'smallest'}, the worst one: give "
            f"--checkpoint.mode {wanted}")


def _name_monitored_metric(checkpoint: Any) -> None:
    """Put a ``checkpoint.monitor`` other than ``val/mIoU`` in the best checkpoint's default
    file name (``best-epoch012-mDice_mean_over_cases0.8312.ckpt``), where the name had shown
    the mIoU of a checkpoint chosen by something else."""
    monitor = checkpoint.get("monitor")
    if checkpoint.get("filename") != _BEST_FILENAME or monitor in (None, "val/mIoU") or \
            any(c in str(monitor) for c in "{}[]:"):  # not a key Lightning's format can read
        return
    short = re.sub(r"[^\w.-]+", "-", str(monitor).removeprefix("val/")).strip("-") or "metric"
    checkpoint.filename = f"best-epoch{{epoch:03d}}-{short}{{{monitor}:.4f}}"


_SEGPIPE_DIR = Path(__file__).resolve().parent


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """segpipe's own warnings as ``segpipe: warning: MESSAGE``, without the source file, line
    and statement that Python (or Lightning, for a file named ``lightning*``) prints with
    them: they are about the user's data and options, not about segpipe's code. Other
    warnings keep the format they had (:data:`_LIBRARY_FORMAT`)."""
    if Path(filename).resolve().is_relative_to(_SEGPIPE_DIR):
        return f"segpipe: warning: {message}\n"
    return _LIBRARY_FORMAT(message, category, filename, lineno, line)


#: ``warnings.formatwarning`` as Lightning left it (for other libraries' warnings).
_LIBRARY_FORMAT = warnings.formatwarning


class _NoTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ..." lines (offers of its cloud services)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def run_cli(args: Sequence[str], callbacks: Sequence[Callback] = ()) -> SegpipeCLI:
    """Run ``segpipe fit|validate|test`` with ``args`` and return the CLI (trainer, model, data).

    Args:
        args: Command-line arguments after ``segpipe``.
        callbacks: Callback objects added to the trainer's (after those from the config), for
            callers in Python such as benchmarks and notebooks.
    """
    _FIT_RECORD.clear()  # what a stopped command kept is this command's
    quiet_disk_full_in_threads()  # TensorBoard's writer thread: the command says it, once
    warnings.formatwarning = _format_warning
    tune_allocator()
    fit_threads_to_cpus()
    # segpipe keeps the checkpoint folder itself (an earlier run's files go to earlier-K when
    # training starts, after Lightning has looked), so this warning would only alarm.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    if args and args[0] in ("test", "validate"):
        # best-checkpoint bookkeeping of a training run, meaningless when scoring a checkpoint
        # kept in another folder than this run's
        warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
    # "Seed set to 0" on every command, before any one-line error: the seed is in config.yaml.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    # Lightning's advertisement for its cloud logger, on every command.
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_NoTips())
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "segpipe", *args]  # LightningCLI reads sys.argv
    defaults: dict[str, Any] = {"precision": default_precision()}
    if callbacks:
        defaults["callbacks"] = list(callbacks)
    try:
        # No abbreviations (a misspelt --data.rot would be taken for --data.rotate90) and
        # plain-text help with short lists.
        kwargs = {"formatter_class": HelpFormatter, "allow_abbrev": False, "exit_on_error": False}
        return SegpipeCLI(
            SegmentationTask,
            LightningDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            trainer_defaults=defaults,
            save_config_callback=_RunConfigCallback,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**kwargs, **{sub: dict(kwargs) for sub in ("fit", "validate", "test")}},
            # One way to set the optimiser and scheduler: model.optimizer/model.lr_scheduler.
            auto_configure_optimizers=False,
        )
    except BaseException:
        _remove_empty_folders(_MADE_DIRS)  # a command stopped by a bad option leaves no folders
        raise
    finally:
        _MADE_DIRS.clear()
        sys.argv = saved_argv
