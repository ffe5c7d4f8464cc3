"""Metric figures that the by-hand tests of tests/test_metrics.py and tests/test_per_case.py
did not pin down (found by mutation testing): per-image Dice, the per-case means with a class
absent from a case, the logged per-case means, the JSON report's micro and per-class Dice
figures, and the direction of per-class monitors."""

from __future__ import annotations

import math

import pytest
import torch

from segpipe.metrics import (
    case_score_logs,
    case_scores,
    metrics_report,
    monitor_mode,
    per_image_scores,
)
from tests.test_metrics import PREDS, TARGET, _computed

# tests/test_metrics.py's masks: class 3 absent, class 2 only predicted. Per class: IoU 3/4,
# 2/4, 0, (absent); Dice 6/7, 4/6, 0, (absent).
NAMES = ["a", "b", "c", "d"]


def test_per_image_dice_is_the_macro_dice_of_the_classes_in_the_image():
    (score,) = per_image_scores(PREDS, TARGET, 4, 255)
    assert score["Dice"] == pytest.approx((6 / 7 + 4 / 6 + 0.0) / 3)
    assert score["IoU"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)


def test_report_has_each_figure_under_its_own_name():
    rep = metrics_report(_computed(), NAMES, 255)
    assert rep["mIoU"] == pytest.approx((0.75 + 0.5) / 3)
    assert rep["mDice"] == pytest.approx((6 / 7 + 4 / 6) / 3)
    assert rep["micro_IoU"] == pytest.approx(5 / 9)  # not the pixel accuracy (5/7)
    assert rep["pixel_accuracy"] == pytest.approx(5 / 7)
    assert rep["Dice_per_class"]["a"] == pytest.approx(6 / 7)  # not the IoU (3/4)
    assert rep["Dice_per_class"]["b"] == pytest.approx(4 / 6)
    # a class absent from truth and prediction has no Dice either (not 0.0)
    assert rep["Dice_per_class"]["d"] is None and rep["IoU_per_class"]["d"] is None


def test_a_class_absent_from_a_case_is_left_out_of_that_cases_means():
    # case p1: tumour 1 tp, 1 fn (Dice 2/3, IoU 1/2); case p2: no tumour anywhere
    cms = {"p1": torch.tensor([[10, 0], [1, 1]]), "p2": torch.tensor([[8, 0], [0, 0]])}
    out = case_scores(cms, {"p1": 1, "p2": 1}, ["bg", "tumour"])
    rows = {r["case"]: r for r in out["cases"]}
    assert rows["p2"]["Dice_per_class"]["tumour"] is None
    assert rows["p2"]["mDice"] == pytest.approx(1.0)  # bg only, not (1 + 0) / 2
    assert rows["p2"]["mIoU"] == pytest.approx(1.0)
    bg_dice_p1, bg_iou_p1 = 20 / 21, 10 / 11
    assert rows["p1"]["mDice"] == pytest.approx((bg_dice_p1 + 2 / 3) / 2)
    assert rows["p1"]["mIoU"] == pytest.approx((bg_iou_p1 + 1 / 2) / 2)
    assert out["mDice_mean_over_cases"] == pytest.approx(((bg_dice_p1 + 2 / 3) / 2 + 1.0) / 2)
    assert out["mIoU_mean_over_cases"] == pytest.approx(((bg_iou_p1 + 1 / 2) / 2 + 1.0) / 2)


def test_logged_case_means_are_the_tables_figures():
    cms = {"p1": torch.tensor([[10, 0], [1, 1]]), "p2": torch.tensor([[8, 0], [0, 3]])}
    per_case = case_scores(cms, {"p1": 1, "p2": 1}, ["bg", "tumour"])
    logs = case_score_logs(per_case, ["bg", "tumour"], prefix="val/")
    assert logs["val/mDice_mean_over_cases"] == pytest.approx(per_case["mDice_mean_over_cases"])
    assert logs["val/mIoU_mean_over_cases"] == pytest.approx(per_case["mIoU_mean_over_cases"])
    assert logs["val/mIoU_mean_over_cases"] < logs["val/mDice_mean_over_cases"]
    # the figure a checkpoint monitor selects on: the tumour Dice over patients, not its IoU
    assert logs["val/Dice_mean_over_cases/tumour"] == pytest.approx((2 / 3 + 1.0) / 2)
    test_logs = case_score_logs(per_case, ["bg", "tumour"], prefix="test/", per_class=False)
    assert set(test_logs) == {"test/mDice_mean_over_cases", "test/mIoU_mean_over_cases"}
    none = case_score_logs(case_scores({"z": torch.zeros(2, 2, dtype=torch.long)}, {"z": 1},
                                       ["bg", "tumour"]), ["bg", "tumour"])
    assert all(math.isnan(v) for v in none.values())


@pytest.mark.parametrize("name, mode", [
    ("val/mIoU", "max"), ("val/IoU/road", "max"), ("val/Dice/road", "max"),
    ("val/Dice_mean_over_cases/tumour", "max"), ("val/mDice_mean_over_cases", "max"),
    ("val/loss", "min"), ("train/loss_epoch", "min"), ("val/whatever", None),
])
def test_monitor_mode_knows_every_logged_score(name, mode):
    assert monitor_mode(name) == mode


def test_a_plateau_schedule_on_a_per_class_score_is_set_to_max():
    """torch's default mode min on val/IoU/<class> cut the learning rate at every improvement."""
    from segpipe.tasks.segmentation import _plateau_mode

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    with pytest.warns(UserWarning, match="watches val/IoU/road, which is larger"):
        _plateau_mode(plateau, "val/IoU/road")
    assert plateau.mode == "max"
    for score in (0.2, 0.3, 0.4):
        plateau.step(score)
    assert opt.param_groups[0]["lr"] == 1.0
