"""Evaluation report: ``report.md`` with tables, plots and a gallery of the worst test images.

:func:`write_report` turns the dict the test stage builds (``SegmentationTask.test_report``: the
output of :func:`segpipe.metrics.metrics_report` plus ``num_images``, ``per_image`` and
``worst_images``) into a folder a person can read::

    out_dir/report.md                      summary, per-class table, links to everything below
    out_dir/report_files/confusion_matrix.png   rows (ground truth) normalised to 1
    out_dir/report_files/per_class_iou.png      per-class IoU bars with the macro/micro means
    out_dir/report_files/per_image.csv          path, IoU, Dice, pixel_accuracy (unless linked)
    out_dir/report_files/worst_01_<name>.png    image | truth overlay | prediction overlay

Every number keeps the name it has in ``test_metrics.json`` and says whether it is a **macro**
mean over classes or a **micro** (pooled pixel) figure. Classes absent from both ground truth and
prediction have no IoU/Dice (``None``) and are shown as "—".

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch), so writing a
report never opens a window and never changes the backend of the calling program. Every file is
written atomically (:mod:`segpipe.fileio`).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.data.io import read_image, to_float
from segpipe.data.spec import default_class_colors, default_class_names
from segpipe.fileio import atomic_write_bytes, atomic_write_text

__all__ = [
    "write_per_case_csv",
    "REPORT_FILES_DIR",
    "colorize_labels",
    "display_image",
    "plot_confusion_matrix",
    "plot_per_class_iou",
    "plot_worst_image",
    "write_per_image_csv",
    "write_report",
]

REPORT_FILES_DIR = "report_files"
"""Folder (beside ``report.md``) that holds the report's plots, gallery and CSV."""

PER_IMAGE_FIELDS: tuple[str, ...] = ("path", "IoU", "Dice", "pixel_accuracy")
"""Columns of the per-image CSV."""

_ABSENT = "—"
_OVERLAY_ALPHA = 0.45

ImageReader = Callable[[Path], np.ndarray]


# ------------------------------------------------------------------------------------ helpers
def _num(value: Any) -> float | None:
    """A finite float, or None for None/NaN/inf/non-numbers."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(value: Any, digits: int = 4) -> str:
    v = _num(value)
    return _ABSENT if v is None else f"{v:.{digits}f}"


def _pct(value: Any) -> str:
    v = _num(value)
    return _ABSENT if v is None else f"{100 * v:.2f} %"


def _md(text: Any) -> str:
    """Escape text for a markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _safe_name(text: str, max_len: int = 60) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"
    return name[:max_len]


def _class_names(class_names: Sequence[str], k: int) -> list[str]:
    """``k`` names: the given ones, completed with the default ``class_i`` names."""
    return [str(n) for n in class_names][:k] + default_class_names(k)[len(class_names) :]


def _axis_labels(names: Sequence[str], width: int = 28) -> list[str]:
    """Class names for a plot's axis, long ones shortened with an ellipsis (a 100-character
    name took most of the figure; the report's tables keep them whole)."""
    return [n if len(n) <= width else n[: width - 1] + "…" for n in names]


def _color_table(class_colors: Sequence[Sequence[int]] | None, num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours: the given ones, completed with the default palette if too few."""
    colors = [list(map(int, c))[:3] for c in (class_colors or [])]
    if len(colors) < num_classes:
        colors += default_class_colors(num_classes)[len(colors) :]
    return np.asarray(colors[:num_classes], dtype=np.uint8).reshape(num_classes, 3)


def _new_figure(width: float, height: float, layout: str | None = None) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot state, no GUI)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, path: Path) -> Path:
    # Rendered in memory: given a file name, matplotlib has Pillow's C encoder write to the file
    # descriptor, which ignores a short write on a nearly full disk.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getbuffer())


# ------------------------------------------------------------------------------------ images
def display_image(image: np.ndarray) -> np.ndarray:
    """Make any raster displayable: (H, W, 3) float in [0, 1].

    The first three bands are shown as RGB; images with one or two bands show their first band
    as grayscale. uint8 images are divided by 255; everything else (uint16, float, ...) is scaled
    by :func:`~segpipe.data.io.to_float` and then stretched between its 2nd and 98th percentile,
    so 12-bit sensors and float rasters are not shown black.

    Args:
        image: (H, W) or (H, W, C) array in any dtype.

    Returns:
        (H, W, 3) float32 array in [0, 1].
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] == 0:
        raise ValueError(f"cannot display an array of shape {arr.shape}; expected (H, W[, C])")
    arr = arr[:, :, :3] if arr.shape[2] >= 3 else arr[:, :, :1]
    native_uint8 = arr.dtype == np.uint8
    out = to_float(arr)
    out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    if not native_uint8 and out.size:
        lo, hi = np.percentile(out, [2, 98])
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return out


