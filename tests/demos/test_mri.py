"""``segpipe demo mri --smoke``: slices, fit, test (metrics + report) and predict, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("nilearn", reason="the MRI demo needs the demo extra: pip install 'segpipe[demo]'")
pytest.importorskip("nibabel", reason="the MRI demo needs the demo extra: pip install 'segpipe[demo]'")


def test_mri_demo_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from segpipe.demos.mri import CLASS_NAMES, run_mri_demo

    result = run_mri_demo(tmp_path / "mri", smoke=True)
    out = capsys.readouterr().out

    assert result.metrics_path is not None and result.metrics_path.name == "test_metrics.json"
    metrics = json.loads(result.metrics_path.read_text())
    assert set(metrics["IoU_per_class"]) == set(CLASS_NAMES)
    assert 0.0 <= metrics["mIoU"] <= 1.0 and metrics["num_images"] == 4  # max_per_split=4
    assert result.report_path is not None and result.report_path.name == "report.md"
    assert "mIoU" in result.report_path.read_text(encoding="utf-8")
    assert result.checkpoint.is_file()
    assert "=== segpipe MRI demo ===" in out and "mIoU (macro)" in out

    masks = sorted(p for p in result.masks_dir.rglob("*.png") if not p.stem.endswith("_palette"))
    assert len(masks) == 4
    assert len(list(result.masks_dir.rglob("*_overlay.jpg"))) == 4


def test_mri_demo_rerun_and_bad_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rerun in the same folder evaluates its own slices only; bad --output/--minutes and a
    failed step are one line each."""
    from segpipe.demos import main as demo_main

    out = tmp_path / "mri"
    stale = out / "data" / "test" / "images" / "slice_999.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x89PNG stale")
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "slice_999.png").write_bytes(b"x")
    assert demo_main(["mri", "--output", str(out), "--smoke"]) == 0
    assert not stale.exists() and not (out / "predictions" / "slice_999.png").exists()
    metrics = sorted(out.rglob("test_metrics.json"), key=lambda p: p.stat().st_mtime)[-1]
    assert json.loads(metrics.read_text())["num_images"] == 4
    # the README's main command run again: its own predictions (and predict's record of their
    # settings, which failed the second run at its last step) are replaced
    assert (out / "predictions" / ".segpipe-predict.json").is_file()
    assert demo_main(["mri", "--output", str(out), "--smoke"]) == 0
    capsys.readouterr()
    (tmp_path / "afile").write_text("x")
    for argv, words in (
        (["--output", str(tmp_path / "afile")], "is a file, not a folder"),
        (["--output", str(tmp_path / "m0"), "--minutes", "0"], "--minutes must be a number of minutes > 0"),
    ):
        try:
            code = demo_main(["mri", *argv])
        except SystemExit as exc:  # the parser's own errors
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and words in err and "Traceback" not in err, err
    # a folder holding the user's own files is not cleared
    (tmp_path / "mine" / "data").mkdir(parents=True)
    (tmp_path / "mine" / "data" / "notes.txt").write_text("keep")
    assert demo_main(["mri", "--output", str(tmp_path / "mine"), "--smoke"]) == 1
    assert "holds files the demo did not write" in capsys.readouterr().err
    assert (tmp_path / "mine" / "data" / "notes.txt").read_text() == "keep"
    (tmp_path / "mine2" / "predictions").mkdir(parents=True)  # refused before the training
    (tmp_path / "mine2" / "predictions" / "notes.txt").write_text("keep")
    assert demo_main(["mri", "--output", str(tmp_path / "mine2"), "--smoke"]) == 1
    captured = capsys.readouterr()
    assert "holds files the demo did not write" in captured.err and "[1/4]" not in captured.out


def test_a_missing_demo_extra_is_one_line_before_any_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """It exited with 1 and a bare message, after printing step 1 and making the folder."""
    import importlib.util

    from segpipe.demos import main as demo_main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nibabel" else find_spec(name, *a))
    assert demo_main(["mri", "--output", str(tmp_path / "out"), "--smoke"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "segpipe demo mri: error: the MRI demo needs the demo extra: pip install "
        "'segpipe[demo]' (missing: nibabel)")
    assert "[1/4]" not in captured.out and not (tmp_path / "out").exists()


def test_mri_demo_anneals_to_its_time_budget(tmp_path: Path) -> None:
    """The demo's cosine was set over its 40 epochs; on a machine where the time budget ended
    it after 6, the learning rate stood at 95 % of its start. It now anneals to whichever ends
    the run first (the budget and the epochs), as the shipped CPU configs do."""
    from segpipe.demos.mri import demo_config
    from segpipe.tasks.schedules import DeadlineCosineLR

    cfg = demo_config(tmp_path / "data", tmp_path / "run", smoke=False, max_minutes=90)
    assert cfg["trainer"]["max_time"] == "00:01:30:00"  # was "00:00:90:00"
    assert cfg["trainer"]["max_epochs"] == 40
    assert cfg["model"]["scheduler_interval"] == "step"
    assert cfg["model"]["lr_scheduler"]["class_path"] == (
        f"{DeadlineCosineLR.__module__}.{DeadlineCosineLR.__name__}")


def test_a_stopped_demo_says_so_and_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C during its training was "training failed", exit 1; an infinite --minutes was an
    OverflowError traceback after the slices were cut."""
    from segpipe import cli
    from segpipe.demos import main as demo_main

    fit = cli.main
    monkeypatch.setattr(cli, "main", lambda argv: 130 if argv[0] == "fit" else fit(argv))
    assert demo_main(["mri", "--output", str(tmp_path / "out"), "--smoke"]) == 130
    err = capsys.readouterr().err
    assert "segpipe demo mri: stopped by Ctrl-C (SIGINT) before it finished; the demo does not " \
        "resume" in err and "training failed" not in err, err
    with pytest.raises(SystemExit) as info:
        demo_main(["mri", "--output", str(tmp_path / "inf"), "--minutes", "inf"])
    assert info.value.code == 2 and not (tmp_path / "inf").exists()
    assert "--minutes must be a number of minutes > 0, got inf" in capsys.readouterr().err
