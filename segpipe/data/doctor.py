"""``segpipe check-data``: look at a data set before anyone trains on it.

Reads the ``data`` section of the same YAML files ``segpipe fit`` reads (the other sections are
ignored), builds the :class:`~segpipe.data.SegmentationDataModule`, and reports:

* image/mask pairs found, images without a mask, masks without an image, duplicate stems (split
  by split, after the data module's held-out val split and ``limit_samples``);
* every problem the pre-flight check :func:`~segpipe.data.check_samples` finds: unreadable or
  truncated files, image/mask size mismatches, label values outside the classes that are not the
  ignore index, images whose channels do not fit ``data.in_channels`` (every image when images
  are decoded, else a sample); one line per cause with its count, the first files and the fix
  (:func:`~segpipe.data.checks.group_problems`; ``--json`` lists every file);
* masks saved as JPEG, which is lossy (every one, counted, even when its values are in range):
  label problems in them get the advice to save the masks as PNG, not to change the classes;
* how the masks are encoded, from a sample of masks (dtype, channels, values): class indices,
  colours or 0/255, and whether that matches ``data.mask_values`` / ``data.mask_colors``, with
  the lines to paste under ``data:`` (e.g. the full ``mask_colors`` list of the colours seen);
* whether the images' channel count fits ``data.in_channels`` (same sample);
* the class pixel frequency per split and suggested class weights by median frequency balancing
  (Eigen & Fergus 2015, SegNet): ``w_c = median(freq) / freq_c`` where ``freq_c`` is the number of
  training pixels of class ``c`` divided by the labelled (non-ignored) pixels of the training
  images that contain ``c``; printed as a YAML line for ``model.class_weights``;
* image size statistics (min/median/max H and W, number of distinct sizes);
* per-band statistics of the training images (dtype, min, max, mean, std, in raw units and
  scaled to ``[0, 1]`` as training sees them, see :func:`~segpipe.data.stats.band_statistics`)
  and, unless the images are 8-bit RGB (where the ImageNet default applies), the
  ``mean: [...]`` / ``std: [...]`` lines to paste under ``data:``.

Exit status: 0 when no error was found, 1 when errors were found (``segpipe fit`` would refuse the
data), 2 when the check could not run (bad arguments or config, data root not found).

Usage::

    segpipe check-data --config configs/camvid_unet.yaml --data.root /data/camvid
    segpipe check-data --config configs/lgg_unet.yaml --data.root /data/lgg_mri --json lgg.json
    segpipe check-data --data.root DIR --data.num_classes 3 --splits [val]
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from segpipe.helpformat import HelpFormatter
from segpipe.argparsing import option_at
from segpipe.data.checks import (
    WARNING_KINDS,
    Problem,
    ProblemGroup,
    channel_problem,
    check_samples,
    class_pixel_counts,
    group_problems,
    filling_values,
    is_jpeg,
    parallel_map,
)
from segpipe.data.datamodule import SegmentationDataModule
from segpipe.data.datasets import JPEG_COLOUR_TOLERANCE, Sample, scan_findings
from segpipe.data.io import (
    ImageReadError,
    image_size,
    mask_palette,
    probe_raster,
    read_image,
    read_mask,
)
from segpipe.data.stats import band_statistics, needs_measured_stats
from segpipe.fileio import atomic_write_json

__all__ = [
    "DataReport",
    "build_parser",
    "check_data",
    "format_report",
    "main",
    "median_frequency_weights",
    "size_stats",
    "sniff_masks",
]

_T = TypeVar("_T")

#: Problem kinds that make a mask unusable for pixel counting.
_UNCOUNTABLE = {"unreadable_mask", "missing_mask"}

#: More distinct colours than this in colour masks is no table of class colours.
MAX_MASK_COLOURS = 256

#: Files named per cause / per warning in the text report (``--json`` has every file).
FILES_SHOWN = 3

_JPEG_LOSSY = "JPEG compression is lossy and changes label values at class edges"


# ------------------------------------------------------------------------------------ results
@dataclass
class DataReport:
    """Findings of :func:`check_data`.

    Attributes:
        root: Data root.
        layout: Layout name.
        num_classes: Number of classes.
        class_names: Class names.
        ignore_index: Ignore label or None.
        splits: Per split: ``images``, ``with_mask``, ``missing_mask``, ``orphan_masks``,
            ``duplicates``, ``sizes`` (see :func:`size_stats`), ``source`` (how the split was made).
        problems: Problems found (errors; any makes the exit status 1).
        warnings: Things that are probably wrong but do not stop training.
        hints: Suggestions (e.g. a ``mask_values`` line) that explain the problems.
        notes: Plain information (e.g. "no test split").
        mask_encoding: What a sample of masks looks like (see :func:`sniff_masks`).
        image_format: Channels/dtypes seen in a sample of images.
        band_stats: Per-band statistics of the train split (see :func:`_band_stats`); empty
            when the train split was not checked or could not be measured.
        class_pixels: Per split, pixels per class (labelled pixels only).
        class_images: Per split, number of masks containing each class.
        class_weights: Median-frequency weights from the train split (None: class absent).
        bad_label_values: Label values outside the classes (not the ignore index) -> mask count.
        jpeg_masks: Every mask stored as JPEG (lossy), in split/sample order.
        timings: Seconds per phase and ``total``.
    """

    root: str
    layout: str
    num_classes: int
    class_names: list[str]
    ignore_index: int | None
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mask_encoding: dict[str, Any] = field(default_factory=dict)
    image_format: dict[str, Any] = field(default_factory=dict)
    band_stats: dict[str, Any] = field(default_factory=dict)
    class_pixels: dict[str, list[int]] = field(default_factory=dict)
    class_images: dict[str, list[int]] = field(default_factory=dict)
    class_weights: list[float | None] | None = None
    bad_label_values: dict[int, int] = field(default_factory=dict)
    jpeg_masks: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no error was found."""
        return not self.problems

    def problem_groups(self) -> list[ProblemGroup]:
        """The problems grouped by cause (kind, file-independent description, fix)."""
        return group_problems(self.problems)

    @property
    def num_files(self) -> int:
        """Images plus masks looked at."""
        return sum(s["images"] + s["with_mask"] for s in self.splits.values())

    def class_frequency(self, split: str) -> list[float | None]:
        """Share of the labelled pixels of ``split`` per class (None without labelled pixels)."""
        counts = np.asarray(self.class_pixels.get(split, []), dtype=np.float64)
        total = counts.sum()
        return [float(c / total) if total else None for c in counts]

    def weights_yaml(self, digits: int = 4) -> str | None:
        """``class_weights: [...]`` ready to paste under ``model:`` (absent classes get 1.0)."""
        if self.class_weights is None:
            return None
        vals = [f"{1.0 if w is None else w:.{digits}f}" for w in self.class_weights]
        return f"class_weights: [{', '.join(vals)}]"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready findings (``--json``)."""
        return {
            "ok": self.ok,
            "root": self.root,
            "layout": self.layout,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "ignore_index": self.ignore_index,
            "splits": self.splits,
            "errors": len(self.problems),
            # One entry per cause (kind, cause, fix, count, splits) with every file.
            "problems": [g.to_dict() for g in self.problem_groups()],
            "jpeg_masks": {"count": len(self.jpeg_masks), "files": self.jpeg_masks},
            "warnings": self.warnings,
            "hints": self.hints,
            "notes": self.notes,
            "mask_encoding": self.mask_encoding,
            "image_format": self.image_format,
            "band_stats": self.band_stats,
            "bad_label_values": {str(k): v for k, v in sorted(self.bad_label_values.items())},
            "class_pixels": self.class_pixels,
            "class_images": self.class_images,
            "class_frequency": {s: self.class_frequency(s) for s in self.class_pixels},
            "class_weights": self.class_weights,
            "class_weights_method": (
                "median frequency balancing over the train split: w_c = median(freq) / freq_c, "
                "freq_c = pixels of c / labelled pixels of the images containing c"
            ),
            "timings_s": self.timings,
        }


# ------------------------------------------------------------------------------------ pieces
#: What each kind of sampled mask is, in words (for the summary of masks that mix kinds).
_KIND_WORDS = {"binary_0_255": "with values 0/255 only", "indices": "with class indices",
               "colours": "colour (RGB)", "other_values": "with values outside the classes"}


def median_frequency_weights(per_image_counts: np.ndarray | Sequence[Sequence[int]]) -> list[float | None]:
    """Class weights by median frequency balancing (Eigen & Fergus 2015; SegNet).

    ``freq_c`` = pixels of class ``c`` / pixels of the images in which ``c`` is present (pixels
    meaning the counted, labelled pixels); ``w_c = median_c(freq_c) / freq_c``. Frequent classes get
    weights below 1, rare ones above 1; the median class gets 1.

    Args:
        per_image_counts: (N, K) pixels per class per image, e.g.
            ``class_pixel_counts(samples, K, per_image=True)``.

    Returns:
        K weights; None for classes present in no image (their weight is undefined).
    """
    counts = np.asarray(per_image_counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"per_image_counts must be (N, K), got shape {counts.shape}")
    totals = counts.sum(axis=1)
    freq = np.full(counts.shape[1], np.nan)
    for c in range(counts.shape[1]):
        present = counts[:, c] > 0
        if present.any():
            freq[c] = counts[present, c].sum() / totals[present].sum()
    if np.all(np.isnan(freq)):
        return [None] * counts.shape[1]
    median = float(np.nanmedian(freq))
    return [None if np.isnan(f) else median / float(f) for f in freq]


def size_stats(sizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Image size statistics.

    Args:
        sizes: ``(H, W)`` per image.

    Returns:
        ``{"count", "height": {min, median, max}, "width": {...}, "distinct", "most_common"}``
        (``most_common``: up to 3 ``[H, W, count]``); empty dict for no sizes.
    """
    if not sizes:
        return {}
    arr = np.asarray(sizes, dtype=np.int64)
    common = Counter(map(tuple, arr.tolist())).most_common()

    def stats(col: np.ndarray) -> dict[str, float]:
        med = float(np.median(col))
        return {"min": int(col.min()), "median": int(med) if med.is_integer() else med,
                "max": int(col.max())}

    return {
        "count": int(len(arr)),
        "height": stats(arr[:, 0]),
        "width": stats(arr[:, 1]),
        "distinct": len(common),
        "most_common": [[int(h), int(w), int(n)] for (h, w), n in common[:3]],
    }


