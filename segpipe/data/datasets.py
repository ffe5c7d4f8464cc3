"""Data set layouts (scanners), mask encoding and torch datasets.

Scanners turn a data root into a :class:`Scan`: a ``dict`` mapping split names (``"train"``,
``"val"``, ``"test"``; only the splits present) to sorted lists of :class:`Sample` (image path,
mask path or None). A :class:`Scan` also carries what the pre-flight checker should report but
cannot be a sample: ``orphans`` (masks without an image) and ``duplicates`` (files ignored because
another file of the same split has the same stem), both keyed by split, and ``folders`` (the
image folder of each split, for error messages).

Supported layouts:

* ``folder``: ``ROOT/{train,val,test}/images/**`` + ``ROOT/{split}/masks/**`` matched by relative
  path without extension (also ``ROOT/images`` + ``ROOT/masks`` without split folders: all train).
* ``camvid``: ``ROOT/{train,val,test}`` + ``ROOT/{split}annot`` (SegNet's CamVid).
* ``lgg``: ``ROOT/kaggle_3m/<patient>/<patient>_<n>.tif`` + ``..._<n>_mask.tif`` with a
  patient-level split.
* ``isbi``: ``ROOT/{train,val,test}/{image,label}`` or one ``ROOT/train/{image,label}`` split by
  a contiguous range of slices.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from segpipe.data.cache import PairCache, SharedPairCache
from segpipe.data.io import (
    UNREAD_RASTER_EXTENSIONS,
    ImageReadError,
    is_image_file,
    is_jpeg,
    read_image_valid,
    read_mask,
    to_float,
)
from segpipe.data.spec import default_mean_std
from segpipe.data.normalization import normalize_to_tensor

__all__ = [
    "LAYOUT_HELP",
    "prepare_image",
    "DataRootError",
    "DataSplitError",
    "SPLITS",
    "ItemKey",
    "PredictDataset",
    "Sample",
    "Scan",
    "SegmentationDataset",
    "adapt_channels",
    "check_label_range",
    "label_range_fix",
    "encode_mask",
    "find_images",
    "item_seed",
    "scan_camvid",
    "scan_findings",
    "scan_folder",
    "scan_isbi",
    "scan_lgg",
]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class Sample:
    """One image and its mask.

    Attributes:
        image: Image file.
        mask: Mask file, or None when no mask was found (the checker reports it).
        case: The case the image belongs to (an LGG patient, a scan, a scene), or None; test
            metrics are also reported per case.
    """

    image: Path
    mask: Path | None = None
    case: str | None = None


class Scan(dict[str, list[Sample]]):
    """Result of a layout scanner: ``dict[split, list[Sample]]`` plus what the checker reports.

    Being a ``dict``, a Scan can be used wherever ``dict[str, list[Sample]]`` is expected.

    Attributes:
        orphans: Masks that have no image, keyed by split.
        duplicates: Files ignored because another file in the split has the same stem.
        folders: Image folder of each split (for error messages).
        missing_mask_dirs: The mask folder a split's layout expects, for splits where it does
            not exist (its images then have no mask; the check names the folder).
        unlisted_dirs: Per split, the errors of the image or mask folders that could not be
            listed (each error's ``filename`` is the folder): their files are not found, so the
            check names the folders (the masks or images they leave unpaired are left out).
    """

    def __init__(
        self,
        splits: Mapping[str, list[Sample]] | None = None,
        orphans: Mapping[str, list[Path]] | None = None,
        duplicates: Mapping[str, list[Path]] | None = None,
        folders: Mapping[str, Path] | None = None,
    ) -> None:
        super().__init__(splits or {})
        self.orphans: dict[str, list[Path]] = {k: list(v) for k, v in (orphans or {}).items()}
        self.duplicates: dict[str, list[Path]] = {
            k: list(v) for k, v in (duplicates or {}).items()
        }
        self.folders: dict[str, Path] = dict(folders or {})
        self.missing_mask_dirs: dict[str, Path] = {}
        self.unlisted_dirs: dict[str, list[OSError]] = {}

    def add(
        self,
        split: str,
        folder: Path,
        paired: tuple[list[Sample], list[Path], list[Path], list[OSError]],
    ) -> None:
        """Record one split: its image folder and ``_pair_folders``' (samples, orphans, dups,
        folders not listed)."""
        samples, orphans, dups, unlisted = paired
        self[split] = samples
        self.folders[split] = folder
        if orphans:
            self.orphans[split] = orphans
        if dups:
            self.duplicates[split] = dups
        if unlisted:
            self.unlisted_dirs[split] = unlisted

    @property
    def splits(self) -> dict[str, list[Sample]]:
        """The samples per split as a plain dict."""
        return dict(self)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={len(v)}" for k, v in self.items())
        extra = sum(len(v) for v in self.orphans.values())
        return f"Scan({counts}; orphans={extra})"


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders ``img_2`` before ``img_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def find_images(
    path: str | Path, recursive: bool = True, links: list[Path] | None = None,
    unread: list[Path] | None = None, unreadable: list[OSError] | None = None,
) -> list[Path]:
    """Image files under a folder (or the file itself), naturally sorted.

    Hidden files and folders are skipped. Links to folders are followed (a data set put
    together from linked folders is read whole), except one that leads back to a folder above
    it (a loop) or to a folder already read (which would read its files twice).

    Args:
        path: A folder or a single image file.
        recursive: Search sub-folders too.
        links: When given, the links met that were not followed or lead nowhere (folder links
            that loop or repeat a folder, broken links) are appended to it, sorted, for the
            caller to name.
        unread: When given, the files in raster formats segpipe does not read
            (:data:`~segpipe.data.io.UNREAD_RASTER_EXTENSIONS`: ``.vrt``, ``.jp2``, ...) are
            appended to it, sorted, for the caller to name.
        unreadable: When given, the errors of the folders that could not be listed (no
            permission: their images are not found) are appended to it, for the caller to name
            (each error's ``filename`` is the folder).

    Returns:
        Sorted list of image files (hidden files skipped).

    Raises:
        FileNotFoundError: When ``path`` does not exist.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or folder")
    files: list[Path] = []
    unfollowed: list[Path] = []
    rasters: list[Path] = []
    seen = {os.path.realpath(p)}
    for dirpath, dirs, names in os.walk(p, followlinks=True,
                                        onerror=None if unreadable is None else unreadable.append):
        here = Path(dirpath)
        real_here = os.path.realpath(here)
        keep = []
        # sorted, so which of two links to one folder is read does not depend on the disk
        for d in sorted(dirs, key=_natural_key):
            if d.startswith("."):
                continue
            real = os.path.realpath(here / d)
            if real in seen or (real_here + os.sep).startswith(real + os.sep):
                unfollowed.append(here / d)  # a loop, or a folder already read
                continue
            seen.add(real)
            keep.append(d)
        dirs[:] = keep
        for name in names:
            f = here / name
            if name.startswith("."):
                continue
            if f.is_file():
                if is_image_file(f):
                    files.append(f)
                elif f.suffix.lower() in UNREAD_RASTER_EXTENSIONS:
                    rasters.append(f)
            elif f.is_symlink():  # broken, or a loop of links
                unfollowed.append(f)
        if not recursive:
            break
    if links is not None:
        links += sorted(unfollowed)
    if unread is not None:
        unread += sorted(rasters)
    return sorted(files, key=lambda f: _natural_key(f.relative_to(p).as_posix()))


def _index_by_key(
    folder: Path, files: Iterable[Path], strip_suffix: str = ""
) -> tuple[dict[str, Path], list[Path]]:
    """Map relative path without extension (and ``strip_suffix``) -> file; collect duplicates.
    Keys are in Unicode's NFC form: a name written on macOS (NFD: ``cafe`` + a combining accent)
    pairs with the same name written elsewhere (NFC: ``café``), which it looks identical to."""
    out: dict[str, Path] = {}
    dups: list[Path] = []
    for f in files:
        key = unicodedata.normalize("NFC", f.relative_to(folder).with_suffix("").as_posix())
        if strip_suffix and key.endswith(strip_suffix):
            key = key[: -len(strip_suffix)]
        if key in out:
            dups.append(f)
        else:
            out[key] = f
    return out, dups


def _pair_folders(
    image_dir: Path, mask_dir: Path | None, recursive: bool = True, mask_suffix: str = ""
) -> tuple[list[Sample], list[Path], list[Path], list[OSError]]:
    """Match images and masks by relative stem (a mask's less ``mask_suffix``). Returns
    (samples, orphan masks, duplicates, errors of the folders that could not be listed). An
    image that is a broken link and has a mask stays a sample, so the check names it as
    unreadable (its mask had been reported as having no image); links without a mask (a loop of
    links, say) are skipped, as other non-files are. The masks of an image folder that could
    not be listed are not orphans, nor are the images of such a mask folder without masks: the
    folder is the problem, and the check names it."""
    masks: dict[str, Path] = {}
    dup_mask: list[Path] = []
    unlisted: list[OSError] = []
    if mask_dir is not None and mask_dir.is_dir():
        masks, dup_mask = _index_by_key(
            mask_dir, find_images(mask_dir, recursive=recursive, unreadable=unlisted),
            strip_suffix=mask_suffix)
    mask_gone = _unlisted_keys(mask_dir, unlisted)
    links: list[Path] = []
    found = find_images(image_dir, recursive=recursive, links=links, unreadable=unlisted)
    image_gone = _unlisted_keys(image_dir, unlisted)
    broken = [p for p in links if not p.exists() and is_image_file(p)
              and p.relative_to(image_dir).with_suffix("").as_posix() in masks]
    if broken:
        found = sorted(found + broken,
                       key=lambda f: _natural_key(f.relative_to(image_dir).as_posix()))
    images, dup_img = _index_by_key(image_dir, found)
    samples = [Sample(image=images[k], mask=masks.get(k)) for k in images
               if k in masks or not _under_any(k, mask_gone)]
    orphans = [masks[k] for k in masks if k not in images and not _under_any(k, image_gone)]
    return samples, orphans, dup_img + dup_mask, unlisted


def _unlisted_keys(folder: Path | None, errors: Sequence[OSError]) -> list[str]:
    """The folders of ``errors`` that lie in ``folder``, as pairing keys' prefixes (``.`` for
    the folder itself)."""
    keys = []
    for exc in errors if folder is not None else ():
        try:
            rel = Path(exc.filename).relative_to(folder)
        except ValueError:  # another folder's
            continue
        keys.append(unicodedata.normalize("NFC", rel.as_posix()))
    return keys


def _under_any(key: str, prefixes: Sequence[str]) -> bool:
    return any(p == "." or key.startswith(p + "/") for p in prefixes)


def scan_findings(scan: Mapping[str, Any], splits: Iterable[str]) -> dict[str, dict[str, Any]]:
    """What a scan found beside its samples, for ``splits``: orphan masks, duplicates, mask
    folders missing, folders it could not list; as :func:`~segpipe.data.check_samples`' keyword
    arguments (a data module's ``scan()`` may return a plain dict, which found none)."""
    keep = set(splits)
    return {name: {k: v for k, v in getattr(scan, name, {}).items() if k in keep}
            for name in ("orphans", "duplicates", "missing_mask_dirs", "unlisted_dirs")}


class DataRootError(FileNotFoundError):
    """``data.root`` is missing or does not hold the layout's folders; the message says which
    folders the layout expects and to set ``data.root``."""


class DataSplitError(ValueError):
    """A split that the stage needs is missing or empty; the message names the folder and the
    fix."""


def _require_root(root: str | Path, layout: str, expected: str) -> Path:
    p = Path(root).expanduser()
    if not p.is_dir():
        raise DataRootError(
            f"data root {p} does not exist or is not a folder; the {layout!r} layout expects "
            f"{expected}. Set data.root to the folder that holds the data."
        )
    return p


FOLDER_LAYOUT = "ROOT/{train,val,test}/images/* with masks in ROOT/{split}/masks/* (same stem)"
CAMVID_LAYOUT = "ROOT/{train,val,test}/* with labels in ROOT/{train,val,test}annot/* (same stem)"
LGG_LAYOUT = "ROOT/kaggle_3m/<patient>/<patient>_<n>.tif with <patient>_<n>_mask.tif"
ISBI_LAYOUT = "ROOT/train/image/*.png with ROOT/train/label/*.png (or also val/, test/)"
#: What each layout expects under its root, for messages.
LAYOUT_HELP: dict[str, str] = {
    "folder": FOLDER_LAYOUT, "camvid": CAMVID_LAYOUT, "lgg": LGG_LAYOUT, "isbi": ISBI_LAYOUT,
}


def scan_folder(root: str | Path, mask_suffix: str = "") -> Scan:
    """Scan the generic ``folder`` layout.

    ``ROOT/{train,val,test}/images/**`` (recursive, any of the image extensions) paired with
    ``ROOT/{split}/masks/**`` by relative path without extension, so ``images/a/x.jpg`` pairs
    with ``masks/a/x.png`` (with ``mask_suffix="_mask"``, ``masks/a/x_mask.png``). The other
    order, ``ROOT/images/{train,val,test}`` with ``ROOT/masks/{split}`` (mmsegmentation's, many
    Kaggle sets'), is read the same way. Without split folders, ``ROOT/images`` +
    ``ROOT/masks`` is taken as the train split. A split is present when its ``images`` folder
    exists (it may be empty; the data module then reports it).

    Args:
        root: Data root.
        mask_suffix: What mask names add to their image's stem (e.g. ``"_mask"``).

    Returns:
        A :class:`Scan`; images without a mask get ``Sample(mask=None)``.

    Raises:
        FileNotFoundError: When the root is missing or has none of the expected folders.
    """
    base = _require_root(root, "folder", FOLDER_LAYOUT)
    scan = Scan()
    for split in SPLITS:
        image_dir = base / split / "images"
        if image_dir.is_dir():
            scan.add(split, image_dir, _pair_folders(image_dir, base / split / "masks",
                                                     mask_suffix=mask_suffix))
            if not (base / split / "masks").is_dir():
                scan.missing_mask_dirs[split] = base / split / "masks"
    if not scan and (base / "images").is_dir():
        split_last = [split for split in SPLITS if (base / "images" / split).is_dir()]
        for split in split_last:  # ROOT/images/train: pooled, the val and test were trained on
            image_dir, mask_dir = base / "images" / split, base / "masks" / split
            scan.add(split, image_dir, _pair_folders(image_dir, mask_dir, mask_suffix=mask_suffix))
            if not mask_dir.is_dir():
                scan.missing_mask_dirs[split] = mask_dir
        if not split_last:
            _refuse_split_names(base / "images")
            scan.add("train", base / "images", _pair_folders(base / "images", base / "masks",
                                                             mask_suffix=mask_suffix))
            if not (base / "masks").is_dir():
                scan.missing_mask_dirs["train"] = base / "masks"
    if not scan:
        raise DataRootError(
            f"{base}: no train/images, val/images, test/images or images folder found; the "
            f"'folder' layout expects {FOLDER_LAYOUT}{_other_case(base)}"
        )
    return scan


def _refuse_split_names(images: Path) -> None:
    """Refuse ``ROOT/images/{training,validation,...}``: read as one train split, the val and
    test images would be trained on."""
    found = sorted(d.name for d in images.iterdir()
                   if d.is_dir() and d.name.lower() in _SPLIT_ALIASES
                   and d.name.lower() not in SPLITS)
    if found:
        moves = ", ".join(f"{d} -> {_SPLIT_ALIASES[d.lower()]}" for d in found)
        raise DataRootError(
            f"{images} holds the split folders {found}, which the 'folder' layout would pool "
            f"into one training split (val and test images trained on); it names splits "
            f"train, val and test: rename them ({moves}), in {images.parent / 'masks'} too")


def _other_case(base: Path) -> str:
    """A hint for ``Images``/``Masks`` folders, which are matched in lower case only."""
    parents = [folder for folder in (base, *(base / split for split in SPLITS))
               if folder.is_dir()]
    near = sorted(d for folder in parents for d in folder.iterdir()
                  if d.is_dir() and d.name.lower() in ("images", "masks")
                  and d.name not in ("images", "masks"))
    if not near:
        return ""
    return (f"; found {', '.join(str(d) for d in near[:3])}: folder names are matched exactly, "
            "rename them in lower case (images, masks)")


def scan_camvid(root: str | Path) -> Scan:
    """Scan SegNet's CamVid layout: ``ROOT/{split}`` frames with ``ROOT/{split}annot`` labels.

    Frames and labels share a stem; frames may be PNG, WebP or any image extension.

    Args:
        root: Data root (the ``CamVid`` folder).

    Returns:
        A :class:`Scan` with the splits whose frame folder exists.

    Raises:
        FileNotFoundError: When the root is missing or holds no split folder.
    """
    base = _require_root(root, "camvid", CAMVID_LAYOUT)
    scan = Scan()
    for split in SPLITS:
        image_dir = base / split
        if image_dir.is_dir():
            paired = _pair_folders(image_dir, base / f"{split}annot", recursive=False)
            scan.add(split, image_dir, paired)
    if not scan:
        raise DataRootError(
            f"{base}: no train/, val/ or test/ folder found; the 'camvid' layout expects "
            f"{CAMVID_LAYOUT}"
        )
    return scan


def _read_excluded(path: Path) -> set[str]:
    """Slice ids from ``excluded_corrupt_slices.txt`` (first token per line, ``#`` comments)."""
    out: set[str] = set()
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(Path(line.split()[0]).stem)
    return out


def _read_splits_csv(path: Path) -> dict[str, str]:
    """patient_id -> split from a CSV with columns ``patient_id,split[,...]``."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "patient_id" not in fields or "split" not in fields:
            raise ValueError(
                f"{path}: expected a header with columns patient_id,split (got {fields}); "
                "fix the CSV or set splits_csv to null for a seeded split"
            )
        out: dict[str, str] = {}
        for lineno, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            pid, split = row["patient_id"], row["split"].lower()
            if not pid:
                continue
            if split not in _SPLIT_ALIASES:
                raise ValueError(
                    f"{path}:{lineno}: unknown split {row['split']!r} for {pid}; "
                    "use train, val or test"
                )
            new = _SPLIT_ALIASES[split]
            if out.get(pid, new) != new:
                raise ValueError(
                    f"{path}:{lineno}: patient {pid} is listed in two splits "
                    f"({out[pid]} and {new}); a patient must be in exactly one split"
                )
            out[pid] = new
    return out


def _seeded_holdout(keys: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A seeded random subset of ``keys`` of size round(fraction * n) (at least 1 if n > 1)."""
    keys = sorted(keys)
    if fraction <= 0 or len(keys) < 2:
        return set()
    n_val = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    shuffled = list(keys)
    random.Random(seed).shuffle(shuffled)
    return set(shuffled[:n_val])


def scan_lgg(
    root: str | Path,
    splits_csv: str | None = "splits.csv",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Scan:
    """Scan the LGG MRI ``kaggle_3m`` layout with a patient-level split.

    Slices are ``ROOT/kaggle_3m/<patient>/<patient>_<n>.tif`` with masks ``<patient>_<n>_mask.tif``
    (``ROOT`` may also be the ``kaggle_3m`` folder itself). The split comes from
    ``ROOT/<splits_csv>`` (columns ``patient_id,split[,n_slices]``) when it exists; patients it
    does not list are left out with a warning. Otherwise a seeded ``val_fraction`` of the
    *patients* goes to val, so one patient's slices are never in two splits. Slices listed in
    ``ROOT/excluded_corrupt_slices.txt`` (one slice id such as ``TCGA_CS_5393_19990606_12`` per
    line, optionally followed by a tab and a note; ``#`` starts a comment) are skipped.

    Args:
        root: Data root (holding ``kaggle_3m/``).
        splits_csv: CSV file name relative to root, or None to always use the seeded split.
        val_fraction: Fraction of patients for val in the seeded split.
        seed: Seed of the seeded split.

    Returns:
        A :class:`Scan`; slices sorted by patient, then slice number.

    Raises:
        FileNotFoundError: When no patient folders are found.
        ValueError: For a malformed splits CSV.
    """
    base = _require_root(root, "lgg", LGG_LAYOUT)
    data_dir = base / "kaggle_3m" if (base / "kaggle_3m").is_dir() else base
    excluded = _read_excluded(base / "excluded_corrupt_slices.txt")
    if data_dir != base:
        excluded |= _read_excluded(data_dir / "excluded_corrupt_slices.txt")
    by_patient: dict[str, list[Sample]] = {}
    orphans: list[Path] = []
    unlisted: dict[str, OSError] = {}
    for pdir in sorted(d for d in data_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
        try:
            files = sorted(f for f in pdir.iterdir() if f.is_file() and is_image_file(f))
        except OSError as exc:  # no permission: the check names the folder
            unlisted[pdir.name] = exc
            continue
        masks = {f.stem[: -len("_mask")]: f for f in files if f.stem.endswith("_mask")}
        images = [f for f in files if not f.stem.endswith("_mask")]
        samples = []
        for img in images:
            if img.stem in excluded:
                continue
            samples.append(Sample(image=img, mask=masks.get(img.stem)))
        image_stems = {f.stem for f in images}
        orphans += [
            m for k, m in masks.items() if k not in image_stems and k not in excluded
        ]
        if samples:
            samples.sort(key=lambda s: _natural_key(s.image.name))
            by_patient[pdir.name] = samples
    if not by_patient:
        raise DataRootError(
            f"{data_dir}: no patient folders with .tif slices found; the 'lgg' layout expects "
            f"{LGG_LAYOUT}"
        )
    csv_path = base / splits_csv if splits_csv else None
    if csv_path is not None and csv_path.is_file():
        assignment = _read_splits_csv(csv_path)
        missing = sorted(p for p in by_patient if p not in assignment)
        if missing:
            log.warning(
                "%s does not list %d patient folder(s) (e.g. %s); they are left out",
                csv_path, len(missing), missing[0],
            )
    else:
        val = _seeded_holdout(list(by_patient), val_fraction, seed)
        assignment = {p: ("val" if p in val else "train") for p in by_patient}
    scan = Scan(folders={})
    for split in SPLITS:
        patients = [p for p in sorted(by_patient) if assignment.get(p) == split]
        if patients:
            scan[split] = [s for p in patients for s in by_patient[p]]
            scan.folders[split] = data_dir
    if orphans:
        patient_split = {
            s.image.parent: split for split, samples in scan.items() for s in samples
        }
        for m in orphans:
            scan.orphans.setdefault(patient_split.get(m.parent, "train"), []).append(m)
    for patient, exc in unlisted.items():  # drawn in no seeded split: train's, to be named
        scan.unlisted_dirs.setdefault(assignment.get(patient, "train"), []).append(exc)
    return scan


def _isbi_dirs(split_dir: Path) -> tuple[Path, Path] | None:
    for img_name, lab_name in (("image", "label"), ("images", "labels"), ("images", "masks")):
        if (split_dir / img_name).is_dir():
            return split_dir / img_name, split_dir / lab_name
    return None


def scan_isbi(root: str | Path, val_slices: tuple[int, int] | None = (20, 24)) -> Scan:
    """Scan the ISBI 2012 EM layout (``zhixuhao/unet``'s per-slice PNG export).

    With ``ROOT/val`` (or ``ROOT/test``) present, the split folders are used as they are.
    Otherwise the slices of ``ROOT/train/{image,label}``, sorted by name, are split by a
    contiguous range: slices ``[start, stop)`` go to val (neighbouring EM sections are highly
    correlated, so a random split would leak).

    Args:
        root: Data root.
        val_slices: ``(start, stop)`` slice range for val, or None to keep all in train.

    Returns:
        A :class:`Scan`.

    Raises:
        FileNotFoundError: When ``ROOT/train/image`` is missing.
        ValueError: When ``val_slices`` is not a valid range of the available slices.
    """
    base = _require_root(root, "isbi", ISBI_LAYOUT)
    scan = Scan()
    for split in SPLITS:
        dirs = _isbi_dirs(base / split)
        if dirs is not None:
            scan.add(split, dirs[0], _pair_folders(dirs[0], dirs[1], recursive=False))
    if "train" not in scan:
        raise DataRootError(
            f"{base}: no train/image folder found; the 'isbi' layout expects {ISBI_LAYOUT}"
        )
    if "val" not in scan and val_slices is not None:
        train = scan["train"]
        start, stop = int(val_slices[0]), int(val_slices[1])
        if not 0 <= start < stop <= len(train) or stop - start >= len(train):
            raise ValueError(
                f"val_slices ({start}, {stop}) is not a valid range of the {len(train)} slices "
                f"in {scan.folders['train']}; set data.val_slices to [start, stop) with "
                f"0 <= start < stop <= {len(train)} leaving some slices for training"
            )
        scan["val"] = train[start:stop]
        scan["train"] = train[:start] + train[stop:]
        scan.folders["val"] = scan.folders["train"]
        # Keep the usual split order.
        ordered = {k: scan[k] for k in SPLITS if k in scan}
        scan.clear()
        scan.update(ordered)
    return scan


# --------------------------------------------------------------------------------------------
# Mask encoding and channel adaptation (shared with the checker)
# --------------------------------------------------------------------------------------------


def _map_values(
    raw: np.ndarray, mapping: Mapping[int, int], fill: int | None, path: Path
) -> np.ndarray:
    uniq, inv = np.unique(raw, return_inverse=True)
    out_vals = np.empty(len(uniq), dtype=np.int64)
    unknown: list[int] = []
    for i, u in enumerate(uniq.tolist()):
        if u in mapping:
            out_vals[i] = mapping[u]
        elif fill is not None:
            out_vals[i] = fill
        else:
            unknown.append(u)
    if unknown:
        raise ImageReadError(
            path,
            f"mask values {unknown[:10]} are not in data.mask_values "
            f"(known: {sorted(mapping)[:10]})",
            "add them to data.mask_values, or set data.ignore_index to ignore them",
        )
    return out_vals[inv.reshape(-1)].reshape(raw.shape)


def colour_codes(colours: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """RGB colours (``(..., 3+)``: a mask, or a table of colours) as int64 codes
    ``R << 16 | G << 8 | B``, one per colour, so they compare and sort as single values."""
    if not isinstance(colours, np.ndarray):  # a table: its entries may carry alpha
        colours = [list(c)[:3] for c in colours]
    rgb = np.asarray(colours, dtype=np.int64)[..., :3]
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def code_colour(code: int) -> tuple[int, int, int]:
    """The ``(R, G, B)`` colour of a :func:`colour_codes` code."""
    code = int(code)
    return code >> 16, (code >> 8) & 255, code & 255


#: How far (Euclidean distance in RGB) a JPEG colour mask's colour may lie from a
#: ``data.mask_colors`` colour to be read as it (and it must lie nearer it than half-way to any
#: other): JPEG shifts flat colours by a few levels, chroma subsampling by tens.
JPEG_COLOUR_TOLERANCE = 64.0


def snap_jpeg_colours(raw: np.ndarray, mask_colors: Sequence[Sequence[int]]) -> np.ndarray:
    """A JPEG colour mask with each colour that compression shifted put back on its table colour.

    A colour not in the table that lies within :data:`JPEG_COLOUR_TOLERANCE` of one table colour,
    and nearer it than half-way to any other, becomes that colour; farther ones (blends of two
    classes at their edge, a class the table leaves out) are kept, for
    :func:`encode_mask` to read as ``ignore_index`` or refuse. Read without this, a pure red
    class lost every pixel to JPEG's chroma subsampling.

    Args:
        raw: (H, W, 3) uint8 mask.
        mask_colors: The colour table (i-th colour = class i).

    Returns:
        (H, W, 3) uint8 mask (``raw`` itself when nothing moved).
    """
    table = np.asarray([list(c)[:3] for c in mask_colors], dtype=np.float64)
    codes = colour_codes(raw)
    uniq, inverse = np.unique(codes, return_inverse=True)
    off = np.flatnonzero(~np.isin(uniq, colour_codes(table.astype(np.int64))))
    if off.size == 0:
        return raw
    palette = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], 1)  # each colour
    dist = np.linalg.norm(palette[off, None, :].astype(np.float64) - table[None], axis=2)
    nearest, near = dist.argmin(1), dist.min(1)
    tolerance = JPEG_COLOUR_TOLERANCE
    if len(table) > 1:
        pairs = np.linalg.norm(table[:, None] - table[None], axis=2)
        tolerance = min(tolerance, pairs[np.triu_indices(len(table), 1)].min() / 2 - 1e-6)
    moved = near <= tolerance
    if not moved.any():
        return raw
    palette[off[moved]] = table[nearest[moved]].astype(np.int64)
    return palette[inverse.reshape(codes.shape)].astype(np.uint8)


def encode_mask(
    raw: np.ndarray,
    path: str | Path,
    mask_values: Mapping[int, int] | None = None,
    mask_colors: Sequence[Sequence[int]] | None = None,
    ignore_index: int | None = None,
    snap: bool | None = None,
) -> np.ndarray:
    """Turn a raw mask from :func:`~segpipe.data.io.read_mask` into (H, W) int64 class indices.

    * ``mask_colors``: RGB colour-coded mask; the i-th colour is class i, any other colour
      becomes ``ignore_index`` (an error when it is None). In a JPEG file, colours that
      compression shifted near a table colour are read as it (:func:`snap_jpeg_colours`).
    * ``mask_values``: raw value -> class (e.g. ``{0: 0, 255: 1}``); unlisted values become
      ``ignore_index`` (an error when it is None).
    * Otherwise the values are the classes. An RGB mask whose three channels are equal is taken
      as grayscale.

    Args:
        raw: (H, W) integer or (H, W, 3) uint8 array.
        path: Mask file (for error messages).
        mask_values: Optional value mapping.
        mask_colors: Optional colour table.
        ignore_index: Label for unmapped values / colours.
        snap: Read colours near a table colour as it (:func:`snap_jpeg_colours`); None: when
            ``path`` is a JPEG file. (A caller that snapped ``raw`` already passes False.)

    Returns:
        (H, W) int64 labels (range not checked here).

    Raises:
        ImageReadError: For masks that do not fit the configured encoding.
    """
    p = Path(path)
    if mask_colors:
        if raw.ndim != 3:
            raise ImageReadError(
                p,
                "data.mask_colors is set but the mask has a single channel",
                "remove data.mask_colors for index masks (or use mask_values)",
            )
        if is_jpeg(p) if snap is None else snap:  # lossy: colours near one are read as it
            raw = snap_jpeg_colours(raw, mask_colors)
        codes = colour_codes(raw)
        table = {code: i for i, code in enumerate(colour_codes(mask_colors).tolist())}
        if len(table) != len(mask_colors):
            raise ValueError("data.mask_colors lists the same colour twice")
        try:
            return _map_values(codes, table, ignore_index, p)
        except ImageReadError:
            uniq = np.unique(codes)
            bad = [code_colour(u) for u in uniq.tolist() if u not in table]
            raise ImageReadError(
                p,
                f"mask colours {bad[:5]} are not in data.mask_colors",
                "add them to data.mask_colors, or set data.ignore_index to ignore them",
            ) from None
    if raw.ndim == 3:
        if np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2]):
            raw = raw[..., 0]
        else:
            raise ImageReadError(
                p,
                "mask is a colour (RGB) image but no colour table is configured",
                "set data.mask_colors to the list of class colours (i-th colour = class i), "
                "or save masks as single-channel class indices",
            )
    raw = raw.astype(np.int64, copy=False)
    if mask_values:
        mapping = {int(k): int(v) for k, v in mask_values.items()}
        return _map_values(raw, mapping, ignore_index, p)
    return raw


