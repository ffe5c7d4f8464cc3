"""The ``segpipe`` dispatcher without a training run: the short version flag, where the usage
goes, shipped configs in the ``--config=FILE`` form, the user errors found behind the error
that hid them, suggestions for a misspelt option, the run config named for a checkpoint, and
segpipe's own log messages."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import pytest

from segpipe import cli
from segpipe.cli import main


def test_short_version_flag_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``segpipe -V`` is ``segpipe --version``: the version on stdout, exit 0."""
    from segpipe import __version__

    assert main(["-V"]) == 0
    assert capsys.readouterr().out.strip() == f"segpipe {__version__}"


def test_usage_without_a_command_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    """``segpipe`` alone is a usage error: the usage on stderr (nothing on stdout), exit 2;
    ``segpipe --help`` asked for it: stdout, exit 0."""
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: segpipe {fit,validate,test,")
    assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: segpipe ") and err == ""


def test_a_shipped_config_given_with_an_equals_sign_keeps_its_option(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--config=configs/folder_unet.yaml`` where there is no configs/ folder becomes
    ``--config=SHIPPED``, not a bare path the parser would take for a positional argument."""
    from segpipe.configs import FOLDER

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config=configs/folder_unet.yaml", "--trainer.max_epochs=1"]
    assert cli._shipped_configs(args) == [
        "fit", f"--config={FOLDER / 'folder_unet.yaml'}", "--trainer.max_epochs=1"]
    assert "using the one shipped with segpipe" in capsys.readouterr().err
    args = ["fit", "--config", "configs/folder_unet.yaml"]
    assert cli._shipped_configs(args) == ["fit", "--config", str(FOLDER / "folder_unet.yaml")]


def _raised_while_handling(first: Exception, second: Exception) -> Exception:
    """``second`` as raised inside the handler of ``first`` (so ``first`` is its context)."""
    try:
        try:
            raise first
        except type(first):
            raise second  # noqa: B904 - implicit context
    except type(second) as exc:
        return exc


def test_a_user_error_raised_before_another_error_is_still_one_line() -> None:
    """When the run's clean-up fails while handling a user error (Lightning finalising its
    loggers on a full disk), the user error's one line is given, not a traceback of the
    clean-up's error."""
    from segpipe.errors import ConfigError

    outer = _raised_while_handling(ConfigError("data.batch_size must be >= 1, got 0"),
                                   RuntimeError("logger finalisation failed"))
    assert cli.user_error(outer) == "data.batch_size must be >= 1, got 0"


def test_a_library_error_behind_another_error_is_translated() -> None:
    """Lightning's TypeError for ``--trainer.devices -1`` on a CPU is still translated into the
    one-line fix when another error was raised while handling it."""
    outer = _raised_while_handling(
        TypeError("`devices` selected with `CPUAccelerator` should be an int > 0."),
        RuntimeError("teardown failed"))
    text = cli.user_error(outer)
    assert text is not None and text.startswith("--trainer.devices on a CPU is a number")
    assert cli.user_error(RuntimeError("a bug")) is None  # a bug keeps its traceback


def test_a_typo_that_begins_several_options_gets_the_closest() -> None:
    """A misspelt option that begins one option is that option; one that begins several gets
    the closest by spelling, not whichever is listed first."""
    assert cli._close_name("max_ep", ["max_steps", "max_epochs", "max_time"]) == "max_epochs"
    names = ["num_classes_per_group", "num_classes"]
    assert cli._close_name("num_classe", names) == "num_classes"


def test_without_a_config_the_run_config_named_is_the_newest_before_the_checkpoint(
        tmp_path: Path) -> None:
    """``test --ckpt_path RUN/checkpoints/x.ckpt`` without ``--config``: the config named is the
    run's latest written before the checkpoint (the fit's), not an older fit's, nor one a later
    test wrote."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    now = time.time()
    configs = []
    for version, age in ((0, 300), (1, 200), (2, 10)):
        cfg = run / "lightning_logs" / f"version_{version}" / "config.yaml"
        cfg.parent.mkdir(parents=True)
        cfg.write_text("trainer: {}\n")
        os.utime(cfg, (now - age, now - age))
        configs.append(cfg)
    ckpt.write_bytes(b"x")
    os.utime(ckpt, (now - 100, now - 100))
    text = cli._network_from_a_run(["test", "--ckpt_path", str(ckpt)])
    assert f"--config {configs[1]})" in text, text


@contextlib.contextmanager
def bare_logging(root_handlers: list[logging.Handler]):
    """The root logger with ``root_handlers`` only and the ``segpipe`` logger without any (as
    in a fresh ``segpipe`` process), both restored afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("segpipe")
    saved_root, saved_ours, level = root.handlers[:], ours.handlers[:], ours.level
    root.handlers[:] = root_handlers
    ours.handlers[:] = []
    try:
        yield ours
    finally:
        root.handlers[:] = saved_root
        ours.handlers[:] = saved_ours
        ours.setLevel(level)


def test_segpipes_info_messages_are_shown_on_the_command_line() -> None:
    """In a program that set up no logging, segpipe's INFO messages (such as the tiling an
    export records) reach stderr."""
    with bare_logging([]) as ours:
        cli._show_segpipe_messages()
        assert len(ours.handlers) == 1 and ours.isEnabledFor(logging.INFO)


def test_a_program_that_configured_logging_keeps_its_setup() -> None:
    """A program that configured logging itself gets no second handler for segpipe (each
    message would show twice)."""
    with bare_logging([logging.NullHandler()]) as ours:
        cli._show_segpipe_messages()
        assert ours.handlers == []


def test_a_union_type_error_gives_the_first_cause_alone() -> None:
    """jsonargparse's error for a value no type of a Union accepts is one line with the key
    and the first type's reason, without the list of every other type it tried."""
    from typing import Optional, Union

    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data.size", type=Optional[Union[int, list[int]]])
    with pytest.raises(ArgumentError) as exc:
        parser.parse_args(["--data.size", "x"])
    line = cli._short_parse_error(str(exc.value))
    assert line == "Parser key \"data.size\": Expected a <class 'int'>", line


def test_the_none_an_optional_accepts_is_not_given_as_the_cause() -> None:
    """Of an Optional option's causes, "Expected a NoneType" (the null it also takes) is not
    the reason shown, wherever jsonargparse lists it."""
    text = ("Parser key \"model.net\":\n"
            "  Does not validate against any of the Union subtypes\n"
            "  Subtypes: [<class 'NoneType'>, <class 'torch.nn.Module'>]\n"
            "  Errors:\n"
            "    - Expected a <class 'NoneType'>\n"
            "    - Import path tests.nope does not exist\n"
            "  Given value type: <class 'str'>\n"
            "  Given value: tests.nope")
    assert cli._short_parse_error(text) == (
        "Parser key \"model.net\": Import path tests.nope does not exist")


def test_a_network_option_before_its_config_in_the_equals_form_is_named() -> None:
    """``--model.net.init_args.X`` typed before ``--config=FILE`` (the ``=`` form) is named as
    coming before the config that chooses the network, as before ``--config FILE``."""
    for config in (["--config=configs/folder_unet.yaml"], ["--config", "configs/folder_unet.yaml"]):
        text = cli._option_before_its_class(
            ["fit", "--model.net.init_args.depth=3", *config])
        assert text is not None and text.startswith(
            "--model.net.init_args.depth comes before the --config that chooses model.net")
    assert cli._option_before_its_class(
        ["fit", "--config=configs/folder_unet.yaml", "--model.net.init_args.depth=3"]) is None


def test_a_bad_file_met_in_a_loader_worker_is_its_own_message() -> None:
    """A bad image met in a DataLoader worker (torch re-raises it as a RuntimeError holding the
    worker's traceback) is one line: segpipe's message (file, reason, fix) without the
    exception's class name."""
    worker = RuntimeError(
        "Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        "call last):\n  File \"x.py\", line 1, in <module>\nsegpipe.data.io.ImageReadError: "
        "train/images/a.png: file is empty (0 bytes)")
    assert cli.user_error(worker) == "train/images/a.png: file is empty (0 bytes)"