def _even_sample(items: Sequence[_T], n: int) -> list[_T]:
    if n <= 0 or not items:
        return []
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, num=n).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def _fmt_values(values: Sequence[int], limit: int = 12) -> str:
    vals = sorted(int(v) for v in values)
    if len(vals) >= 3 and vals == list(range(vals[0], vals[-1] + 1)):
        return f"{vals[0]}..{vals[-1]}"
    shown = ", ".join(str(v) for v in vals[:limit])
    return "{" + shown + (", ..." if len(vals) > limit else "") + "}"


def _colour_yaml(colours: Sequence[Sequence[int]]) -> str:
    """``mask_colors: [[r, g, b], ...]``, one YAML line to paste under ``data:``."""
    return "mask_colors: [" + ", ".join(f"[{c[0]}, {c[1]}, {c[2]}]" for c in colours) + "]"


def _jpeg_values_hint(values: Sequence[int], where: str) -> str:
    return (
        f"values {_fmt_values(values)} {where} are no class: {_JPEG_LOSSY}, so these "
        "values are compression noise, not classes to add or map. Save the masks as PNG "
        "(lossless) from the original labels"
    )


def sniff_masks(
    masks: Sequence[Path],
    num_classes: int,
    ignore_index: int | None = None,
    mask_values: Mapping[int, int] | None = None,
    mask_colors: Sequence[Sequence[int]] | None = None,
    max_workers: int | None = None,
) -> dict[str, Any]:
    """Look at a sample of masks and say how they are encoded.

    Kinds: ``indices`` (one channel, values in ``0..K-1`` or the ignore index), ``binary_0_255``
    (one channel, only 0 and 255), ``other_values`` (one channel, values outside the classes, e.g.
    gray levels 0/38/75), ``colours`` (RGB with differing channels). Masks stored as JPEG are
    counted: values or colours in them that fit no class are put down to the lossy compression
    (save them as PNG), and only lossless masks lead to advice on ``data.num_classes`` or
    ``data.mask_values``. Colour masks without ``data.mask_colors`` get the full list of colours
    seen as a ``mask_colors: [...]`` line to paste under ``data:``.

    Args:
        masks: Mask files (unreadable ones are skipped; the full check reports them).
        num_classes: Number of classes.
        ignore_index: Ignore label.
        mask_values: Configured value mapping (changes the verdict).
        mask_colors: Configured colour table (changes the verdict).
        max_workers: Threads.

    Returns:
        ``{"sampled", "jpeg" (JPEG masks in the sample), "dtypes", "channels", "kinds" (kind ->
        count), "values" (distinct raw values, single-channel masks), "colours" (distinct RGB
        colours, up to :data:`MAX_MASK_COLOURS`), "distinct_colours", "yaml" (lines to paste
        under ``data:``, or None), "verdict", "hints", "warnings"}``; a hint with a YAML
        suggestion ends with ``:`` and the YAML lines, one per line.
    """

    def look(path: Path) -> dict[str, Any] | None:
        try:
            raw = read_mask(path, colours=bool(mask_colors))
            dtype = str(read_image(path).dtype)
        except ImageReadError:
            return None
        out: dict[str, Any] = {"dtype": dtype, "jpeg": is_jpeg(path), "path": path}
        if not mask_colors and raw.ndim == 2:
            palette = mask_palette(path)
            if palette is not None:  # index -> colour, for the indices the mask uses
                out["palette"] = {int(v): palette[v] for v in np.unique(raw)
                                  if 0 <= v < len(palette)}
        if raw.ndim == 3 and not (
            np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2])
        ):
            out["channels"] = 3
            out["kind"] = "colours"
            uniq = np.unique(raw.reshape(-1, 3), axis=0)[: MAX_MASK_COLOURS + 1]
            out["colours"] = [tuple(int(v) for v in c) for c in uniq]
            return out
        flat = raw[..., 0] if raw.ndim == 3 else raw
        vals = np.unique(flat)
        out["channels"] = 3 if raw.ndim == 3 else 1
        out["values"] = vals.tolist()
        out["large"] = filling_values(flat, [int(v) for v in vals])
        allowed = set(range(num_classes)) | ({ignore_index} if ignore_index is not None else set())
        if set(out["values"]) <= {0, 255} and 255 in out["values"] and num_classes <= 255:
            out["kind"] = "binary_0_255"
        elif set(out["values"]) <= allowed:
            out["kind"] = "indices"
        else:
            out["kind"] = "other_values"
        return out

    looked = [r for r in parallel_map(look, list(masks), max_workers, "sampling masks")
              if r is not None]
    kinds = Counter(r["kind"] for r in looked)
    values = sorted({v for r in looked for v in r.get("values", [])})
    lossless_values = sorted({v for r in looked if not r["jpeg"] for v in r.get("values", [])})
    jpeg_values = sorted({v for r in looked if r["jpeg"] for v in r.get("values", [])})
    colours = sorted({c for r in looked for c in r.get("colours", [])})
    n_jpeg = sum(1 for r in looked if r["jpeg"])
    result: dict[str, Any] = {
        "sampled": len(looked),
        "jpeg": n_jpeg,
        "dtypes": sorted({r["dtype"] for r in looked}),
        "channels": sorted({r["channels"] for r in looked}),
        "kinds": dict(kinds),
        "values": values[:256],
        "colours": [list(c) for c in colours[:MAX_MASK_COLOURS]],
        "distinct_colours": len(colours),
        "yaml": None,
        "verdict": "",
        "hints": [],
        "warnings": [],
    }
    hints: list[str] = result["hints"]
    warns: list[str] = result["warnings"]
    seen: dict[int, tuple[tuple[int, int, int], Path]] = {}
    for r in looked:  # palette masks whose palettes give one index different colours
        clash = next(((i, c, seen[i]) for i, c in r.get("palette", {}).items()
                      if i in seen and seen[i][0] != c), None)
        if clash is not None:
            i, colour, (first, where) = clash
            warns.append(
                f"the masks are palette images whose palettes differ: index {i} is "
                f"{list(colour)} in {r['path'].name} but {list(first)} in {where.name}; the "
                "indices are read as the classes. If the colours are the classes (tools that "
                "save colour masks as palette PNGs order each file's palette anew), set "
                "data.mask_colors to the class colours (i-th colour = class i) to read them by "
                "colour")
            break
        for i, c in r.get("palette", {}).items():
            seen.setdefault(i, (c, r["path"]))
    if not looked:
        result["verdict"] = "no readable mask in the sample"
        return result
    main_kind = kinds.most_common(1)[0][0]
    mixed = (" (the sampled masks mix encodings: " + ", ".join(
        f"{n} {_KIND_WORDS.get(k, k)}" for k, n in kinds.most_common()) + ")"
        if len(kinds) > 1 else "")
    jpeg_note = f"; {n_jpeg} of them JPEG (lossy)" if n_jpeg else ""
    allowed = set(range(num_classes)) | ({ignore_index} if ignore_index is not None else set())
    if "colours" in kinds and main_kind != "colours":  # a few odd files: no data-set advice
        odd = [r["path"].name for r in looked if r["kind"] == "colours"]
        warns.append(
            f"{len(odd)} of the {len(looked)} sampled masks are colour images "
            f"({', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''}) where most are "
            "single-channel: export those as single-channel masks like the others")
    if main_kind == "colours":
        many = len(colours) > MAX_MASK_COLOURS
        count = f"more than {MAX_MASK_COLOURS}" if many else str(len(colours))
        result["verdict"] = f"colour-coded RGB masks, {count} distinct colours{mixed}{jpeg_note}"
        jpeg_colours = any(r["jpeg"] and r["kind"] == "colours" for r in looked)
        known = [tuple(int(v) for v in m[:3]) for m in mask_colors or []]
        unknown = [c for c in colours if c not in known]
        if jpeg_colours and (unknown or not mask_colors):
            hints.append(
                f"the colour masks are JPEG files: {_JPEG_LOSSY}, so most of the {count} "
                "colours seen are compression noise, not class colours. Save the masks as PNG "
                "(lossless) from the original labels"
                + (f"; meanwhile each colour within {JPEG_COLOUR_TOLERANCE:g} of one in "
                   "data.mask_colors is read as it, and the blends at class edges farther from "
                   "every table colour as data.ignore_index" if mask_colors
                   else ", then set data.mask_colors")
            )
        elif many and (unknown or not mask_colors):
            hints.append(
                f"the masks hold more than {MAX_MASK_COLOURS} distinct colours: not a table of "
                "class colours (anti-aliased or resized masks?); export them with exact class "
                "colours (PNG, no smoothing) or as single-channel class indices"
            )
        elif mask_colors:
            if unknown and ignore_index is None:
                table = [list(c) for c in known] + [list(c) for c in unknown]
                result["yaml"] = [_colour_yaml(table), f"num_classes: {len(table)}"]
                shown = ", ".join(f"[{r}, {g}, {b}]" for r, g, b in unknown)
                hints.append(
                    f"colours {shown} in the masks are not in data.mask_colors: set "
                    "data.ignore_index to ignore them, or add them as classes; the configured "
                    "colours with these appended (keep class order), to paste under `data:`:\n"
                    + "\n".join(result["yaml"])
                )
        else:
            table = [list(c) for c in colours]
            result["yaml"] = [_colour_yaml(table)]
            more = ""
            if len(table) != num_classes:
                result["yaml"].append(f"num_classes: {len(table)}")
                more = (f"; data.num_classes is {num_classes}: to keep it, list only the class "
                        "colours and set data.ignore_index for the others")
            hints.append(
                "masks are colour-coded: set data.mask_colors, i-th colour = class i. The "
                f"{len(table)} colours seen in {result['sampled']} sampled mask(s), sorted (put "
                f"them in class order{more}), to paste under `data:`:\n"
                + "\n".join(result["yaml"])
            )
        return result
    jpeg_outside = [v for v in jpeg_values if v not in allowed]
    if mask_values:
        keys = set(int(k) for k in mask_values)
        unmapped = [v for v in lossless_values if v not in keys]
        jpeg_unmapped = [v for v in jpeg_values if v not in keys]
        result["verdict"] = (
            f"single-channel masks with values {_fmt_values(values)}, mapped by data.mask_values"
            f"{mixed}{jpeg_note}"
        )
        if jpeg_unmapped:
            hints.append(_jpeg_values_hint(jpeg_unmapped, "in the JPEG masks (not in "
                                                          "data.mask_values)"))
        if unmapped and ignore_index is None:
            hints.append(
                f"values {_fmt_values(unmapped)} are not in data.mask_values; add them or set "
                "data.ignore_index to ignore them"
            )
        return result
    if main_kind == "binary_0_255":
        result["verdict"] = f"binary masks with values 0/255{mixed}{jpeg_note}"
        noise = [v for v in jpeg_values if v not in (0, 255)]
        if noise:
            hints.append(_jpeg_values_hint(noise, "in the JPEG masks (between 0 and 255)"))
        if ignore_index == 255:
            warns.append(
                "masks are 0/255 but 255 is data.ignore_index: every foreground pixel would be "
                "ignored and the foreground class never learnt; set data.mask_values: "
                "{0: 0, 255: 1} (and another ignore_index, or null)"
            )
        else:
            hints.append("masks are 0/255: set data.mask_values: {0: 0, 255: 1}")
        return result
    outside = [v for v in values if v not in allowed]
    if main_kind == "indices" and not outside:  # odd colour masks are warned about above
        ign = f" + ignore index {ignore_index}" if ignore_index in values else ""
        result["verdict"] = (
            f"class indices, values {_fmt_values(values)} (classes 0..{num_classes - 1}{ign})"
            f"{mixed}{jpeg_note}"
        )
        return result
    lossless_outside = [v for v in lossless_values if v not in allowed]
    result["verdict"] = (
        f"single-channel masks with values {_fmt_values(values)}, "
        f"{_fmt_values(outside)} outside the classes 0..{num_classes - 1}{mixed}{jpeg_note}"
    )
    large = sorted({v for r in looked if r["jpeg"] for v in r.get("large", [])} & set(jpeg_outside))
    if large:  # on a share of some mask: a class, not JPEG's edge noise
        hints.append(
            f"values {_fmt_values(large)} in the JPEG masks cover 5 % of a mask or more: a class "
            f"beyond data.num_classes={num_classes}? (set data.num_classes, or map the values "
            "with data.mask_values); save the masks as PNG too, as JPEG changes values at class "
            "edges")
    noise = [v for v in jpeg_outside if v not in large]
    if noise:
        hints.append(_jpeg_values_hint(noise, "in the JPEG masks"))
    if not lossless_outside:
        return result
    # Lossless masks: the values are what the labelling tool wrote, so the classes are off.
    if len(lossless_values) == num_classes and not jpeg_outside:
        mapping = ", ".join(f"{v}: {i}" for i, v in enumerate(lossless_values))
        hints.append(f"the masks hold {num_classes} distinct values; if they are the classes in "
                     f"order, set data.mask_values: {{{mapping}}}")
    else:
        hints.append(
            f"values {_fmt_values(lossless_outside)} are no class: set data.mask_values to map "
            "raw values to classes, data.ignore_index to ignore one value, or raise "
            "data.num_classes"
        )
    return result


