"""Pre-flight data check: find every bad file before training starts, report them all at once.

:func:`check_samples` looks at every image/mask pair of the given splits (header sizes of the
images, fully decoded masks) and returns a list of :class:`Problem`. :class:`DataCheckError`
turns that list into one readable error with one line per file and a fix for each.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from tqdm.auto import tqdm

from segpipe.data.datasets import (
    JPEG_COLOUR_TOLERANCE,
    Sample,
    check_label_range,
    code_colour,
    colour_codes,
    encode_mask,
    snap_jpeg_colours,
)
from segpipe.data.io import (
    ImageReadError,
    exif_orientation,
    grid_mismatch,
    image_size,
    is_jpeg,
    may_have_nodata,
    read_image_valid,
    read_image_validities,
    read_mask,
)
from segpipe.runtime import available_cpus

__all__ = [
    "DataCheckError",
    "JPEG_MASK_FIX",
    "Problem",
    "ProblemGroup",
    "PROGRESS_THRESHOLD",
    "WARNING_KINDS",
    "channel_problem",
    "check_samples",
    "class_pixel_counts",
    "group_problems",
    "is_jpeg",
    "parallel_map",
]

PROGRESS_THRESHOLD = 200
"""A progress bar is shown when more files than this are checked."""

MAX_LISTED = 50
"""DataCheckError names at most this many files per cause, then "... and N more"."""

# Problem kinds and their one-line fixes.
FIXES: dict[str, str] = {
    "missing_mask": "add the mask (same file name stem) or remove the image",
    "orphan_mask": "add the matching image or delete the mask",
    "duplicate": "keep one file per stem (delete or rename the other)",
    "unlisted_folder": "give the user running segpipe read access to the folder (chmod a+rx), "
    "or move it out of the data",
    "unreadable_image": "re-export the file or remove it",
    "unreadable_mask": "re-export the file or remove the pair",
    "size_mismatch": "re-export the mask at the image's size",
    "grid_mismatch": "rasterise or warp the mask onto its image's grid (e.g. gdalwarp -t_srs "
    "<the image's CRS> -te <its bounds> -ts <its width> <its height> -r near), or drop the "
    "georeference of one of them if they do overlay",
    "bad_labels": "map the mask values to the classes with data.mask_values (`segpipe "
    "check-data` with this config shows the values the masks hold), set data.ignore_index to "
    "the value that marks pixels to leave out, or fix data.num_classes",
    "nodata_pixels": "set data.ignore_index (e.g. 255): nodata pixels are then left out of the "
    "loss and the metrics, and fed to the network as the training mean, as `segpipe predict` "
    "feeds them",
    "partial_nodata": "if the nodata value is a sentinel (such as -9999), set every band of "
    "such pixels to it (or to NaN): they are then no data, left out of the loss and the "
    "metrics and written as nodata by `segpipe predict`; the band statistics leave them out "
    "either way",
    "nonfinite_pixels": "replace them with a finite value (e.g. the band's mean) and label those "
    "pixels data.ignore_index in the mask; a NaN spreads through the network to its neighbours "
    "and makes the loss NaN",
}

#: Kinds of :class:`Problem` that warn instead of stopping training: the data can be used as
#: configured, but maybe not as meant.
WARNING_KINDS = frozenset({"unlisted_labels", "absent_classes", "mixed_dtypes", "exif_rotated",
                           "partial_nodata"})

# Problems that leave a training mask uncounted: class presence is not judged over the rest.
_UNCOUNTED = frozenset({"missing_mask", "unreadable_mask", "bad_labels"})

UNLISTED_FIX = ("if one is a class (or a typo of one), add it to the table; a void colour or "
                "value is fine as it is")

_EXIF_FIX = ("to keep the stored pixels, remove the tag from the images (exiftool "
             "-Orientation=1 -n FILE); to keep the view, save the images turned (Pillow: "
             "ImageOps.exif_transpose(image), which drops the tag) and turn the masks alike")

JPEG_MASK_FIX = (
    "save the masks as PNG (lossless) from the original labels and check again; converting "
    "the JPEG files to PNG keeps the damage"
)
"""Fix for label problems in JPEG masks (JPEG is lossy: it invents values at class edges)."""

# What a problem's path is, per kind (for "3 images: ..." / "12 masks: ...").
_NOUNS: dict[str, str] = {
    "missing_mask": "image",
    "orphan_mask": "mask",
    "unreadable_image": "image",
    "unreadable_mask": "mask",
    "size_mismatch": "mask",
    "grid_mismatch": "mask",
    "bad_labels": "mask",
    "channel_mismatch": "image",
    "unlisted_labels": "mask",
    "nonfinite_pixels": "image",
    "nodata_pixels": "image",
    "partial_nodata": "image",
    "empty_split": "folder",
    "unlisted_folder": "folder",
    "absent_classes": "folder",
    "mixed_dtypes": "image",
    "too_few_classes": "folder",
    "mixed_mask_encodings": "mask",
    "exif_rotated": "image",
}

# Reasons from segpipe.data.io that end in the decoder's message about this very file: the part
# that is the same for every file, so that 88 truncated files are one cause, not 88. (Reasons
# with sizes, e.g. the decompression-bomb limit, stay whole: same-size files group anyway.)
_REASON_CAUSES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(truncated or corrupt image data)\b.*", re.S), r"\1"),
    (re.compile(r"^(not a raster rasterio can read)\b.*", re.S), r"\1"),
    (re.compile(r"^(unsupported image mode '[^']*').*", re.S), r"\1"),
)

def _reason_cause(reason: str) -> str:
    """The file-independent part of an :class:`~segpipe.data.io.ImageReadError` reason."""
    for pattern, repl in _REASON_CAUSES:
        if pattern.match(reason):
            return pattern.sub(repl, reason)
    return reason


@dataclass(frozen=True)
class Problem:
    """One problem with one file.

    Attributes:
        path: The offending file.
        split: Split it belongs to.
        kind: One of ``missing_mask``, ``orphan_mask``, ``duplicate``, ``unlisted_folder``,
            ``unreadable_image``,
            ``unreadable_mask``, ``size_mismatch``, ``grid_mismatch``, ``bad_labels``,
            ``nonfinite_pixels``,
            ``unlisted_labels`` (a warning: :data:`WARNING_KINDS`; tools may add their own,
            e.g. ``segpipe check-data``'s ``channel_mismatch``).
        message: What is wrong.
        fix: One-line fix.
        values: For ``bad_labels`` from the range check, the offending label values (so tools
            such as ``segpipe check-data`` can summarise them); empty otherwise.
        cause: What is wrong without the file-specific parts (same text for every file with
            this problem), used to group problems: :func:`group_problems`. ``{values}`` and
            ``{colours}`` in it stand for the union of ``values`` / ``colours`` over the group.
            Empty: ``message`` is the cause.
        colours: For ``bad_labels`` of colour masks, the RGB colours not in
            ``data.mask_colors``; empty otherwise.
        unmapped: For ``bad_labels`` of masks with values not in ``data.mask_values``, those
            raw values (``{unmapped}`` in ``cause``); empty otherwise.
        detail: A file-specific part of the cause (``{detail}`` in it), e.g. an offset's
            amount: shown when every file of the group has the same.
    """

    path: Path
    split: str
    kind: str
    message: str
    fix: str = ""
    values: tuple[int, ...] = ()
    cause: str = ""
    colours: tuple[tuple[int, int, int], ...] = ()
    unmapped: tuple[int, ...] = ()
    detail: str = ""

    def __str__(self) -> str:
        fix = self.fix or FIXES.get(self.kind, "")
        return f"[{self.split}] {self.path}: {self.message}" + (f" -> fix: {fix}" if fix else "")


_MAX_COLOURS_SHOWN = 32


def _fmt_union(values: Sequence[int], limit: int = 20) -> str:
    vals = sorted(set(values))
    return ", ".join(str(v) for v in vals[:limit]) + (", ..." if len(vals) > limit else "")


@dataclass
class ProblemGroup:
    """Problems with one cause (same kind, file-independent description and fix).

    Attributes:
        kind: Problem kind.
        cause: The cause in words (``{values}`` / ``{colours}`` filled in with the union over
            the group).
        fix: One-line fix.
        problems: The problems, in the order found.
    """

    kind: str
    cause: str
    fix: str
    problems: list[Problem] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Number of problems (files) with this cause."""
        return len(self.problems)

    @property
    def splits(self) -> dict[str, int]:
        """Problems per split, in the order the splits first appear."""
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.split] = out.get(p.split, 0) + 1
        return out

    @property
    def text(self) -> str:
        """The cause with the group's label values / colours filled in."""
        text = self.cause
        if "{values}" in text:
            values = [v for p in self.problems for v in p.values]
            text = text.replace("{values}", _fmt_union(values))
        if "{unmapped}" in text:
            text = text.replace("{unmapped}", _fmt_union([v for p in self.problems
                                                          for v in p.unmapped]))
        if "{detail}" in text:
            details = sorted({p.detail for p in self.problems})
            text = text.replace("{detail}", details[0] if len(details) == 1 else
                                f" (by {len(details)} different amounts)")
        if "{colours}" in text:
            colours = sorted({c for p in self.problems for c in p.colours})
            shown = ", ".join(f"[{r}, {g}, {b}]" for r, g, b in colours[:_MAX_COLOURS_SHOWN])
            if len(colours) > _MAX_COLOURS_SHOWN:
                shown += f", ... ({len(colours)} colours)"
            text = text.replace("{colours}", shown)
        return text

    def line(self, max_files: int = 3) -> str:
        """``[split] N images: cause (file, file, ... and M more) -> fix: ...``.

        Args:
            max_files: Files named before "... and M more".
        """
        noun = _NOUNS.get(self.kind, "file")
        n = self.count
        files = ", ".join(str(p.path) for p in self.problems[:max_files])
        if n > max_files:
            files += f", ... and {n - max_files} more"
        fix = f" -> fix: {self.fix}" if self.fix else ""
        return (f"[{', '.join(self.splits)}] {n} {noun}{'' if n == 1 else 's'}: {self.text} "
                f"({files}){fix}")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready group with every file."""
        return {
            "kind": self.kind,
            "cause": self.text,
            "fix": self.fix,
            "count": self.count,
            "splits": self.splits,
            "files": [
                {"path": str(p.path), "split": p.split, "message": p.message,
                 **({"values": list(p.values)} if p.values else {}),
                 **({"colours": [list(c) for c in p.colours]} if p.colours else {})}
                for p in self.problems
            ],
        }


def group_problems(problems: Sequence[Problem]) -> list[ProblemGroup]:
    """Group problems by cause: kind, file-independent description and fix.

    Args:
        problems: Problems, e.g. from :func:`check_samples`.

    Returns:
        Groups in the order their first problem appears; problems in each group in the given
        order (so the output is deterministic for a deterministic input).
    """
    groups: dict[tuple[str, str, str], ProblemGroup] = {}
    for p in problems:
        fix = p.fix or FIXES.get(p.kind, "")
        key = (p.kind, p.cause or p.message, fix)
        if key not in groups:
            groups[key] = ProblemGroup(p.kind, key[1], fix)
        groups[key].problems.append(p)
    return list(groups.values())


class DataCheckError(ValueError):
    """The pre-flight check found problems; the message has one line per cause.

    Each line gives the cause, how many files have it, the first ``max_listed`` of them and
    the fix (``segpipe check-data --json`` lists every file).

    Attributes:
        problems: All problems found.
        groups: The problems grouped by cause (:func:`group_problems`).
    """

    def __init__(self, problems: Sequence[Problem], max_listed: int = MAX_LISTED) -> None:
        self.problems = list(problems)
        self.groups = group_problems(self.problems)
        n_files = len({p.path for p in self.problems})
        lines = [
            f"data check found {len(self.problems)} problem(s) in {n_files} file(s), "
            f"{len(self.groups)} cause(s):",
        ]
        lines += [f"  {g.line(max_listed)}" for g in self.groups]
        lines.append(
            "Fix the files above (or set data.check_data=false to skip this check at your own "
            "risk); `segpipe check-data` with the same config lists every file (--json FILE)."
        )
        super().__init__("\n".join(lines))


def channel_problem(
    path: Path, split: str, channels: int, in_channels: int, bands: Sequence[int] | None
) -> Problem | None:
    """A ``channel_mismatch`` problem when an image's channels cannot feed ``in_channels``.

    1 <-> 3 channels are converted (not a problem).

    Args:
        path: Image file.
        split: Its split.
        channels: Channels read (after ``bands``).
        in_channels: ``data.in_channels``.
        bands: ``data.bands``.

    Returns:
        The problem, or None when the channels fit.
    """
    if channels == in_channels or {channels, in_channels} == {1, 3}:
        return None
    after = " (after data.bands)" if bands else ""
    cause = f"{channels} channels{after} but data.in_channels={in_channels}"
    if bands:
        fix = f"set data.in_channels: {channels}, or change data.bands"
    elif channels > in_channels:
        picks = list(range(1, in_channels + 1))
        fix = (f"set data.in_channels: {channels}, or pick {in_channels} bands with data.bands "
               f"(e.g. data.bands: {picks})")
    else:
        fix = f"set data.in_channels: {channels}"
    return Problem(path, split, "channel_mismatch",
                   f"image has {channels} channel(s){after} but data.in_channels={in_channels}",
                   fix, cause=cause)


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
        max_workers: Threads (default ``min(8, 2 * available_cpus())``); 1 maps in this thread.
        desc: Progress bar label; the bar is shown for more than :data:`PROGRESS_THRESHOLD`
            items.

    Returns:
        ``[fn(x) for x in items]``, in order (the first exception raised by ``fn`` propagates).
    """
    if not items:
        return []
    workers = max_workers or min(8, 2 * available_cpus())
    show = len(items) > PROGRESS_THRESHOLD
    if workers <= 1:
        return [fn(x) for x in tqdm(items, desc=desc, disable=not show, leave=False)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=not show, leave=False)
        )


