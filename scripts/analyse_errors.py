#!/usr/bin/env python
"""Where a checkpoint's pixel errors lie: how far from the true class borders, and at what threshold.

For each image/mask pair (matched by file stem) the checkpoint predicts the image as `segpipe
predict` does (`Segmenter`), and each wrong pixel is binned by its distance to the nearest pixel
of another true class: 1 px means on the border itself, where annotators of thin structures
(membranes, vessels, outlines) disagree most. For two classes it also prints the pixel error with
the positive class predicted where its probability reaches each threshold, and the share of the
pixels predicted and truly positive: a miscalibrated model shows its best threshold far from 0.5.

    python scripts/analyse_errors.py --ckpt runs/isbi_unet/checkpoints/last.ckpt \
        --images DIR/isbi2012_em/train/image --masks DIR/isbi2012_em/train/label \
        --mask-values 0:0,255:1 --stems 20 21 22 23 --positive 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpipe.data.datasets import _pair_folders, check_label_range, encode_mask  # noqa: E402
from segpipe.data.io import ImageReadError, read_image, read_mask  # noqa: E402
from segpipe.errors import ConfigError  # noqa: E402
from segpipe.predict.api import Segmenter  # noqa: E402
from segpipe.predict.checkpoint import read_checkpoint  # noqa: E402

#: Wrong pixels are counted by distance (px) to the nearest pixel of another true class: up to
#: each edge (1 px, diagonal 1.41 px, 2 px, ...), then farther.
BIN_EDGES = (1.5, 2.5, 3.5)
BIN_LABELS = ("1 px", "2 px", "3 px", "farther")
THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


def border_distance(truth: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """Distance of each pixel to the nearest pixel of another scored class.

    Args:
        truth: (H, W) integer class map.
        ignore_index: Label that is not a class (not scored): its pixels are no border, so an
            error beside an unlabelled region is not counted as a border error.

    Returns:
        (H, W) float32 Euclidean distance in pixels: 1 for a pixel next to (4-neighbour) another
        class, about 1.41 diagonally; inf where the map holds one scored class only (and at
        ignored pixels).
    """
    dist = np.full(truth.shape, np.inf, dtype=np.float32)
    ignored = truth == ignore_index if ignore_index is not None else np.zeros(truth.shape, bool)
    for c in np.unique(truth[~ignored]):
        inside = (truth == c) | ignored  # every pixel but those of another scored class
        if inside.all():
            continue
        d = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        own = truth == c
        dist[own] = d[own]
    return dist


def parse_mask_values(text: str | None) -> dict[int, int] | None:
    """``"0:0,255:1"`` -> ``{0: 0, 255: 1}``."""
    if not text:
        return None
    pairs = [item.split(":") for item in text.split(",")]
    try:
        if any(len(p) != 2 for p in pairs):
            raise ValueError
        return {int(a): int(b) for a, b in pairs}
    except ValueError:
        raise SystemExit(f"--mask-values must look like 0:0,255:1, got {text!r}") from None


def checkpoint_mask_values(ckpt: Path) -> dict[int, int] | None:
    """The ``data.mask_values`` the checkpoint was trained with (None when it had none)."""
    found = (read_checkpoint(ckpt).get("datamodule_hyper_parameters") or {}).get("mask_values")
    return {int(k): int(v) for k, v in found.items()} if found else None


def pairs(images: Path, masks: Path, stems: list[str] | None) -> list[tuple[Path, Path]]:
    """Image/mask files that share a stem, sorted; ``stems`` keeps only those."""
    for folder in (images, masks):
        if not folder.is_dir():
            raise SystemExit(f"{folder}: not a folder; give the folders of the images and the masks")
    samples = _pair_folders(images, masks, recursive=False)[0]
    out = [(s.image, s.mask) for s in samples
           if s.mask is not None and (stems is None or s.image.stem in stems)]
    unknown = sorted(set(stems or ()) - {image.stem for image, _ in out})
    if out and unknown:
        raise SystemExit(f"--stems {' '.join(unknown)}: no image of that stem with a mask in "
                         f"{images} and {masks}")
    if not out:
        raise SystemExit(f"no image in {images} has a mask of the same stem in {masks}"
                         + (f" among the stems {stems}" if stems else ""))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True, help="folder of images")
    p.add_argument("--masks", type=Path, required=True, help="folder of masks, same stems")
    p.add_argument("--stems", nargs="+", help="only these file stems")
    p.add_argument("--mask-values", help="raw mask value to class index, e.g. 0:0,255:1 "
                   "(default: the checkpoint's data.mask_values)")
    p.add_argument("--ignore-index", type=int, default=None,
                   help="truth label not scored (default: the checkpoint's data.ignore_index)")
    p.add_argument("--positive", type=int, default=1, help="the class thresholded (two classes)")
    args = p.parse_args(argv)

    mask_values = parse_mask_values(args.mask_values)
    try:
        seg = Segmenter.from_checkpoint(args.ckpt, device="cpu")
        if mask_values is None:
            mask_values = checkpoint_mask_values(args.ckpt)
            if mask_values:
                print(f"mask values: {mask_values} (the checkpoint's)")
    except (OSError, ConfigError) as exc:
        raise SystemExit(str(exc)) from None
    ignore_index = args.ignore_index if args.ignore_index is not None else seg.config.ignore_index
    print(f"ignore index: {ignore_index if ignore_index is not None else 'none'}"
          + (" (the checkpoint's)" if args.ignore_index is None else ""))
    num_classes = len(seg.class_names)
    if num_classes == 2 and not 0 <= args.positive < 2:
        raise SystemExit(f"--positive {args.positive}: the checkpoint's classes are 0 "
                         f"({seg.class_names[0]}) and 1 ({seg.class_names[1]})")
    wrong_total = scored_total = 0
    wrong_by_bin = np.zeros(len(BIN_LABELS), dtype=np.int64)
    sweep = np.zeros(len(THRESHOLDS), dtype=np.int64)
    predicted_pos = true_pos = 0
    for image_path, mask_path in pairs(args.images, args.masks, args.stems):
        try:  # unmapped values become the ignore index; a colour mask is refused with the fix
            truth = encode_mask(read_mask(mask_path), mask_path, mask_values, None, ignore_index)
        except ImageReadError as exc:
            raise SystemExit(str(exc)) from None
        bad = check_label_range(truth, num_classes, ignore_index)
        if bad:
            raise SystemExit(
                f"{mask_path}: label values {bad[:10]} are no class of the checkpoint's 0.."
                f"{num_classes - 1}{'' if ignore_index is None else f' (ignore index {ignore_index})'}"
                "; give --mask-values (e.g. 0:0,255:1) or the masks of these images")
        proba = seg.predict_proba(read_image(image_path))
        if proba.shape[1:] != truth.shape:
            raise SystemExit(f"{mask_path}: mask is {truth.shape[1]}x{truth.shape[0]}, "
                             f"its image {image_path} {proba.shape[2]}x{proba.shape[1]}")
        scored = truth != ignore_index if ignore_index is not None else np.ones(truth.shape, bool)
        pred = proba.argmax(0)
        wrong = (pred != truth) & scored
        bins = np.digitize(border_distance(truth, ignore_index)[wrong], BIN_EDGES)
        wrong_by_bin += np.bincount(bins, minlength=len(BIN_LABELS))
        n_wrong, n_scored = int(wrong.sum()), int(scored.sum())
        wrong_total += n_wrong
        scored_total += n_scored
        print(f"{image_path.name}: pixel error {100 * n_wrong / max(n_scored, 1):.2f} %")
        if num_classes == 2:
            is_pos = truth == args.positive
            for k, t in enumerate(THRESHOLDS):
                sweep[k] += int((((proba[args.positive] >= t) != is_pos) & scored).sum())
            predicted_pos += int(((pred == args.positive) & scored).sum())
            true_pos += int((is_pos & scored).sum())
    if scored_total == 0:
        raise SystemExit("no scored pixel: every truth pixel is the ignore index")
    print(f"all: pixel error {100 * wrong_total / scored_total:.2f} % over {scored_total} pixels")
    shares = ", ".join(f"{label} {100 * n / max(wrong_total, 1):.0f} %"
                       for label, n in zip(BIN_LABELS, wrong_by_bin))
    print(f"wrong pixels by distance to the true border: {shares}")
    if num_classes == 2:
        name = seg.class_names[args.positive]
        print(f"{name} predicted on {100 * predicted_pos / scored_total:.1f} % of the pixels, "
              f"true on {100 * true_pos / scored_total:.1f} %")
        print(f"pixel error with {name} where its probability >= t: "
              + "  ".join(f"{t:g}: {100 * n / scored_total:.2f} %" for t, n in zip(THRESHOLDS, sweep)))


if __name__ == "__main__":
    main()
