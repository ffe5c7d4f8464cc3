"""The evaluation report: markdown numbers, absent classes, plots and the worst-image gallery."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest

from segpipe.data.io import write_image
from segpipe.fileio import TMP_PREFIX
from segpipe.report import REPORT_FILES_DIR, display_image, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(worst: list[dict] | None = None) -> dict:
    """A hand-made test report: 3 classes, 'bike' absent from truth and prediction."""
    return {
        "mIoU": 0.61234,
        "mDice": 0.70011,
        "micro_IoU": 0.81818,
        "pixel_accuracy": 0.9,
        "IoU_per_class": {"road": 0.8, "car": 0.42468, "bike": None},
        "Dice_per_class": {"road": 0.88889, "car": 0.51133, "bike": None},
        "class_names": ["road", "car", "bike"],
        "ignore_index": 255,
        "confusion_matrix": [[80, 20, 0], [5, 15, 0], [0, 0, 0]],
        "truth_share": [0.8, 0.2, 0.0],
        "pred_share": [0.85, 0.35, 0.0],
        "num_images": 2,
        "per_image": [
            {"path": "a.png", "IoU": 0.5, "Dice": 0.6, "pixel_accuracy": 0.9},
            {"path": "b.png", "IoU": 0.7, "Dice": 0.8, "pixel_accuracy": 0.95},
        ],
        "worst_images": worst or [],
    }


def _row(path: Path | str, h: int = 12, w: int = 16, iou: float = 0.25) -> dict:
    mask = np.zeros((h, w), dtype=np.int64)
    mask[: h // 2] = 1
    pred = np.zeros((h, w), dtype=np.int64)
    pred[: h // 3] = 1
    return {"path": str(path), "IoU": iou, "Dice": iou + 0.1, "pixel_accuracy": 0.8,
            "pred": pred, "mask": mask}


def test_report_numbers_tables_and_plots(tmp_path: Path) -> None:
    md_path = write_report(_report(), tmp_path, class_colors=[[0, 0, 0], [255, 0, 0], [0, 0, 255]])
    assert md_path == tmp_path / "report.md"
    md = md_path.read_text(encoding="utf-8")
    # Summary: every number labelled macro or micro.
    assert re.search(r"\| mIoU \| macro[^|]*\| 0\.6123 \|", md)
    assert re.search(r"\| mDice \| macro[^|]*\| 0\.7001 \|", md)
    assert re.search(r"\| micro_IoU \| micro[^|]*\| 0\.8182 \|", md)
    assert re.search(r"\| pixel_accuracy \| micro[^|]*\| 0\.9000 \|", md)
    # Per-class rows: IoU, Dice, truth and prediction pixel shares.
    assert "| 0 | road | 0.8000 | 0.8889 | 80.00 % | 85.00 % |" in md
    assert "| 1 | car | 0.4247 | 0.5113 | 20.00 % | 35.00 % |" in md
    # The absent class shows "—" with a note naming it.
    assert "| 2 | bike | — | — | 0.00 % | 0.00 % |" in md
    assert re.search(r"— : class absent from both ground truth and prediction.*\(bike\)", md)
    assert "ignore index **255**" in md
    assert "**2** test image(s)" in md and "eval_resize" not in md
    files = tmp_path / REPORT_FILES_DIR
    for name in ("confusion_matrix.png", "per_class_iou.png"):
        assert (files / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({REPORT_FILES_DIR}/{name})" in md
    with open(files / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == ["a.png", "b.png"] and rows[1]["IoU"] == "0.7"
    assert {"path", "IoU", "Dice"} <= set(rows[0])
    assert "| over 2 image(s) | 0.6000 | 0.6000 | 0.5000 | 0.7000 |" in md
    assert "No worst images recorded" in md
    assert not [p for p in tmp_path.rglob(f"{TMP_PREFIX}*")], "atomic writes leave no temp files"


def test_gallery_for_worst_images(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rgb = write_image(data / "rgb.png", np.full((12, 16, 3), 120, dtype=np.uint8))
    # Padded by the batch collate: the image is smaller, truth padded with the ignore index.
    small = write_image(data / "small.png", np.full((10, 13, 3), 60, dtype=np.uint8))
    padded = _row(small, iou=0.2)
    padded["mask"][10:, :] = 255
    padded["mask"][:, 13:] = 255
    # Evaluated at a resized size, 16-bit single band, 5-band float TIFF.
    big = write_image(data / "big.png", np.zeros((36, 48, 3), dtype=np.uint8))
    gray16 = write_image(data / "gray16.png", (np.arange(12 * 16).reshape(12, 16) * 50).astype(np.uint16))
    multi = write_image(data / "multi.tif", np.random.default_rng(0).random((12, 16, 5)).astype(np.float32))
    worst = [padded, _row(rgb, iou=0.21), _row(big, iou=0.22), _row(gray16, iou=0.23),
             _row(multi, iou=0.24), _row(data / "missing.png", iou=0.3)]
    md = write_report(_report(worst), tmp_path / "out").read_text(encoding="utf-8")
    panels = sorted((tmp_path / "out" / REPORT_FILES_DIR).glob("worst_*.png"))
    assert [p.name for p in panels] == [
        "worst_01_small.png", "worst_02_rgb.png", "worst_03_big.png", "worst_04_gray16.png",
        "worst_05_multi.png", "worst_06_missing.png",
    ]
    for p in panels:
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert f"({REPORT_FILES_DIR}/{p.name})" in md
    assert "| 1 | `" in md and "small.png` | 0.2000 | 0.3000 |" in md
    # The unreadable image is reported, not fatal; the resize is explained.
    assert re.search(r"#6 `[^`]*missing\.png`: could not read the image \(.*file not found", md)
    assert re.search(r"#3 `[^`]*big\.png`: image \(48×36\) resized to the evaluated size \(16×12\)", md)
    assert "#1 `" not in md.split("Notes:")[1].split("**#1**")[0]  # padding is silently cropped
    # A second report in the same folder (no logger: no version folder) keeps its own gallery.
    write_report(_report([_row(rgb, iou=0.5)]), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out" / REPORT_FILES_DIR).glob("worst_*.png")] == [
        "worst_01_rgb.png"]


def test_image_reader_is_used_and_may_fail(tmp_path: Path) -> None:
    calls: list[Path] = []

    def reader(path: Path) -> np.ndarray:
        calls.append(path)
        raise OSError("disk on fire")

    md = write_report(_report([_row("x/y.png")]), tmp_path, image_reader=reader).read_text()
    assert calls == [Path("x/y.png")]
    assert "could not read the image (disk on fire)" in md
    assert (tmp_path / REPORT_FILES_DIR / "worst_01_y.png").exists()


def test_display_image_bands_and_scaling() -> None:
    assert display_image(np.zeros((4, 5, 1), np.uint8)).shape == (4, 5, 3)
    out = display_image(np.arange(40, dtype=np.uint16).reshape(4, 5, 2))
    assert out.shape == (4, 5, 3) and out.min() == 0.0 and out.max() == 1.0  # stretched
    five = display_image(np.ones((4, 5, 5), np.float32) * 7)
    assert five.shape == (4, 5, 3) and np.all(five == 0)  # flat float band: no division by 0
    assert display_image(np.full((2, 2, 3), 255, np.uint8)).max() == 1.0


def test_report_names_the_split_scored_and_the_evaluation_size(tmp_path: Path) -> None:
    """Without a test split, `segpipe test` scores val: the report said "test image(s)"."""
    report = {**_report(), "scored_split": "val", "eval_resize": [24, 32]}
    md = write_report(report, tmp_path).read_text(encoding="utf-8")
    assert "**2** val image(s) (the data has no test split)" in md
    assert ("predicted at 32×24 (W×H, `data.eval_resize: [24, 32]`), scored against the masks "
            "at their native") in md
    nothing = {**_report(), "mIoU": None, "mDice": None, "micro_IoU": None,
               "pixel_accuracy": None, "warning": "no pixel of these images is labelled"}
    md = write_report(nothing, tmp_path).read_text(encoding="utf-8")
    assert "**Warning:** no pixel of these images is labelled." in md
    assert re.search(r"\| mDice \| macro[^|]*\| — \|", md)


def test_report_states_the_threshold_and_tabulates_the_sweep(tmp_path: Path) -> None:
    """A two-class model's report: the decision rule among the facts, and the sweep's table
    (the mean over cases column only when images belong to cases)."""
    sweep = {"class": "car", "thresholds": [0.3, 0.5], "Dice_pooled": [0.8, 0.75],
             "pixel_accuracy": [0.9, 0.95], "Dice_mean_over_cases": [0.7, None],
             "num_cases": [3, 0]}
    report = {**_report(), "decision": "car (class 1) where its probability > 0.3",
              "threshold_sweep": sweep}
    md = write_report(report, tmp_path).read_text(encoding="utf-8")
    assert "; labels: car (class 1) where its probability > 0.3." in md
    assert "| threshold | Dice car, pooled | pixel accuracy | Dice car, mean over cases |" in md
    assert "| 0.3 | 80.00 % | 90.00 % | 70.00 % |" in md and "| 0.5 | 75.00 % | 95.00 % | — |" in md
    sweep["Dice_mean_over_cases"] = None
    md = write_report(report, tmp_path).read_text(encoding="utf-8")
    assert "| threshold | Dice car, pooled | pixel accuracy |\n" in md
    assert "## Threshold sweep" not in write_report(_report(), tmp_path).read_text(encoding="utf-8")


def test_report_needs_class_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="class_names or IoU_per_class"):
        write_report({"mIoU": 0.5}, tmp_path)
    assert not os.listdir(tmp_path)


def test_a_second_test_in_one_folder_says_so_and_leaves_no_stale_case_csv(tmp_path: Path) -> None:
    """With --trainer.logger false every test writes to one folder: a second one replaced the
    first's files silently and left its test_per_case.csv (of other data) beside its own."""
    from types import SimpleNamespace

    import torch

    from segpipe.callbacks import TestMetricsWriter
    from segpipe.metrics import case_scores

    writer = TestMetricsWriter(report=False)
    trainer = SimpleNamespace(ckpt_path="last.ckpt", datamodule=None,
                              lightning_module=SimpleNamespace(spec=None))
    cases = case_scores({"p1": torch.tensor([[3, 0], [0, 2]])}, {"p1": 1}, ["bg", "fg"])
    first = {**_report(), "per_case": cases}
    writer._write(trainer, SimpleNamespace(test_report=first), tmp_path)
    assert (tmp_path / "test_per_case.csv").exists()
    with pytest.warns(UserWarning, match="replacing an earlier test's test_metrics.json"):
        writer._write(trainer, SimpleNamespace(test_report=_report()), tmp_path)
    assert not (tmp_path / "test_per_case.csv").exists()
    assert (tmp_path / "test_per_image.csv").exists()