# ------------------------------------------------------------------------------------ check
def check_data(
    dm: SegmentationDataModule,
    splits: Sequence[str] | None = None,
    decode_images: bool = True,
    sample_size: int = 16,
    max_workers: int | None = None,
) -> DataReport:
    """Check a data set as the data module sees it.

    Args:
        dm: The data module (not set up).
        splits: Splits to check (default: all the data module has).
        decode_images: Fully decode every image (catches truncated images); False reads headers.
        sample_size: Masks and images per split looked at for the encoding and channel checks.
        max_workers: Threads for decoding.

    Returns:
        The findings.

    Raises:
        FileNotFoundError: When the data root or the layout's folders are missing.
        ValueError: Unknown split names, malformed split files.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    scan = dm.scan()
    available = dm.splits
    timings["scan"] = time.perf_counter() - t0
    names = list(splits) if splits else list(available)
    unknown = [s for s in names if s not in available]
    if unknown:
        raise ValueError(
            f"{dm.root}: no split(s) {unknown} in the {dm.layout!r} layout (found: "
            f"{sorted(available)}); pass --splits with some of these"
        )
    chosen = {s: available[s] for s in names}
    rep = DataReport(
        root=str(dm.root), layout=dm.layout, num_classes=dm.num_classes,
        class_names=list(dm.class_names), ignore_index=dm.ignore_index,
    )

    # Pairs per split -----------------------------------------------------------------------
    limit = dm.hparams.get("limit_samples")
    empty: list[Problem] = []  # train or val splits without an image: errors, as in fit
    for s, samples in chosen.items():
        with_mask = sum(1 for x in samples if x.mask is not None)
        source = _split_source(dm, scan, s)
        rep.splits[s] = {
            "images": len(samples), "with_mask": with_mask, "missing_mask": len(samples) - with_mask,
            "orphan_masks": len(scan.orphans.get(s, [])), "duplicates": len(scan.duplicates.get(s, [])),
            "source": source, "folder": str(scan.folders.get(s, dm.root)),
        }
        if not samples:
            folder = scan.folders.get(s, Path(dm.root))
            if s == "test":
                rep.warnings.append(f"[{s}] the split has no images ({folder}): `segpipe test` "
                                    "refuses it; put images there or delete the folder")
            else:  # segpipe fit stops on it
                empty.append(Problem(Path(folder), s, "empty_split", "the split has no images",
                                     "put images there" + (", or delete the empty folder so "
                                     "that data.val_fraction holds out part of train"
                                     if s == "val" else "")))
    if "val" not in available and "train" in available and dm.validates and (
            not splits or "val" in splits):  # fit stops on it
        empty.append(Problem(Path(dm.root), "val", "empty_split", "there is no val split",
                             dm.no_val_hint()))
    if "test" not in available:
        rep.notes.append("no test split: `segpipe test` will evaluate the val split")
    if limit:
        rep.notes.append(f"data.limit_samples={limit}: only that many samples per split checked")

    # Pre-flight check (every file) ---------------------------------------------------------
    t0 = time.perf_counter()
    counted: dict[Path, np.ndarray] = {}  # each mask's class pixels, as training counts them
    rep.problems = check_samples(
        chosen, num_classes=dm.num_classes, ignore_index=dm.ignore_index,
        mask_values=dm.mask_values, mask_colors=dm.mask_colors, class_names=dm.class_names,
        **scan_findings(scan, chosen),
        max_workers=max_workers, decode_images=decode_images, bands=dm.bands,
        # Decoded images: the channels of every image are checked here (else a sample below).
        in_channels=dm.in_channels if decode_images else None,
        pixel_counts=counted,
    )
    unlabelled = getattr(scan, "missing_mask_dirs", {}).get("test")
    if unlabelled is not None and "test" in chosen:  # images to predict: fit does not read them
        n = sum(p.kind == "missing_mask" and p.split == "test" for p in rep.problems)
        rep.problems = [p for p in rep.problems
                        if not (p.kind == "missing_mask" and p.split == "test")]
        rep.warnings.append(
            f"[test] {n} image(s) and no masks ({unlabelled} does not exist): `segpipe test` "
            "refuses the split, which `fit` does not read; predict it with `segpipe predict`, "
            "or add the masks to score it")
    # Warnings among them (unlisted mask colours/values read as ignore_index) do not stop fit.
    rep.warnings += [g.line(FILES_SHOWN) for g in group_problems(
        [p for p in rep.problems if p.kind in WARNING_KINDS])]
    rep.problems = empty + [p for p in rep.problems if p.kind not in WARNING_KINDS]
    for p in rep.problems:
        for v in p.values:
            rep.bad_label_values[v] = rep.bad_label_values.get(v, 0) + 1
    masks = [x.mask for samples in chosen.values() for x in samples if x.mask is not None]
    rep.jpeg_masks = [str(m) for m, jpeg in zip(masks, parallel_map(is_jpeg, masks, max_workers,
                                                                    "mask formats")) if jpeg]
    if rep.jpeg_masks:
        n = len(rep.jpeg_masks)
        rep.warnings.append(
            f"{n} of {len(masks)} masks are JPEG files ({_first_files(rep.jpeg_masks)}): "
            f"{_JPEG_LOSSY}, also where the values stay within the classes, so the model "
            "learns from damaged labels; save the masks as PNG (lossless) from the original "
            "labels"
        )
    timings["check"] = time.perf_counter() - t0

    # Image sizes (headers) -----------------------------------------------------------------
    t0 = time.perf_counter()

    def header(sample: Sample) -> tuple[int, int] | None:
        try:
            return image_size(sample.image)
        except ImageReadError:
            return None

    for s, samples in chosen.items():
        sizes = [x for x in parallel_map(header, samples, max_workers, f"sizes {s}")
                 if x is not None]
        rep.splits[s]["sizes"] = size_stats(sizes)
    timings["sizes"] = time.perf_counter() - t0

    # Mask encoding and image channels (a sample) -------------------------------------------
    t0 = time.perf_counter()
    bad_files = {p.path for p in rep.problems if p.kind in ("unreadable_image", "unreadable_mask")}
    mask_sample = [
        x.mask for samples in chosen.values()
        for x in _even_sample([y for y in samples if y.mask is not None and y.mask not in bad_files],
                              sample_size)
    ]
    rep.mask_encoding = sniff_masks(mask_sample, dm.num_classes, dm.ignore_index,
                                    dm.mask_values, dm.mask_colors, max_workers)
    rep.hints += rep.mask_encoding.pop("hints")
    rep.warnings += rep.mask_encoding.pop("warnings")
    image_sample = [
        (s, x.image) for s, samples in chosen.items()
        for x in _even_sample([y for y in samples if y.image not in bad_files], sample_size)
    ]
    _check_channels(rep, image_sample, dm, max_workers, report=not decode_images)
    timings["sample"] = time.perf_counter() - t0

    # Per-band statistics of the training images ---------------------------------------------
    t0 = time.perf_counter()
    if "train" in chosen:
        unusable = bad_files | {p.path for p in rep.problems if p.kind == "channel_mismatch"}
        _band_stats(rep, [x.image for x in chosen["train"] if x.image not in unusable], dm,
                    max_workers)
    else:
        rep.notes.append("train split not checked: no band statistics (data.mean/data.std)")
    timings["stats"] = time.perf_counter() - t0

    # Class pixel frequency and weights ------------------------------------------------------
    t0 = time.perf_counter()
    uncountable = {p.path for p in rep.problems
                   if p.kind in _UNCOUNTABLE or (p.kind == "bad_labels" and not p.values)}
    per_image: dict[str, np.ndarray] = {}
    for s, samples in chosen.items():
        ok = [x for x in samples if x.mask is not None and x.mask not in uncountable]
        try:
            # counted by the check, which read the images' nodata when it decoded them
            per_image[s] = (np.stack([counted[x.mask] for x in ok]).astype(np.int64)
                            if decode_images and all(x.mask in counted for x in ok) and ok
                            else class_pixel_counts(
                                ok, dm.num_classes, dm.ignore_index, dm.mask_values,
                                dm.mask_colors, max_workers=max_workers, per_image=True,
                                bands=dm.bands, in_channels=dm.in_channels))
        except ImageReadError as exc:  # pragma: no cover - check_samples reports these first
            rep.warnings.append(f"[{s}] pixel counts skipped: {exc}")
            continue
        rep.class_pixels[s] = per_image[s].sum(axis=0).astype(int).tolist()
        rep.class_images[s] = (per_image[s] > 0).sum(axis=0).astype(int).tolist()
    if "train" in per_image and len(per_image["train"]):
        rep.class_weights = median_frequency_weights(per_image["train"])
        # classes without a training pixel: check_samples's absent_classes / too_few_classes
    elif "train" not in chosen:
        rep.notes.append("train split not checked: no class weights suggested")
    timings["counts"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    rep.timings = {k: round(v, 3) for k, v in timings.items()}
    return rep


def _split_source(dm: SegmentationDataModule, scan: Any, split: str) -> str:
    """Where a split's samples come from, in words."""
    hp = dm.hparams
    root = Path(dm.root).expanduser()
    if split in ("train", "val") and (hp.get("val_cases") is not None
                                      or hp.get("val_case_fraction") is not None):
        how = (f"data.val_cases {list(hp['val_cases'])}" if hp.get("val_cases") is not None
               else f"data.val_case_fraction={hp['val_case_fraction']}, seed {hp['seed']}"
               + (f", fold {hp['fold']}" if hp.get("fold") is not None else ""))
        return f"train + val split by case ({how})"
    if split not in scan:
        return f"held out from train (data.val_fraction={hp['val_fraction']}, seed {hp['seed']})"
    if dm.layout == "lgg":
        if (root / "splits.csv").is_file():
            return "patients listed in splits.csv"
        return f"seeded patient split (data.val_fraction={hp['val_fraction']}, seed {hp['seed']})"
    folder = scan.folders.get(split)
    if folder is None:
        return "-"
    if split != "train" and folder == scan.folders.get("train"):
        return "slices held out from train (data.val_slices)"
    try:
        return Path(folder).relative_to(root).as_posix() + "/"
    except ValueError:
        return str(folder)