def label_range_fix(labels: np.ndarray, bad: list[int], num_classes: int,
                    mask_values: dict | None) -> str:
    """The fix for a mask with label values outside the classes, from the values it holds.

    Args:
        labels: (H, W) encoded labels of the mask.
        bad: Its values outside ``[0, num_classes)`` and not the ignore index.
        num_classes: Number of classes.
        mask_values: ``data.mask_values`` (None when unset).

    Returns:
        The one setting that fits the mask best, then the others to consider.
    """
    if mask_values:
        return (f"values {bad[:10]} are what data.mask_values maps them to: map them to "
                f"0..{num_classes - 1}, or fix data.num_classes")
    values = [int(v) for v in np.unique(labels)]
    if len(values) == num_classes:  # as segpipe check-data's hint
        mapping = ", ".join(f"{v}: {i}" for i, v in enumerate(values))
        first = f"if the mask's values are the classes in order, set data.mask_values: {{{mapping}}}"
    else:
        first = (f"map its values {values[:12]} to the classes with data.mask_values, or fix "
                 "data.num_classes")
    if len(bad) == 1:
        first += f"; if {bad[0]} marks pixels to leave out, set data.ignore_index: {bad[0]}"
    return f"{first}; `segpipe check-data` shows the values every mask holds"


def check_label_range(
    labels: np.ndarray, num_classes: int, ignore_index: int | None
) -> list[int]:
    """Label values outside ``[0, num_classes)`` that are not the ignore index.

    Args:
        labels: Encoded labels.
        num_classes: Number of classes.
        ignore_index: Allowed extra value.

    Returns:
        Sorted list of offending values (empty when all are valid).
    """
    if labels.size == 0:
        return []
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < num_classes:
        return []
    if lo >= 0 and hi < 65536 and np.issubdtype(labels.dtype, np.integer):
        # One counting pass, no sort (np.unique sorts).
        uniq = np.flatnonzero(np.bincount(labels.ravel(), minlength=hi + 1))
    else:
        uniq = np.unique(labels)
    return [
        int(u) for u in uniq if not (0 <= u < num_classes) and (ignore_index is None or u != ignore_index)
    ]