def _unlisted_labels(
    split: str,
    path: Path,
    raw: np.ndarray,
    mask_values: Mapping[int, int] | None,
    mask_colors: Sequence[Sequence[int]] | None,
    ignore_index: int,
    lossy: bool,
) -> list[Problem]:
    """An ``unlisted_labels`` warning when the mask holds colours not in ``mask_colors`` (or
    values not in ``mask_values``, other than ``ignore_index`` itself), which
    :func:`~segpipe.data.datasets.encode_mask` reads as ``ignore_index``: a class left out of
    the table, or mistyped, silently disappears from training and scoring."""
    if mask_colors and raw.ndim == 3:
        codes, known = colour_codes(raw), colour_codes(mask_colors).tolist()
        table, what = "data.mask_colors", "colours {colours}"
    elif mask_values and raw.ndim == 2:
        codes, known, table, what = raw, [*map(int, mask_values), ignore_index], \
            "data.mask_values", "values [{values}]"
    else:
        return []
    uniq, counts = np.unique(codes, return_counts=True)
    unlisted = ~np.isin(uniq, np.asarray(known, dtype=uniq.dtype))
    if not unlisted.any():
        return []
    share = float(counts[unlisted].sum()) / codes.size
    found = [int(u) for u in uniq[unlisted]]
    colours = tuple(code_colour(u) for u in found) if table == "data.mask_colors" else ()
    values = () if colours else tuple(found)
    cause = f"mask {what} are not in {table} and are read as ignore_index={ignore_index} " \
            "(not learnt, not scored)"
    fix = UNLISTED_FIX
    if lossy:  # a JPEG mask: compression noise at class edges, not classes to add
        cause = (f"mask {'colours' if colours else 'values'} not in {table}, read as "
                 f"ignore_index={ignore_index}: the masks are JPEG files, whose lossy "
                 "compression invents them at class edges"
                 + (f" (colours it only shifted, within {JPEG_COLOUR_TOLERANCE:g} of a table "
                    "colour, are read as that colour)" if colours else ""))
        fix = JPEG_MASK_FIX
    listed = ", ".join(f"[{r}, {g}, {b}]" for r, g, b in colours[:5]) if colours else \
        ", ".join(map(str, values[:5]))
    return [Problem(path, split, "unlisted_labels",
                    f"{listed} ({share:.1%} of the pixels) not in {table}: read as "
                    f"ignore_index={ignore_index}", fix, values, cause=cause,
                    colours=colours)]