def _first_files(files: Sequence[Any], n: int = FILES_SHOWN) -> str:
    """``a, b, c, ... and 85 more``."""
    shown = ", ".join(str(f) for f in files[:n])
    return shown + (f", ... and {len(files) - n} more" if len(files) > n else "")


def _check_channels(
    rep: DataReport, items: Sequence[tuple[str, Path]], dm: SegmentationDataModule,
    max_workers: int | None, report: bool = True,
) -> None:
    """Channel count / dtype of a sample of images against ``data.in_channels``.

    With ``report``, sampled images whose channels do not fit are added to ``rep.problems``
    (when every image was decoded, :func:`check_samples` has reported them all already).
    """

    def look(item: tuple[str, Path]) -> tuple[str, Path, int, str, int] | None:
        try:
            img = read_image(item[1], dm.bands, dm.in_channels)
            info = probe_raster(item[1]) if dm.bands is None else None
        except ImageReadError:
            return None
        in_file = info.count if info is not None else int(img.shape[2])
        return item[0], item[1], int(img.shape[2]), str(img.dtype), in_file

    looked = [r for r in parallel_map(look, list(items), max_workers, "sampling images")
              if r is not None]
    dropped = [r for r in looked if r[4] > r[2]]  # a raster band tagged alpha, not read
    if dropped:
        _, path, c, _, n = dropped[0]
        rep.notes.append(
            f"{len(dropped)} sampled raster(s) have a band tagged alpha that is not read (e.g. "
            f"{path}: {n} bands, {c} read); if it is data (e.g. near-infrared in a 4-band uint8 "
            f"GeoTIFF), set data.in_channels: {n}, or pick bands with data.bands")
    channels = Counter(r[2] for r in looked)
    rep.image_format = {
        "sampled": len(looked),
        "channels": {str(k): v for k, v in sorted(channels.items())},
        "dtypes": sorted({r[3] for r in looked}),
        "in_channels": dm.in_channels,
        "bands": dm.bands,
    }
    want = dm.in_channels
    for split, path, c, _, _ in looked:
        found = channel_problem(path, split, c, want, dm.bands) if report else None
        if found is not None:
            rep.problems.append(found)
    if len(channels) > 1 and not all(c == want or {c, want} == {1, 3} for c in channels):
        rep.warnings.append(
            f"images have different channel counts {dict(channels)}; set data.in_channels so all "
            "are converted (1 <-> 3 only) or pick bands with data.bands"
        )
    if any(c != want and {c, want} == {1, 3} for c in channels):
        rep.notes.append(
            f"images with {'/'.join(str(c) for c in channels if c != want)} channel(s) are "
            f"converted to data.in_channels={want} (gray <-> RGB)"
        )


