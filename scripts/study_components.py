"""Does removing small connected components of a class raise its Dice per case?

Buda et al. keep the largest 3-D connected component of the tumour in each patient's volume.
This script measures such post-processing on a checkpoint's own val split, without training:
it predicts every val image (``Segmenter.predict_proba``, as ``segpipe predict`` does), stacks
each case's slices in their natural order, and scores one class's Dice per case, then the mean
over cases, for each filter:

* ``none``: the predicted masks as they are;
* ``largest 3-D``: the largest connected component (6-connected) of each case's volume;
* ``3-D < k``: components of fewer than ``k`` voxels removed;
* ``2-D < k``: components of fewer than ``k`` pixels removed from each slice.

    python scripts/study_components.py --ckpt runs/lgg_unet/checkpoints/last.ckpt \\
        --data-root DIR/lgg_mri --class-index 1

The val split is the checkpoint's (its data module's settings, ``--data-root`` replacing the
root), so a fold's checkpoint is scored on the cases it did not train on.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpipe.argparsing import at_least as whole_at_least, positive_int  # noqa: E402


def _natural(path: Path) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean arrays; NaN when both are empty (no score)."""
    total = int(pred.sum()) + int(truth.sum())
    return float("nan") if total == 0 else 2.0 * int((pred & truth).sum()) / total


def _components(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of ``volume``'s connected components (face-connected) and each one's size."""
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - scipy comes with the test dependencies
        sys.exit("study_components.py needs scipy: pip install scipy")
    labels, count = ndimage.label(volume)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels, sizes


def largest(volume: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean volume (all of an empty one)."""
    labels, sizes = _components(volume)
    return volume if sizes.max(initial=0) == 0 else labels == int(sizes.argmax())


def at_least(volume: np.ndarray, k: int) -> np.ndarray:
    """``volume`` without its connected components of fewer than ``k`` elements."""
    labels, sizes = _components(volume)
    return (sizes >= k)[labels] & volume


def filters(sizes_3d: list[int], sizes_2d: list[int]) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The filters compared, by name; each takes and returns a (slices, H, W) boolean volume."""
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {"none": lambda v: v,
                                                         "largest 3-D": largest}
    for k in sizes_3d:
        out[f"3-D < {k}"] = lambda v, k=k: at_least(v, k)
    for k in sizes_2d:
        out[f"2-D < {k}"] = lambda v, k=k: np.stack([at_least(s, k) for s in v])
    return out


def compare(cases: dict[str, tuple[np.ndarray, np.ndarray]],
            named: dict[str, Callable[[np.ndarray], np.ndarray]]) -> dict[str, tuple[float, float]]:
    """``{filter: (Dice mean over cases, Dice pooled)}`` for ``{case: (pred, truth)}`` volumes."""
    out = {}
    for name, fn in named.items():
        per_case, inter, total = [], 0, 0
        for pred, truth in cases.values():
            kept = fn(pred)
            per_case.append(dice(kept, truth))
            inter += int((kept & truth).sum())
            total += int(kept.sum()) + int(truth.sum())
        out[name] = (float(np.nanmean(per_case)) if per_case else float("nan"),
                     2.0 * inter / total if total else float("nan"))
    return out


def predict_cases(ckpt: Path, data_root: str, class_index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{case: (predicted, true)}`` boolean volumes of ``class_index`` over the checkpoint's
    val split, each case's slices in natural order."""
    from segpipe import Segmenter
    from segpipe.data import SegmentationDataModule
    from segpipe.data.datasets import encode_mask
    from segpipe.data.io import read_mask

    dm = SegmentationDataModule.from_checkpoint(ckpt, root=data_root)
    dm.setup("validate")
    samples = dm.datasets["val"].samples
    if not samples or any(s.case is None or s.mask is None for s in samples):
        sys.exit(f"the val split of {ckpt} has no cases (or unlabelled images): this study "
                 "needs images that belong to cases, such as LGG patients")
    by_case: dict[str, list] = defaultdict(list)
    for sample in samples:
        by_case[sample.case].append(sample)
    segmenter = Segmenter.from_checkpoint(ckpt, device="cpu")
    if class_index >= len(segmenter.class_names):  # scored, it was a table of NaN after minutes
        sys.exit(f"--class-index {class_index}: {ckpt} has the classes 0.."
                 f"{len(segmenter.class_names) - 1} ({', '.join(segmenter.class_names)})")
    out = {}
    for case, items in sorted(by_case.items()):
        items.sort(key=lambda s: _natural(s.image))
        preds, truths = [], []
        for sample in items:
            preds.append(segmenter.predict(sample.image) == class_index)
            raw = read_mask(sample.mask, colours=bool(dm.mask_colors))
            labels = encode_mask(raw, sample.mask, dm.mask_values, dm.mask_colors, dm.ignore_index)
            truths.append(labels == class_index)
        out[case] = (np.stack(preds), np.stack(truths))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a segpipe fit checkpoint")
    parser.add_argument("--data-root", required=True, help="the data root it was trained on")
    parser.add_argument("--class-index", type=whole_at_least(0), default=1, help="the class scored (1)")
    parser.add_argument("--sizes-3d", type=positive_int, nargs="*", default=[200, 1000, 3000])
    parser.add_argument("--sizes-2d", type=positive_int, nargs="*", default=[50, 200, 500])
    args = parser.parse_args(argv)
    cases = predict_cases(args.ckpt, args.data_root, args.class_index)
    results = compare(cases, filters(args.sizes_3d, args.sizes_2d))
    base = results["none"][0]
    print(f"{len(cases)} val cases of {args.ckpt}; class {args.class_index}")
    print(f"{'filter':14s} {'Dice mean over cases':>21s} {'vs none':>8s} {'Dice pooled':>12s}")
    for name, (mean, pooled) in results.items():
        print(f"{name:14s} {100 * mean:20.2f} % {100 * (mean - base):+7.2f} {100 * pooled:11.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
