"""``segpipe predict``: masks from a checkpoint alone, for an image or a folder of images.

Usage::

    segpipe predict --ckpt_path runs/camvid_unet/checkpoints/best.ckpt \\
        --input photos/ --output masks/ --format mask palette overlay
    segpipe predict --ckpt_path sat.ckpt --input scenes/ --output out/ --tile 512 --tta
    segpipe predict ... --accelerator gpu --devices 4 --strategy ddp   # files spread over GPUs

The model, classes, colours, band selection, normalisation and eval resize come from the
checkpoint's saved hyperparameters. Outputs mirror the inputs' relative paths under ``--output``
(see :mod:`segpipe.predict.writers` for the formats). Exit code: 0 when every file was written or
already done, 1 when any failed, 2 for bad arguments (missing checkpoint, no images...) or an
output folder that cannot be written (also when its disk fills up during the run: one error line,
the finished outputs are complete), 130 when interrupted (rerun the same command: finished
outputs are skipped), 143 when stopped by SIGTERM (likewise).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from typing import TYPE_CHECKING

from segpipe.argparsing import CommandParser, home_path
from segpipe.data.io import IMAGE_EXTENSIONS
from segpipe.errors import MissingExtraError
from segpipe.fileio import TMP_PREFIX, OutputDirError, check_output_dir, is_stale_temporary
from segpipe.predict.writers import FORMATS, PredictionWriter
from segpipe.runtime import available_cpus, default_precision, fit_threads_to_cpus

# torch and the network are imported when a prediction runs, not for --help or a usage error;
# Lightning only when it runs on several devices or processes (segpipe.predict.distributed).
if TYPE_CHECKING:
    from segpipe.predict.engine import InputFile, PredictSummary

__all__ = [
    "PredictUsageError",
    "build_parser",
    "clean_stale_temporaries",
    "find_inputs",
    "main",
    "predict",
]

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 4
DEFAULT_RASTER_TILE = 512
"""The tile rasters are read by when no ``--tile`` is given, and the largest side of a
georeferenced raster predicted whole (a chip) with ``eval_resize``."""
DEFAULT_OVERLAP = 0.25


class PredictUsageError(ValueError):
    """Bad arguments (reported without a traceback, exit code 2)."""


#: Folder names of masks beside a folder of images (``split/masks`` by ``split/images``).
_MASK_FOLDERS = {"masks": "images", "mask": "image", "labels": "images", "label": "image",
                 "annotations": "images", "gt": "images"}


def _mask_folders(files: Sequence[Path]) -> list[tuple[Path, Path]]:
    """``(masks folder, images folder)`` for the folders of ``files`` that hold a data split's
    masks beside its images: ``test/masks`` by ``test/images``, CamVid's ``testannot`` by
    ``test``."""
    folders = {f.parent for f in files}
    found = []
    for folder in sorted(folders):
        name = folder.name.lower()
        images = (_MASK_FOLDERS.get(name) if name in _MASK_FOLDERS
                  else name[: -len("annot")] if name.endswith("annot") and len(name) > 5 else None)
        if images is None:
            continue
        sibling = next((f for f in folders if f.parent == folder.parent
                        and f.name.lower() == images), None)
        if sibling is not None:
            found.append((folder, sibling))
    return found


def find_inputs(
    input_path: str | Path, output_dir: str | Path, writer: PredictionWriter
) -> list[InputFile]:
    """The input images, with their relative paths and pre-known problems.

    A folder is searched recursively (hidden files and folders skipped); files inside the output
    folder are left out, so ``--output`` may lie inside ``--input``. Two inputs whose outputs
    would share a name (``a/x.png`` and ``a/x.jpg``) cannot both be written: the second gets an
    error and is reported as failed.

    Args:
        input_path: An image file or a folder.
        output_dir: The output folder.
        writer: The output writer (output names).

    Returns:
        The inputs in natural order.

    Raises:
        FileNotFoundError: When ``input_path`` does not exist.
        PredictUsageError: When an output would replace an input file, or every image of the
            input folder lies inside the output folder.
    """
    from segpipe.data.datasets import find_images
    from segpipe.predict.engine import InputFile

    src = Path(input_path)
    links: list[Path] = []
    unread: list[Path] = []
    unlisted: list[OSError] = []
    files = find_images(src, links=links, unread=unread, unreadable=unlisted)
    if links and _rank_from_env() == 0:
        log.warning(
            "%d link(s) under %s not followed (a folder link that loops back to a folder "
            "above it, or leads to a folder already read; a file link to a file already read; a "
            "broken link): %s%s", len(links),
            src, ", ".join(str(p) for p in links[:5]), " ..." if len(links) > 5 else "")
    if unread and _rank_from_env() == 0:
        tiff = all(p.suffix.lower() in (".geotiff", ".gtiff") for p in unread)
        log.warning(
            "%d file(s) under %s in raster formats GDAL reads left out: segpipe reads %s, not %s "
            "files: %s%s; %s", len(unread), src, ", ".join(IMAGE_EXTENSIONS),
            "/".join(sorted({p.suffix.lower() for p in unread})),
            ", ".join(str(p) for p in unread[:5]), " ..." if len(unread) > 5 else "",
            "they are GeoTIFFs: rename them to .tif" if tiff else
            f"convert them to GeoTIFF, e.g. gdal_translate -of GTiff -co TILED=YES "
            f"{unread[0].name} {unread[0].stem}.tif")
    root = src if src.is_dir() else src.parent
    out_root = Path(output_dir).resolve()
    if src.is_dir() and out_root == src.resolve():
        raise PredictUsageError(
            f"--output {output_dir} is the input folder: a later run would read its masks as "
            "images to predict; choose another output folder (one inside the input is fine)")
    names = writer.all_names()
    claimed: dict[str, Path] = {}
    inputs: list[InputFile] = []
    resolved = {f: f.resolve() for f in files}
    # An output folder inside the input holds earlier outputs: left out. One that holds the
    # input folder (--output . ) writes beside it, and every image is an input.
    inside = src.is_dir() and out_root.is_relative_to(src.resolve())
    kept = [f for f in files if not resolved[f].is_relative_to(out_root)] if inside else files
    if files and not kept:
        raise PredictUsageError(
            f"all {len(files)} image(s) in {src} lie inside the output folder {output_dir}, "
            "whose files predict leaves out (they would be its own outputs); choose an output "
            "folder outside the input")
    if inside and not writer.unstamped_outputs and _rank_from_env() == 0:
        from segpipe.data.io import read_output_stamp

        own = [f for f in files if f not in kept and read_output_stamp(f) is None]
        if own:  # images the user put there, not outputs: say they are not predicted
            log.warning(
                "%d image(s) inside the output folder %s are not predicted (predict leaves that "
                "folder's files out, as its own outputs) though segpipe did not write them: "
                "%s%s; move them out of it, or choose another --output", len(own), output_dir,
                ", ".join(str(f) for f in own[:5]), " ..." if len(own) > 5 else "")
    files = kept
    if src.is_dir():
        # Another run's output folder inside the input (pred_v1 beside pred_v2): its masks are
        # not images to predict.
        top = src.resolve()
        others = sorted(d for d in {p.parent.resolve() for p in src.rglob(SETTINGS_FILE)}
                        if d != out_root and d != top)  # an --output . over the input is not
        if others:
            before = len(files)
            files = [f for f in files if not any(resolved[f].is_relative_to(o) for o in others)]
            if before > len(files) and _rank_from_env() == 0:
                log.warning(
                    "left out %d file(s) in %d other segpipe predict output folder(s) inside "
                    "the input: %s%s", before - len(files), len(others),
                    ", ".join(str(o) for o in others[:3]), " ..." if len(others) > 3 else "")
            if not files:
                raise PredictUsageError(
                    f"every image in {src} lies in a segpipe predict output folder; give the "
                    "folder of the images to predict")
    if src.is_dir() and _rank_from_env() == 0:
        for masks, images in _mask_folders(files):
            log.warning(
                "%s looks like the masks of %s (a data split's layout): its files are predicted "
                "as images too; give --input %s to predict the images alone", masks, images,
                images)
    originals = {resolved[f] for f in files}
    for f in files:
        rel = f.relative_to(root)
        for n in names:
            target = (out_root / writer.formats[n].filename(rel)).resolve()
            if target in originals:
                raise PredictUsageError(
                    f"--output {output_dir} would write the {n} output of {f} over the input "
                    f"image {target}; choose another output folder")
        keys = [writer.formats[n].filename(rel).as_posix().casefold() for n in names]
        clash = next((claimed[k] for k in keys if k in claimed), None)
        error = None
        if clash is not None:
            error = f"its outputs would have the names of those of {clash}; rename one of them"
        else:
            claimed.update(dict.fromkeys(keys, f))
        inputs.append(InputFile(f, rel, error))
    for exc in unlisted:  # a failure each, so the run does not end as if complete
        folder = Path(exc.filename)
        inputs.append(InputFile(folder, folder.relative_to(root), (
            f"the folder cannot be listed ({exc.strerror}), so its images are not predicted; "
            "give the user running segpipe read access to it (chmod a+rx)")))
    return inputs


def clean_stale_temporaries(output_dir: str | Path) -> int:
    """Delete unfinished temporary files (``TMP_PREFIX*``) an interrupted run left behind,
    keeping another live run's in the same folder (:func:`~segpipe.fileio.is_stale_temporary`;
    deleting them failed that run's file after its compute).

    Args:
        output_dir: The output folder (nothing happens when it does not exist).

    Returns:
        How many files were deleted.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return 0
    removed = 0
    for dirpath, _dirs, filenames in os.walk(root):
        for name in filenames:
            if name.startswith(TMP_PREFIX):
                path = Path(dirpath) / name
                try:
                    if is_stale_temporary(path):
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass
    return removed


