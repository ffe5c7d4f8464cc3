"""``segpipe demo driving``: config, arguments, smoke runs on tiny CamVid-like data, real data (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from segpipe.demos import download as dl
from segpipe.demos import main as demo_main
from segpipe.fileio import OutputDirError
from segpipe.demos.driving import (
    demo_config,
    load_camvid_config,
    max_time_string,
    run_driving_demo,
)
from tests.data.synthetic import make_camvid_like
from tests.demos.conftest import make_fake_segnet_zip

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_reads_the_shipped_config() -> None:
    """The repository's configs/ is the package's segpipe/configs (which the wheel holds), so
    the demo needs no copy of its own."""
    yaml_cfg = yaml.safe_load((REPO / "configs" / "camvid_unet.yaml").read_text(encoding="utf-8"))
    cfg, source = load_camvid_config()
    assert cfg == yaml_cfg and Path(source) == REPO / "segpipe" / "configs" / "camvid_unet.yaml"
    assert cfg is not load_camvid_config()[0]  # a fresh dict each time


def test_max_time_string() -> None:
    assert max_time_string(30) == "00:00:30:00"
    assert max_time_string(0.5) == "00:00:00:30"
    assert max_time_string(90) == "00:01:30:00"
    assert max_time_string(60 * 24 + 1) == "01:00:01:00"


def test_demo_config_keeps_the_camvid_settings(tmp_path: Path) -> None:
    cfg = demo_config(tmp_path / "camvid", tmp_path / "run", max_minutes=12)
    assert cfg["data"]["root"] == str(tmp_path / "camvid") and cfg["data"]["layout"] == "camvid"
    assert cfg["data"]["eval_resize"] == [180, 240]  # half size; scored at the full 480x360
    assert cfg["trainer"]["max_time"] == "00:00:12:00"
    assert cfg["trainer"]["default_root_dir"] == str(tmp_path / "run")
    for key in ("class_weights", "loss", "optimizer"):
        assert cfg["model"][key] == load_camvid_config()[0]["model"][key]
    assert cfg["data"]["crop_size"] == 160 and cfg["data"]["ignore_index"] == 11


def test_needs_data_dir_or_download(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        demo_main(["driving"])
    assert info.value.code == 2 and "--data_dir DIR or --download" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo_main(["driving", "--data-dir", str(tmp_path), "--download"])


def test_missing_data_dir_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_main(["driving", "--data-dir", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "--download" in err
    make_camvid_like(tmp_path / "camvid", n_val=0)
    assert demo_main(["driving", "--data-dir", str(tmp_path / "camvid"), "--output", str(tmp_path)]) == 2
    assert "val is missing or holds no frames" in capsys.readouterr().err


def _check_outputs(result, n_predicted: int) -> None:  # noqa: ANN001
    assert result.metrics_path is not None and result.metrics_path.name == "test_metrics.json"
    assert result.report_path is not None and result.report_path.name == "report.md"
    assert set(result.metrics["IoU_per_class"]) == set(load_camvid_config()[0]["data"]["class_names"])
    assert result.checkpoint.is_file() and result.config.is_file()
    assert result.summary_path is not None and result.summary_path.is_file()
    masks = sorted(p for p in result.predictions_dir.glob("*.png") if not p.stem.endswith("_palette"))
    assert len(masks) == n_predicted
    assert len(list(result.predictions_dir.glob("*_overlay.jpg"))) == n_predicted
    assert len(list(result.predictions_dir.glob("*_palette.png"))) == n_predicted


def test_smoke_with_test_split(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               caplog: pytest.LogCaptureFixture) -> None:
    data = make_camvid_like(tmp_path / "camvid", n_train=6, n_val=3, n_test=3, void_index=11)
    with caplog.at_level("INFO", logger="segpipe"):
        result = run_driving_demo(data, tmp_path / "out", smoke=True)
    out = capsys.readouterr().out
    # the masks are made over the views segpipe test scored (the config's five sizes and flip)
    assert "segpipe test scored this model's mean over other views" not in caplog.text
    assert ("Each frame is scored, and its masks made, on the mean prediction over 5 sizes "
            "(0.5-1.5 x the evaluation size), each with the training's flips") in out
    assert "--format mask overlay --tta --tta_scales 0.5 0.75 1 1.25 1.5\n" in out
    assert result.eval_split == "test" and result.counts == {"train": 6, "val": 3, "test": 3}
    assert result.metrics["num_images"] == 3
    assert "Scores below are on 3 held-out test frames" in out
    assert "val  mIoU, macro (mean over the classes present), best epoch:" in out
    assert "test mIoU, macro" in out and "pixel accuracy, micro" in out and "IoU per class" in out
    assert "no test split" not in out
    assert str(result.report_path) in out
    _check_outputs(result, n_predicted=3)
    from PIL import Image

    first = sorted(result.predictions_dir.glob("0001TP_*[0-9].png"))[0]
    assert Image.open(first).size == (48, 36)  # full frame size, no resize


def test_smoke_download_without_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--download`` from a file:// mirror of a copy without test/: evaluation falls back to val."""
    counts = {"train": 4, "val": 2}
    archive = make_fake_segnet_zip(tmp_path / "mirror" / "camvid.zip", counts=counts)
    monkeypatch.setattr(dl, "CAMVID_COUNTS", counts)
    cache = tmp_path / "cache"
    rc = demo_main(["driving", "--download", "--cache", str(cache), "--url", archive.as_uri(),
                    "--output", str(tmp_path / "out"), "--smoke"])
    assert rc == 0
    out = capsys.readouterr().out
    assert (cache / "CamVid" / dl.MANIFEST_NAME).is_file()
    assert "has no test/ split: the scores below are on val" in out
    assert "This copy of CamVid has no test split, so the scores below are on 2 val frames" in out
    metrics = json.loads(next((tmp_path / "out").rglob("test_metrics.json")).read_text())
    scored = sum(v is not None for v in metrics["IoU_per_class"].values())
    assert f"val  mIoU, macro (mean over the {scored} classes with a score):" in out
    assert str(cache / "CamVid") in out
    assert (tmp_path / "out" / "summary.txt").read_text().strip() in out
    # A frame damaged in the cache after its verification: fit's data check names it in one
    # line (it was a traceback), and says the file is the download's.
    frame = sorted((cache / "CamVid" / "train").glob("*.png"))[1]
    frame.write_bytes(frame.read_bytes()[:60])
    rc = demo_main(["driving", "--download", "--cache", str(cache), "--url", archive.as_uri(),
                    "--output", str(tmp_path / "out2"), "--smoke"])
    err = capsys.readouterr().err
    assert rc == 2 and "DataCheckError" not in err  # no traceback
    assert "segpipe demo driving: error: data check found 1 problem" in err
    assert frame.name in err
    assert (f"(the frames are the download's, in {cache}: if one is damaged, delete that folder "
            "and run the demo with --download again)") in err