def _resize_nearest(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    rows = np.minimum((np.arange(h) * arr.shape[0] / h).astype(int), arr.shape[0] - 1)
    cols = np.minimum((np.arange(w) * arr.shape[1] / w).astype(int), arr.shape[1] - 1)
    return arr[rows][:, cols]


def colorize_labels(
    labels: np.ndarray,
    colors: np.ndarray,
    base: np.ndarray | None = None,
    alpha: float = _OVERLAY_ALPHA,
) -> np.ndarray:
    """Colour a label map, optionally blended over an image.

    Labels outside ``0..K-1`` (the ignore index, padding) get no colour: they show the base
    image (or mid grey without one).

    Args:
        labels: (H, W) integer labels.
        colors: (K, 3) uint8 class colours.
        base: Optional (H, W, 3) float image in [0, 1] to blend over.
        alpha: Opacity of the class colours over ``base``.

    Returns:
        (H, W, 3) float32 image in [0, 1].
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    k = len(colors)
    valid = (labels >= 0) & (labels < k)
    color = (np.asarray(colors, dtype=np.float32) / 255.0)[np.where(valid, labels, 0)]
    if base is None:
        out = np.full(labels.shape + (3,), 0.5, dtype=np.float32)
        out[valid] = color[valid]
        return out
    out = base.astype(np.float32, copy=True)
    out[valid] = (1 - alpha) * out[valid] + alpha * color[valid]
    return out


def _fit_image(
    image: np.ndarray, mask: np.ndarray, pred: np.ndarray, ignore_index: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Bring image, truth and prediction to one size; returns them and a note (or "")."""
    ih, iw = image.shape[:2]
    h, w = mask.shape[:2]
    if (ih, iw) == (h, w):
        return image, mask, pred, ""
    if ih <= h and iw <= w and ignore_index is not None:
        pad_rows, pad_cols = mask[ih:, :], mask[:ih, iw:]
        if np.all(pad_rows == ignore_index) and np.all(pad_cols == ignore_index):
            # Batch padding (PadCollate): crop truth and prediction back to the image.
            return image, mask[:ih, :iw], pred[:ih, :iw], ""
    note = f"image ({iw}×{ih}) resized to the evaluated size ({w}×{h}) for display"
    return _resize_nearest(image, (h, w)), mask, pred, note


def plot_worst_image(
    row: Mapping[str, Any],
    colors: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    image_reader: ImageReader | None = None,
    ignore_index: int | None = None,
    rank: int | None = None,
) -> tuple[Path, str]:
    """Write one gallery panel: image | truth overlay | prediction overlay.

    Args:
        row: ``{"path", "pred", "mask", "IoU", "Dice", ...}`` (a ``worst_images`` row).
        colors: (K, 3) uint8 class colours.
        class_names: Class names (for the legend).
        path: Output PNG.
        image_reader: Reads the image file (default :func:`~segpipe.data.io.read_image`).
        ignore_index: Label of ignored / padded pixels (not coloured).
        rank: Position in the gallery (for the title).

    Returns:
        The written path and a note for the report ("" when nothing needs saying), e.g. that the
        image could not be read (the panel then shows truth and prediction only).
    """
    from matplotlib.patches import Patch

    reader = image_reader or read_image
    mask = np.asarray(row["mask"]).astype(np.int64, copy=False)
    pred = np.asarray(row["pred"]).astype(np.int64, copy=False)
    if mask.shape != pred.shape:
        h, w = min(mask.shape[0], pred.shape[0]), min(mask.shape[1], pred.shape[1])
        mask, pred = mask[:h, :w], pred[:h, :w]
    note = ""
    image: np.ndarray | None = None
    src = str(row.get("path") or "")
    if src:
        try:
            image = display_image(reader(Path(src)))
        except Exception as exc:  # noqa: BLE001 - any failure: say so in the report, go on
            note = f"could not read the image ({exc})"
    else:
        note = "no image path recorded"
    if image is not None:
        image, mask, pred, note = _fit_image(image, mask, pred, ignore_index)
    h, w = mask.shape[:2]
    panels: list[tuple[str, np.ndarray]] = []
    if image is not None:
        panels.append(("image", image))
    panels.append(("ground truth", colorize_labels(mask, colors, image)))
    panels.append(("prediction", colorize_labels(pred, colors, image)))
    if image is None:
        panels.insert(0, ("image (unreadable)", np.full((h, w, 3), 0.85, dtype=np.float32)))

    panel_w = 3.4
    fig = _new_figure(panel_w * len(panels), panel_w * h / max(w, 1) + 0.9, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if image is None:
        axes[0].text(0.5, 0.5, "image could not\nbe read", ha="center", va="center",
                     transform=axes[0].transAxes, fontsize=10, color="crimson")
    present = sorted(int(v) for v in np.union1d(np.unique(mask), np.unique(pred))
                     if 0 <= v < len(colors))
    handles = [
        Patch(facecolor=colors[c] / 255.0, edgecolor="black",
              label=_axis_labels(_class_names(class_names, len(colors)))[c])
        for c in present
    ]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6),
                   fontsize=8, frameon=False)
    head = f"#{rank} " if rank is not None else ""
    fig.suptitle(
        f"{head}{Path(src).name or '?'}   IoU (macro over classes in image) {_fmt(row.get('IoU'), 3)}"
        f"   Dice {_fmt(row.get('Dice'), 3)}",
        fontsize=10,
    )
    return _save_figure(fig, path), note


