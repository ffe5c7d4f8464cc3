"""segpipe.demos.driving on tiny CamVid-like data, with ``segpipe fit``/``test``/``predict``
faked (no training): budgets, data checks, the checkpoint it scores, the frames it predicts and
its summary."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from segpipe.demos import main as demo_main
from segpipe.demos.driving import (
    DrivingDemoResult,
    demo_config,
    load_camvid_config,
    run_driving_demo,
    summary_lines,
)
from segpipe.fileio import OutputDirError
from tests.data.synthetic import make_camvid_like


class _Fake:
    """Stands in for ``run_cli`` (fit, test) and ``segpipe.cli.main`` (predict)."""

    def __init__(self, checkpoint_age: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.checkpoint_age = checkpoint_age

    def run_cli(self, argv: list[str]) -> Any:
        self.calls.append(argv)
        if argv[0] == "fit":
            cfg = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
            ckpt = Path(cfg["trainer"]["default_root_dir"]) / "checkpoints" / "best.ckpt"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_bytes(b"x")
            t = time.time() - self.checkpoint_age
            os.utime(ckpt, (t, t))
            cb = SimpleNamespace(best_model_path=str(ckpt), last_model_path="", best_model_score=0.5)
            return SimpleNamespace(trainer=SimpleNamespace(checkpoint_callback=cb, callbacks=[]))
        return SimpleNamespace(trainer=SimpleNamespace(callbacks=[]))

    def predict(self, argv: list[str]) -> int:
        self.calls.append(argv)
        src, out = Path(argv[argv.index("--input") + 1]), Path(argv[argv.index("--output") + 1])
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir()):
            for name in (f"{f.stem}.png", f"{f.stem}_palette.png", f"{f.stem}_overlay.jpg"):
                (out / name).write_bytes(b"x")
        return 0


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> _Fake:
    from segpipe import cli, lightning_cli

    f = _Fake()
    monkeypatch.setattr(lightning_cli, "run_cli", f.run_cli)
    monkeypatch.setattr(cli, "main", f.predict)
    return f


def test_a_budget_of_zero_minutes_is_refused(tmp_path: Path) -> None:
    data = make_camvid_like(tmp_path / "camvid", n_train=2, n_val=1)
    with pytest.raises(ValueError, match="--minutes must be > 0"):
        run_driving_demo(data, tmp_path / "out", max_minutes=0)
    assert not (tmp_path / "out").exists()


def test_a_frame_without_a_label_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A training frame whose label is missing is a one-line error naming it (exit 2)."""
    data = make_camvid_like(tmp_path / "camvid", n_train=3, n_val=1, image_ext=".png")
    label = sorted((data / "trainannot").iterdir())[1]
    label.unlink()
    assert demo_main(["driving", "--data_dir", str(data), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'train' / label.name} has no label in {data / 'trainannot'}" in err


def test_a_predictions_folder_with_the_users_files_is_refused_before_training(
        tmp_path: Path, fake: _Fake) -> None:
    data = make_camvid_like(tmp_path / "camvid", n_train=3, n_val=1, n_test=1, void_index=11)
    (tmp_path / "out" / "predictions").mkdir(parents=True)
    (tmp_path / "out" / "predictions" / "notes.txt").write_text("keep")
    with pytest.raises(OutputDirError, match="holds files the demo did not write"):
        run_driving_demo(data, tmp_path / "out", smoke=True)
    assert fake.calls == []  # no training was spent first
    assert (tmp_path / "out" / "predictions" / "notes.txt").read_text() == "keep"


def test_a_stale_checkpoint_is_not_scored(tmp_path: Path, fake: _Fake) -> None:
    """A checkpoint older than the run (an earlier run's) is an error, not scored as this one."""
    data = make_camvid_like(tmp_path / "camvid", n_train=3, n_val=1, n_test=1, void_index=11)
    fake.checkpoint_age = 3600
    with pytest.raises(RuntimeError, match="training wrote no checkpoint"):
        run_driving_demo(data, tmp_path / "out", smoke=True)
    assert [c[0] for c in fake.calls] == ["fit"]


def test_smoke_predicts_only_the_first_few_test_frames(tmp_path: Path, fake: _Fake,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Smoke mode predicts 4 frames (copied apart), and the summary counts masks, not the colour
    masks beside them."""
    data = make_camvid_like(tmp_path / "camvid", n_train=3, n_val=1, n_test=6, void_index=11)
    result = run_driving_demo(data, tmp_path / "out", smoke=True)
    predict = fake.calls[-1]
    frames = Path(predict[predict.index("--input") + 1])
    assert frames != data / "test" and len(list(frames.iterdir())) == 4
    assert result.predictions_dir is not None
    assert any(line.endswith("(4 files)") for line in result.lines), result.lines
    assert "the first 4 test frames (smoke mode)" in capsys.readouterr().out


def test_smoke_config_has_no_time_limit(tmp_path: Path) -> None:
    """The smoke run's few steps are not cut short by a time budget (its max_minutes is ignored)."""
    cfg = demo_config(tmp_path / "camvid", tmp_path / "run", smoke=True, max_minutes=0.001)
    assert cfg["trainer"]["max_time"] is None and cfg["trainer"]["max_epochs"] == 1
    assert demo_config(tmp_path / "camvid", tmp_path / "run", max_minutes=0.001)["trainer"][
        "max_time"] == "00:00:00:01"


def _result(tmp_path: Path, eval_split: str, metrics: dict[str, Any]) -> DrivingDemoResult:
    return DrivingDemoResult(
        output=tmp_path, data_dir=tmp_path / "camvid", config=tmp_path / "config.yaml",
        checkpoint=tmp_path / "best.ckpt", eval_split=eval_split, counts={"train": 367, "val": 101},
        held_out=["0006R0"], num_train=367, num_val=101, val_mIoU=0.42, metrics=metrics,
        metrics_path=None, report_path=None, predictions_dir=None)


def test_summary_on_val_counts_the_scored_frames_and_has_no_separate_val_row(tmp_path: Path) -> None:
    """On a copy without test/, the scores are val's: the summary gives the number of frames
    actually scored (4 in smoke mode, not the 101 of the split) and no second "best epoch" val
    row beside them."""
    cfg = load_camvid_config()[0]
    metrics = {"num_images": 4, "mIoU": 0.5, "pixel_accuracy": 0.8, "mDice": 0.6,
               "IoU_per_class": {"Sky": 0.9, "Road": None}}
    text = "\n".join(summary_lines(_result(tmp_path, "val", metrics), cfg, smoke=True, max_minutes=30))
    assert "the scores below are on the 4 val frames of sequence 0006R0" in text
    row = "val  mIoU, macro (mean over the classes present), best epoch"
    assert row not in text and "val  mIoU, macro (mean over the 1 classes" in text
    test = _result(tmp_path, "test", {**metrics, "num_images": 233})
    text = "\n".join(summary_lines(test, cfg, smoke=False, max_minutes=30))
    assert "Scores below are on 233 held-out test frames" in text and row in text
