"""Segmentation metrics, built on torchmetrics and labelled so no one mistakes micro for macro.

Naming used everywhere (logs, ``test_metrics.json``, reports):

* ``IoU/<class>`` and ``Dice/<class>``: per-class scores over all pixels of the split.
* ``mIoU`` and ``mDice``: **macro** means over classes, the ignore index excluded, classes absent
  from both ground truth and prediction left out of the mean (torchmetrics' macro averaging).
* ``micro_IoU``: IoU over all non-ignored pixels pooled (micro average); dominated by large classes.
* ``pixel_accuracy``: fraction of non-ignored pixels classified correctly (micro).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)

__all__ = [
    "WeightedMean",
    "CaseConfusions",
    "CaseSums",
    "SWEEP_THRESHOLDS",
    "ThresholdSweep",
    "case_scores",
    "case_score_logs",
    "image_confusions",
    "IOU_METRICS",
    "METRIC_DESCRIPTIONS",
    "build_metrics",
    "confusion_stats",
    "flatten_metrics",
    "metrics_report",
    "monitor_mode",
    "nothing_scored",
    "validation_metric_names",
    "per_image_scores",
    "undefined_when_nothing_scored",
]

METRIC_DESCRIPTIONS = {
    "mIoU": "macro mean IoU over classes (ignore index excluded; classes absent from both truth and "
    "prediction left out)",
    "mDice": "macro mean Dice (F1) over classes, same rules as mIoU",
    "micro_IoU": "micro IoU: intersection over union pooled over all non-ignored pixels; with "
                 "one label per pixel it is pixel_accuracy / (2 - pixel_accuracy)",
    "pixel_accuracy": "micro pixel accuracy: correct / non-ignored pixels",
    "IoU": "per-class IoU",
    "Dice": "per-class Dice (F1)",
}


#: Said (in ``test_metrics.json``, the report and the log) when no pixel was scored.
NO_LABELLED_PIXELS = (
    "no pixel of these images is labelled (every mask value is the ignore index): no metric is "
    "defined; check data.mask_values / data.mask_colors and data.ignore_index")

#: The metrics sharing one confusion-matrix state (one torchmetrics compute group): the cheap
#: subset that training updates on every batch.
IOU_METRICS = ("IoU", "mIoU", "micro_IoU")


#: Scores validation logs once (``val/mIoU``) and once per class (``val/IoU/<class>``); each is
#: larger when the model is better.
_SCALAR_SCORES = ("mIoU", "mDice", "micro_IoU", "pixel_accuracy", "mDice_mean_over_cases",
                  "mIoU_mean_over_cases")
_PER_CLASS_SCORES = ("IoU", "Dice", "Dice_mean_over_cases")
_SCORES = _SCALAR_SCORES + _PER_CLASS_SCORES


def monitor_mode(name: str) -> str | None:
    """Whether a logged metric is better smaller (``"min"``: a loss) or larger (``"max"``: the
    scores segpipe logs), or None for a name segpipe does not log."""
    key = str(name).split("/", 1)[-1]
    if key.startswith("loss"):
        return "min"
    return "max" if key.split("/", 1)[0] in _SCORES else None


def validation_metric_names(class_names: Sequence[str]) -> set[str]:
    """Every scalar validation can log under ``val/`` for these classes (the per-class ones
    appear only once a class is scored, the per-case ones only when images belong to cases)."""
    names = {f"val/{m}" for m in ("loss", *_SCALAR_SCORES)}
    for family in _PER_CLASS_SCORES:
        names.update(f"val/{family}/{c}" for c in class_names)
    return names


def build_metrics(
    num_classes: int,
    ignore_index: int | None = None,
    confusion_matrix: bool = False,
    only: Sequence[str] | None = None,
) -> MetricCollection:
    """Build the one metric collection that every stage clones.

    Args:
        num_classes: Number of classes C (labels ``0..C-1``).
        ignore_index: Label excluded from every metric, or None. Not one of the classes
            ``0..C-1``: mIoU would leave that class out and mDice count it as 0 (the task and
            data modules refuse it with :func:`segpipe.data.spec.check_ignore_index`, which gives
            the mask values that number the other classes ``0..C-2``).
        confusion_matrix: Also accumulate the C×C confusion matrix (rows = truth, columns = prediction).
        only: Keep just these metric names (e.g. :data:`IOU_METRICS`, whose three metrics share
            one state, so an update costs a third of the full collection's).

    Returns:
        A ``MetricCollection`` taking ``(preds (N,H,W) int64, target (N,H,W) int64)``.
    """
    common = dict(num_classes=num_classes, ignore_index=ignore_index, validate_args=False)
    metrics: dict = {
        "IoU": MulticlassJaccardIndex(average="none", zero_division=float("nan"), **common),
        "mIoU": MulticlassJaccardIndex(average="macro", **common),
        "micro_IoU": MulticlassJaccardIndex(average="micro", **common),
        "Dice": MulticlassF1Score(average="none", zero_division=float("nan"), **common),
        "mDice": MulticlassF1Score(average="macro", **common),
        "pixel_accuracy": MulticlassAccuracy(average="micro", **common),
    }
    if confusion_matrix:
        metrics["confusion_matrix"] = MulticlassConfusionMatrix(**common)
    if only is not None:
        unknown = sorted(set(only) - set(metrics))
        if unknown:
            raise ValueError(f"Unknown metric names {unknown}; choose from {sorted(metrics)}.")
        metrics = {name: metric for name, metric in metrics.items() if name in only}
    return MetricCollection(metrics)


def _clean(value: float) -> float | None:
    """JSON-safe float: NaN (class absent from truth and prediction) becomes None."""
    return None if math.isnan(value) else float(value)


def flatten_metrics(
    computed: dict[str, Tensor], class_names: Sequence[str], prefix: str = "",
    keep_undefined: bool = False,
) -> dict[str, float]:
    """Turn a computed collection into scalar ``name -> value`` pairs for logging.

    Per-class tensors become ``IoU/<class name>``; the confusion matrix is left out (not a scalar).
    Classes absent from truth and prediction (NaN) are left out of the per-class entries, unless
    ``keep_undefined`` (validation: a ``checkpoint.monitor`` on ``val/IoU/<class>`` must find
    its key in an epoch where that class is in neither; Lightning's checkpoint stopped the fit
    there, and ranks a NaN as the worst score).
    """
    out: dict[str, float] = {}
    for name, value in computed.items():
        if name == "confusion_matrix":
            continue
        if value.ndim == 0:
            out[f"{prefix}{name}"] = float(value)
            continue
        for cls_name, v in zip(class_names, value.tolist()):
            if keep_undefined or not math.isnan(v):
                out[f"{prefix}{name}/{cls_name}"] = float(v)
    return out


def confusion_stats(confmat: Tensor) -> dict[str, list[float | None]]:
    """Per-class pixel shares from a confusion matrix (rows truth, columns prediction).

    Returns:
        ``{"truth_share": [...], "pred_share": [...]}``: fraction of non-ignored pixels per class.
    """
    cm = confmat.double()
    total = cm.sum()
    if total == 0:
        return {"truth_share": [None] * cm.shape[0], "pred_share": [None] * cm.shape[0]}
    return {
        "truth_share": (cm.sum(1) / total).tolist(),
        "pred_share": (cm.sum(0) / total).tolist(),
    }


def per_image_scores(
    preds: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None
) -> list[dict[str, float | None]]:
    """Macro IoU and Dice of each image, over the classes present in its truth or prediction.

    Args:
        preds: (N,H,W) predicted labels.
        target: (N,H,W) true labels.

    Returns:
        One ``{"IoU": ..., "Dice": ..., "pixel_accuracy": ...}`` per image (None where the
        image has no labelled pixel).
    """
    out = []
    for cm in image_confusions(preds, target, num_classes, ignore_index).double().cpu():
        if cm.sum() == 0:
            out.append({"IoU": None, "Dice": None, "pixel_accuracy": None})
            continue
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        iou = (tp[present] / union[present]).mean().item()
        dice = (2 * tp[present] / (union[present] + tp[present])).mean().item()
        out.append({"IoU": iou, "Dice": dice, "pixel_accuracy": (tp.sum() / cm.sum()).item()})
    return out


def image_confusions(
    preds: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None
) -> Tensor:
    """Each image's confusion matrix, on the device of ``preds`` and without a host
    synchronisation (no boolean indexing, no ``bincount`` sizing).

    Args:
        preds: (N, H, W) predicted labels.
        target: (N, H, W) true labels; ``ignore_index`` and labels outside 0..K-1 are left out.
        num_classes: K.
        ignore_index: Label of unscored pixels, or None.

    Returns:
        (N, K, K) int64, rows truth, columns prediction.
    """
    n, k = target.shape[0], num_classes
    t, p = target.reshape(n, -1).long(), preds.reshape(n, -1).long()
    valid = (t >= 0) & (t < k) & (p >= 0) & (p < k)
    if ignore_index is not None:
        valid &= t != ignore_index
    offset = torch.arange(n, device=t.device).mul_(k * k).unsqueeze(1)
    index = torch.where(valid, t * k + p + offset, n * k * k).flatten()  # the last bin: unscored
    counts = torch.zeros(n * k * k + 1, dtype=torch.int64, device=t.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[:-1].view(n, k, k)


class CaseSums:
    """Per-image tensors summed over each case's images (LGG patients, CamVid sequences), with
    the number of images per case. Kept on the tensors' device: no host synchronisation per
    batch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Tensor, cases: Sequence[str | None]) -> None:
        """Add (N, ...) ``values`` of N images and their case names ("" or None for an image
        in no case, which is left out)."""
        for i, case in enumerate(cases):
            if case:
                held = self.sums.get(case)
                self.sums[case] = values[i] if held is None else held + values[i]
                self.counts[case] = self.counts.get(case, 0) + 1

    def merged(self, world_size: int = 1) -> tuple[dict[str, Tensor], dict[str, int]]:
        """Every process's cases summed (a case's images may be spread over the processes; all
        of them must call this when ``world_size`` > 1), on the CPU."""
        sums = {case: value.cpu() for case, value in self.sums.items()}
        counts = dict(self.counts)
        if world_size > 1:
            parts: list = [None] * world_size
            torch.distributed.all_gather_object(parts, (sums, counts))
            sums, counts = {}, {}
            for part_sums, part_counts in parts:
                for case, value in part_sums.items():
                    sums[case] = sums[case] + value if case in sums else value
                    counts[case] = counts.get(case, 0) + part_counts[case]
        return sums, counts


