"""Metrics against IoU, Dice and accuracy computed by hand on tiny masks."""

import math

import pytest
import torch

from segpipe.metrics import (
    IOU_METRICS,
    CaseConfusions,
    build_metrics,
    flatten_metrics,
    image_confusions,
    metrics_report,
    nothing_scored,
    per_image_scores,
    undefined_when_nothing_scored,
)

# truth / prediction, 255 = ignore. Class 3 appears nowhere (absent), class 2 only in prediction.
TARGET = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 255]]])
PREDS = torch.tensor([[[0, 1, 1, 1], [0, 0, 2, 2]]])
# Non-ignored pixels (7): truth 0 0 1 1 0 0 1 ; pred 0 1 1 1 0 0 2
# class 0: tp=3, fp=0, fn=1 -> IoU 3/4, Dice 6/7
# class 1: tp=2, fp=1 (pixel 1), fn=1 (pixel 6) -> IoU 2/4, Dice 4/6
# class 2: tp=0, fp=1 -> IoU 0, Dice 0 ; class 3: absent -> NaN, left out of the macro mean
# micro IoU = sum tp / sum(tp+fp+fn) = 5 / (5 + 2 + 2) = 5/9 ; pixel accuracy = 5/7


def _computed(ignore_index=255):
    m = build_metrics(4, ignore_index=ignore_index, confusion_matrix=True)
    m.update(PREDS, TARGET)
    return m.compute()


def test_per_class_and_macro_iou_by_hand():
    c = _computed()
    iou = c["IoU"].tolist()
    assert iou[:3] == pytest.approx([0.75, 0.5, 0.0])
    assert math.isnan(iou[3])
    assert float(c["mIoU"]) == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert float(c["micro_IoU"]) == pytest.approx(5 / 9)
    assert float(c["pixel_accuracy"]) == pytest.approx(5 / 7)
    assert c["Dice"].tolist()[:3] == pytest.approx([6 / 7, 4 / 6, 0.0])
    assert float(c["mDice"]) == pytest.approx((6 / 7 + 4 / 6) / 3)


def test_ignored_pixel_counts_nowhere():
    cm = _computed()["confusion_matrix"]
    assert int(cm.sum()) == 7  # 8 pixels, one ignored
    assert cm[1, 2] == 1 and cm[0, 1] == 1


def test_report_is_labelled_and_json_ready():
    rep = metrics_report(_computed(), ["a", "b", "c", "d"], 255)
    assert rep["IoU_per_class"]["d"] is None
    assert rep["IoU_per_class"]["a"] == pytest.approx(0.75)
    assert "macro" in rep["definitions"]["mIoU"] and "micro" in rep["definitions"]["micro_IoU"]
    assert rep["confusion_matrix"][0] == [3, 1, 0, 0]
    assert rep["truth_share"][0] == pytest.approx(4 / 7)


def test_nothing_scored_leaves_every_summary_figure_undefined():
    """mIoU was undefined but mDice, micro IoU and pixel accuracy read 0.0 when every pixel was
    ignored (a wrong mask encoding, say): they looked like a model that gets everything wrong."""
    m = build_metrics(4, ignore_index=255, confusion_matrix=True)
    m.update(PREDS, torch.full_like(TARGET, 255))
    rep = metrics_report(m.compute(), ["a", "b", "c", "d"], 255)
    assert [rep[k] for k in ("mIoU", "mDice", "micro_IoU", "pixel_accuracy")] == [None] * 4
    assert "no pixel of these images is labelled" in rep["warning"]
    assert "warning" not in metrics_report(_computed(), ["a", "b", "c", "d"], 255)
    # Validation has no confusion matrix: the per-class IoU tell (it logged 0.0 for the three)
    val = build_metrics(4, ignore_index=255)
    val.update(PREDS, torch.full_like(TARGET, 255))
    computed = val.compute()
    assert nothing_scored(computed)
    undefined = undefined_when_nothing_scored(computed)
    assert all(math.isnan(float(undefined[k])) for k in ("mIoU", "mDice", "micro_IoU",
                                                          "pixel_accuracy"))
    val.reset()
    val.update(PREDS, TARGET)
    assert not nothing_scored(val.compute())


def test_flatten_names_classes():
    flat = flatten_metrics(_computed(), ["a", "b", "c", "d"], prefix="val/")
    assert flat["val/IoU/b"] == pytest.approx(0.5)
    assert "val/IoU/d" not in flat  # absent class is not reported as 0
    assert "val/confusion_matrix" not in flat