def _check_pair(
    split: str,
    sample: Sample,
    num_classes: int,
    ignore_index: int | None,
    mask_values: Mapping[int, int] | None,
    mask_colors: Sequence[Sequence[int]] | None,
    decode_images: bool,
    bands: Sequence[int] | None,
    in_channels: int | None = None,
    dtypes: dict[Path, str] | None = None,
) -> tuple[list[Problem], np.ndarray | None]:
    """The problems of one pair, and its mask's pixels per class with the ignored pixels last
    (None when the mask could not be encoded); with ``dtypes`` and ``decode_images``, the
    image's dtype is recorded there."""
    out: list[Problem] = []
    size: tuple[int, int] | None = None
    valid: np.ndarray | None = None  # the image's nodata
    try:
        if decode_images:
            image, valid, every_band = read_image_validities(sample.image, bands, in_channels)
            if every_band is not None:  # valid: nodata; every_band: nodata in some bands only
                partial = int(np.count_nonzero(~every_band if valid is None
                                               else valid & ~every_band))
                out.append(Problem(
                    sample.image, split, "partial_nodata",
                    f"{partial} pixel(s) nodata in only some of the bands read",
                    FIXES["partial_nodata"],
                    cause="pixels nodata in only some of the bands read: trained on (and "
                    "predicted) with the nodata value in those bands"))
            size = image.shape[:2]
            if dtypes is not None:
                dtypes[sample.image] = str(image.dtype)
            if in_channels is not None:
                found = channel_problem(sample.image, split, int(image.shape[2]), in_channels,
                                        bands)
                if found is not None:
                    out.append(found)
            if image.dtype.kind == "f":
                finite = np.isfinite(image)
                if valid is not None:  # a declared nodata of NaN is nodata, not a bad value
                    finite |= ~valid[..., None]
                bad = int(finite.size - np.count_nonzero(finite))
                if bad:
                    out.append(Problem(sample.image, split, "nonfinite_pixels",
                                       f"{bad} NaN or infinite value(s)",
                                       cause="NaN or infinite pixel values"))
            del image
            if ignore_index is None:
                if valid is not None:
                    out.append(Problem(
                        sample.image, split, "nodata_pixels",
                        f"{valid.size - int(valid.sum())} nodata pixel(s) (the raster's nodata "
                        "value, mask or alpha band) and no data.ignore_index to leave them out "
                        "of training", cause="nodata pixels (the raster's nodata value, mask or "
                        "alpha band) and no data.ignore_index to leave them out of training"))
        else:
            size = image_size(sample.image)
    except ImageReadError as exc:
        out.append(Problem(sample.image, split, "unreadable_image", exc.reason,
                           exc.hint or FIXES["unreadable_image"], cause=_reason_cause(exc.reason)))
    if sample.mask is None:
        out.append(Problem(sample.image, split, "missing_mask", "no mask found for this image",
                           FIXES["missing_mask"], cause="no mask found"))
        return out, None
    try:
        raw = read_mask(sample.mask, colours=bool(mask_colors))
    except ImageReadError as exc:
        out.append(Problem(sample.mask, split, "unreadable_mask", exc.reason,
                           exc.hint or FIXES["unreadable_mask"], cause=_reason_cause(exc.reason)))
        return out, None
    lossy = is_jpeg(sample.mask)
    if mask_colors and raw.ndim == 3 and lossy:  # as encode_mask reads it (snap=False below)
        raw = snap_jpeg_colours(raw, mask_colors)  # for the colours left unlisted too
    turned = exif_orientation(sample.image) if size is not None else 1
    mismatch = size is not None and raw.shape[:2] != tuple(size)
    if mismatch:
        sizes = f"mask is {raw.shape[1]}×{raw.shape[0]} but image"
        if turned in (5, 6, 7, 8) and raw.shape[:2] == tuple(size)[::-1]:
            # the image's size as stored: the mask was drawn on the unturned pixels
            out.append(Problem(
                sample.mask, split, "size_mismatch",
                f"{sizes} {sample.image.name} is {size[1]}×{size[0]} (W×H) as its EXIF "
                f"orientation ({turned}) turns it", _EXIF_FIX,
                cause=f"{sizes} is {size[1]}×{size[0]} (W×H) as its EXIF orientation turns "
                      "it: the mask matches the stored, unturned pixels"))
        else:
            out.append(
                Problem(
                    sample.mask,
                    split,
                    "size_mismatch",
                    f"{sizes} {sample.image.name} is {size[1]}×{size[0]} (W×H)",
                    FIXES["size_mismatch"],
                    cause=f"{sizes} is {size[1]}×{size[0]} (W×H)",
                )
            )
    elif size is not None:
        grid = grid_mismatch(sample.image, sample.mask)
        if grid is not None:
            cause, by, amount = grid.partition(" by ")
            out.append(Problem(sample.mask, split, "grid_mismatch", f"{grid} ({sample.image.name})",
                               FIXES["grid_mismatch"], cause=cause + ("{detail}" if by else ""),
                               detail=by + amount))
    if turned != 1 and not mismatch:
        out.append(Problem(
            sample.image, split, "exif_rotated",
            f"EXIF orientation {turned}: read turned as viewers show it",
            "make sure each mask matches its image as a viewer shows it, not as stored "
            "(labelling tools that ignore the tag draw on the stored pixels); " + _EXIF_FIX,
            cause="EXIF orientation tags: the images are read turned (or mirrored) as viewers "
                  "show them, and their masks must match that"))
    jpeg = "JPEG compression is lossy and changes label values at class edges"
    try:
        labels = encode_mask(raw, sample.mask, mask_values, mask_colors, ignore_index,
                             snap=False)  # snapped above where it applies
    except ImageReadError as exc:
        colours: tuple[tuple[int, int, int], ...] = ()
        unmapped: tuple[int, ...] = ()
        cause = _reason_cause(exc.reason)
        if mask_values and raw.ndim == 2 and exc.reason.startswith("mask values "):
            # one cause for every mask with unmapped values (JPEG noise, anti-aliased edges
            # differ from file to file), with their union: it was one line per file
            known = {int(k) for k in mask_values}
            unmapped = tuple(int(v) for v in np.unique(raw) if int(v) not in known)
            cause = (f"mask values not in data.mask_values (known: {sorted(known)[:10]})"
                     if lossy else f"mask values [{{unmapped}}] are not in data.mask_values "
                     f"(known: {sorted(known)[:10]})")
        if mask_colors and raw.ndim == 3 and exc.reason.startswith("mask colours "):
            known = {tuple(int(v) for v in c[:3]) for c in mask_colors}
            seen = [(int(r), int(g), int(b)) for r, g, b in np.unique(raw.reshape(-1, 3), axis=0)]
            colours = tuple(c for c in seen if c not in known)
            cause = ("mask colours not in data.mask_colors" if lossy
                     else "mask colours {colours} are not in data.mask_colors")
        if lossy:
            out.append(Problem(sample.mask, split, "bad_labels", exc.reason, JPEG_MASK_FIX,
                               cause=f"{cause}; the masks are JPEG files ({jpeg})",
                               colours=colours))
        else:
            out.append(Problem(sample.mask, split, "bad_labels", exc.reason, exc.hint,
                               cause=cause, colours=colours, unmapped=unmapped))
        return out, None
    if ignore_index is not None and (mask_values or mask_colors):
        out += _unlisted_labels(split, sample.mask, raw, mask_values, mask_colors, ignore_index,
                                lossy)
    bad = check_label_range(labels, num_classes, ignore_index)
    if bad:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        ign = "" if ignore_index is None else f" (ignore_index={ignore_index})"
        outside = f"outside 0..{num_classes - 1}{ign}"
        # a value on edge pixels is JPEG's; one that fills much of a mask is a class
        large = lossy and bool(filling_values(labels, bad))
        if lossy and not large:
            fix = JPEG_MASK_FIX
            cause = (f"label values [{{values}}] {outside} in JPEG masks: {jpeg}, so these "
                     "are compression noise, not classes")
        elif large:
            fix = f"{FIXES['bad_labels']}; and {JPEG_MASK_FIX}"
            cause = (f"label values [{{values}}] {outside} in JPEG masks, some on 5 % of a mask "
                     "or more: a class beyond data.num_classes (JPEG's noise lies along class "
                     "edges)")
        else:
            fix, cause = FIXES["bad_labels"], f"label values [{{values}}] {outside}"
        out.append(
            Problem(
                sample.mask,
                split,
                "bad_labels",
                f"label values [{shown}] {outside}",
                fix,
                tuple(bad),
                cause=cause,
            )
        )
    return out, _class_pixels(_without_nodata(labels, valid, ignore_index), num_classes,
                              ignore_index)


