"""Pre-flight data check: find every bad file before training starts, report them all at once.

:func:`check_samples` looks at every image/mask pair of the given splits (header sizes of the
images, fully decoded masks) and returns a list of :class:`Problem`. :class:`DataCheckError`
turns that list into one readable error with one line per file and a fix for each.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from tqdm.auto import tqdm

from segpipe.data.datasets import Sample, check_label_range, encode_mask
from segpipe.data.io import ImageReadError, image_size, read_image, read_mask

__all__ = [
    "DataCheckError",
    "Problem",
    "PROGRESS_THRESHOLD",
    "check_samples",
    "class_pixel_counts",
    "parallel_map",
]

PROGRESS_THRESHOLD = 200
"""A progress bar is shown when more files than this are checked."""

MAX_LISTED = 50
"""DataCheckError lists at most this many problems, then "... and N more"."""

# Problem kinds and their one-line fixes.
FIXES: dict[str, str] = {
    "missing_mask": "add the mask (same file name stem) or remove the image",
    "orphan_mask": "add the matching image or delete the mask",
    "duplicate": "keep one file per stem (delete or rename the other)",
    "unreadable_image": "re-export the file or remove it",
    "unreadable_mask": "re-export the file or remove the pair",
    "size_mismatch": "re-export the mask at the image's size",
    "bad_labels": "set data.ignore_index or data.mask_values (e.g. {0: 0, 255: 1}), "
    "or fix data.num_classes",
}


@dataclass(frozen=True)
class Problem:
    """One problem with one file.

    Attributes:
        path: The offending file.
        split: Split it belongs to.
        kind: One of ``missing_mask``, ``orphan_mask``, ``duplicate``, ``unreadable_image``,
            ``unreadable_mask``, ``size_mismatch``, ``bad_labels`` (tools may add their own,
            e.g. ``segpipe check-data``'s ``channel_mismatch``).
        message: What is wrong.
        fix: One-line fix.
        values: For ``bad_labels`` from the range check, the offending label values (so tools
            such as ``segpipe check-data`` can summarise them); empty otherwise.
    """

    path: Path
    split: str
    kind: str
    message: str
    fix: str = ""
    values: tuple[int, ...] = ()

    def __str__(self) -> str:
        fix = self.fix or FIXES.get(self.kind, "")
        return f"[{self.split}] {self.path}: {self.message}" + (f" -> fix: {fix}" if fix else "")


class DataCheckError(ValueError):
    """The pre-flight check found problems; the message lists every problem file.

    Attributes:
        problems: All problems found.
    """

    def __init__(self, problems: Sequence[Problem], max_listed: int = MAX_LISTED) -> None:
        self.problems = list(problems)
        n_files = len({p.path for p in self.problems})
        lines = [
            f"data check found {len(self.problems)} problem(s) in {n_files} file(s):",
        ]
        lines += [f"  {p}" for p in self.problems[:max_listed]]
        if len(self.problems) > max_listed:
            lines.append(f"  ... and {len(self.problems) - max_listed} more")
        lines.append(
            "Fix the files above (or set data.check_data=false to skip this check at your own "
            "risk)."
        )
        super().__init__("\n".join(lines))


_T = TypeVar("_T")
_R = TypeVar("_R")


def parallel_map(
    fn: Callable[[_T], _R], items: Sequence[_T], max_workers: int | None, desc: str
) -> list[_R]:
    """Map ``fn`` over ``items`` in a thread pool, keeping the order.

    Meant for file reading and decoding, which release the GIL. Shared by the pre-flight
    check, ``segpipe check-data`` and :mod:`segpipe.data.stats`.

    Args:
        fn: Function of one item.
        items: Items to map.
        max_workers: Threads (default ``min(8, 2 * cpu_count)``); 1 maps in this thread.
        desc: Progress bar label; the bar is shown for more than :data:`PROGRESS_THRESHOLD`
            items.

    Returns:
        ``[fn(x) for x in items]``, in order (the first exception raised by ``fn`` propagates).
    """
    if not items:
        return []
    workers = max_workers or min(8, 2 * (os.cpu_count() or 1))
    show = len(items) > PROGRESS_THRESHOLD
    if workers <= 1:
        return [fn(x) for x in tqdm(items, desc=desc, disable=not show, leave=False)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=not show, leave=False)
        )


def _check_pair(
    split: str,
    sample: Sample,
    num_classes: int,
    ignore_index: int | None,
    mask_values: Mapping[int, int] | None,
    mask_colors: Sequence[Sequence[int]] | None,
    decode_images: bool,
    bands: Sequence[int] | None,
) -> list[Problem]:
    out: list[Problem] = []
    size: tuple[int, int] | None = None
    try:
        if decode_images:
            size = read_image(sample.image, bands).shape[:2]
        else:
            size = image_size(sample.image)
    except ImageReadError as exc:
        out.append(Problem(sample.image, split, "unreadable_image", exc.reason,
                           FIXES["unreadable_image"]))
    if sample.mask is None:
        out.append(Problem(sample.image, split, "missing_mask", "no mask found for this image",
                           FIXES["missing_mask"]))
        return out
    try:
        raw = read_mask(sample.mask)
    except ImageReadError as exc:
        out.append(Problem(sample.mask, split, "unreadable_mask", exc.reason,
                           FIXES["unreadable_mask"]))
        return out
    if size is not None and raw.shape[:2] != tuple(size):
        out.append(
            Problem(
                sample.mask,
                split,
                "size_mismatch",
                f"mask is {raw.shape[1]}×{raw.shape[0]} but image {sample.image.name} is "
                f"{size[1]}×{size[0]} (W×H)",
                FIXES["size_mismatch"],
            )
        )
    try:
        labels = encode_mask(raw, sample.mask, mask_values, mask_colors, ignore_index)
    except ImageReadError as exc:
        out.append(Problem(sample.mask, split, "bad_labels", exc.reason, exc.hint))
        return out
    bad = check_label_range(labels, num_classes, ignore_index)
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        ign = "" if ignore_index is None else f" (ignore_index={ignore_index})"
        out.append(
            Problem(
                sample.mask,
                split,
                "bad_labels",
                f"label values [{shown}] outside 0..{num_classes - 1}{ign}",
                FIXES["bad_labels"],
                tuple(bad),
            )
        )
    return out


def check_samples(
    splits: Mapping[str, Sequence[Sample]],
    num_classes: int,
    ignore_index: int | None = None,
    mask_values: Mapping[int, int] | None = None,
    mask_colors: Sequence[Sequence[int]] | None = None,
    orphans: Mapping[str, Sequence[Path]] | None = None,
    duplicates: Mapping[str, Sequence[Path]] | None = None,
    max_workers: int | None = None,
    decode_images: bool = False,
    bands: Sequence[int] | None = None,
) -> list[Problem]:
    """Check every image/mask pair and return all problems found.

    Checks: missing mask, mask without image (``orphans``), duplicate stems, unreadable image
    (header) or mask (full decode), image/mask size mismatch, label values (after
    ``mask_values`` / ``mask_colors`` mapping) outside ``[0, num_classes)`` that are not
    ``ignore_index``.

    Args:
        splits: Samples per split (e.g. a :class:`~segpipe.data.datasets.Scan`).
        num_classes: Number of classes.
        ignore_index: Label allowed in addition to the classes.
        mask_values: Raw value -> class mapping.
        mask_colors: Colour table for RGB masks.
        orphans: Masks without an image, per split (``Scan.orphans``).
        duplicates: Files ignored for a duplicate stem, per split (``Scan.duplicates``).
        max_workers: Threads (default ``min(8, 2 * cpu_count)``).
        decode_images: Fully decode images too (catches truncated images; slower).
        bands: Band selection used when ``decode_images``.

    Returns:
        Problems in split/sample order (empty when everything is fine).
    """
    problems: list[Problem] = []
    for split, paths in (orphans or {}).items():
        for p in paths:
            problems.append(
                Problem(Path(p), split, "orphan_mask", "mask has no matching image",
                        FIXES["orphan_mask"])
            )
    for split, paths in (duplicates or {}).items():
        for p in paths:
            problems.append(
                Problem(Path(p), split, "duplicate",
                        "another file in the same folder has the same stem; this one is ignored",
                        FIXES["duplicate"])
            )
    items = [(split, s) for split, samples in splits.items() for s in samples]

    def run(item: tuple[str, Sample]) -> list[Problem]:
        return _check_pair(item[0], item[1], num_classes, ignore_index, mask_values,
                           mask_colors, decode_images, bands)

    for found in parallel_map(run, items, max_workers, "checking data"):
        problems.extend(found)
    return problems


def class_pixel_counts(
    samples: Sequence[Sample],
    num_classes: int,
    ignore_index: int | None = None,
    mask_values: Mapping[int, int] | None = None,
    mask_colors: Sequence[Sequence[int]] | None = None,
    max_workers: int | None = None,
    per_image: bool = False,
) -> np.ndarray:
    """Pixels per class over the masks of ``samples`` (e.g. for class weights).

    Values outside ``[0, num_classes)`` (including ``ignore_index``) are not counted.
    With ``per_image=True`` the counts of each mask are returned separately, which is what
    median frequency balancing needs (a class's frequency is taken over the images that
    contain it).

    Args:
        samples: Samples with masks (samples without a mask are skipped).
        num_classes: Number of classes.
        ignore_index: Label of ignored pixels.
        mask_values: Raw value -> class mapping.
        mask_colors: Colour table for RGB masks.
        max_workers: Threads.
        per_image: Return one row per sample instead of the total.

    Returns:
        int64 array of shape (num_classes,), or (len(samples), num_classes) with ``per_image``
        (rows in sample order; all zero for samples without a mask).

    Raises:
        ImageReadError: For unreadable masks.
    """

    def count(sample: Sample) -> np.ndarray:
        if sample.mask is None:
            return np.zeros(num_classes, dtype=np.int64)
        labels = encode_mask(read_mask(sample.mask), sample.mask, mask_values, mask_colors,
                             ignore_index)
        valid = labels[(labels >= 0) & (labels < num_classes)]
        return np.bincount(valid.ravel(), minlength=num_classes).astype(np.int64)

    rows = parallel_map(count, list(samples), max_workers, "counting pixels")
    if per_image:
        return np.stack(rows) if rows else np.zeros((0, num_classes), dtype=np.int64)
    total = np.zeros(num_classes, dtype=np.int64)
    for c in rows:
        total += c
    return total