# ------------------------------------------------------------------------------------ plots
def _row_normalised(cm: np.ndarray) -> np.ndarray:
    rows = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, cm / np.where(rows > 0, rows, 1), np.nan)


def plot_confusion_matrix(
    confusion: Sequence[Sequence[float]] | np.ndarray, class_names: Sequence[str], path: Path
) -> Path:
    """Plot the row-normalised confusion matrix (rows: ground truth, columns: prediction).

    Each row sums to 1 (the recall of that class is on the diagonal); rows of classes without
    any ground-truth pixel are grey.

    Args:
        confusion: (K, K) pixel counts, rows = truth, columns = prediction.
        class_names: K class names for both axes.
        path: Output PNG.

    Returns:
        ``path``.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    k = cm.shape[0]
    norm = _row_normalised(cm)
    side = max(4.0, 0.55 * k + 2.5)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(norm), cmap="Blues", vmin=0.0, vmax=1.0,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class's pixels")
    names = _axis_labels(_class_names(class_names, k))
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    ax.set_title("Confusion matrix (rows normalised to 1)")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                v = norm[i, j]
                if np.isnan(v):
                    continue
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 else "black")
    return _save_figure(fig, path)


def plot_per_class_iou(
    iou: Sequence[float | None],
    class_names: Sequence[str],
    colors: np.ndarray,
    path: Path,
    miou: float | None = None,
    micro_iou: float | None = None,
) -> Path:
    """Horizontal bars of per-class IoU, with the macro mIoU and micro IoU as reference lines.

    Classes without an IoU (absent from truth and prediction) are labelled "— absent".

    Args:
        iou: Per-class IoU (None for absent classes).
        class_names: Class names.
        colors: (K, 3) uint8 class colours (bar colours).
        path: Output PNG.
        miou: Macro mean IoU (dashed line).
        micro_iou: Micro IoU (dotted line).

    Returns:
        ``path``.
    """
    k = len(iou)
    values = [_num(v) for v in iou]
    fig = _new_figure(7.0, max(2.5, 0.35 * k + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    ys = np.arange(k)
    ax.barh(ys, [v if v is not None else 0.0 for v in values],
            color=[colors[i] / 255.0 for i in range(k)], edgecolor="black", linewidth=0.6)
    for y, v in zip(ys, values):
        label = f"{v:.3f}" if v is not None else f"{_ABSENT} absent"
        ax.text((v or 0.0) + 0.01, y, label, va="center", fontsize=8)
    if _num(miou) is not None:
        ax.axvline(float(miou), color="crimson", linestyle="--", linewidth=1.2,
                   label=f"mIoU (macro) = {float(miou):.3f}")
    if _num(micro_iou) is not None:
        ax.axvline(float(micro_iou), color="dimgray", linestyle=":", linewidth=1.2,
                   label=f"micro IoU (pooled pixels) = {float(micro_iou):.3f}")
    ax.set_yticks(ys)
    ax.set_yticklabels(_axis_labels(_class_names(class_names, k)), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.12)
    ax.set_xlabel("IoU")
    ax.set_title("Per-class IoU")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    return _save_figure(fig, path)


# ------------------------------------------------------------------------------------ CSV
def write_per_image_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write per-image scores (``path, IoU, Dice, pixel_accuracy``) as CSV, atomically.

    Args:
        path: Output CSV.
        rows: ``per_image`` rows of the test report (extra keys are ignored).

    Returns:
        ``path``.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(PER_IMAGE_FIELDS), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in PER_IMAGE_FIELDS})
    return atomic_write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------------ report
def write_per_case_csv(path: Path, per_case: Mapping[str, Any]) -> Path:
    """Write per-case scores (``case, num_images, mDice, mIoU, Dice/<class>..., IoU/<class>...``)
    as CSV, atomically.

    Args:
        path: Output ``.csv``.
        per_case: The ``per_case`` section of a test report
            (:func:`segpipe.metrics.case_scores`).

    Returns:
        The written path.
    """
    rows = list(per_case.get("cases") or [])
    names = list(per_case.get("Dice_per_class_mean_over_cases") or {})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case", "num_images", "mDice", "mIoU", *(f"Dice/{n}" for n in names),
                     *(f"IoU/{n}" for n in names)])
    def cell(value: Any) -> str:  # empty for a missing value, as the per-image CSV writes
        v = _num(value)
        return "" if v is None else f"{v:.6f}"

    for r in rows:
        writer.writerow([r["case"], r["num_images"], cell(r.get("mDice")), cell(r.get("mIoU")),
                         *(cell(r["Dice_per_class"].get(n)) for n in names),
                         *(cell(r["IoU_per_class"].get(n)) for n in names)])
    return atomic_write_text(path, buf.getvalue())


def _rel(path: Path, base: Path) -> str:
    try:
        rel = path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        rel = path.resolve().as_posix()
    return f"<{rel}>" if " " in rel else rel


def _per_class_names(report: Mapping[str, Any]) -> list[str]:
    names = report.get("class_names")
    if names:
        return [str(n) for n in names]
    return [str(n) for n in (report.get("IoU_per_class") or {})]


def write_report(
    report: Mapping[str, Any],
    out_dir: str | Path,
    class_colors: Sequence[Sequence[int]] | None = None,
    image_reader: ImageReader | None = None,
    *,
    per_image_csv: str | Path | None = None,
    title: str = "Evaluation report",
) -> Path:
    """Write ``report.md`` and its plots, CSV and gallery into ``out_dir``.

    Args:
        report: The test report: keys of :func:`segpipe.metrics.metrics_report` (``mIoU``,
            ``mDice``, ``micro_IoU``, ``pixel_accuracy``, ``IoU_per_class``, ``Dice_per_class``,
            ``class_names``, ``ignore_index``, optionally ``confusion_matrix``, ``truth_share``,
            ``pred_share``) plus optional ``num_images``, ``per_image`` (rows ``{path, IoU, Dice,
            pixel_accuracy}``) and ``worst_images`` (rows with numpy ``pred``/``mask``).
        out_dir: Folder for ``report.md`` (created); the other files go to
            ``out_dir/report_files/``.
        class_colors: One RGB colour per class for the overlays and bars (default: the data
            module's default palette).
        image_reader: Reads an image file for the gallery (default
            :func:`~segpipe.data.io.read_image`; pass e.g. ``partial(read_image, bands=[4, 3, 2])``
            for multiband data). Images that cannot be read are reported, not fatal.
        per_image_csv: An existing per-image CSV to link (e.g. ``test_per_image.csv`` written by
            :class:`~segpipe.callbacks.TestMetricsWriter`); when None, ``report_files/per_image.csv``
            is written from ``report["per_image"]``.
        title: Heading of the report.

    Returns:
        Path of ``report.md``.

    Raises:
        ValueError: When ``report`` has no class names / per-class IoU (not a test report).
    """
    out = Path(out_dir)
    files = out / REPORT_FILES_DIR
    for stale in files.glob("worst_*.png"):  # an earlier report's gallery in the same folder
        stale.unlink(missing_ok=True)
    names = _per_class_names(report)
    if not names:
        raise ValueError(
            "write_report needs a test report with class_names or IoU_per_class (the dict "
            "SegmentationTask.test_report or segpipe.metrics.metrics_report builds); got keys "
            f"{sorted(report)}"
        )
    k = len(names)
    colors = _color_table(class_colors, k)
    ignore_index = report.get("ignore_index")
    iou_map = report.get("IoU_per_class") or {}
    dice_map = report.get("Dice_per_class") or {}
    iou = [_num(iou_map.get(n)) for n in names]
    dice = [_num(dice_map.get(n)) for n in names]
    truth_share = list(report.get("truth_share") or [None] * k)
    pred_share = list(report.get("pred_share") or [None] * k)
    per_image = list(report.get("per_image") or [])
    worst = list(report.get("worst_images") or [])
    num_images = report.get("num_images", len(per_image) or None)

    lines: list[str] = [f"# {title}", ""]
    facts = []
    split = report.get("scored_split")
    if num_images is not None:
        facts.append(f"**{num_images}** test image(s)" if split in (None, "test") else
                     f"**{num_images}** {split} image(s) (the data has no test split)")
    partial = report.get("partial_split")
    if partial:
        limits = ", ".join(f"`{k} {v}`" for k, v in (partial.get("limits") or {}).items())
        facts.append(f"**part of the split only**: {partial['scored_images']} of its "
                     f"{partial['split_images']} images" + (f" ({limits})" if limits else ""))
    facts.append(f"{k} classes")
    facts.append(
        f"ignore index **{ignore_index}** (excluded from every metric)"
        if ignore_index is not None else "no ignore index"
    )
    if report.get("eval_resize"):
        h, w = report["eval_resize"]
        facts.append(f"predicted at {w}×{h} (W×H, `data.eval_resize: [{h}, {w}]`), scored "
                     "against the masks at their native size")
    if report.get("test_time_augmentation"):
        facts.append(f"test-time augmentation: {report['test_time_augmentation']}")
    if report.get("decision"):  # model.positive_threshold
        facts.append(f"labels: {report['decision']}")
    bn_stats = report.get("batchnorm_statistics")
    if bn_stats and not bn_stats.startswith("training"):  # model.bn_adapt
        facts.append(f"BatchNorm statistics: {bn_stats}")
    if report.get("checkpoint"):
        facts.append(f"checkpoint `{report['checkpoint']}`")
    lines += ["; ".join(facts) + ".", ""]
    if report.get("warning"):
        lines += [f"**Warning:** {_md(str(report['warning']))}.", ""]
    metrics_json = out / "test_metrics.json"
    if metrics_json.exists():
        lines += [f"All numbers are also in [test_metrics.json]({_rel(metrics_json, out)}).", ""]

    # Summary -------------------------------------------------------------------------------
    definitions = dict(report.get("definitions") or {})
    from segpipe.metrics import METRIC_DESCRIPTIONS

    def describe(key: str) -> str:
        return _md(definitions.get(key) or METRIC_DESCRIPTIONS.get(key, ""))

    lines += [
        "## Summary",
        "",
        "| metric | kind | value | definition |",
        "|---|---|---:|---|",
        f"| mIoU | macro (mean over classes) | {_fmt(report.get('mIoU'))} | {describe('mIoU')} |",
        f"| mDice | macro (mean over classes) | {_fmt(report.get('mDice'))} | {describe('mDice')} |",
        f"| micro_IoU | micro (pooled pixels) | {_fmt(report.get('micro_IoU'))} | "
        f"{describe('micro_IoU')} |",
        f"| pixel_accuracy | micro (pooled pixels) | {_fmt(report.get('pixel_accuracy'))} | "
        f"{describe('pixel_accuracy')} |",
        "",
        "Macro means weigh every class equally; micro figures pool all pixels and are dominated "
        "by the large classes, so they are usually higher. Do not compare one with the other.",
        "",
    ]

    # Per-class table -----------------------------------------------------------------------
    lines += [
        "## Per class",
        "",
        "| # | class | IoU | Dice | share of ground-truth pixels | share of predicted pixels |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for i, name in enumerate(names):
        ts = truth_share[i] if i < len(truth_share) else None
        ps = pred_share[i] if i < len(pred_share) else None
        lines.append(
            f"| {i} | {_md(name)} | {_fmt(iou[i])} | {_fmt(dice[i])} | {_pct(ts)} | {_pct(ps)} |"
        )
    absent = [n for n, v in zip(names, iou) if v is None]
    lines.append("")
    notes = [
        "Pixel shares are fractions of the non-ignored pixels of the test set (ground truth: "
        "rows of the confusion matrix; prediction: its columns)."
    ]
    if absent:
        notes.insert(
            0,
            f"{_ABSENT} : class absent from both ground truth and prediction in the test set "
            f"({', '.join(_md(n) for n in absent)}); its IoU and Dice are undefined and it is left "
            "out of the macro means.",
        )
    else:
        notes.insert(0, f"{_ABSENT} would mark a class absent from both ground truth and "
                        "prediction (undefined IoU/Dice, left out of the macro means).")
    lines += [f"- {n}" for n in notes] + [""]

    # Plots ---------------------------------------------------------------------------------
    lines += ["## Confusion matrix", ""]
    cm = report.get("confusion_matrix")
    if cm is not None and np.asarray(cm).shape == (k, k):
        cm_path = plot_confusion_matrix(cm, names, files / "confusion_matrix.png")
        lines += [
            f"![Row-normalised confusion matrix]({_rel(cm_path, out)})",
            "",
            "Rows: ground-truth class, normalised so each row sums to 1 (the diagonal is the "
            "class's recall). Columns: predicted class. Grey rows: no ground-truth pixel.",
            "",
        ]
    else:
        lines += ["No confusion matrix in this report.", ""]

    bar_path = plot_per_class_iou(iou, names, colors, files / "per_class_iou.png",
                                  report.get("mIoU"), report.get("micro_IoU"))
    lines += ["## Per-class IoU", "", f"![Per-class IoU]({_rel(bar_path, out)})", ""]

    # Per case ------------------------------------------------------------------------------
    per_case = report.get("per_case")
    if per_case and per_case.get("cases"):
        dice_mean = per_case.get("Dice_per_class_mean_over_cases") or {}
        iou_mean = per_case.get("IoU_per_class_mean_over_cases") or {}
        per_class_cases = per_case.get("num_cases_per_class") or {}
        outside = int(per_case.get("images_without_case") or 0)
        lines += [
            "## Per case", "",
            f"{per_case['num_cases']} case{'' if per_case['num_cases'] == 1 else 's'}"
            + (f" (and {per_case['num_cases_without_score']} without a labelled pixel, which "
               "has no score and is left out of every mean)"
               if per_case.get("num_cases_without_score") else "")
            + ". Each case's Dice and IoU pool the pixels of its "
            "images; the **mean over cases** weighs every case equally (the protocol of, e.g., "
            "per-patient Dice), where the figures above pool all pixels and weigh large cases "
            "more. A case where a class is absent from both truth and prediction has no score "
            "for it and is left out of that class's mean (the `cases` column counts the cases "
            "behind each mean); a case's mDice and mIoU average the classes it has.", "",
        ]
        if outside:
            lines += [f"**{outside}** image(s) belong to no case (`data.case_pattern` finds "
                      "none in their path): they count in the pooled figures above only.", ""]
        lines += [
            f"Mean over cases of each case's mDice: {_pct(per_case.get('mDice_mean_over_cases'))}"
            f"; of each case's mIoU: {_pct(per_case.get('mIoU_mean_over_cases'))}.", "",
            "| class | Dice, mean over cases | IoU, mean over cases | cases |",
            "|---|---|---|---|",
        ]
        lines += [f"| {_md(n)} | {_pct(dice_mean.get(n))} | {_pct(iou_mean.get(n))} | "
                  f"{per_class_cases.get(n, _ABSENT)} |" for n in names]
        case_csv = report.get("per_case_csv")
        if case_csv and (out / Path(case_csv).name).is_file():
            name = Path(case_csv).name
            lines += ["", f"[{name}]({name}): every case's images, mDice, mIoU and Dice and "
                          "IoU per class."]
        lines += ["", "| case | images | mDice | mIoU |", "|---|---|---|---|"]
        lines += [f"| {_md(r['case'])} | {r['num_images']} | {_pct(r.get('mDice'))} | "
                  f"{_pct(r.get('mIoU'))} |" for r in per_case["cases"]]
        lines.append("")

    # Threshold sweep (two-class models) ----------------------------------------------------
    sweep = report.get("threshold_sweep")
    if sweep and sweep.get("thresholds"):
        name = _md(sweep.get("class", "class 1"))
        by_case = sweep.get("Dice_mean_over_cases")
        lines += ["## Threshold sweep", "",
                  f"Labels at each threshold of p({name}) (`model.positive_threshold`; 0.5 is the "
                  "arg-max), from the probabilities scored above. A threshold chosen on these "
                  "images flatters them: choose it on other folds (`segpipe crossval` does, "
                  "leaving each fold out).", "",
                  f"| threshold | Dice {name}, pooled | pixel accuracy |"
                  + (f" Dice {name}, mean over cases |" if by_case else ""),
                  "|---|---|---|" + ("---|" if by_case else "")]
        for i, t in enumerate(sweep["thresholds"]):
            lines.append(f"| {t:g} | {_pct(sweep['Dice_pooled'][i])} | "
                         f"{_pct(sweep['pixel_accuracy'][i])} |"
                         + (f" {_pct(by_case[i])} |" if by_case else ""))
        lines.append("")

    # Per image -----------------------------------------------------------------------------
    lines += ["## Per image", ""]
    if per_image_csv is not None:
        csv_path = Path(per_image_csv)
        if not csv_path.is_absolute():
            csv_path = out / csv_path
    elif per_image:
        csv_path = write_per_image_csv(files / "per_image.csv", per_image)
    else:
        csv_path = None
    if csv_path is not None:
        lines.append(
            f"[{csv_path.name}]({_rel(csv_path, out)}): path, IoU, Dice and pixel accuracy of "
            "every test image. Per-image IoU and Dice are macro means over the classes present "
            "in that image's truth or prediction."
        )
    scores = [v for v in (_num(r.get("IoU")) for r in per_image) if v is not None]
    if scores:
        arr = np.asarray(scores)
        lines += [
            "",
            "| per-image IoU | mean | median | min | max |",
            "|---|---:|---:|---:|---:|",
            f"| over {len(scores)} image(s) | {arr.mean():.4f} | {np.median(arr):.4f} | "
            f"{arr.min():.4f} | {arr.max():.4f} |",
            "",
            "The mean of per-image IoU is a third kind of average, neither the macro mIoU nor "
            "the micro IoU above.",
        ]
        n_none = len(per_image) - len(scores)
        if n_none:
            lines.append(f"{n_none} image(s) have no labelled pixel and no score.")
    elif not per_image:
        lines.append("No per-image scores in this report.")
    lines.append("")

    # Gallery -------------------------------------------------------------------------------
    lines += ["## Worst images", ""]
    if worst:
        lines += [
            f"The {len(worst)} test image(s) with the lowest per-image IoU: image | ground truth "
            "| prediction, class colours over the image (ignored pixels uncoloured).",
            "",
            "| rank | image | IoU | Dice | panel |",
            "|---:|---|---:|---:|---|",
        ]
        gallery_notes: list[str] = []
        embedded: list[tuple[int, str, Path]] = []
        for rank, row in enumerate(worst, start=1):
            src = str(row.get("path") or "")
            panel = files / f"worst_{rank:02d}_{_safe_name(Path(src).stem)}.png"
            try:
                written, note = plot_worst_image(row, colors, names, panel, image_reader,
                                                 ignore_index, rank)
                link = f"[png]({_rel(written, out)})"
                embedded.append((rank, src, written))
            except (KeyError, ValueError) as exc:
                link, note = _ABSENT, f"no panel ({exc})"
            if note:
                gallery_notes.append(f"- #{rank} `{src}`: {note}")
            lines.append(
                f"| {rank} | `{_md(src)}` | {_fmt(row.get('IoU'))} | {_fmt(row.get('Dice'))} | "
                f"{link} |"
            )
        lines.append("")
        if gallery_notes:
            lines += ["Notes:", "", *gallery_notes, ""]
        for rank, src, written in embedded:
            lines += [f"**#{rank}** `{_md(src)}`", "", f"![#{rank}]({_rel(written, out)})", ""]
    else:
        lines += ["No worst images recorded (set model.num_worst_images > 0).", ""]

    return atomic_write_text(out / "report.md", "\n".join(lines).rstrip() + "\n")