def _without_nodata(labels: np.ndarray, valid: np.ndarray | None,
                    ignore_index: int | None) -> np.ndarray:
    """``labels`` as training sees them: the image's nodata pixels ignored (uncounted)."""
    if valid is None or valid.shape != labels.shape:
        return labels
    return np.where(valid, labels, -1 if ignore_index is None else ignore_index)


def filling_values(labels: np.ndarray, values: Sequence[int], share: float = 0.05) -> list[int]:
    """The ``values`` that fill at least ``share`` of ``labels``. In a JPEG mask such a value is
    most likely a class: the values JPEG's ringing invents along class edges took at most 4.3 %
    of a mask in our checks (thin stripes, quality 75), a real third class 8-11 %.

    Args:
        labels: Label map.
        values: The values to look at.
        share: The least share of the pixels.
    """
    found, counts = np.unique(labels, return_counts=True)
    wanted = {int(v) for v in values}
    return [int(v) for v, n in zip(found, counts) if int(v) in wanted and n >= share * labels.size]


def _mixed_dtypes(splits: Mapping[str, Sequence[Sample]],
                  dtypes: Mapping[Path, str]) -> list[Problem]:
    """A ``mixed_dtypes`` warning when the images are of several integer types: each is scaled
    by its own type's maximum (1/255, 1/65535), so 12-bit scans in 16-bit files reach the
    network about 16 times darker than 8-bit ones, and the ImageNet-or-measured decision and
    the checkpoint's ``input_dtype`` rest on the first images."""
    kinds: dict[str, list[tuple[str, Path]]] = {}
    for split, samples in splits.items():
        for sample in samples:
            if sample.image in dtypes:
                kinds.setdefault(dtypes[sample.image], []).append((split, sample.image))
    if len([k for k in kinds if np.dtype(k).kind in "iub"]) < 2:
        return []
    counts = ", ".join(f"{k}: {len(v)}" for k, v in sorted(kinds.items()))
    common = max(sorted(kinds), key=lambda k: len(kinds[k]))
    # one line per odd type, listing its files (it named one file, of either type)
    return [Problem(path, split, "mixed_dtypes", f"{kind} where most images are {common}",
                    "convert them to one type (e.g. all 16-bit, or all 8-bit scaled alike): "
                    "each type is scaled by its own maximum, so the same scene reaches the "
                    "network at other brightness",
                    cause=f"the images mix pixel types ({counts}); these are {kind}")
            for kind in sorted(kinds) if kind != common for split, path in kinds[kind]]