SETTINGS_FILE = ".segpipe-predict.json"
"""In an output folder: the checkpoint and options its outputs were made with."""


def _file_identity(path: str | Path) -> dict[str, Any]:
    """A checkpoint as its path, size, modification time and fingerprint (its size and the
    hash of its last MiB, which holds a zip checkpoint's table of CRCs: a hash of it all would
    read gigabytes). Two identities are the same checkpoint when their fingerprints agree
    (:func:`_same_settings`): a moved run folder's is, and another checkpoint of the same size
    written within a second at the same path is not."""
    from segpipe.fileio import file_fingerprint

    p = Path(path).resolve()
    try:
        st = p.stat()
        fingerprint = file_fingerprint(p)
    except OSError:
        return {"path": str(p)}
    return {"path": str(p), "bytes": st.st_size, "mtime": int(st.st_mtime),
            "fingerprint": fingerprint}


def _comparable(value: Any, other: Any) -> Any:
    """A setting as compared with ``other``: a file identity by its fingerprint when both have
    one (a record of an older segpipe has none: path, size and time then)."""
    if isinstance(value, dict) and isinstance(other, dict) and "fingerprint" in value \
            and "fingerprint" in other:
        return {k: v for k, v in value.items() if k not in ("path", "mtime")}
    if isinstance(value, dict) and "fingerprint" in value and isinstance(other, dict):
        return {k: v for k, v in value.items() if k != "fingerprint"}
    return value