def _band_stats(
    rep: DataReport, images: Sequence[Path], dm: SegmentationDataModule, max_workers: int | None
) -> None:
    """Per-band statistics of the training images, as the data module would measure them.

    Fills ``rep.band_stats`` with :meth:`~segpipe.data.stats.BandStats.to_dict` plus ``split``,
    ``labels`` (file band numbers with ``data.bands``, else channel numbers from 1), ``needed``
    (the images are not 8-bit RGB, so the default mean/std does not fit), ``configured``
    (``data.mean``/``data.std`` from the config, or None) and ``yaml`` (the lines to paste under
    ``data:``, or None for 8-bit RGB).
    """
    if not images:
        return
    try:
        needed = needs_measured_stats(images, bands=dm.bands, in_channels=dm.in_channels)
        stats = band_statistics(images, bands=dm.bands, in_channels=dm.in_channels,
                                seed=int(dm.hparams.get("seed") or 0), max_workers=max_workers)
    except (ImageReadError, ValueError) as exc:
        rep.warnings.append(f"[train] band statistics skipped: {exc}")
        return
    n = len(stats.mean)
    bands = list(dm.bands) if dm.bands else None
    labels = bands if bands is not None and len(bands) == n else list(range(1, n + 1))
    mean, std = dm.hparams.get("mean"), dm.hparams.get("std")
    configured = None if mean is None or std is None else {"mean": list(mean), "std": list(std)}
    rep.band_stats = {
        "split": "train",
        "images_available": len(images),
        **stats.to_dict(),
        "labels": labels,
        "needed": needed,
        "configured": configured,
        "yaml": stats.yaml_lines() if needed else None,
    }


