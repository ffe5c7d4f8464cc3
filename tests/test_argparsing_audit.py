"""Argument parsing shared by segpipe's commands: reading options out of an argument list,
argparse types, both spellings of an option, and values from ``--config`` files."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from segpipe.argparsing import (
    CommandParser,
    class_parameters,
    command_line_value,
    option_at,
    positive_int,
)
from segpipe.predict.command import build_parser as predict_parser

BASE = "ckpt_path: m.ckpt\ninput: in\noutput: out\n"


def test_the_last_option_given_on_the_command_line_wins() -> None:
    """As argparse does, the last of repeated ``--ckpt_path`` values is the one meant."""
    argv = ["fit", "--ckpt_path", "a.ckpt", "--config", "c.yaml", "--ckpt_path=b.ckpt"]
    assert command_line_value(argv, "--ckpt_path") == "b.ckpt"
    assert command_line_value(["fit", "--config", "c.yaml"], "--ckpt_path") is None


def test_option_at_reads_both_forms_and_nothing_else() -> None:
    """``--config FILE`` and ``--config=FILE`` give FILE; an option at the end without its value,
    and other options that merely start with the same letters, give nothing."""
    argv = ["--config", "a.yaml", "--config=b.yaml", "--data.root=x", "--data"]
    assert option_at(argv, 0, "--config") == "a.yaml"
    assert option_at(argv, 2, "--config") == "b.yaml"
    assert option_at(argv, 3, "--data") is None  # --data.root is another option
    assert option_at(argv, 4, "--data") is None  # no value follows
    assert option_at(["--configs=x"], 0, "--config") is None


def test_class_parameters_of_a_missing_module_is_empty() -> None:
    """A class path naming a module that is not installed gives no parameters (no ImportError)."""
    assert class_parameters("no_such_package_xyz.models.Net") == {}
    assert "num_classes" in class_parameters("tests.predict.nets.ThresholdNet")


def test_positive_int_refuses_zero() -> None:
    """Counts (images, steps, rounds) must be at least 1."""
    assert positive_int("1") == 1
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1, got 0"):
        positive_int("0")


def test_home_is_expanded_in_paths_the_shell_does_not_expand(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--input=~/x`` (no shell expansion after ``=``) and ``~`` in a --config file's values
    name paths in the user's home."""
    monkeypatch.setenv("HOME", str(tmp_path))
    a = predict_parser().parse_args(["--ckpt_path=~/m.ckpt", "--input=~/in", "--output", "o"])
    assert (a.ckpt_path, a.input) == (str(tmp_path / "m.ckpt"), str(tmp_path / "in"))
    cfg = tmp_path / "p.yaml"
    cfg.write_text("ckpt_path: m.ckpt\ninput: in\noutput: ~/out\n")
    assert predict_parser().parse_args(["--config", str(cfg)]).output == str(tmp_path / "out")


def test_an_option_documented_with_dashes_takes_the_underscore_spelling() -> None:
    """Both spellings work whichever one the option was declared with."""
    p = CommandParser(prog="segpipe x", config=False)
    p.add_argument("--data-dir")
    assert p.parse_args(["--data_dir", "/d"]).data_dir == "/d"
    assert p.parse_args(["--data_dir=/e"]).data_dir == "/e"


def test_config_given_with_an_equals_sign(tmp_path: Path) -> None:
    """``--config=FILE`` reads the file as ``--config FILE`` does."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(BASE + "batch_size: 3\n")
    a = predict_parser().parse_args([f"--config={cfg}"])
    assert (a.ckpt_path, a.batch_size) == ("m.ckpt", 3)


def test_an_empty_config_file_gives_nothing(tmp_path: Path) -> None:
    """An empty (or all-comment) --config file is no error: the command line gives the values."""
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("# nothing yet\n")
    a = predict_parser().parse_args(["--config", str(cfg), "--ckpt_path", "m", "--input", "i",
                                     "--output", "o"])
    assert (a.ckpt_path, a.batch_size) == ("m", predict_parser().get_default("batch_size"))


def test_config_keys_may_be_dashed(tmp_path: Path) -> None:
    """A key spelt like the dashed option (``batch-size: 2``) is that option."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(BASE + "batch-size: 2\nfail-fast: true\n")
    a = predict_parser().parse_args(["--config", str(cfg)])
    assert (a.batch_size, a.fail_fast) == (2, True)


@pytest.mark.parametrize("line, words", [
    ("tile: {size: 512}", "tile takes one value, got {'size': 512}"),
    ("accelerator: {name: cpu}", "accelerator takes one value"),
    ("batch_size: true", "batch_size must be a whole number, got True"),
    ("bn_adapt: true", "bn_adapt must be a number, got True"),  # was 1.0: full re-estimation
    ("overlap: false", "overlap must be a number, got False"),
])
def test_config_values_of_the_wrong_kind_are_one_line_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, words: str) -> None:
    """A mapping where one value is expected, or true/false for a number, is refused as on the
    command line (not turned into the string "{...}", the count 1 or the weight 1.0)."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(BASE + line + "\n")
    with pytest.raises(SystemExit) as exc:
        predict_parser().parse_args(["--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and words in err[0], err


def test_config_values_of_untyped_options_are_strings_as_typed(tmp_path: Path) -> None:
    """``precision: 16`` in a --config file gives the string "16", as ``--precision 16`` does."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text(BASE + "precision: 16\nstrategy: 1.5\n")
    a = predict_parser().parse_args(["--config", str(cfg)])
    assert (a.precision, a.strategy) == ("16", "1.5")
    assert a == predict_parser().parse_args(["--config", str(cfg), "--precision", "16"])