def _changed_settings(recorded: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The keys whose values differ between a folder's record and this run's settings."""
    return sorted(k for k in {*recorded, *settings}
                  if _comparable(recorded.get(k), settings.get(k))
                  != _comparable(settings.get(k), recorded.get(k)))


#: In a settings record: written by an ``--overwrite`` run over outputs of other settings,
#: removed when it finishes; a rerun that finds it knows some outputs may be older ones.
_REPLACING = "replacing_older_outputs"
#: In a settings record: a run with these settings added outputs beside ones of other settings
#: (without ``--overwrite``); kept until an ``--overwrite`` run remakes them all.
_MIXED = "mixed_with_other_settings"
#: In a settings record: the folder's outputs store what they were made from (a record
#: without it was made by a segpipe whose outputs do not, which are then taken as done).
_STAMPED = "outputs_stamped"
#: Keys of a settings record that are not settings.
_NOT_SETTINGS = (_REPLACING, _MIXED, _STAMPED)


def _read_record(output: str | Path) -> dict[str, Any] | None:
    """The settings record in ``output`` (:data:`SETTINGS_FILE`), or None (none, unreadable)."""
    try:
        record = json.loads((Path(output) / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _holds_unstamped(output: str | Path) -> bool:
    """Whether an output folder holds an output without a stamp (see
    :func:`~segpipe.data.io.read_output_stamp`), or one whose header cannot be read."""
    from segpipe.data.io import read_output_stamp

    for path in Path(output).rglob("*"):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in (
                ".png", ".jpg", ".jpeg", ".tif", ".tiff"):
            continue
        try:
            if read_output_stamp(path) is None:
                return True
        except OSError:
            return True
    return False


def _check_settings(output: str | Path, overwrite: bool, settings: dict[str, Any],
                    before: dict[str, Any] | None) -> tuple[dict[str, Any] | None, bool]:
    """Warn when the outputs already in ``output`` were made with another checkpoint or other
    options: a rerun skips existing outputs ("already done"), so they would be kept silently
    beside new ones; likewise after an ``--overwrite`` run that was stopped before it had
    remade them all. Returns the settings record to write once this run writes an output
    (None: the record stays), and whether this run replaces outputs of other settings (the
    record then says so until the run finishes). A run that adds outputs beside ones of other
    settings records that the folder mixes them, so that later runs say so too. ``before``:
    the folder's record (:func:`_read_record`)."""
    unfinished = bool(before and before.get(_REPLACING))
    mixed = bool(before and before.get(_MIXED))
    recorded = ({k: v for k, v in before.items() if k not in _NOT_SETTINGS}
                if before else None)
    if overwrite or recorded is None:
        replacing = overwrite and recorded is not None and (
            bool(_changed_settings(recorded, settings)) or unfinished or mixed)
        return ({**settings, _REPLACING: True} if replacing else settings), replacing
    changed = _changed_settings(recorded, settings)
    if changed:
        log.warning(
            "the outputs in %s were made with another %s: they are kept and skipped as done, "
            "and the ones this run adds (other images or --format) are made with this run's "
            "settings, so the folder will mix the two: add --overwrite to remake them all, or "
            "choose another --output", output,
            ", ".join("checkpoint" if k == "checkpoint" else f"--{k}" for k in changed))
        return {**settings, _MIXED: True}, False
    if mixed:
        log.warning(
            "the outputs in %s were made with more than one checkpoint or set of options (a "
            "run with other settings added to them); existing outputs are skipped as done: "
            "add --overwrite to remake them all with these", output)
    elif unfinished:
        log.warning(
            "an --overwrite run with these settings was stopped before it had remade every "
            "output in %s: the ones it had not reached are still from the settings before it "
            "and are skipped as done; add --overwrite to remake them all", output)
    return None, False


def _record_settings(output: str | Path, settings: dict[str, Any], stamped: bool = True) -> None:
    """Write :data:`SETTINGS_FILE` (a convenience: a failure loses no output); ``stamped``:
    every output in the folder is stamped (not so while an older segpipe's remain)."""
    from segpipe.fileio import atomic_write_json

    try:
        atomic_write_json(Path(output) / SETTINGS_FILE,
                          {**settings, _STAMPED: True} if stamped else settings)
    except OSError:
        pass


def _accelerator_available() -> bool:
    import torch

    return torch.cuda.is_available() or (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    )


def _warn_unused_options(formats: Sequence[str], probs_mode: str, overlay_alpha: float,
                         tile: int | None, overlap: float,
                         overlay_bands: Sequence[int] | None = None) -> None:
    """Say when an option will do nothing (its format is not written) or cost a lot."""
    if probs_mode != "classes" and "probs" not in formats:
        log.warning("--probs %s shapes the probs output, which --format does not ask for", probs_mode)
    for option, used in (("--overlay_alpha", overlay_alpha != 0.5),
                         ("--overlay_bands", overlay_bands is not None)):
        if used and "overlay" not in formats:
            log.warning("%s applies to the overlay output, which --format does not ask for",
                        option)
    if overlap > 0.75:
        log.warning("--overlap %g moves each tile by %.0f %% of its size: about %.0f times the "
                    "forward passes of --overlap 0 for %s", overlap, 100 * (1 - overlap),
                    1 / (1 - overlap) ** 2, "images larger than --tile" if tile else "rasters")


def _check_tile(tile: int | None, multiple: int, min_size: int = 0) -> None:
    """Refuse a ``--tile`` under the network's size step and warn on one off its multiples
    or under the least size the network takes (PAN's): every tile is padded up to it, so each
    costs compute for nothing."""
    if tile is not None and multiple <= tile < min_size:
        log.warning("--tile %d is smaller than the least size this network takes (%d px): each "
                    "tile is padded to %d, which costs what --tile %d does and covers less of "
                    "the image per tile; use --tile %d or more", tile, min_size, min_size,
                    min_size, min_size)
        return
    if tile is None or tile % multiple == 0:
        return
    if tile < multiple:
        raise PredictUsageError(
            f"--tile {tile} is smaller than the network's size step ({multiple} px): every tile "
            f"is padded to a multiple of it, and so little context hurts the masks; use a "
            f"multiple of {multiple} such as {max(256, multiple)}")
    padded = -(-tile // multiple) * multiple
    log.warning("--tile %d is not a multiple of the network's size step (%d px): each tile is "
                "padded to %d; --tile %d costs the same and covers more of the image per tile",
                tile, multiple, padded, padded)


def _rank_from_env() -> int:
    """This process's global rank as a launcher set it (Lightning's rank_zero_only reads the
    same variables, in this order), 0 when none did."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(name)
        if value is not None:
            return int(value)
    return 0


def default_write_workers(on_accelerator: bool, loader_workers: int = 0, processes: int = 1) -> int:
    """Output-writing threads for each ``segpipe predict`` process.

    With a GPU the predicting process mostly waits for the device, so up to 4 threads encode
    PNGs/GeoTIFFs beside it, from the CPUs the loader workers leave. On a CPU the network's
    threads use every core (``torch.get_num_threads()``), and a writer would only pre-empt
    them (as a decoding worker did: 25 % slower on 2 cores); only cores beyond them are used.
    With several processes (``--devices``), each gets its share.

    Args:
        on_accelerator: Whether the network runs on a GPU (or another accelerator).
        loader_workers: DataLoader worker processes of each process.
        processes: Predicting processes on this machine.

    Returns:
        Number of threads per process (0: write between batches, in the predicting thread).
    """
    import torch

    cpus = available_cpus()
    per_process = 1 if on_accelerator else torch.get_num_threads()
    busy = max(1, processes) * (per_process + loader_workers)
    return min(4, max(0, (cpus - busy) // max(1, processes)))


def predict(
    ckpt_path: str | Path,
    input: str | Path,  # noqa: A002 - mirrors --input
    output: str | Path,
    *,
    formats: Sequence[str] = ("auto",),
    tile: int | None = None,
    overlap: float | None = None,
    tta: bool = False,
    tta_scales: Sequence[float] | None = None,
    bn_adapt: float = 0.0,
    bands: Sequence[int] | None = None,
    positive_threshold: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    fail_fast: bool = False,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    precision: str | None = None,
    num_workers: int | None = None,
    write_workers: int | None = None,
    probs_mode: str = "classes",
    overlay_alpha: float = 0.5,
    overlay_bands: Sequence[int] | None = None,
    raster_tile: int = DEFAULT_RASTER_TILE,
    progress: bool = True,
) -> PredictSummary:
    """Predict every image under ``input`` and write the outputs under ``output``.

    Args:
        ckpt_path: Checkpoint written by ``segpipe fit``, or a ``.onnx`` file written by
            ``segpipe export`` (then onnxruntime runs the network, in fp32).
        input: An image file or a folder (searched recursively).
        output: Output folder (outputs mirror the inputs' relative paths).
        formats: Output formats (see :mod:`segpipe.predict.writers`); ``auto`` = ``geotiff``
            for georeferenced rasters, ``mask`` otherwise.
        tile: Sliding-window tile size for ordinary images (None: whole images); rasters are
            always read by windows, with tiles of ``tile`` or ``raster_tile``.
        overlap: Overlap of neighbouring tiles (fraction of a tile); None: 0.25.
        tta: Test-time augmentation over the flips/rotations the model was trained with.
        tta_scales: Multi-scale inference: average the probabilities over the evaluation size
            (``data.eval_resize``, else each image's or tile's size) times each factor, each
            view resized from the input at its native size (:mod:`segpipe.tta`); with ``tta``
            each view is also flipped. None: the evaluation size alone.
        bn_adapt: Before predicting, re-estimate the network's BatchNorm statistics on the
            input images (one extra forward pass over them, no labels) and use this weight x
            theirs + (1 - weight) x training's (:mod:`segpipe.models.batchnorm`), as
            ``segpipe test --model.bn_adapt`` does on the test images; for images from another
            camera, scanner or lighting than the training ones. 0 (default): off.
        bands: 1-based bands of the input files to read, one per channel the model takes,
            instead of the checkpoint's ``data.bands`` (inputs from another sensor or product,
            whose bands lie in another order); None: the checkpoint's.
        positive_threshold: Two-class models: label class 1 where its probability exceeds
            this (:func:`segpipe.decision.decide`) instead of the checkpoint's
            ``model.positive_threshold``; 0.5 is the arg-max. None: the checkpoint's.
        batch_size: Images (or tiles) per forward pass.
        overwrite: Rewrite existing outputs (else files whose outputs exist are skipped).
        fail_fast: Stop at the first failed file.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``...).
        devices: Lightning devices (several processes share the files).
        strategy: Lightning strategy (e.g. ``ddp``).
        precision: Lightning precision; :func:`segpipe.runtime.default_precision` when None.
        num_workers: DataLoader workers decoding images (default: 0 on CPU, where the
            network uses every core, else ``min(4, CPUs - 1)``).
        write_workers: Threads encoding and writing outputs while the next batch is predicted
            (default: :func:`default_write_workers`; 0 writes between batches).
        probs_mode: ``classes`` or ``max`` for the ``probs`` format.
        overlay_alpha: Mask weight in the ``overlay`` format.
        overlay_bands: 1-based channels of the model's input shown as red, green and blue (or
            one, grey) in the ``overlay`` format; None: the first three.
        raster_tile: Tile size for rasters when ``tile`` is None.
        progress: Progress bars (rank 0).

    Returns:
        The counts over all processes (``summary.rank`` tells which process this is).

    Raises:
        FileNotFoundError: Missing checkpoint or input.
        CheckpointError: Checkpoint that cannot rebuild its model.
        PredictUsageError: Bad options or no images found.
        OutputDiskFullError: The output folder's disk filled up; the run stopped (its
            ``summary`` holds the counts so far; the finished outputs are complete).
    """
    from torch.utils.data import DataLoader

    from segpipe.data.loading import default_num_workers, ignore_sigterm
    from segpipe.predict.checkpoint import load_predictor, matching_view_options
    from segpipe.predict.engine import (
        InProcessRunner,
        OutputDiskFullError,
        PredictFailed,
        PredictInputs,
        PredictModule,
        PredictOptions,
        WritingCallback,
        collate_records,
        in_process_device,
    )

    if tile is not None and tile < 1:
        raise PredictUsageError(f"--tile must be a positive number of pixels, got {tile}")
    if raster_tile < 1:
        raise PredictUsageError(f"raster tile must be positive, got {raster_tile}")
    if overlap is not None and not 0.0 <= overlap < 1.0:
        raise PredictUsageError(f"--overlap must be a fraction in [0, 1), got {overlap}")
    if batch_size < 1:
        raise PredictUsageError(f"--batch_size must be >= 1, got {batch_size}")
    for name, workers in (("--num_workers", num_workers), ("--write_workers", write_workers)):
        if workers is not None and workers < 0:
            raise PredictUsageError(f"{name} must be >= 0 (0: in the main process), got {workers}")
    from segpipe.models.batchnorm import BatchNormAdaptError, batchnorm_layers, check_bn_adapt
    from segpipe.tta import check_scales

    try:
        bn_adapt = check_bn_adapt(bn_adapt, "--bn_adapt")
        scales = check_scales(tta_scales, "--tta_scales")
    except ValueError as exc:
        raise PredictUsageError(str(exc)) from None
    if bn_adapt and Path(ckpt_path).suffix.lower() == ".onnx":
        raise PredictUsageError(
            "--bn_adapt re-estimates BatchNorm statistics, which an ONNX export has folded into "
            "its convolutions; predict from the checkpoint (--ckpt_path) instead.")
    identity = _file_identity(ckpt_path)  # what the outputs record they were made with
    if Path(ckpt_path).suffix.lower() == ".onnx":
        from segpipe.predict.onnx import load_onnx_predictor

        task, config, sidecar = load_onnx_predictor(ckpt_path)
        # a hand-edited sidecar (mean, a recorded tile) makes other outputs from the same graph
        identity["sidecar_sha256"] = hashlib.sha256(
            json.dumps(sidecar, sort_keys=True).encode()).hexdigest()
        if precision not in (None, "32-true", "32", 32):
            log.warning("--precision %s is ignored with an ONNX model: onnxruntime computes in "
                        "fp32 on the CPU", precision)
        precision = "32-true"
        if accelerator not in ("auto", "cpu"):
            log.warning("--accelerator %s is ignored with an ONNX model: onnxruntime runs it on "
                        "the CPU; predict from the checkpoint (--ckpt_path) to use a GPU",
                        accelerator)
        accelerator = "cpu"  # on a GPU machine too: no round trip of each batch through it
        from segpipe.predict.onnx import recorded_tiling

        chosen_tile, chosen_overlap = recorded_tiling(sidecar)  # export --tile/--overlap
        if tile is None and chosen_tile:
            tile = chosen_tile
            log.info("--tile %d, as segpipe export --tile recorded in %s", tile,
                     Path(ckpt_path).with_suffix(".json").name)
        if overlap is None and chosen_overlap is not None:
            overlap = chosen_overlap
    else:
        task, config = load_predictor(ckpt_path)
        if bn_adapt and not batchnorm_layers(task.net):
            raise PredictUsageError(
                f"--bn_adapt re-estimates BatchNorm statistics, but the network in {ckpt_path} "
                "has no BatchNorm layer that keeps them; drop the option.")
    overlap = DEFAULT_OVERLAP if overlap is None else overlap
    _check_tile(tile, config.pad_multiple, config.min_size)
    same_views = matching_view_options(config, tta, scales)
    if same_views and tile is None and _rank_from_env() == 0:  # tiles: not what test scored anyway
        log.info("%s: segpipe test scored this model's mean over other views than this run "
                 "predicts with; for the masks it scored, use %s", ckpt_path, same_views)
    try:
        config = config.with_bands(bands).with_display_channels(overlay_bands)
        config = config.with_positive_threshold(positive_threshold)
    except ValueError as exc:
        raise PredictUsageError(str(exc)) from None
    try:
        writer = PredictionWriter(
            output, formats, config, overwrite=overwrite, probs_mode=probs_mode,
            overlay_alpha=overlay_alpha,
        )
    except ValueError as exc:
        raise PredictUsageError(str(exc)) from None
    _warn_unused_options(writer.all_names(), probs_mode, overlay_alpha, tile, overlap,
                         overlay_bands)
    before = _read_record(output)
    unstamped = before is not None and not before.get(_STAMPED)  # an older segpipe's outputs
    writer.unstamped_outputs = unstamped
    source = Path(input).expanduser()
    writer.input_root = str((source if source.is_dir() else source.parent).resolve())
    if unstamped and _rank_from_env() == 0:
        log.warning(
            "the outputs in %s were made by a segpipe before 2026-12, which did not record what "
            "each was made from: existing files there are taken as done, whatever they are, and "
            "an input changed since is not made again; --overwrite remakes them", output)
    files = find_inputs(input, output, writer)
    if files:
        try:  # one clear error up front, not the same failure for every file
            check_output_dir(output, "predictions", "output")
        except OutputDirError as exc:
            raise PredictUsageError(str(exc)) from None
    if not files:
        raise PredictUsageError(
            f"no images found in {input} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
        )
    if _rank_from_env() == 0:
        removed = clean_stale_temporaries(output)
        if removed:
            log.warning("removed %d unfinished file(s) left by an interrupted run in %s",
                        removed, output)
    settings = {
        "checkpoint": identity, "bands": list(bands) if bands else None,
        "tile": tile, "overlap": overlap, "tta": bool(tta), "tta_scales": scales,
        "bn_adapt": float(bn_adapt),
        "probs_mode": probs_mode, "overlay_alpha": float(overlay_alpha),
        "overlay_bands": list(overlay_bands) if overlay_bands else None}
    if config.positive_threshold is not None:  # absent: the arg-max, as before the option
        settings["positive_threshold"] = config.positive_threshold
    if bn_adapt:  # the adapted statistics depend on how the images are batched
        settings["batch_size"] = batch_size
    record, replacing = (_check_settings(output, overwrite, settings, before)
                         if _rank_from_env() == 0 else (None, False))
    if record is not None:
        # Recorded as the first output is named into place, not at the end: a run killed
        # after it (OOM, a scheduler's SIGKILL) leaves outputs whose settings are known.
        writer.before_first_output = lambda: _record_settings(output, record,
                                                              stamped=not unstamped)
    if tile is not None and config.eval_resize:
        log.warning(
            "the model was evaluated on images resized to %s; --tile predicts at native "
            "resolution instead", config.eval_resize,
        )
    options = PredictOptions(
        tile=tile, overlap=overlap, raster_tile=raster_tile, tta=tta, tta_scales=scales,
        batch_size=batch_size,
        fail_fast=fail_fast, progress=progress, bn_adapt=bn_adapt,
    )
    dataset = PredictInputs(files, writer, config, resize=tile is None, chip_size=raster_tile,
                            native=scales is not None)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not _accelerator_available())
    if num_workers is None:
        # On CPUs the network already uses every core; a decoding worker only oversubscribes
        # them (measured: 25% slower on 2 cores). Accelerators get background decoding.
        num_workers = 0 if on_cpu else default_num_workers()
    workers = int(num_workers)
    if write_workers is None:
        if isinstance(devices, int):
            processes = devices
        elif on_cpu:
            processes = 1  # Lightning's "auto" on a CPU
        else:
            import torch

            processes = max(1, torch.cuda.device_count())
        write_workers = default_write_workers(on_accelerator=not on_cpu, loader_workers=workers,
                                              processes=processes)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate_records, persistent_workers=False,
        worker_init_fn=ignore_sigterm if workers else None,
    )
    module = PredictModule(task, config, writer, options)
    callback = WritingCallback(writer, len(files), fail_fast=fail_fast, progress=progress,
                               write_workers=int(write_workers))
    precision = precision or default_precision()
    device = in_process_device(accelerator, devices, strategy, precision)
    if device is not None:  # one device, this process: no Lightning to import and start
        runner: Any = InProcessRunner(device, precision)
    else:
        from segpipe.predict.distributed import LightningRunner

        runner = LightningRunner(accelerator, devices, strategy, precision, len(files))
    stopped = interrupted = False
    with warnings.catch_warnings(), _sigterm_as_interrupt() as terminated:
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # A truncated TIFF is reported as failed with its reason; Pillow's warning adds nothing.
        warnings.filterwarnings("ignore", message="Truncated File Read")
        warnings.showwarning = _one_line_warning  # restored by catch_warnings
        try:
            interrupted = runner.run(module, callback, loader)
        except PredictFailed:
            stopped = True
        except BatchNormAdaptError as exc:  # --bn_adapt found nothing it can read
            raise PredictUsageError(str(exc)) from None
        except OutputDiskFullError as exc:
            exc.summary = callback.summary
            exc.summary.rank = runner.rank
            raise
    summary = callback.summary
    summary.rank = runner.rank
    summary.batchnorm_statistics = module.bn_description
    summary.stopped_early = stopped
    summary.interrupted = interrupted
    summary.terminated = interrupted and terminated.is_set()
    complete = writer.before_first_output is None and not (
        interrupted or stopped or summary.failed)
    if complete and unstamped and overwrite and _rank_from_env() == 0:
        unstamped = _holds_unstamped(output)  # all remade (no other format's left): stamped
        if not unstamped:
            _record_settings(output, settings)
    if replacing and complete:
        # every output remade: no older one is left (of other formats, an older segpipe's
        # unstamped outputs may be: such a folder stays marked as holding them)
        _record_settings(output, settings, stamped=not unstamped)
    return summary


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, file: Any = None, line: str | None = None) -> None:
    """A Python warning raised during a prediction (segpipe's own about a file, a library's)
    as one log line, without the source file and line Python prints under it."""
    log.warning("%s", message)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[threading.Event]:
    """SIGTERM (a scheduler's time limit, ``docker stop``, ``timeout``) stops a prediction as
    Ctrl-C does: the file in progress is abandoned without a partial output, the finished
    ones stay. Lightning only notes SIGTERM, and checks it in training loops alone, so a
    prediction ran on to its end or to the SIGKILL that follows. The event tells whether it
    came (the command then exits 143)."""
    import signal

    received = threading.Event()
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield received
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        if not received.is_set():
            received.set()
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _formats(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out


def _devices(value: str) -> int | str:
    return int(value) if value.lstrip("-").isdigit() else value


def build_parser() -> CommandParser:
    """The ``segpipe predict`` argument parser."""
    p = CommandParser(
        prog="segpipe predict",
        description="Predict masks for an image or a folder of images from a checkpoint alone. "
                    "Options may also come from --config FILE (YAML, e.g. ckpt_path: ..., "
                    "format: [mask, overlay]); dashed spellings (--batch-size) work too.",
    )
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt_path", dest="ckpt_path", metavar="CKPT", type=home_path,
                       help="checkpoint written by `segpipe fit` (e.g. RUN/checkpoints/last.ckpt)")
    model.add_argument("--onnx", dest="onnx", metavar="MODEL_ONNX", type=home_path,
                       help="model.onnx written by `segpipe export` (its model.json beside it); "
                            "runs with onnxruntime instead of torch")
    p.add_argument("--input", required=True, type=home_path,
                   help="an image file or a folder (searched recursively)")
    p.add_argument("--output", required=True, type=home_path,
                   help="output folder; outputs mirror the inputs' relative paths")
    p.add_argument("--format", dest="formats", nargs="+", default=["auto"],
                   metavar="FORMAT",
                   help="one or more of auto, " + ", ".join(FORMATS) + " (space- or "
                        "comma-separated). auto = geotiff for georeferenced rasters, else mask")
    p.add_argument("--tile", type=int, default=None, metavar="SIZE",
                   help="sliding-window tile size in pixels for images larger than it "
                        f"(rasters always go by windows, default tile {DEFAULT_RASTER_TILE})")
    p.add_argument("--overlap", type=float, default=None, metavar="FRACTION",
                   help="overlap of neighbouring tiles, blended with a Gaussian window (0.25, "
                        "or what segpipe export recorded for an ONNX model)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average over the flips/rotations the model was "
                        "trained with (read from the checkpoint)")
    p.add_argument("--tta_scales", type=float, nargs="+", default=None, metavar="FACTOR",
                   help="multi-scale inference: average over the evaluation size times each "
                        "FACTOR (e.g. 0.75 1 1.25), each view resized from the input at its "
                        "native size; with --tta each view is also flipped")
    p.add_argument("--positive_threshold", type=float, default=None, metavar="P",
                   help="two-class models: label class 1 where its probability exceeds P "
                        "(0.5 is the arg-max; default: the checkpoint's "
                        "model.positive_threshold, else the arg-max)")
    p.add_argument("--bn_adapt", dest="bn_adapt", type=float, default=0.0, metavar="WEIGHT",
                   help="re-estimate BatchNorm statistics on the input images first and use "
                        "WEIGHT x theirs + (1 - WEIGHT) x training's (0 = off, default; 0.5 for "
                        "images from another camera, scanner or lighting; one extra pass)")
    p.add_argument("--bands", type=int, nargs="+", default=None, metavar="BAND",
                   help="1-based bands of the input files to read, one per channel the model "
                        "takes, instead of the checkpoint's data.bands (inputs from another "
                        "sensor, whose bands lie in another order)")
    p.add_argument("--batch_size", dest="batch_size", type=int,
                   default=DEFAULT_BATCH_SIZE, help="images or tiles per forward pass")
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite outputs that already exist (default: skip them)")
    p.add_argument("--fail_fast", dest="fail_fast", action="store_true",
                   help="stop at the first file that cannot be predicted")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu, auto (default)")
    p.add_argument("--devices", type=_devices, default=1,
                   help="devices/processes, e.g. 2 or auto (default 1)")
    p.add_argument("--strategy", default="auto", help="e.g. ddp to spread files over devices")
    p.add_argument("--precision", default=None,
                   help="Lightning precision (default: bf16-mixed where fast, else 32-true)")
    p.add_argument("--num_workers", dest="num_workers", type=int, default=None,
                   help="DataLoader workers decoding images (default: 0 on CPU, else "
                        "min(4, CPUs - 1))")
    p.add_argument("--write_workers", dest="write_workers", type=int, default=None,
                   help="threads writing outputs while the next batch is predicted (default: "
                        "up to 4 on a GPU, on a CPU only cores the network leaves free)")
    p.add_argument("--probs", dest="probs_mode", choices=("classes", "max"), default="classes",
                   help="probs format: one band per class (classes) or the max confidence")
    p.add_argument("--overlay_alpha", dest="overlay_alpha", type=float, default=0.5,
                   help="weight of the mask colours in the overlay (0..1)")
    p.add_argument("--overlay_bands", dest="overlay_bands", type=int, nargs="+", default=None,
                   metavar="CHANNEL",
                   help="1-based channels of the model's input shown as red, green and blue "
                        "(or one, grey) in the overlay, e.g. 3 2 1 for a model fed blue, green, "
                        "red, near-infrared (default: the first three)")
    p.add_argument("--no_progress", dest="progress", action="store_false",
                   help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``segpipe predict``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.onnx is not None:
        if Path(args.onnx).suffix.lower() != ".onnx":
            parser.error(f"--onnx takes a model.onnx written by segpipe export, got {args.onnx}; "
                         "give a checkpoint with --ckpt_path")
        args.ckpt_path = args.onnx
    fit_threads_to_cpus()
    from segpipe.predict.checkpoint import CheckpointError
    from segpipe.predict.engine import OutputDiskFullError

    try:
        return _run(args, CheckpointError, OutputDiskFullError)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """End the process group ``--strategy ddp`` started (the command owns its processes): left to
    the interpreter's exit, gloo's threads can abort it ("terminate called without an active
    exception", exit -6) after every file was written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(args: Any, CheckpointError: type, OutputDiskFullError: type) -> int:  # noqa: N803
    """The prediction of ``main``, with its reporting; returns the exit code."""
    try:
        summary = predict(
            args.ckpt_path, args.input, args.output, formats=_formats(args.formats),
            tile=args.tile, overlap=args.overlap, tta=args.tta, tta_scales=args.tta_scales,
            bn_adapt=args.bn_adapt,
            bands=args.bands, positive_threshold=args.positive_threshold,
            batch_size=args.batch_size,
            overwrite=args.overwrite, fail_fast=args.fail_fast, accelerator=args.accelerator,
            devices=args.devices, strategy=args.strategy, precision=args.precision,
            num_workers=args.num_workers, write_workers=args.write_workers,
            probs_mode=args.probs_mode,
            overlay_alpha=args.overlay_alpha, overlay_bands=args.overlay_bands,
            progress=args.progress,
        )
    except (FileNotFoundError, CheckpointError, PredictUsageError, MissingExtraError) as exc:
        print(f"segpipe predict: error: {exc}", file=sys.stderr)
        return 2
    except OutputDiskFullError as exc:  # like an unwritable --output found up front
        if exc.summary is not None and exc.summary.rank == 0:
            print(exc.summary.report())
        print(f"segpipe predict: error: {exc}", file=sys.stderr)
        return 2
    if summary.rank == 0:
        print(summary.report())
        if summary.stopped_early:
            print("predict: stopped at the first failure (--fail_fast)")
        if summary.interrupted:
            print(f"predict: {'stopped by SIGTERM' if summary.terminated else 'interrupted'}; "
                  "run the same command again to finish")
    if summary.interrupted:
        return 143 if summary.terminated else 130
    return 1 if summary.failed else 0