def _format_band_stats(bs: dict[str, Any]) -> list[str]:
    """The "Band statistics" section of :func:`format_report`."""
    dtypes = ", ".join(bs["dtypes"])
    lines = [
        f"Band statistics ({bs['split']}, {bs['num_images']} of {bs['images_available']} images, "
        f"{bs['num_pixels']} sampled pixels; dtype {dtypes}; raw units and scaled to [0, 1] as "
        "training sees them)"
    ]
    raw = bs["raw"]
    rows: list[list[Any]] = [["band", "dtype", "min", "max", "mean", "std", "min [0,1]",
                              "max [0,1]", "mean [0,1]", "std [0,1]"]]
    for i, label in enumerate(bs["labels"]):
        if raw is None:
            raw_cells = ["-", "-", "-", "-"]
        else:
            raw_cells = [f"{raw[k][i]:.5g}" for k in ("min", "max", "mean", "std")]
        rows.append([label, dtypes, *raw_cells, f"{bs['min'][i]:.4g}", f"{bs['max'][i]:.4g}",
                     f"{bs['mean'][i]:.4g}", f"{bs['std'][i]:.4g}"])
    lines += _table(rows)
    if bs["yaml"] is None and bs["configured"] is not None:
        conf = bs["configured"]
        lines.append(f"  data.mean / data.std are set in the config and used: {conf['mean']} / "
                     f"{conf['std']} (compare the mean and std [0,1] columns above)")
    elif bs["yaml"] is None:
        mixed = (f"; the sampled images mix dtypes ({dtypes}): the first images decide, see "
                 "the warnings" if len(bs["dtypes"]) > 1 else "")
        lines.append("  8-bit RGB images: the ImageNet default mean/std is used (no data.mean / "
                     f"data.std needed){mixed}.")
    else:
        if bs["configured"] is not None:
            conf = bs["configured"]
            lines.append(f"  data.mean / data.std are set in the config: {conf['mean']} / "
                         f"{conf['std']}; the measured values are:")
        else:
            lines.append("  The images are not 8-bit RGB, so the default mean/std does not fit "
                         "them. Paste under `data:` in the config (or pass --data.mean / "
                         "--data.std):")
        lines += [f"    {line}" for line in bs["yaml"]]
    lines.append("")
    return lines