def test_a_test_without_a_report_removes_an_earlier_tests_report(tmp_path: Path) -> None:
    """A test run with metrics_writer.report=false (or whose report failed) in a folder that
    holds an earlier test's report.md left that report beside its own test_metrics.json."""
    from types import SimpleNamespace

    from segpipe.callbacks import TestMetricsWriter

    trainer = SimpleNamespace(ckpt_path="last.ckpt", datamodule=None,
                              lightning_module=SimpleNamespace(spec=None))
    TestMetricsWriter()._write(trainer, SimpleNamespace(test_report=_report()), tmp_path)
    assert (tmp_path / "report.md").exists()
    writer = TestMetricsWriter(report=False)
    with pytest.warns(UserWarning, match="replacing an earlier test's"):
        writer._write(trainer, SimpleNamespace(test_report=_report()), tmp_path)
    assert not (tmp_path / "report.md").exists()
    assert writer.last_report_path is None
    assert (tmp_path / "test_metrics.json").exists()


def test_the_console_names_classes_the_table_has_no_row_for(tmp_path: Path, capsys) -> None:
    """A class absent from truth and prediction vanished from the console table: the JSON and
    the report said 'absent', the log looked as if it had been forgotten."""
    from types import SimpleNamespace

    from segpipe.callbacks import TestMetricsWriter

    trainer = SimpleNamespace(ckpt_path="last.ckpt", datamodule=None,
                              lightning_module=SimpleNamespace(spec=None))
    TestMetricsWriter(report=False)._write(trainer, SimpleNamespace(test_report=_report()),
                                           tmp_path)
    assert "(no row for bike: absent from both the truth and the predictions" in \
        capsys.readouterr().out


def test_plot_labels_shorten_long_class_names() -> None:
    """A 100-character class name took most of the confusion matrix's figure."""
    from segpipe.report import _axis_labels

    long = "x" * 100
    assert _axis_labels([long, "road"]) == ["x" * 27 + "…", "road"]
    assert len(_axis_labels([long], width=10)[0]) == 10