def test_download_cache_and_hash_are_checked_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file where the cache folder goes was a FileExistsError traceback; a mistyped --sha256
    cost a whole download before the archive was deleted as corrupted."""
    archive = make_fake_segnet_zip(tmp_path / "mirror" / "camvid.zip", counts={"train": 4,
                                                                              "val": 2})
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc = demo_main(["driving", "--download", "--cache", str(blocker), "--url", archive.as_uri(),
                    "--output", str(tmp_path / "out"), "--smoke"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{blocker} is a file, not a folder" in err and "--cache" in err
    with pytest.raises(SystemExit) as stop:
        demo_main(["driving", "--download", "--cache", str(tmp_path / "c"), "--url",
                   archive.as_uri(), "--sha256", "not-a-hash", "--smoke"])
    assert stop.value.code == 2
    assert "--sha256 must be 64 hexadecimal digits" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing fetched


def test_smoke_validates_and_predicts_the_held_out_sequence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The config holds sequence 0006R0 out (``data.val_cases``): the demo scores and predicts
    its frames, not the copy's val/ folder, which trains."""
    data = make_camvid_like(tmp_path / "camvid", n_train=6, n_val=3, void_index=11)
    for split in ("train", "trainannot"):
        for f in sorted((data / split).iterdir())[:2]:  # two frames of another sequence
            f.rename(f.with_name(f.name.replace("0001TP", "0006R0")))
    result = run_driving_demo(data, tmp_path / "out", smoke=True)
    out = capsys.readouterr().out
    assert result.eval_split == "val" and result.held_out == ["0006R0"]
    assert (result.num_train, result.num_val) == (7, 2)  # train/ + val/ less the held frames
    assert "Training a U-Net on 7 CamVid frames" in out
    assert "the 2 frames of sequence 0006R0, held out of training" in out
    assert "shares a video sequence" not in out
    predicted = sorted(p.name for p in result.predictions_dir.glob("*[0-9].png"))
    assert predicted and all(n.startswith("0006R0_") for n in predicted)


@pytest.mark.slow
@pytest.mark.realdata
def test_real_camvid_smoke(data_dir: Path, tmp_path: Path) -> None:
    """Smoke mode on the real CamVid copy (no test split): full 480x360 masks and an honest report."""
    camvid = data_dir / "camvid"
    if not camvid.is_dir():
        pytest.skip(f"{camvid} not found")
    result = run_driving_demo(camvid, tmp_path / "out", smoke=True)
    assert result.eval_split == "val" and result.counts == {"train": 367, "val": 101}
    # validated, scored and predicted on the held-out daytime sequence 0006R0 (in train/)
    assert result.held_out == ["0006R0"] and (result.num_train, result.num_val) == (367, 101)
    assert all(p.name.startswith("0006R0_") for p in result.predictions_dir.glob("*[0-9].png"))
    assert result.metrics["num_images"] == 4  # limit_test_batches=2 x eval_batch_size=2
    _check_outputs(result, n_predicted=4)
    from segpipe.data.io import read_mask

    mask = read_mask(sorted(result.predictions_dir.glob("*[0-9].png"))[0])
    assert mask.shape == (360, 480) and int(np.max(mask)) <= 10


def test_an_earlier_runs_predictions_are_not_counted_as_this_runs(tmp_path: Path) -> None:
    """Frames another run predicted stayed beside the new ones, and the summary counted them."""
    data = make_camvid_like(tmp_path / "camvid", n_train=6, n_val=3, n_test=3, void_index=11)
    stale = tmp_path / "out" / "predictions" / "Seq99_000000.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x89PNG")
    result = run_driving_demo(data, tmp_path / "out", smoke=True)
    assert not stale.exists()
    assert sorted(p.name for p in result.predictions_dir.glob("*.png")
                  if not p.stem.endswith(("_palette", "_overlay")))[0].startswith("0001TP_")
    (tmp_path / "other" / "predictions").mkdir(parents=True)
    (tmp_path / "other" / "predictions" / "notes.txt").write_text("keep")
    with pytest.raises(OutputDirError, match="holds files the demo did not write"):
        run_driving_demo(data, tmp_path / "other", smoke=True)
    assert (tmp_path / "other" / "predictions" / "notes.txt").read_text() == "keep"