def adapt_channels(image: np.ndarray, in_channels: int | None, path: str | Path) -> np.ndarray:
    """Match an (H, W, C) float image to ``in_channels``.

    Documented conversions: 1 channel with ``in_channels == 3`` is replicated to 3; 3 channels
    (RGB) with ``in_channels == 1`` become luminance (0.299 R + 0.587 G + 0.114 B). Any other
    mismatch is an error.

    Args:
        image: (H, W, C) array.
        in_channels: Expected channel count, or None to accept any.
        path: Image file (for error messages).

    Returns:
        (H, W, in_channels) array.

    Raises:
        ImageReadError: On a channel mismatch that is not one of the conversions above.
    """
    c = image.shape[2]
    if in_channels is None or c == in_channels:
        return image
    if c == 1 and in_channels == 3:
        return np.repeat(image, 3, axis=2)
    if c == 3 and in_channels == 1:
        w = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
        return (image.astype(np.float32) @ w)[:, :, None].astype(image.dtype, copy=False)
    raise ImageReadError(
        path,
        f"image has {c} channel(s) but the model expects in_channels={in_channels}",
        "set data.in_channels (and model in_channels) to match, or pick bands with data.bands",
        kind="channels", file_bands=c,
    )


# --------------------------------------------------------------------------------------------
# Torch datasets
# --------------------------------------------------------------------------------------------