def _mixed_encodings(
    masks: Sequence[tuple[str, Path, np.ndarray]], num_classes: int, ignore_index: int
) -> list[Problem]:
    """Masks that hold only 0 and ``ignore_index`` beside masks that hold class indices and no
    ``ignore_index`` at all: two exports merged, 0/255 and 0/1, whose 255 is the foreground.
    Read as they are, the 0/255 masks' foreground is ignored (neither learnt nor scored) in
    silence; each such mask is an error, with the two ways out. (Where masks with classes use
    ``ignore_index`` too, it is a void label of the data, and a mask of background and void
    alone is plausible: nothing is said.)

    Args:
        masks: ``(split, mask, pixels per class with the ignored pixels last)`` per mask.
        num_classes: Number of classes.
        ignore_index: The ignored label.
    """
    binary = [(split, path) for split, path, c in masks
              if c[0] and c[-1] and not c[1:num_classes].any()]
    indexed = [c for _, _, c in masks if c[1:num_classes].any()]
    if not binary or not indexed or any(c[-1] for c in indexed):
        return []
    keep = ", ".join(f"{k}: {k}" for k in range(num_classes)) if num_classes <= 6 else \
        f"0: 0, 1: 1, ..., {num_classes - 1}: {num_classes - 1}"
    classes = "1" if num_classes == 2 else f"1..{num_classes - 1}"
    cause = (f"the masks mix two encodings: {len(binary)} hold only 0 and {ignore_index} "
             f"(data.ignore_index), {len(indexed)} hold class indices ({classes}) and "
             f"no {ignore_index}; the {ignore_index} pixels of the former, their foreground if "
             "they were exported as 0/255, would be ignored (neither learnt nor scored)")
    fix = (f"re-save those masks with class indices ({ignore_index} -> the class), or, if "
           f"{ignore_index} does mark pixels to ignore in them, say so: data.mask_values: "
           f"{{{keep}, {ignore_index}: {ignore_index}}}")
    return [Problem(path, split, "mixed_mask_encodings",
                    f"holds only 0 and {ignore_index} while {len(indexed)} other masks hold "
                    f"class indices without {ignore_index}", fix, cause=cause)
            for split, path in binary]