def test_per_image_scores():
    scores = per_image_scores(PREDS, TARGET, 4, 255)
    assert scores[0]["IoU"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert scores[0]["pixel_accuracy"] == pytest.approx(5 / 7)
    all_ignored = per_image_scores(PREDS, torch.full_like(TARGET, 255), 4, 255)
    assert all_ignored[0]["IoU"] is None


def test_iou_subset_matches_full_collection_and_shares_one_state():
    m = build_metrics(4, ignore_index=255, only=IOU_METRICS)
    m.update(PREDS, TARGET)
    assert sorted(m.keys()) == sorted(IOU_METRICS)
    assert len(m.compute_groups) == 1  # one confusion matrix behind all three
    got, full = m.compute(), _computed()
    for name in IOU_METRICS:
        assert torch.allclose(got[name], full[name], equal_nan=True)


def test_unknown_metric_name_is_refused():
    with pytest.raises(ValueError, match="Unknown metric names \\['mIOU'\\]"):
        build_metrics(4, only=["mIoU", "mIOU"])


def test_micro_iou_is_what_its_definition_says_of_pixel_accuracy():
    import torch

    from segpipe.metrics import METRIC_DESCRIPTIONS, build_metrics

    metrics = build_metrics(3, ignore_index=255)
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 9, 11))
    target[0, :2] = 255
    preds = torch.where(torch.rand(2, 9, 11) < 0.7, target.clamp(max=2), torch.randint(0, 3, (2, 9, 11)))
    metrics.update(preds, target)
    out = metrics.compute()
    acc = float(out["pixel_accuracy"])
    assert float(out["micro_IoU"]) == pytest.approx(acc / (2 - acc), rel=1e-5)
    assert "pixel_accuracy / (2 - pixel_accuracy)" in METRIC_DESCRIPTIONS["micro_IoU"]


def test_image_confusions_match_a_bincount_per_image() -> None:
    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 4, (3, 7, 5), generator=g)
    target = torch.randint(0, 4, (3, 7, 5), generator=g)
    target[0, 0, :] = 255  # ignored
    target[1, 1, 0] = 9  # outside 0..K-1: not scored
    cms = image_confusions(preds, target, 4, ignore_index=255)
    assert cms.shape == (3, 4, 4) and cms.dtype == torch.int64
    for i in range(3):
        keep = (target[i] != 255) & (target[i] < 4)
        ref = torch.bincount(target[i][keep] * 4 + preds[i][keep], minlength=16).view(4, 4)
        assert torch.equal(cms[i], ref)
    assert int(cms[0].sum()) == 35 - 5 and int(cms[1].sum()) == 34


def test_case_confusions_sum_each_cases_images() -> None:
    tracker = CaseConfusions(2)
    preds = torch.tensor([[[0, 1]], [[1, 1]], [[0, 0]]])
    target = torch.tensor([[[0, 1]], [[0, 1]], [[1, 1]]])
    tracker.update(preds, target, ["a", "", "a"])  # the second image is in no case
    tracker.update(preds[1:2], target[1:2], ["b"])
    confusions, counts = tracker.merged()
    assert counts == {"a": 2, "b": 1}
    assert confusions["a"].tolist() == [[1, 0], [2, 1]]
    assert confusions["b"].tolist() == [[0, 1], [0, 1]]
    tracker.reset()
    assert tracker.merged() == ({}, {})


def test_the_threshold_sweep_counts_as_labelling_at_each_threshold_would() -> None:
    """Pooled Dice and pixel accuracy, and per-case Dice with its mean, at each threshold of
    p(class 1), against labels made at that threshold and scored by hand; ignored pixels and
    images in no case (pooled only) as segpipe test treats them."""
    from segpipe.metrics import SWEEP_THRESHOLDS, ThresholdSweep

    g = torch.Generator().manual_seed(0)
    prob = torch.rand(5, 6, 7, generator=g)
    target = (torch.rand(5, 6, 7, generator=g) < 0.4).long()
    target[0, 0] = 255  # ignored
    target[3] = 0  # a case without class 1 anywhere, predicted below 0.8 everywhere
    prob[3] *= 0.8
    cases = ["a", "a", "b", "c", ""]
    sweep = ThresholdSweep(ignore_index=255)
    sweep.update(prob[:3], target[:3], cases[:3])  # two batches
    sweep.update(prob[3:], target[3:], cases[3:])
    out = sweep.summary("tumour")
    assert out["thresholds"] == list(SWEEP_THRESHOLDS) and out["class"] == "tumour"
    assert SWEEP_THRESHOLDS[0] == 0.1 and SWEEP_THRESHOLDS[-1] == 0.9 and 0.5 in SWEEP_THRESHOLDS
    valid = target != 255

    def dice(pred, truth, ok):
        tp = (pred & truth & ok).sum().item()
        denom = 2 * tp + (pred & ~truth & ok).sum().item() + (~pred & truth & ok).sum().item()
        return 2 * tp / denom if denom else None

    for i, t in enumerate(SWEEP_THRESHOLDS):
        pred, truth = prob > t, target == 1
        assert out["Dice_pooled"][i] == pytest.approx(dice(pred, truth, valid))
        wrong = ((pred != truth) & valid).sum().item()
        assert out["pixel_accuracy"][i] == pytest.approx(1 - wrong / valid.sum().item())
        per_case = [dice(pred[idx], truth[idx], valid[idx]) for idx in ([0, 1], [2], [3])]
        scored = [d for d in per_case if d is not None]
        assert out["num_cases"][i] == len(scored)
        assert out["Dice_mean_over_cases"][i] == pytest.approx(sum(scored) / len(scored))
    # case "c" has no tumour: scored (Dice 0) only where the threshold predicts some
    assert out["num_cases"][0] == 3 and out["num_cases"][-1] == 2
    sweep.reset()
    assert sweep.summary() is None
    sweep.update(prob, target)  # no cases at all: pooled figures only
    assert sweep.summary()["Dice_mean_over_cases"] is None
