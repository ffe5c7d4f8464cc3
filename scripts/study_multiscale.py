"""Does averaging a model's predictions over several input scales raise its val mIoU?

Multi-scale inference (mmseg's ``img_ratios``, the DeepLab and PSPNet test recipes) runs the
network on the image resized to several scales, maps each softmax back to the image's size and
averages them (``segpipe test --model.test_tta_scales``, ``segpipe predict --tta_scales``). This
script measures it on a checkpoint's own val split, without training, for many sets of scales in
one pass, to choose the scales: for every val image it predicts the
class probabilities (``Segmenter.predict_proba``, as ``segpipe predict`` does) with the
evaluation size (``data.eval_resize``, or the image's own size) times each scale, each view
resized from the image file as ``data.eval_resize`` resizes it, with and without TTA over the
training symmetries (``Segmenter``'s ``tta``: the horizontal flip for the CamVid and LGG configs,
eight flips and rotations for ISBI), and scores every combination of them against
the native masks (IoU per class from one confusion matrix over the split, the ignore index left
out, as ``segpipe test`` pools them):

    python scripts/study_multiscale.py --ckpt runs/camvid_unet/checkpoints/best-....ckpt \\
        --data-root DIR/camvid --scales 0.5 0.75 1 1.25 1.5

The val split is the checkpoint's (its data module's settings, ``--data-root`` replacing the
root). Scales outside the training's random rescaling show objects at sizes the network never
saw; the script prints that range beside the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpipe.argparsing import positive_int  # noqa: E402
from segpipe.tta import scaled_size  # noqa: E402,F401 - the sizes segpipe's option uses

#: One prediction: (scale, with TTA over the training symmetries).
View = tuple[float, bool]


def positive_float(value: str) -> float:
    """An argparse ``type`` for scales: a finite number > 0."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def combinations(scales: list[float], tta: bool) -> dict[str, list[View]]:
    """The view sets compared, by name: each scale alone, all scales, and the scales around 1.

    With ``tta``, each set also with TTA at each of its scales (``" + TTA"``).
    """
    sets: dict[str, list[float]] = {f"{s:g}": [s] for s in scales}
    if len(scales) > 1:
        sets["all: " + " ".join(f"{s:g}" for s in scales)] = list(scales)
    middle = [s for s in scales if 0.7 <= s <= 1.3]
    if 1 < len(middle) < len(scales):
        sets["middle: " + " ".join(f"{s:g}" for s in middle)] = middle
    out: dict[str, list[View]] = {}
    for name, chosen in sets.items():
        out[name] = [(s, False) for s in chosen]
        if tta:
            out[name + " + TTA"] = [(s, True) for s in chosen]
    return out


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int,
              ignore_index: int | None) -> np.ndarray:
    """(K, K) int64 confusion matrix, rows truth, of the pixels whose truth is a class (segpipe
    test's per-image one, :func:`segpipe.metrics.image_confusions`)."""
    import torch

    from segpipe.metrics import image_confusions

    return image_confusions(torch.as_tensor(pred)[None], torch.as_tensor(truth)[None],
                            num_classes, ignore_index)[0].numpy()


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN for a class absent from both truth and prediction."""
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def dice_mean_over_cases(by_case: dict[str, np.ndarray]) -> np.ndarray:
    """Each class's Dice per case (pixels pooled within the case), then the mean over the cases
    that score it (a class absent from a case's truth and prediction has no score there): the
    per-case means of ``segpipe test`` (:func:`segpipe.metrics.case_scores`); NaN where no case
    scores a class. Images in no case (``""``) are left out, as there."""
    import torch

    from segpipe.metrics import case_scores

    k = len(next(iter(by_case.values())))
    scores = case_scores({case: torch.as_tensor(cm) for case, cm in by_case.items() if case},
                         {}, [str(i) for i in range(k)])
    means = scores["Dice_per_class_mean_over_cases"].values()
    return np.array([np.nan if v is None else v for v in means])


def study(ckpt: Path, data_root: str, scales: list[float], tta: bool,
          limit: int | None = None) -> tuple[dict[str, dict[str, np.ndarray]], list[str], str]:
    """``({view set: {case: confusion matrix}}, class names, a line on the sizes)`` over the
    val split; images without a case are the case ``""``."""
    from segpipe import Segmenter
    from segpipe.data import SegmentationDataModule
    from segpipe.data.datasets import encode_mask
    from segpipe.data.io import read_mask

    dm = SegmentationDataModule.from_checkpoint(ckpt, root=data_root)
    dm.setup("validate")
    samples = [s for s in dm.datasets["val"].samples if s.mask is not None][:limit]
    if not samples:
        sys.exit(f"the val split of {ckpt} under {data_root} has no labelled image")
    segmenter = Segmenter.from_checkpoint(ckpt, device="cpu")
    base_config = segmenter.config
    k = base_config.num_classes
    sets = combinations(scales, tta)
    matrices: dict[str, dict[str, np.ndarray]] = {name: {} for name in sets}
    for n, sample in enumerate(samples, 1):
        raw = read_mask(sample.mask, colours=bool(dm.mask_colors))
        truth = encode_mask(raw, sample.mask, dm.mask_values, dm.mask_colors, dm.ignore_index)
        base = base_config.eval_resize or tuple(truth.shape)
        probs: dict[View, np.ndarray] = {}
        for s in scales:
            segmenter.config = dataclasses.replace(base_config, eval_resize=scaled_size(base, s))
            probs[(s, False)] = segmenter.predict_proba(sample.image, tta=False)
            if tta:
                probs[(s, True)] = segmenter.predict_proba(sample.image, tta=True)
        segmenter.config = base_config
        for name, views in sets.items():
            pred = sum(probs[v] for v in views).argmax(0)
            cm = confusion(pred, truth, k, dm.ignore_index)
            case = sample.case or ""
            matrices[name][case] = matrices[name].get(case, 0) + cm
        print(f"\r{n}/{len(samples)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    eval_size = base_config.eval_resize
    line = f"evaluation size {eval_size or 'the image size'} x scale"
    trained = dm.hparams.get("scale")
    if trained:  # the training rescaled the native images by these factors
        native = truth.shape[0]
        ratio = native / eval_size[0] if eval_size else 1.0
        line += (f"; training rescaled by {trained[0]:g}-{trained[1]:g} of the native size, "
                 f"scales {trained[0] * ratio:g}-{trained[1] * ratio:g} here")
    return matrices, list(segmenter.class_names), line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a segpipe fit checkpoint")
    parser.add_argument("--data-root", required=True, help="the data root it was trained on")
    parser.add_argument("--scales", type=positive_float, nargs="+",
                        default=[0.5, 0.75, 1.0, 1.25, 1.5],
                        help="factors of the evaluation size (0.5 0.75 1 1.25 1.5)")
    parser.add_argument("--no-tta", action="store_true",
                        help="leave out TTA over the training symmetries (flips, rotations)")
    parser.add_argument("--limit", type=positive_int, default=None, help="the first N val images only")
    args = parser.parse_args(argv)
    scales = sorted(set(args.scales))
    matrices, names, sizes = study(args.ckpt, args.data_root, scales, not args.no_tta,
                                   args.limit)
    print(f"{args.ckpt}: val split, {sizes}")
    header = " ".join(f"{n[:8]:>8s}" for n in names)
    print(f"IoU per class, pixels pooled over the split (micro: micro IoU; acc: pixel accuracy)"
          f"\n{'views':32s} {'mIoU':>6s} {'micro':>6s} {'acc':>6s}  {header}")
    for name, by_case in matrices.items():
        cm = sum(by_case.values())
        iou = iou_per_class(cm)
        hits, total = np.diag(cm).sum(), cm.sum()
        micro, accuracy = hits / max(1, 2 * total - hits), hits / max(1, total)
        print(f"{name:32s} {100 * np.nanmean(iou):6.2f} {100 * micro:6.2f} {100 * accuracy:6.2f}  "
              + " ".join(f"{100 * v:8.1f}" for v in iou))
    cases = len(next(iter(matrices.values())))
    if cases > 1:
        print(f"\nDice per class, mean over the {cases} cases (each case's pixels pooled)\n"
              f"{'views':32s} {'mDice':>6s}  {header}")
        for name, by_case in matrices.items():
            dice = dice_mean_over_cases(by_case)
            print(f"{name:32s} {100 * np.nanmean(dice):6.2f}  "
                  + " ".join(f"{100 * v:8.1f}" for v in dice))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