class CaseConfusions(CaseSums):
    """Per-case confusion matrices summed over each case's images, for the per-case figures
    of ``segpipe validate``/``test`` and the val ones a checkpoint can be selected on
    (:meth:`merged` gives them).

    Args:
        num_classes: K.
        ignore_index: Label of unscored pixels, or None.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        super().__init__()

    def update(self, preds: Tensor, target: Tensor, cases: Sequence[str]) -> None:
        """Add a batch: (N, H, W) ``preds`` and ``target``, N case names ("" for an image in
        no case, which is left out)."""
        if any(cases):
            self.add(image_confusions(preds, target, self.num_classes, self.ignore_index), cases)


#: The thresholds of p(class 1) that :class:`ThresholdSweep` scores: 0.1, 0.15, ..., 0.9.
SWEEP_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(2, 19))


class ThresholdSweep:
    """A two-class model's labels at each of several thresholds of p(class 1), scored in
    ``segpipe test`` to choose ``model.positive_threshold``: Dice of class 1 pooled over the
    images, pixel accuracy, and Dice per case with its mean over cases. Counts stay on the
    probabilities' device (no host synchronisation per batch), one threshold at a time (memory
    of one label map, whatever the number of thresholds).

    Args:
        ignore_index: Label of unscored pixels, or None (labels other than 0 and 1 are never
            scored).
        thresholds: The thresholds, each in (0, 1).
    """

    def __init__(self, ignore_index: int | None = None,
                 thresholds: Sequence[float] = SWEEP_THRESHOLDS) -> None:
        self.ignore_index, self.thresholds = ignore_index, tuple(float(t) for t in thresholds)
        self.reset()

    def reset(self) -> None:
        #: (T, 4) int64 counts per threshold (true positives, false positives, false negatives,
        #: scored pixels) of each case, and of every image as the one case "all".
        self.by_case, self.pooled = CaseSums(), CaseSums()

    def update(self, prob1: Tensor, target: Tensor, cases: Sequence[str] | None = None) -> None:
        """Add a batch: (N, H, W) probabilities of class 1 and true labels, and N case names
        ("" or None for images in no case: pooled only)."""
        n = target.shape[0]
        truth = target.reshape(n, -1)
        valid = (truth == 0) | (truth == 1)
        if self.ignore_index is not None:
            valid &= truth != self.ignore_index
        positive = (truth == 1) & valid
        prob = prob1.reshape(n, -1)
        counts = torch.empty(n, len(self.thresholds), 4, dtype=torch.int64, device=prob.device)
        counts[:, :, 3] = valid.sum(-1, keepdim=True)
        pos = positive.sum(-1)
        for i, threshold in enumerate(self.thresholds):
            pred = (prob > threshold) & valid
            tp = (pred & positive).sum(-1)
            counts[:, i, 0] = tp
            counts[:, i, 1] = pred.sum(-1) - tp
            counts[:, i, 2] = pos - tp
        self.pooled.add(counts.sum(0, keepdim=True), ["all"])
        self.by_case.add(counts, cases or ())

    def summary(self, class_name: str = "class 1", world_size: int = 1) -> dict[str, Any] | None:
        """The sweep for ``test_metrics.json`` (every process's images when ``world_size`` > 1;
        all processes must call it then), or None before any image.

        Returns:
            ``{"class", "thresholds", "Dice_pooled", "pixel_accuracy",
            "Dice_mean_over_cases", "num_cases", "note"}``: one value per threshold (None
            where undefined; the per-case entries None when no image had a case).
        """
        pooled = self.pooled.merged(world_size)[0].get("all")
        cases = self.by_case.merged(world_size)[0]
        if pooled is None:
            return None

        def dice(c: Tensor) -> list[float | None]:
            c = c.double()
            denom = 2 * c[:, 0] + c[:, 1] + c[:, 2]
            return [_clean(float(2 * tp / d)) if d > 0 else None for tp, d in zip(c[:, 0], denom)]

        c = pooled.double()
        accuracy = [_clean(float(1 - (fp + fn) / n)) if n > 0 else None
                    for fp, fn, n in zip(c[:, 1], c[:, 2], c[:, 3])]
        per_case = [dice(cases[case]) for case in sorted(cases)]
        means: list[float | None] | None = None
        num_cases: list[int] | None = None
        if per_case:
            columns = [[row[i] for row in per_case if row[i] is not None]
                       for i in range(len(self.thresholds))]
            means = [sum(col) / len(col) if col else None for col in columns]
            num_cases = [len(col) for col in columns]
        return {
            "class": class_name, "thresholds": list(self.thresholds),
            "Dice_pooled": dice(pooled), "pixel_accuracy": accuracy,
            "Dice_mean_over_cases": means, "num_cases": num_cases,
            "note": ("labels at each threshold of p(class 1), from the probabilities scored above; "
                     "a threshold chosen on these images flatters them: choose it on other "
                     "folds (segpipe crossval does, leaving each fold out) and set "
                     "model.positive_threshold"),
        }


def case_scores(
    confusions: dict[str, Tensor], counts: dict[str, int], class_names: Sequence[str]
) -> dict:
    """Per-case Dice and IoU (pixels pooled over each case's images) and their mean over cases.

    The medical protocol (e.g. Buda et al. 2019: mean Dice over patients): each case's Dice of a
    class comes from all of that case's pixels; the mean over cases weighs every case equally,
    where pooled figures weigh large cases more. A case where a class is absent from both truth
    and prediction has no score for it and is left out of that class's mean.

    Args:
        confusions: Case -> (K, K) confusion matrix summed over its images.
        counts: Case -> number of images.
        class_names: K names.

    Returns:
        ``{"num_cases"`` (the cases scored: each mean is over them), ``"num_cases_without_score"``
        (cases with no labelled pixel, left out; their rows stay), ``"num_cases_per_class",
        "Dice_per_class_mean_over_cases",
        "IoU_per_class_mean_over_cases", "mDice_mean_over_cases", "mIoU_mean_over_cases",
        "cases": [rows]}``.
    """
    rows = []
    for case in sorted(confusions):
        cm = confusions[case].double()
        tp = cm.diag()
        fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
        denom_dice, union = 2 * tp + fp + fn, tp + fp + fn
        dice = {n: (_clean(float(2 * tp[i] / denom_dice[i])) if denom_dice[i] > 0 else None)
                for i, n in enumerate(class_names)}
        iou = {n: (_clean(float(tp[i] / union[i])) if union[i] > 0 else None)
               for i, n in enumerate(class_names)}
        present = [v for v in dice.values() if v is not None]
        present_iou = [v for v in iou.values() if v is not None]
        rows.append({
            "case": case, "num_images": int(counts.get(case, 0)),
            "mDice": sum(present) / len(present) if present else None,
            "mIoU": sum(present_iou) / len(present_iou) if present_iou else None,
            "Dice_per_class": dice, "IoU_per_class": iou,
        })

    def mean(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return sum(vals) / len(vals) if vals else None

    unscored = sum(r["mDice"] is None for r in rows)
    return {
        # the cases behind the means: one without a labelled pixel has no score (its row stays)
        "num_cases": len(rows) - unscored,
        "num_cases_without_score": unscored,
        # The cases behind each class's mean (those where it is in the truth or prediction).
        "num_cases_per_class": {
            n: sum(r["Dice_per_class"][n] is not None for r in rows) for n in class_names},
        "Dice_per_class_mean_over_cases": {
            n: mean([r["Dice_per_class"][n] for r in rows]) for n in class_names},
        "IoU_per_class_mean_over_cases": {
            n: mean([r["IoU_per_class"][n] for r in rows]) for n in class_names},
        "mDice_mean_over_cases": mean([r["mDice"] for r in rows]),
        "mIoU_mean_over_cases": mean([r["mIoU"] for r in rows]),
        "cases": rows,
    }


def case_score_logs(per_case: dict, class_names: Sequence[str], prefix: str = "",
                    per_class: bool = True) -> dict[str, float]:
    """The means over cases of :func:`case_scores` as scalars to log: ``mDice_mean_over_cases``,
    ``mIoU_mean_over_cases`` and, with ``per_class``, ``Dice_mean_over_cases/<class>`` (NaN
    where no case scores the class, so a checkpoint monitor on one always finds it)."""
    def number(value: float | None) -> float:
        return math.nan if value is None else float(value)

    out = {f"{prefix}{m}_mean_over_cases": number(per_case[f"{m}_mean_over_cases"])
           for m in ("mDice", "mIoU")}
    if per_class:
        for name in class_names:
            out[f"{prefix}Dice_mean_over_cases/{name}"] = number(
                per_case["Dice_per_class_mean_over_cases"][name])
    return out


def nothing_scored(computed: dict[str, Tensor]) -> bool:
    """Whether a computed collection scored no pixel (every one ignored): its confusion matrix
    is empty, or, without one, every class's IoU is undefined (a class is only undefined when
    it is in neither the truth nor the prediction of any scored pixel)."""
    cm = computed.get("confusion_matrix")
    if cm is not None:
        return int(cm.sum()) == 0
    iou = computed.get("IoU")
    return iou is not None and iou.numel() > 0 and bool(torch.isnan(iou).all())


def undefined_when_nothing_scored(computed: dict[str, Tensor]) -> dict[str, Tensor]:
    """``computed`` with the summary metrics NaN (undefined) when no pixel was scored (every
    pixel ignored: an empty confusion matrix, or, without one, every class's IoU undefined),
    where torchmetrics gives 0.0 for mDice, micro IoU and pixel accuracy; as it is otherwise."""
    if not nothing_scored(computed):
        return computed
    out = dict(computed)
    for key in ("mIoU", "mDice", "micro_IoU", "pixel_accuracy"):
        if key in out:
            out[key] = torch.full_like(out[key], float("nan"))
    return out


def metrics_report(
    computed: dict[str, Tensor], class_names: Sequence[str], ignore_index: int | None
) -> dict:
    """Everything the test stage knows, as a JSON-ready dict with explicit macro/micro labels."""
    computed = undefined_when_nothing_scored(computed)
    report: dict = {
        "mIoU": _clean(float(computed["mIoU"])),
        "mDice": _clean(float(computed["mDice"])),
        "micro_IoU": _clean(float(computed["micro_IoU"])),
        "pixel_accuracy": _clean(float(computed["pixel_accuracy"])),
        "IoU_per_class": {n: _clean(v) for n, v in zip(class_names, computed["IoU"].tolist())},
        "Dice_per_class": {n: _clean(v) for n, v in zip(class_names, computed["Dice"].tolist())},
        "class_names": list(class_names),
        "ignore_index": ignore_index,
        "definitions": dict(METRIC_DESCRIPTIONS),
    }
    if nothing_scored(computed):  # the summary metrics are NaN (None) above
        report["warning"] = NO_LABELLED_PIXELS
    if "confusion_matrix" in computed:
        cm = computed["confusion_matrix"]
        report["confusion_matrix"] = cm.long().tolist()
        report["confusion_matrix_axes"] = "rows = ground truth class, columns = predicted class"
        report.update(confusion_stats(cm))
    return report


class WeightedMean(Metric):
    """The mean of per-batch values weighted by a weight per batch (the val/test loss: its
    scored pixels), synced across processes as a float sum and a float weight, whatever the
    shards' sizes.

    Lightning's own mean of ``self.log(..., batch_size=n, sync_dist=True)`` divides the
    all-reduced sum by the integer batch-size count averaged over the processes, which
    truncates when the processes hold unequal numbers of images (3 val images on 2 processes
    gave a loss 1.5 times too large). torchmetrics' ``MeanMetric`` does the same sum/count but
    checks for NaN at each update (a host synchronisation) unless told not to.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        # float32: MPS has no float64, and a loss summed over an epoch's batches needs no more
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.computed_weight = torch.tensor(0.0)  # see compute()

    def update(self, value: torch.Tensor, weight: float | torch.Tensor) -> None:  # type: ignore[override]
        """Add a batch's mean ``value`` with its ``weight`` (a number, or a 0-d tensor on the
        value's device: no host synchronisation)."""
        # A number stays a kernel argument: as a device tensor (torch.as_tensor(n, device=...))
        # it was a blocking host-to-device copy, one GPU synchronisation per training step.
        w = (weight.to(device=self.total.device, dtype=torch.float32)
             if isinstance(weight, torch.Tensor) else float(weight))
        self.total += value.detach().float() * w
        self.weight += w

    def compute(self) -> torch.Tensor:
        """Sum over sum of weights (NaN before any update, or when every weight is 0); the
        weights' sum over every process is kept as :attr:`computed_weight`."""
        self.computed_weight = self.weight.detach().clone()  # synced here, local after
        return self.total / self.weight