def _class_pixels(labels: np.ndarray, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """Pixels per class of encoded labels, then the ignored pixels: (num_classes + 1,)."""
    flat = labels.ravel()
    valid = flat[(flat >= 0) & (flat < num_classes)]
    counts = np.bincount(valid, minlength=num_classes)[:num_classes]
    ignored = int(np.count_nonzero(flat == ignore_index)) if ignore_index is not None else 0
    return np.append(counts, ignored).astype(np.int64)


def _class_presence(
    split: str,
    counts: np.ndarray,
    num_classes: int,
    ignore_index: int | None,
    mask_values: Mapping[int, int] | None,
    mask_colors: Sequence[Sequence[int]] | None,
    folder: Path,
    class_names: Sequence[str] | None,
) -> list[Problem]:
    """Classes without a training pixel: a warning for some (the model cannot learn them), an
    error when at most one class is left to learn (a useless training), worded for the common
    cause, 0/255 masks whose 255 is ``data.ignore_index``."""
    names = list(class_names or [f"class_{i}" for i in range(num_classes)])
    present = [i for i in range(num_classes) if counts[i] > 0]
    absent = [names[i] for i in range(num_classes) if counts[i] == 0]
    if not absent:
        return []
    listed = ", ".join(absent[:10]) + (f", ... ({len(absent)} classes)" if len(absent) > 10 else "")
    if len(present) > 1:
        return [Problem(folder, split, "absent_classes",
                        f"class(es) {listed} have no training pixel: the model cannot learn them",
                        "check data.num_classes and data.mask_values / data.mask_colors, or add "
                        "training images that show them")]
    if (ignore_index == 255 and not mask_values and not mask_colors and present == [0]
            and counts[-1] > 0):
        cause = ("the training masks hold 0 and 255 only, and 255 is data.ignore_index: every "
                 "foreground pixel is ignored, so only class 0 would be learnt")
        fix = ("set data.mask_values: {0: 0, 255: 1} (0/255 masks: 255 is the foreground), "
               "and data.ignore_index null (or a value the masks do not use)")
    else:
        only = f"only {names[present[0]]} has" if present else "no class has"
        cause = (f"{only} training pixels (none in {listed}): there is nothing to learn to "
                 "tell apart")
        fix = ("check data.num_classes, data.ignore_index and data.mask_values / "
               "data.mask_colors (`segpipe check-data` shows how the masks are encoded)")
    return [Problem(folder, split, "too_few_classes", cause, fix)]


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
    in_channels: int | None = None,
    class_names: Sequence[str] | None = None,
    missing_mask_dirs: Mapping[str, Path] | None = None,
    pixel_counts: dict[Path, np.ndarray] | None = None,
    unlisted_dirs: Mapping[str, Sequence[OSError]] | None = None,
) -> list[Problem]:
    """Check every image/mask pair and return all problems found.

    Checks: missing mask, mask without image (``orphans``), duplicate stems, unreadable image
    (header) or mask (full decode), image/mask size mismatch, label values (after
    ``mask_values`` / ``mask_colors`` mapping) outside ``[0, num_classes)`` that are not
    ``ignore_index`` (in JPEG masks with the advice to save them as PNG instead), and with
    ``decode_images`` and ``in_channels`` the channel count of every image. With
    ``ignore_index`` and a ``mask_colors``/``mask_values`` table, colours or values missing
    from the table (read as ``ignore_index``) come back as ``unlisted_labels`` problems, of the
    :data:`WARNING_KINDS` that callers report without stopping.

    Args:
        splits: Samples per split (e.g. a :class:`~segpipe.data.datasets.Scan`).
        num_classes: Number of classes.
        ignore_index: Label allowed in addition to the classes.
        mask_values: Raw value -> class mapping.
        mask_colors: Colour table for RGB masks.
        orphans: Masks without an image, per split (``Scan.orphans``).
        duplicates: Files ignored for a duplicate stem, per split (``Scan.duplicates``).
        max_workers: Threads (default ``min(8, 2 * available_cpus())``).
        decode_images: Fully decode images too (catches truncated images; slower).
        bands: Band selection used when ``decode_images``.
        in_channels: With ``decode_images``, report images whose channels (after ``bands``)
            cannot feed this many (``channel_mismatch``; 1 <-> 3 is converted, not reported).
        class_names: Names for the classes in messages (default ``class_<i>``).
        missing_mask_dirs: Per split, the mask folder the layout expects where it does not
            exist (``Scan.missing_mask_dirs``): its images' ``missing_mask`` problems name it.
        pixel_counts: When given, each encoded mask's pixels per class ``(num_classes,)`` are
            recorded there by mask file, as :func:`class_pixel_counts` counts them (with
            ``decode_images``, its image's nodata left out as training leaves it out), so a
            caller need not read the files again.
        unlisted_dirs: Per split, the errors of the folders that could not be listed
            (``Scan.unlisted_dirs``): each is an ``unlisted_folder`` problem.

    When every training mask could be read, the classes are counted over the ``train`` split:
    classes without a pixel there are an ``absent_classes`` warning, and a split where at most
    one class has pixels is a ``too_few_classes`` error (nothing to learn; e.g. 0/255 masks
    whose 255 is ``ignore_index``).

    Returns:
        Problems in split/sample order (empty when everything is fine); group them with
        :func:`group_problems`.
    """
    problems: list[Problem] = []
    for split, paths in (orphans or {}).items():
        for p in paths:
            problems.append(
                Problem(Path(p), split, "orphan_mask", "mask has no matching image",
                        FIXES["orphan_mask"], cause="no matching image")
            )
    for split, paths in (duplicates or {}).items():
        for p in paths:
            problems.append(
                Problem(Path(p), split, "duplicate",
                        "another file in the same folder has the same stem; this one is ignored",
                        FIXES["duplicate"],
                        cause="another file in the same folder has the same stem; ignored")
            )
    for split, errors in (unlisted_dirs or {}).items():
        for exc in errors:
            problems.append(Problem(
                Path(exc.filename), split, "unlisted_folder",
                f"the folder cannot be listed ({exc.strerror}), so its files are not read",
                FIXES["unlisted_folder"], cause=f"folder cannot be listed ({exc.strerror})"))
    items = [(split, s) for split, samples in splits.items() for s in samples]

    dtypes: dict[Path, str] = {}

    def run(item: tuple[str, Sample]) -> tuple[list[Problem], np.ndarray | None]:
        return _check_pair(item[0], item[1], num_classes, ignore_index, mask_values,
                           mask_colors, decode_images, bands, in_channels, dtypes)

    train_counts = np.zeros(num_classes + 1, dtype=np.int64)
    encodings: list[tuple[str, Path, np.ndarray]] = []
    for (split, sample), (found, counts) in zip(items, parallel_map(run, items, max_workers,
                                                                    "checking data")):
        problems.extend(found)
        if split == "train" and counts is not None:
            train_counts += counts
        if counts is not None and sample.mask is not None:
            encodings.append((split, sample.mask, counts))
            if pixel_counts is not None:
                pixel_counts[sample.mask] = counts[:num_classes]
    for split, folder in (missing_mask_dirs or {}).items():
        here = sorted(p.name + "/" for p in folder.parent.iterdir()
                      if p.is_dir() and p.name != "images") if folder.parent.is_dir() else []
        found = f" (beside the images: {', '.join(here)})" if here else ""
        problems = [replace(p, cause=f"no mask found: {folder} does not exist{found}",
                            fix=f"put the masks in {folder} (each named as its image), or "
                                "rename their folder to it")
                    if p.kind == "missing_mask" and p.split == split else p for p in problems]
    problems += _mixed_dtypes(splits, dtypes)
    if ignore_index is not None and not mask_values and not mask_colors:
        problems += _mixed_encodings(encodings, num_classes, ignore_index)
    train = splits.get("train") or []
    if train and not any(p.split == "train" and p.kind in _UNCOUNTED for p in problems):
        folder = Path(os.path.commonpath([str(s.mask.parent) for s in train if s.mask])
                      if any(s.mask for s in train) else train[0].image.parent)
        problems += _class_presence("train", train_counts, num_classes, ignore_index,
                                    mask_values, mask_colors, folder, class_names)
    return _with_suffix_hint(problems)


