"""What the report's plots and per-case section show (found by mutation testing: the existing
tests checked that the PNG files exist, not what they draw)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import segpipe.report as report_module
from segpipe.metrics import case_scores
from segpipe.report import colorize_labels, write_report


def _report() -> dict:
    return {
        "mIoU": 0.61234, "mDice": 0.70011, "micro_IoU": 0.81818, "pixel_accuracy": 0.9,
        "IoU_per_class": {"road": 0.8, "car": 0.42468, "bike": None},
        "Dice_per_class": {"road": 0.88889, "car": 0.51133, "bike": None},
        "class_names": ["road", "car", "bike"], "ignore_index": 255,
        "confusion_matrix": [[80, 20, 0], [5, 15, 0], [0, 0, 0]],
        "truth_share": [0.8, 0.2, 0.0], "pred_share": [0.85, 0.15, 0.0],
        "num_images": 3,
        "per_image": [{"path": "a.png", "IoU": 0.1, "Dice": 0.2, "pixel_accuracy": 0.9},
                      {"path": "b.png", "IoU": 0.2, "Dice": 0.3, "pixel_accuracy": 0.9},
                      {"path": "c.png", "IoU": 0.9, "Dice": 0.95, "pixel_accuracy": 0.99}],
    }


@pytest.fixture()
def figures(monkeypatch):
    """Every figure the report saves, by file name."""
    saved: dict = {}
    original = report_module._save_figure

    def keep(fig, path):
        saved[path.name] = fig
        return original(fig, path)

    monkeypatch.setattr(report_module, "_save_figure", keep)
    return saved


def test_the_confusion_plot_normalises_rows_and_labels_each_cell_where_it_is(tmp_path, figures):
    write_report(_report(), tmp_path)
    ax = figures["confusion_matrix.png"].axes[0]
    shown = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    expected = np.array([[0.8, 0.2, 0.0], [0.25, 0.75, 0.0], [np.nan] * 3])
    np.testing.assert_allclose(shown, expected)  # rows (truth) sum to 1; no truth: grey
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text()
             for t in ax.texts}
    assert texts[(1, 0)] == "0.20"  # x = predicted car, y = true road
    assert texts[(0, 1)] == "0.25"  # x = predicted road, y = true car
    assert (0, 2) not in texts  # the row without truth pixels has no numbers


def test_the_iou_plot_draws_macro_and_micro_at_their_values(tmp_path, figures):
    write_report(_report(), tmp_path)
    ax = figures["per_class_iou.png"].axes[0]
    lines = {line.get_label().split(" = ")[0]: line.get_xdata()[0] for line in ax.get_lines()}
    assert lines == {"mIoU (macro)": pytest.approx(0.61234),
                     "micro IoU (pooled pixels)": pytest.approx(0.81818)}


def test_the_per_image_summary_has_the_median(tmp_path):
    md = write_report(_report(), tmp_path).read_text(encoding="utf-8")
    assert "| over 3 image(s) | 0.4000 | 0.2000 | 0.1000 | 0.9000 |" in md


def test_the_per_case_section_gives_each_figure_its_own_column(tmp_path):
    # p1: tumour Dice 2/3, IoU 1/2; p2: bg only (Dice = IoU = 1)
    cms = {"p1": torch.tensor([[10, 0], [1, 1]]), "p2": torch.tensor([[8, 0], [0, 0]])}
    per_case = case_scores(cms, {"p1": 2, "p2": 1}, ["bg", "tumour"])
    rep = {**_report(), "class_names": ["bg", "tumour"], "confusion_matrix": None,
           "IoU_per_class": {"bg": 0.9, "tumour": 0.3}, "Dice_per_class": {"bg": 0.95, "tumour": 0.5},
           "per_case": per_case}
    md = write_report(rep, tmp_path).read_text(encoding="utf-8")
    mdice, miou = per_case["mDice_mean_over_cases"], per_case["mIoU_mean_over_cases"]
    assert mdice != pytest.approx(miou)
    assert (f"Mean over cases of each case's mDice: {100 * mdice:.2f} %; of each case's mIoU: "
            f"{100 * miou:.2f} %.") in md
    p1 = per_case["cases"][0]
    assert f"| p1 | 2 | {100 * p1['mDice']:.2f} % | {100 * p1['mIoU']:.2f} % |" in md


def test_ignored_pixels_inside_an_image_stay_uncoloured(tmp_path):
    """Void pixels inside a mask (CamVid, Cityscapes), not only batch padding, reach the
    gallery: they show the image, or grey, and the report is written."""
    colors = np.array([[255, 0, 0], [0, 255, 0]], dtype=np.uint8)
    labels = np.array([[0, 255], [1, 2]])  # 255: ignored; 2: no such class
    out = colorize_labels(labels, colors)
    np.testing.assert_allclose(out[0, 1], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(out[1, 1], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(out[0, 0], [1.0, 0.0, 0.0])
    base = np.full((2, 2, 3), 0.2, dtype=np.float32)
    np.testing.assert_allclose(colorize_labels(labels, colors, base)[0, 1], [0.2, 0.2, 0.2])
    mask = np.zeros((12, 16), dtype=np.int64)
    mask[4:6, 4:6] = 255  # interior void
    row = {"path": "", "IoU": 0.3, "Dice": 0.4, "pixel_accuracy": 0.8, "mask": mask,
           "pred": np.ones((12, 16), dtype=np.int64)}
    md = write_report({**_report(), "worst_images": [row]}, tmp_path).read_text(encoding="utf-8")
    assert (tmp_path / "report_files" / "worst_01_image.png").exists()
    assert "| 1 | `` | 0.3000 | 0.4000 | [png]" in md
