"""segpipe's own commands parse like `segpipe fit`: both spellings, --config, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from segpipe.argparsing import CommandParser
from segpipe.demos import build_parser as demo_parser
from segpipe.predict.command import build_parser as predict_parser


def test_both_spellings_and_the_documented_one(capsys: pytest.CaptureFixture[str]) -> None:
    p = predict_parser()
    a = p.parse_args(["--ckpt-path", "m.ckpt", "--input", "i", "--output", "o",
                      "--batch-size", "8", "--fail-fast", "--num_workers=2", "--no-progress"])
    assert (a.ckpt_path, a.batch_size, a.fail_fast, a.num_workers, a.progress) == (
        "m.ckpt", 8, True, 2, False)
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--batch_size" in out and "--batch-size BATCH" not in out and "``" not in out
    d = demo_parser().parse_args(["driving", "--data-dir", "/x", "--smoke"])
    assert str(d.data_dir) == "/x"


def test_config_file_gives_values_and_the_command_line_wins(tmp_path: Path) -> None:
    cfg = tmp_path / "predict.yaml"
    cfg.write_text("ckpt_path: m.ckpt\ninput: in\noutput: out\nbatch_size: 8\n"
                   "format: [mask, overlay]\ntta: true\n")
    a = predict_parser().parse_args(["--config", str(cfg), "--batch-size", "2"])
    assert (a.ckpt_path, a.input, a.output, a.batch_size, a.tta) == ("m.ckpt", "in", "out", 2, True)
    assert a.formats == ["mask", "overlay"]
    # a flag that turns something off means the same in the file as on the command line
    cfg.write_text("onnx: m.onnx\ninput: in\noutput: out\nno_progress: true\n")
    a = predict_parser().parse_args(["--config", str(cfg)])
    assert (a.onnx, a.progress) == ("m.onnx", False)
    cfg.write_text("ckpt_path: m.ckpt\ninput: in\noutput: out\nno_progress: false\n")
    assert predict_parser().parse_args(["--config", str(cfg)]).progress is True


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--input", "i", "--output", "o", "--ckpt_path", "m", "--batch_siz", "3"],
         "unrecognized arguments: --batch_siz 3"),  # never an abbreviation
        (["--input", "i"], "required"),
        (["--config", "nope.yaml"], "--config nope.yaml"),
    ],
)
def test_mistakes_are_one_line(argv: list[str], words: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        predict_parser().parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and words in err[0]
    assert err[0].startswith("segpipe predict: error:")


def test_unknown_config_key_lists_the_options(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("batch: 3\n")
    parser = CommandParser(prog="segpipe x")
    parser.add_argument("--batch_size", type=int)
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", str(cfg)])
    assert "unknown option 'batch'; options: batch_size" in capsys.readouterr().err


def test_config_values_are_checked_as_the_command_line_checks_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = "ckpt_path: m.ckpt\ninput: in\noutput: out\n"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(base + "format: mask\n")  # one string: one value, as on the command line
    assert predict_parser().parse_args(["--config", str(cfg)]).formats == ["mask"]
    cfg.write_text(base + "format: 'mask, palette'\ntta: false\n")
    a = predict_parser().parse_args(["--config", str(cfg)])
    assert a.formats == ["mask, palette"] and a.tta is False
    for line, words in [
        ('overwrite: "false"', "overwrite must be true or false, got 'false'"),  # no string flags
        ("tta: 1", "tta must be true or false, got 1"),
        ("tile: abc", "tile: invalid int value 'abc'"),
        ("batch_size: 2.7", "batch_size must be a whole number, got 2.7"),
        ("probs: maxx", "probs must be one of classes, max, got 'maxx'"),
        ("tile: [1, 2]", "tile takes one value, got [1, 2]"),
    ]:
        cfg.write_text(base + line + "\n")
        with pytest.raises(SystemExit) as exc:
            predict_parser().parse_args(["--config", str(cfg)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1, line
        assert err[0].startswith(f"segpipe predict: error: --config {cfg}: ") and words in err[0]


def test_a_typed_model_option_overrides_the_other_one_in_the_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--ckpt_path` and `--onnx` are one or the other. Typed on the command line, either one
    overrides the other one's value in --config (before, `onnx:` in the file won over a typed
    `--ckpt_path` and the ONNX model predicted, exit 0); both in the file is an error, as both
    typed is."""
    cfg = tmp_path / "p.yaml"
    cfg.write_text("onnx: exp/model.onnx\ninput: in\noutput: out\n")
    a = predict_parser().parse_args(["--config", str(cfg), "--ckpt_path", "run/last.ckpt"])
    assert (a.ckpt_path, a.onnx) == ("run/last.ckpt", None)
    a = predict_parser().parse_args(["--ckpt-path=run/last.ckpt", "--config", str(cfg)])
    assert (a.ckpt_path, a.onnx) == ("run/last.ckpt", None)
    cfg.write_text("ckpt_path: run/last.ckpt\ninput: in\noutput: out\n")
    a = predict_parser().parse_args(["--config", str(cfg), "--onnx", "exp/model.onnx"])
    assert (a.ckpt_path, a.onnx) == (None, "exp/model.onnx")
    cfg.write_text("ckpt_path: run/last.ckpt\nonnx: null\ninput: in\noutput: out\n")
    assert predict_parser().parse_args(["--config", str(cfg)]).ckpt_path == "run/last.ckpt"

    cfg.write_text("ckpt_path: run/last.ckpt\nonnx: exp/model.onnx\ninput: in\noutput: out\n")
    with pytest.raises(SystemExit) as exc:
        predict_parser().parse_args(["--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert f"--config {cfg}: ckpt_path and onnx cannot both be given; keep one" in err[0]


def test_at_least_is_an_argparse_type_with_a_one_line_error(capsys) -> None:
    """The bench scripts' --crop 0, --classes 0 or --workers -1 were tracebacks from deep inside."""
    import argparse

    from segpipe.argparsing import at_least

    p = argparse.ArgumentParser(prog="bench")
    p.add_argument("--workers", type=at_least(0))
    p.add_argument("--classes", type=at_least(2))
    assert p.parse_args(["--workers", "0", "--classes", "2"]).workers == 0
    for bad, said in ((["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
                      (["--classes", "1"], "argument --classes: must be >= 2, got 1"),
                      (["--classes", "x"], "argument --classes: expected a whole number, got 'x'")):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
        assert said in capsys.readouterr().err