def _with_suffix_hint(problems: list[Problem]) -> list[Problem]:
    """Images without a mask beside masks without an image whose names are the images' plus
    one suffix (``x.png`` / ``x_mask.png``): say so, and name ``data.mask_suffix``."""
    problems, by_case = _with_case_hint(problems)
    missing = {p.path.stem for p in problems
               if p.kind == "missing_mask" and (p.kind, p.path) not in by_case}
    suffixes: dict[str, int] = {}
    for p in problems:
        if p.kind == "orphan_mask" and (p.kind, p.path) not in by_case:
            for stem in missing:
                if p.path.stem.startswith(stem) and len(p.path.stem) > len(stem):
                    suffix = p.path.stem[len(stem):]
                    suffixes[suffix] = suffixes.get(suffix, 0) + 1
    if not suffixes:
        return problems
    suffix = max(suffixes, key=lambda k: (suffixes[k], -len(k)))
    fix = (f"mask names add {suffix!r} to their image's (x.png / x{suffix}.png): set "
           f"data.mask_suffix: {suffix!r}")
    return [replace(p, fix=fix) if p.kind in ("missing_mask", "orphan_mask")
            and (p.kind, p.path) not in by_case else p for p in problems]


def _with_case_hint(
    problems: list[Problem],
) -> tuple[list[Problem], set[tuple[str, Path]]]:
    """A mask whose name differs from an unmatched image's only in letter case
    (``Train_001.png`` for ``train_001.jpg``): say so on both, instead of a suffix hint that
    belongs to other files. Returns the problems and the ``(kind, path)`` of those so told."""
    missing = {(p.split, p.path.stem.lower()): p for p in problems if p.kind == "missing_mask"}
    told: set[tuple[str, Path]] = set()
    example = ""
    for p in problems:
        image = missing.get((p.split, p.path.stem.lower())) if p.kind == "orphan_mask" else None
        if image is not None and image.path.stem != p.path.stem:
            told |= {("orphan_mask", p.path), ("missing_mask", image.path)}
            example = example or f"the mask {p.path.name} and the image {image.path.name}"
    # one fix for all, so that they are one cause each (it named each pair: a line per file)
    fix = (f"names differ from their image's or mask's only in letter case (e.g. {example}), "
           "and names are matched exactly: rename one side (e.g. every name in lower case)")
    return ([replace(p, fix=fix) if (p.kind, p.path) in told else p for p in problems], told)