def _as_samples(samples: Iterable[Sample | str | Path]) -> list[Sample]:
    return [s if isinstance(s, Sample) else Sample(image=Path(s), mask=None) for s in samples]


class ItemKey(NamedTuple):
    """Dataset key that carries the epoch, so augmentation can be a function of it.

    The training sampler (:class:`~segpipe.data.datamodule.EpochSampler`) yields these instead of
    plain indices. They reach the dataset in the DataLoader workers with each index, so the
    epoch is right even with persistent workers (whose dataset copies never see the main
    process again).

    Attributes:
        index: Sample index.
        epoch: Training epoch.
        draw: Which pass over the data within the epoch (0 unless ``data.samples_per_epoch``
            exceeds the training set, so that a sample drawn twice in one epoch is augmented
            differently each time).
    """

    index: int
    epoch: int
    draw: int = 0


def item_seed(seed: int, epoch: int, index: int, draw: int = 0) -> int:
    """Augmentation seed of one sample in one epoch: a hash of ``(seed, epoch, index[, draw])``.

    Independent of the process, the worker and of everything drawn before, so a resumed run
    augments every sample exactly as the uninterrupted run would have.

    Args:
        seed: Run seed (``data.seed``).
        epoch: Epoch.
        index: Sample index.
        draw: Pass over the data within the epoch (:attr:`ItemKey.draw`); 0 hashes as before
            passes existed.

    Returns:
        A 32-bit seed.
    """
    return stable_seed(seed, epoch, index, *([draw] if draw else []))