# ------------------------------------------------------------------------------------ output
def _table(rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Plain-text table: numbers right-aligned, text left-aligned (header follows its column)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

    def numeric(text: str) -> bool:
        return text.replace(".", "", 1).replace("-", "", 1).isdigit()

    right = [any(numeric(r[i]) for r in cells[1:]) for i in range(len(widths))]
    return [
        (indent + "  ".join(c.rjust(w) if right[i] else c.ljust(w)
                            for i, (c, w) in enumerate(zip(r, widths)))).rstrip()
        for r in cells
    ]


def format_report(rep: DataReport, files_per_cause: int = FILES_SHOWN) -> str:
    """Human-readable findings (what ``segpipe check-data`` prints).

    Errors are printed one line per cause (:meth:`DataReport.problem_groups`): count, the first
    files and the fix. Hints that carry YAML end with the lines to paste, indented.

    Args:
        rep: Findings of :func:`check_data`.
        files_per_cause: Files named per cause before "... and N more" (``--json`` has all).

    Returns:
        Multi-line text.
    """
    ign = f"ignore_index {rep.ignore_index}" if rep.ignore_index is not None else "no ignore_index"
    lines = [f"Data check of {rep.root} (layout {rep.layout}, {rep.num_classes} classes, {ign})", ""]

    lines.append("Image/mask pairs")
    rows: list[list[Any]] = [["split", "images", "with mask", "missing mask", "orphan masks",
                              "duplicates", "source"]]
    for s, d in rep.splits.items():
        rows.append([s, d["images"], d["with_mask"], d["missing_mask"], d["orphan_masks"],
                     d["duplicates"], d["source"]])
    lines += _table(rows) + [""]

    lines.append("Image sizes (H×W, from file headers)")
    rows = [["split", "min H", "median H", "max H", "min W", "median W", "max W", "distinct",
             "most common"]]
    for s, d in rep.splits.items():
        st = d.get("sizes") or {}
        if not st:
            rows.append([s, "-", "-", "-", "-", "-", "-", 0, "-"])
            continue
        common = ", ".join(f"{h}×{w} ({n})" for h, w, n in st["most_common"][:2])
        rows.append([s, st["height"]["min"], st["height"]["median"], st["height"]["max"],
                     st["width"]["min"], st["width"]["median"], st["width"]["max"],
                     st["distinct"], common])
    lines += _table(rows) + [""]

    fmt = rep.image_format
    if fmt:
        ch = ", ".join(f"{k} channel(s): {v}" for k, v in fmt["channels"].items()) or "-"
        bands = f", data.bands={fmt['bands']}" if fmt.get("bands") else ""
        lines += [f"Images (sample of {fmt['sampled']}): {ch}; dtype {', '.join(fmt['dtypes']) or '-'}"
                  f"; data.in_channels={fmt['in_channels']}{bands}"]
    enc = rep.mask_encoding
    if enc:
        lines += [
            f"Masks (sample of {enc['sampled']}): dtype {', '.join(enc['dtypes']) or '-'}, "
            f"{'/'.join(str(c) for c in enc['channels']) or '-'} channel(s) -> {enc['verdict']}",
        ]
    if rep.bad_label_values:
        vals = ", ".join(f"{v} (in {n} mask(s))" for v, n in sorted(rep.bad_label_values.items()))
        lines.append(
            f"Label values outside 0..{rep.num_classes - 1}"
            + (f" and not ignore_index {rep.ignore_index}" if rep.ignore_index is not None else "")
            + f": {vals}"
        )
    lines.append("")
    if rep.band_stats:
        lines += _format_band_stats(rep.band_stats)

    if rep.class_pixels:
        splits = list(rep.class_pixels)
        lines.append("Class pixel frequency (% of labelled pixels; ignored pixels not counted)")
        rows = [["#", "class", *[f"{s} %" for s in splits], *[f"{s} images" for s in splits]]]
        freqs = {s: rep.class_frequency(s) for s in splits}
        for i, name in enumerate(rep.class_names):
            rows.append([
                i, name,
                *[("-" if freqs[s][i] is None else f"{100 * freqs[s][i]:.2f}") for s in splits],
                *[rep.class_images[s][i] for s in splits],
            ])
        rows.append(["", "labelled pixels", *[sum(rep.class_pixels[s]) for s in splits],
                     *["" for _ in splits]])
        lines += _table(rows) + [""]
    if rep.class_weights is not None:
        lines += [
            "Suggested class weights (median frequency balancing over train: "
            "w_c = median(freq) / freq_c, freq_c = pixels of c / labelled pixels of the train "
            "images containing c)",
        ]
        rows = [["#", "class", "weight"]]
        for i, (name, w) in enumerate(zip(rep.class_names, rep.class_weights)):
            rows.append([i, name, "absent (1.0)" if w is None else f"{w:.4f}"])
        lines += _table(rows)
        lines += ["  Paste under `model:` in the config (or pass --model.class_weights):",
                  f"    {rep.weights_yaml()}", ""]

    for title, items in (("Notes", rep.notes), ("Hints", rep.hints), ("Warnings", rep.warnings)):
        if items:
            lines.append(f"{title}:")
            lines += [f"  - {x}".replace("\n", "\n      ") for x in items]
            lines.append("")

    if rep.problems:
        n_files = len({p.path for p in rep.problems})
        kinds = Counter(p.kind for p in rep.problems)
        groups = rep.problem_groups()
        lines.append(
            f"ERRORS: {len(rep.problems)} problem(s) in {n_files} file(s), {len(groups)} "
            f"cause(s) ({', '.join(f'{k}: {n}' for k, n in sorted(kinds.items()))}):"
        )
        lines += [f"  - {g.line(files_per_cause)}" for g in groups]
        if any(g.count > files_per_cause for g in groups):
            lines.append("  (--json FILE lists every file)")
        lines.append("")
    verdict = "OK: no errors found" if rep.ok else "FAILED: fix the errors above before training"
    lines.append(
        f"{verdict} ({len(rep.warnings)} warning(s)); {rep.num_files} files in "
        f"{rep.timings.get('total', 0.0):.2f} s"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ CLI
class _UsageError(ValueError):
    """A problem with the command line or config (exit status 2)."""


def build_parser() -> ArgumentParser:
    """The ``segpipe check-data`` argument parser (jsonargparse).

    Returns:
        Parser with ``--config`` (the ``data`` section of a training config), every ``--data.*``
        option of :class:`~segpipe.data.SegmentationDataModule` and the checker's own options.
    """
    parser = ArgumentParser(
        prog="segpipe check-data",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
        description=(
            "Check a data set before training: pairs, unreadable files, sizes, mask encoding, "
            "labels, class frequencies and suggested class weights. Exit status 0: no errors, "
            "1: errors found, 2: could not run."
        ),
    )
    parser.add_argument(
        "--config", action=ActionConfigFile,
        help="Training config (YAML); only its data section is used, other sections are ignored.",
    )
    parser.add_class_arguments(SegmentationDataModule, "data")
    parser.add_argument("--splits", type=list[str] | None, default=None,
                        help="Splits to check, e.g. [train, val] (default: all).")
    parser.add_argument("--decode_images", type=bool, default=True,
                        help="Decode every image fully (finds truncated images); false reads "
                             "only headers (faster).")
    parser.add_argument("--sample_size", type=int, default=16,
                        help="Masks and images per split examined for encoding and channels.")
    parser.add_argument("--workers", type=int | None, default=None,
                        help="Decoding threads (default min(8, 2 x CPUs)).")
    parser.add_argument("--json", type=str | None, default=None,
                        help="Also write the findings to this JSON file.")
    return parser


#: The data module check-data checks, as a config's data.class_path may name it.
_OUR_DATA_MODULES = ("segpipe.data.SegmentationDataModule",
                     "segpipe.data.datamodule.SegmentationDataModule", "SegmentationDataModule")


def _not_ours(class_path: str, where: Path | None = None) -> str:
    return (f"{'' if where is None else f'{where}: '}data: {class_path} is a data module of "
            "your own: check-data checks the folders of segpipe's data module "
            "(segpipe.data.SegmentationDataModule: its layouts and options), and not what "
            "another module reads; segpipe fit checks your module's batches when they come")


def _data_section(path: str) -> dict[str, Any]:
    """The ``data`` section of a training config (``init_args`` unwrapped)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise _UsageError(f"config file {p} not found; pass the YAML you train with, e.g. "
                          "--config configs/camvid_unet.yaml")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise _UsageError(f"{p}: not valid YAML ({exc})") from None
    if not isinstance(cfg, dict):
        raise _UsageError(f"{p}: expected a mapping with a data: section")
    data = cfg.get("data") or {}
    own = data.get("class_path") if isinstance(data, dict) else None
    if own and own not in _OUR_DATA_MODULES:
        raise _UsageError(_not_ours(own, p))
    if isinstance(data, dict) and "init_args" in data:
        data = data.get("init_args") or {}
    if not isinstance(data, dict):
        raise _UsageError(f"{p}: the data: section must be a mapping of data module arguments")
    return data


#: Options of ``segpipe fit`` outside its data section: a fit's command line with its verb
#: changed to check-data runs, as its config files do (their other sections are ignored).
_FIT_ONLY = ("--model", "--trainer", "--checkpoint", "--metrics_writer", "--seed_everything",
             "--ckpt_path", "--weights_only", "--optimizer", "--lr_scheduler")


def _filter_configs(argv: Sequence[str]) -> list[str]:
    """Replace each ``--config FILE`` by its ``data`` section, and leave out the options of
    fit's other sections (:data:`_FIT_ONLY`), so that they are ignored."""
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        if any(name == o or name.startswith(o + ".") for o in _FIT_ONLY):
            if "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1  # its value
            i += 1
            continue
        if a == "--config" or a.startswith("--config="):
            if a == "--config":
                if i + 1 >= len(args):
                    raise _UsageError("--config needs a file name")
                value = args[i + 1]
                i += 1
            else:
                value = a.split("=", 1)[1]
            data = _data_section(value)
            out.append("--config=" + yaml.safe_dump({"data": data}, sort_keys=False))
        else:
            out.append(a)
        i += 1
    return out


def _underscored(token: str) -> str:
    """``--sample-size=4`` -> ``--sample_size=4`` (options are documented with underscores)."""
    if not token.startswith("--"):
        return token
    name, eq, value = token.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``segpipe check-data``.

    Args:
        argv: Arguments after ``check-data`` (default ``sys.argv[1:]``).

    Returns:
        0 when no error was found, 1 when errors were found, 2 when the check could not run.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = _filter_configs(args)
    except _UsageError as exc:
        print(f"segpipe check-data: error: {exc}", file=sys.stderr)
        return 2
    args = [_underscored(a) for a in args]  # --sample-size == --sample_size
    for i in range(len(args)):  # --data my.Module (a class path, not a config)
        value = option_at(args, i, "--data")
        if value is not None and "." in value and not value.endswith((".yaml", ".yml", ".json")) \
                and value not in _OUR_DATA_MODULES and "{" not in value and ":" not in value:
            print(f"segpipe check-data: error: {_not_ours(value)}", file=sys.stderr)
            return 2
    from jsonargparse import ArgumentError

    parser.exit_on_error = False
    try:
        cfg = parser.parse_args(args)
    except ArgumentError as exc:  # one line, as segpipe's other commands say it
        from segpipe.cli import _short_parse_error

        print(f"segpipe check-data: error: {_short_parse_error(str(exc))} (see `segpipe "
              "check-data --help`)", file=sys.stderr)
        return 2
    try:
        init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else (
            parser.instantiate_classes(cfg))
        dm: SegmentationDataModule = init.data
    except (ValueError, TypeError) as exc:
        print(f"segpipe check-data: error: invalid data settings: {exc}", file=sys.stderr)
        return 2
    try:
        rep = check_data(dm, splits=cfg.splits, decode_images=cfg.decode_images,
                         sample_size=cfg.sample_size, max_workers=cfg.workers)
    except (FileNotFoundError, ValueError) as exc:
        print(f"segpipe check-data: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(rep), flush=True)
    if cfg.json:
        try:
            path = atomic_write_json(cfg.json, rep.to_dict())
        except OSError as exc:
            print(f"segpipe check-data: error: cannot write --json {cfg.json}: "
                  f"{exc.strerror or exc}; give a path in a folder you can write to",
                  file=sys.stderr)
            return 2
        print(f"Findings written to {path}")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