def class_pixel_counts(
    samples: Sequence[Sample],
    num_classes: int,
    ignore_index: int | None = None,
    mask_values: Mapping[int, int] | None = None,
    mask_colors: Sequence[Sequence[int]] | None = None,
    max_workers: int | None = None,
    per_image: bool = False,
    bands: Sequence[int] | None = None,
    in_channels: int | None = None,
) -> np.ndarray:
    """Pixels per class over the masks of ``samples`` (e.g. for class weights).

    Values outside ``[0, num_classes)`` (including ``ignore_index``) are not counted, nor are
    the pixels of a raster image's nodata, which training ignores.
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
        bands: ``data.bands``: the bands whose nodata is read.
        in_channels: ``data.in_channels``.

    Returns:
        int64 array of shape (num_classes,), or (len(samples), num_classes) with ``per_image``
        (rows in sample order; all zero for samples without a mask).

    Raises:
        ImageReadError: For unreadable masks.
    """

    def count(sample: Sample) -> np.ndarray:
        if sample.mask is None:
            return np.zeros(num_classes, dtype=np.int64)
        labels = encode_mask(read_mask(sample.mask, colours=bool(mask_colors)), sample.mask,
                             mask_values, mask_colors, ignore_index)
        valid = None
        if may_have_nodata(sample.image):
            try:
                valid = read_image_valid(sample.image, bands, in_channels)[1]
            except ImageReadError:  # the image's own problem, reported by the check
                pass
        return _class_pixels(_without_nodata(labels, valid, ignore_index), num_classes,
                             None)[:num_classes]

    rows = parallel_map(count, list(samples), max_workers, "counting pixels")
    if per_image:
        return np.stack(rows) if rows else np.zeros((0, num_classes), dtype=np.int64)
    total = np.zeros(num_classes, dtype=np.int64)
    for c in rows:
        total += c
    return total