def stable_seed(*values: int) -> int:
    """A 32-bit seed hashed from ``values`` (numpy's ``SeedSequence``): the same in every
    process and independent of any random state drawn before.

    Args:
        *values: Integers to hash (run seed, epoch, ...).

    Returns:
        A 32-bit seed.
    """
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


class _TransformMixin:
    transform: Any
    seed: int | None = None

    def reseed(self, seed: int) -> None:
        """Re-seed the albumentations transform (called in each DataLoader worker).

        Args:
            seed: New seed.
        """
        if self.transform is not None and hasattr(self.transform, "set_random_seed"):
            # here, not at the top: prediction reads images without importing albumentations
            from segpipe.data.transforms import seed_transform

            seed_transform(self.transform, seed)

    def _resolve_key(self, key: int | ItemKey) -> int:
        """Index of ``key``; for an :class:`ItemKey` also reseed the transform per item.

        With ``seed`` set and an epoch-carrying key, the transform draws from a generator seeded
        with :func:`item_seed`, so augmentation depends on ``(seed, epoch, index)`` only.
        """
        if isinstance(key, ItemKey):
            if self.seed is not None:
                self.reseed(item_seed(self.seed, key.epoch, key.index, key.draw))
            return int(key.index)
        return int(key)


class SegmentationDataset(_TransformMixin, Dataset):
    """Images with masks as ``{"image", "mask", "path"}`` dicts.

    Each item: ``image`` float32 (C, H, W) normalised, ``mask`` int64 (H, W), ``path`` the image
    path as str. Pipeline: read (native dtype) -> :func:`~segpipe.data.io.to_float` -> channel
    adaptation (:func:`adapt_channels`) -> mask encoding (:func:`encode_mask`) -> albumentations
    transform -> scaling, normalisation and CHW tensor in one pass
    (:func:`~segpipe.data.transforms.normalize_to_tensor`). 8-bit images whose channels already
    match are augmented as uint8 and scaled to [0, 1] after the transform
    (same result up to rounding, much less memory traffic on full-size frames).

    Args:
        samples: Samples (each must have a mask).
        transform: albumentations pipeline taking ``image`` and ``mask``; None for identity.
        mean: Per-channel mean (after scaling to [0, 1]); default from
            :func:`~segpipe.data.spec.default_mean_std`.
        std: Per-channel std; same default.
        bands: 1-based band selection passed to :func:`~segpipe.data.io.read_image`.
        mask_values: Raw mask value -> class mapping.
        mask_colors: Colour table for RGB masks (i-th colour = class i).
        ignore_index: Label of ignored pixels (used for unmapped values).
        in_channels: Expected channel count (see :func:`adapt_channels`); None accepts any.
        num_classes: When given, label values outside ``[0, num_classes)`` other than
            ``ignore_index`` raise an error naming the file (instead of a device assert later).
        seed: Augmentation seed. Items fetched with an :class:`ItemKey` ``(index, epoch)`` are
            augmented with a generator seeded from ``(seed, epoch, index)``
            (:func:`item_seed`); plain integer indices keep the transform's running state.
        cache_mb: Keep decoded pairs (image in its file's dtype, checked labels) in memory up to
            this many MiB, so later epochs skip decoding and checking; 0 disables. Each
            loading process holds its own cache, unless ``shared_cache``.
        shared_cache: One cache of ``cache_mb`` for every DataLoader worker forked after the
            dataset is made (:class:`~segpipe.data.cache.SharedPairCache`): a pair decoded by
            one worker is read by all, in this epoch and later ones. Spawned workers (which
            receive a pickled copy) fall back to a cache of their own.
        uint8_images: Return 8-bit images that need no channel conversion as uint8 (C, H, W),
            not normalised: the data module sends such batches to the GPU as uint8 (a quarter
            of the bytes) and normalises them there
            (:func:`~segpipe.data.transforms.normalize_uint8_batch`). Other images stay float32
            normalised. Masks whose labels (and ignore index) fit in 8 bits come as uint8 too
            (an eighth of int64's bytes); the data module makes them int64 on the device.
        pixel_weights: Maps the augmented (H, W) labels to (H, W) float32 loss weights, added
            to each item as ``"weight"`` (e.g. a ``functools.partial`` of
            :func:`~segpipe.data.transforms.boundary_weight_map`; it must pickle for loader
            workers); None (default) adds none.
        native_masks: Apply ``transform`` to the image alone (an evaluation resize) and keep
            the mask at its native size, so metrics score the image's own pixels; each item
            then carries ``"size"``: int64 ``[H, W]``, the mask's size.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Any | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        bands: Sequence[int] | None = None,
        mask_values: Mapping[int, int] | None = None,
        mask_colors: Sequence[Sequence[int]] | None = None,
        ignore_index: int | None = None,
        in_channels: int | None = None,
        num_classes: int | None = None,
        seed: int | None = None,
        cache_mb: float = 0,
        shared_cache: bool = False,
        uint8_images: bool = False,
        pixel_weights: Callable[[np.ndarray], np.ndarray] | None = None,
        native_masks: bool = False,
    ) -> None:
        self.samples = _as_samples(samples)
        self.pixel_weights = pixel_weights
        self.native_masks = bool(native_masks)
        self.transform = transform
        self.uint8_images = bool(uint8_images)
        self.seed = None if seed is None else int(seed)
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: PairCache | None = None
        if self.cache_bytes and shared_cache:
            try:
                self._cache = SharedPairCache(len(self.samples), self.cache_bytes)
            except OSError as err:  # e.g. strict overcommit refusing the mapping
                log.warning("no shared cache of %d MiB (%s): each loader worker keeps its own",
                            self.cache_bytes >> 20, err)
        if self.cache_bytes and self._cache is None:
            self._cache = PairCache(self.cache_bytes)
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self.bands = list(bands) if bands is not None else None
        self.mask_values = dict(mask_values) if mask_values else None
        self.mask_colors = [list(c) for c in mask_colors] if mask_colors else None
        self.ignore_index = ignore_index
        self.in_channels = in_channels
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def _stats(self, channels: int) -> tuple[Sequence[float], Sequence[float]]:
        d_mean, d_std = default_mean_std(channels)
        return (self.mean or d_mean), (self.std or d_std)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read one pair before augmentation.

        Args:
            index: Sample index.

        Returns:
            ``(image float32 (H, W, C) in [0, 1], labels int64 (H, W))``.

        Raises:
            ImageReadError: For unreadable files, missing masks, size or channel mismatches.
        """
        raw, labels = self._raw_pair(index)
        image = adapt_channels(to_float(raw), self.in_channels, self.samples[index].image)
        return image, labels.astype(np.int64, copy=False)

    def _raw_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The checked pair (image in its file's dtype) from the cache, or decoded and cached
        while room is left."""
        cached = self._cache.get(index) if self._cache is not None else None
        if cached is not None:
            return cached
        sample = self.samples[index]
        raw, valid = read_image_valid(sample.image, self.bands, self.in_channels)
        if sample.mask is None:
            raise ImageReadError(
                sample.image, "no mask found for this image", "add the mask or remove the image"
            )
        labels = encode_mask(
            read_mask(sample.mask, colours=bool(self.mask_colors)), sample.mask,
            self.mask_values, self.mask_colors, self.ignore_index,
        )
        if labels.shape != raw.shape[:2]:
            raise ImageReadError(
                sample.mask,
                f"mask is {labels.shape[1]}×{labels.shape[0]} but its image {sample.image} is "
                f"{raw.shape[1]}×{raw.shape[0]} (W×H)",
                "re-export the mask at the image's size",
            )
        if self.num_classes is not None:
            bad = check_label_range(labels, self.num_classes, self.ignore_index)
            if bad:
                raise ImageReadError(
                    sample.mask,
                    f"label values {bad[:10]} outside 0..{self.num_classes - 1}",
                    label_range_fix(labels, bad, self.num_classes, self.mask_values),
                )
        if valid is not None:  # a raster's nodata
            raw, labels = self._without_nodata(raw, labels, valid)
        if self._cache is not None:
            if labels.size and 0 <= labels.min() and labels.max() <= 255:
                labels = labels.astype(np.uint8)  # an eighth of int64's memory
            self._cache.put(index, raw, labels)
        return raw, labels

    def _without_nodata(self, raw: np.ndarray, labels: np.ndarray,
                        valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A raster's nodata pixels as ``segpipe predict`` sees them: the training mean (0 once
        normalised) in the image, and ``ignore_index`` in the labels, so they are neither
        learnt nor scored (the data check refuses them without an ignore index)."""
        raw, labels = raw.copy(), labels.copy()
        if self.ignore_index is not None:
            labels[~valid] = self.ignore_index
        mean = np.asarray(self._stats(raw.shape[2])[0], dtype=np.float64)
        if mean.size != raw.shape[2]:  # converted channels (1 <-> 3): one grey level
            mean = np.full(raw.shape[2], mean.mean())
        if np.issubdtype(raw.dtype, np.integer):
            mean = np.rint(mean * np.iinfo(raw.dtype).max)
        raw[~valid] = mean.astype(raw.dtype)
        return raw, labels

    def __getitem__(self, index: int | ItemKey) -> dict[str, Any]:
        """``{"image": float32 (C, H, W), "mask": int64 (H, W), "path": str}``, plus
        ``"case": str`` when the samples belong to cases, ``"size": int64 [H, W]`` with
        ``native_masks`` and ``"weight": float32 (H, W)`` with ``pixel_weights`` (``image``
        and ``mask`` uint8 with ``uint8_images``, see the class docstring).

        Args:
            index: Sample index, or an :class:`ItemKey` (index and epoch) from the training
                sampler.
        """
        index = self._resolve_key(index)
        raw, labels = self._raw_pair(index)
        if raw.dtype == np.uint8 and raw.shape[2] == (self.in_channels or raw.shape[2]):
            image = raw  # augmented as uint8 (a quarter of the memory traffic), scaled after
        else:
            image = adapt_channels(to_float(raw), self.in_channels, self.samples[index].image)
        # Whether the padding value (the ignore index) fits in uint8 labels
        ignore_fits = 0 <= (self.ignore_index or 0) <= 255
        if self.transform is not None and self.native_masks:
            image = self.transform(image=image)["image"]
        elif self.transform is not None:
            # Labels as uint8 when they and the padding value fit, cached or not: cv2's
            # nearest-neighbour warps break ties otherwise for uint8 and int32 (no int64 in
            # cv2), so the cache changed a few pixels of strong's rotations.
            fits = ignore_fits
            if fits and labels.dtype != np.uint8:
                fits = bool(labels.size) and 0 <= labels.min() and labels.max() <= 255
            labels = labels.astype(np.uint8 if fits else np.int32, copy=False)
            # A float image beyond [0, 1] (dB, raw reflectance, a stretch) goes through the
            # pixel transforms per band in [0, 0.5] and back: albumentations clips float images
            # to [0, 1] (a SAR image in dB came out all zeros when jittered). Padding takes
            # the band's minimum, where it took 0.
            span = _beyond_unit_range(image)
            if span is not None:
                image = (image - span[0]) / span[1]
            out = self.transform(image=image, mask=labels)
            image, labels = out["image"], out["mask"]
            if span is not None:
                image = image * span[1] + span[0]
        if self.uint8_images and image.dtype == np.uint8:
            pixels = image if image.ndim == 3 else image[:, :, None]
            img_t = torch.from_numpy(_writable(np.ascontiguousarray(pixels))).permute(2, 0, 1)
        else:
            img_t = normalize_to_tensor(image, *self._stats(image.shape[2]))
        if self.uint8_images and labels.dtype == np.uint8 and ignore_fits:
            # crosses to the device as uint8 (an eighth of int64's bytes to collate, pin and
            # copy); the data module makes it int64 there, as it normalises the image
            mask_t = torch.from_numpy(_writable(np.ascontiguousarray(labels)))
        else:
            mask_t = torch.from_numpy(_writable(np.ascontiguousarray(labels, dtype=np.int64)))
        sample = self.samples[index]
        item = {"image": img_t, "mask": mask_t, "path": str(sample.image)}
        if self.native_masks:
            item["size"] = torch.tensor(labels.shape[:2], dtype=torch.int64)
        if self.pixel_weights is not None:
            item["weight"] = torch.from_numpy(
                np.ascontiguousarray(self.pixel_weights(labels), dtype=np.float32)
            )
        if self._has_cases:
            item["case"] = sample.case or ""
        return item

    @functools.cached_property
    def _has_cases(self) -> bool:
        """Whether the samples belong to cases: looked at once, not for every item (a pass
        over every sample per item made an epoch quadratic in the data set's size)."""
        return any(s.case for s in self.samples)


def _writable(array: np.ndarray) -> np.ndarray:
    """``array``, or a copy where it is read-only (a shared cache's view that no transform
    replaced): tensors over read-only memory are not allowed."""
    return array if array.flags.writeable else array.copy()


def _beyond_unit_range(image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(low, span)`` per band, float32 (C,), of a float (H, W, C) image with values outside
    ``[0, 1]``, else None (nothing to clip): ``(image - low) / span`` lies in ``[0, 0.5]``,
    which leaves room for gains up to 2 and brightness shifts before albumentations' clip."""
    if image.dtype.kind != "f" or not image.size:
        return None
    low = image.min(axis=(0, 1))
    high = image.max(axis=(0, 1))
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        return None  # NaN: refused by the data check
    if low.min() >= 0.0 and high.max() <= 1.0:
        return None
    span = 2 * np.maximum(high - low, np.float32(1e-12))
    return low.astype(np.float32), span.astype(np.float32)


class PredictDataset(_TransformMixin, Dataset):
    """Images without masks, preprocessed like :class:`SegmentationDataset`.

    Each item: ``image`` float32 (C, H, W) normalised, ``path`` str, ``size`` int64 tensor
    ``[H, W]`` of the original image (before an optional resize), which collates to (N, 2).

    Args:
        images: Image files (or samples; their masks are ignored).
        transform: Optional albumentations pipeline (e.g. an eval resize).
        mean: Per-channel mean; default from ``default_mean_std``.
        std: Per-channel std.
        bands: 1-based band selection.
        in_channels: Expected channel count (see :func:`adapt_channels`).
    """

    def __init__(
        self,
        images: Sequence[str | Path | Sample],
        transform: Any | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        bands: Sequence[int] | None = None,
        in_channels: int | None = None,
    ) -> None:
        self.samples = _as_samples(images)
        self.transform = transform
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None
        self.bands = list(bands) if bands is not None else None
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int | ItemKey) -> dict[str, Any]:
        """``{"image": float32 (C, H, W), "path": str, "size": int64 [H, W], "dtype": str}``
        (``dtype``: the file's pixels' as read), ``"valid"`` as :func:`prepare_image` gives it
        (a TIFF's nodata included), and for float pixels ``"value_range": (min, max)`` of the
        finite ones."""
        return self.get(index)

    def get(self, index: int | ItemKey, unresized: bool = False,
            alpha_nodata: bool = False) -> dict[str, Any]:
        """:meth:`__getitem__`'s item; with ``unresized`` and a transform, also
        ``"unresized"``: the image prepared without it (float32 (C, H, W) normalised), e.g. for
        an overlay of the input as it is rather than of the network's resized input. With
        ``alpha_nodata``, a PNG's transparent pixels are nodata
        (:func:`~segpipe.data.io.read_image_valid`)."""
        path = self.samples[self._resolve_key(index)].image
        pixels, valid = read_image_valid(path, self.bands, self.in_channels,  # a TIFF's nodata
                                         alpha_nodata=alpha_nodata)
        item = prepare_image(pixels, in_channels=self.in_channels, mean=self.mean,
                             std=self.std, transform=self.transform, source=path, valid=valid)
        item = {**item, "path": str(path), "dtype": str(pixels.dtype)}
        if unresized and self.transform is not None:
            item["unresized"] = prepare_image(pixels, in_channels=self.in_channels,
                                              mean=self.mean, std=self.std, source=path,
                                              valid=valid)["image"]
        value_range = finite_range(pixels, valid)
        if value_range is not None:
            item["value_range"] = value_range
        return item


def finite_range(pixels: np.ndarray, valid: np.ndarray | None = None
                 ) -> tuple[float, float] | None:
    """Minimum and maximum of the finite values of float ``pixels`` (H, W[, C]) (where ``valid``
    (H, W), if given), or None for integer pixels or no such value."""
    if pixels.dtype.kind != "f":
        return None
    values = pixels[valid] if valid is not None else pixels
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if values.size else None


def prepare_image(
    pixels: np.ndarray,
    *,
    in_channels: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    transform: Any | None = None,
    source: str | Path = "image",
    valid: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """An image as a prediction input, exactly as training data is prepared.

    :func:`~segpipe.data.io.to_float` -> :func:`adapt_channels` -> optional transform (e.g. the
    eval resize) -> normalisation into a channels-last (C, H, W) tensor. Shared by
    :class:`PredictDataset` (``segpipe predict``) and the Python API. As in
    :class:`SegmentationDataset`, 8-bit images whose channels match are transformed as uint8
    and scaled after, so that the eval resize rounds as it does in ``segpipe test``.

    Args:
        pixels: (H, W, C) or (H, W) image in its native dtype (bands already selected).
        in_channels: Channels the model takes (None: as given).
        mean: Per-channel mean (default :func:`~segpipe.data.spec.default_mean_std`).
        std: Per-channel std.
        transform: albumentations pipeline taking ``image``, or None.
        source: The file or a name, for error messages.
        valid: (H, W) bool, False at nodata pixels (a raster's mask), or None.

    Returns:
        ``{"image": float32 (C, h, w), "size": int64 [H, W]}`` (size before the transform),
        and ``"valid"``, bool (H, W), when some pixel is nodata (``valid``) or NaN/infinite in
        any channel: those pixels are set to the normalisation mean (0 in the network's input,
        as ``segpipe predict`` fills a raster's nodata), so they add no signal and spread no
        NaN, and their labels are to be written as nodata.
    """
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    # 8-bit images whose channels match are resized as uint8 and scaled after, as
    # SegmentationDataset does, so that `segpipe test` scores exactly these inputs.
    as_uint8 = arr.dtype == np.uint8 and arr.shape[2] == (in_channels or arr.shape[2])
    image = arr if as_uint8 else adapt_channels(to_float(arr), in_channels, source)
    size = torch.tensor(image.shape[:2], dtype=torch.int64)
    d_mean, d_std = default_mean_std(image.shape[2])
    ok = np.isfinite(image).all(axis=-1) if arr.dtype.kind == "f" else None  # ints: finite
    if valid is not None:
        ok = valid if ok is None else ok & valid
    if ok is not None and ok.all():
        ok = None
    if ok is not None:
        fill = np.asarray(mean or d_mean, dtype=np.float64)
        if as_uint8:  # the training mean in 8 bits, as SegmentationDataset fills nodata
            image, fill = image.copy(), np.rint(fill * 255).astype(np.uint8)
        else:
            image, fill = np.array(image, dtype=np.float32), fill.astype(np.float32)
        image[~ok] = fill  # on a copy: the caller's pixels stay as given
    if transform is not None:
        image = transform(image=image)["image"]
    img_t = normalize_to_tensor(image, mean or d_mean, std or d_std)
    out = {"image": img_t, "size": size}
    if ok is not None:
        out["valid"] = torch.from_numpy(np.ascontiguousarray(ok))
    return out
