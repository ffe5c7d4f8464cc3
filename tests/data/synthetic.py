"""Tiny synthetic data sets, written by code, in each supported layout.

Every generator writes to ``root`` (created if needed) and returns ``root`` as a Path. Labels are
learnable from the image: objects (rectangles and discs) of class ``k`` are painted in a
class-specific colour / intensity on a noisy class-0 background, so a small model can fit them.
All generators are deterministic for a given ``seed``.

Used by the data tests and by other test suites (task, CLI end-to-end, prediction).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from segpipe.data.io import write_image, write_mask

__all__ = [
    "class_colors_for",
    "make_camvid_like",
    "make_folder_dataset",
    "make_isbi_like",
    "make_lgg_like",
    "make_pair",
    "synthetic_mask_colors",
]

_RGB_TABLE = [
    (40, 40, 40),
    (230, 50, 50),
    (50, 220, 60),
    (60, 70, 230),
    (230, 220, 60),
    (220, 60, 220),
    (60, 220, 220),
    (235, 235, 235),
]


def class_colors_for(num_classes: int, channels: int = 3) -> np.ndarray:
    """Pixel value of each class in the synthetic *images*.

    Args:
        num_classes: Number of classes.
        channels: Image channels.

    Returns:
        uint8 array (num_classes, channels); class 0 is the (dark) background.
    """
    out = np.zeros((num_classes, channels), dtype=np.uint8)
    for k in range(num_classes):
        if channels == 3 and num_classes <= len(_RGB_TABLE):
            out[k] = _RGB_TABLE[k]
        else:
            level = 30 + (200 * k) // max(1, num_classes - 1)
            for c in range(channels):
                out[k, c] = np.clip(level + (c % 3) * 5, 0, 255)
    return out


def synthetic_mask_colors(num_classes: int) -> list[list[int]]:
    """Colour table used by ``mask_mode="rgb"`` masks (i-th colour = class i).

    Pass it as ``mask_colors`` to the dataset / data module.

    Args:
        num_classes: Number of classes.

    Returns:
        One RGB triplet per class.
    """
    palette = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128],
               [128, 0, 128], [0, 128, 128], [128, 128, 128]]
    while len(palette) < num_classes:
        k = len(palette)
        palette.append([(37 * k) % 256, (91 * k) % 256, (173 * k) % 256])
    return [list(c) for c in palette[:num_classes]]


def make_pair(
    rng: np.random.Generator,
    size: tuple[int, int] = (64, 64),
    num_classes: int = 3,
    channels: int = 3,
    n_objects: int | None = None,
    first_class: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its label map.

    Args:
        rng: Random generator.
        size: ``(height, width)``.
        num_classes: Number of classes (class 0 = background).
        channels: Image channels.
        n_objects: Objects to draw (default 1..3).
        first_class: Class of the first object (to cover all classes across a data set).

    Returns:
        ``(image uint8 (H, W, C), labels uint8 (H, W))``.
    """
    h, w = size
    colors = class_colors_for(num_classes, channels)
    labels = np.zeros((h, w), dtype=np.uint8)
    if num_classes > 1:
        count = n_objects if n_objects is not None else int(rng.integers(1, 4))
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(count):
            if i == 0 and first_class is not None:
                k = 1 + (first_class - 1) % (num_classes - 1)
            else:
                k = int(rng.integers(1, num_classes))
            oh = int(rng.integers(max(2, h // 6), max(3, h // 3) + 1))
            ow = int(rng.integers(max(2, w // 6), max(3, w // 3) + 1))
            y0 = int(rng.integers(0, max(1, h - oh)))
            x0 = int(rng.integers(0, max(1, w - ow)))
            if rng.random() < 0.5:
                labels[y0 : y0 + oh, x0 : x0 + ow] = k
            else:
                cy, cx, r = y0 + oh / 2, x0 + ow / 2, min(oh, ow) / 2
                labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    noise = rng.integers(-12, 13, size=(h, w, channels))
    image = np.clip(colors[labels].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return image, labels


def _write_mask(path: Path, labels: np.ndarray, mask_mode: str, num_classes: int) -> None:
    if mask_mode == "index":
        write_mask(path, labels)
    elif mask_mode == "binary":
        write_mask(path, (labels > 0).astype(np.uint8) * 255)
    elif mask_mode == "rgb":
        table = np.asarray(synthetic_mask_colors(num_classes), dtype=np.uint8)
        write_image(path, table[labels])
    else:
        raise ValueError(f"mask_mode must be index, rgb or binary, got {mask_mode!r}")


def make_folder_dataset(
    root: str | Path,
    n_train: int = 8,
    n_val: int = 4,
    n_test: int = 4,
    size: tuple[int, int] = (64, 64),
    num_classes: int = 3,
    channels: int = 3,
    image_ext: str = ".png",
    mask_mode: Literal["index", "rgb", "binary"] = "index",
    seed: int = 0,
) -> Path:
    """Write ``ROOT/{train,val,test}/{images,masks}`` (the ``folder`` layout).

    Splits with ``n_* == 0`` are not created. Masks are always PNG, named like their image
    (``img_000.png`` for ``img_000.jpg``).

    Args:
        root: Output folder.
        n_train: Training pairs.
        n_val: Validation pairs.
        n_test: Test pairs.
        size: ``(height, width)`` of every image.
        num_classes: Number of classes (``mask_mode="binary"`` needs 2).
        channels: Image channels; other than 1, 3 or 4 needs ``image_ext=".tif"``.
        image_ext: Image extension (``.png``, ``.jpg``, ``.webp``, ``.tif``, ...).
        mask_mode: ``index`` (class indices), ``rgb`` (colours from
            :func:`synthetic_mask_colors`; use them as ``mask_colors``) or ``binary`` (0/255;
            use ``mask_values={0: 0, 255: 1}``).
        seed: Random seed.

    Returns:
        ``root`` as a Path.
    """
    if mask_mode == "binary" and num_classes != 2:
        raise ValueError("mask_mode='binary' needs num_classes=2")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n <= 0:
            continue
        for i in range(n):
            image, labels = make_pair(rng, size, num_classes, channels, first_class=i + 1)
            write_image(root / split / "images" / f"img_{i:03d}{image_ext}", image)
            _write_mask(root / split / "masks" / f"img_{i:03d}.png", labels, mask_mode,
                        num_classes)
    return root


def make_camvid_like(
    root: str | Path,
    n_train: int = 6,
    n_val: int = 3,
    n_test: int = 0,
    size: tuple[int, int] = (36, 48),
    num_classes: int = 4,
    void_index: int | None = None,
    image_ext: str = ".webp",
    seed: int = 0,
) -> Path:
    """Write SegNet's CamVid layout: ``ROOT/{split}`` frames, ``ROOT/{split}annot`` labels.

    Frames are lossless WebP by default (like the real copy), labels 8-bit index PNGs.

    Args:
        root: Output folder.
        n_train: Training frames.
        n_val: Validation frames.
        n_test: Test frames (0: no test split, like the real copy).
        size: ``(height, width)``.
        num_classes: Number of classes.
        void_index: When set, the bottom rows are labelled with this value (use it as
            ``ignore_index``, like CamVid's void = 11).
        image_ext: Frame extension.
        seed: Random seed.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            image, labels = make_pair(rng, size, num_classes, 3, first_class=i + 1)
            if void_index is not None:
                labels[-max(1, size[0] // 8) :, :] = void_index
            stem = f"0001TP_{i * 30:06d}"
            write_image(root / split / f"{stem}{image_ext}", image)
            write_mask(root / f"{split}annot" / f"{stem}.png", labels)
    return root


def make_lgg_like(
    root: str | Path,
    n_patients: int = 5,
    slices_per_patient: int = 3,
    size: tuple[int, int] = (32, 32),
    val_patients: int = 1,
    write_splits_csv: bool = True,
    with_excluded: bool = False,
    seed: int = 0,
) -> Path:
    """Write the LGG MRI ``kaggle_3m`` layout.

    ``ROOT/kaggle_3m/<patient>/<patient>_<n>.tif`` (3-band uint8 LZW TIFF) with
    ``<patient>_<n>_mask.tif`` (one band, 0 background / 255 abnormality; use
    ``mask_values={0: 0, 255: 1}``). Slice numbers start at 1.

    Args:
        root: Output folder.
        n_patients: Patients.
        slices_per_patient: Slices per patient.
        size: ``(height, width)``.
        val_patients: Patients marked ``val`` in ``splits.csv`` (the last ones).
        write_splits_csv: Write ``ROOT/splits.csv`` (patient_id,split,n_slices).
        with_excluded: Also write an undecodable slice for the first patient and list it in
            ``ROOT/excluded_corrupt_slices.txt`` (the scanner must skip it).
        seed: Random seed.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    patients = [f"TCGA_XX_{1000 + p:04d}_2000010{1 + p % 9}" for p in range(n_patients)]
    for p, pid in enumerate(patients):
        pdir = root / "kaggle_3m" / pid
        for n in range(1, slices_per_patient + 1):
            image, labels = make_pair(rng, size, 2, 3, first_class=1)
            write_image(pdir / f"{pid}_{n}.tif", image)
            write_mask(pdir / f"{pid}_{n}_mask.tif", (labels > 0).astype(np.uint8) * 255)
        split = "val" if p >= n_patients - val_patients else "train"
        rows.append(f"{pid},{split},{slices_per_patient}")
    if with_excluded:
        pid = patients[0]
        bad = f"{pid}_{slices_per_patient + 1}"
        pdir = root / "kaggle_3m" / pid
        (pdir / f"{bad}.tif").write_bytes(b"II*\x00" + b"\x00" * 20)  # undecodable
        write_mask(pdir / f"{bad}_mask.tif", np.zeros(size, dtype=np.uint8))
        (root / "excluded_corrupt_slices.txt").write_text(
            "# slices whose TIFF does not decode\n" f"{bad}\timage\n", encoding="utf-8"
        )
    if write_splits_csv:
        (root / "splits.csv").write_text(
            "patient_id,split,n_slices\n" + "\n".join(rows) + "\n", encoding="utf-8"
        )
    return root


def make_isbi_like(
    root: str | Path,
    n_slices: int = 6,
    size: tuple[int, int] = (32, 32),
    seed: int = 0,
) -> Path:
    """Write the ISBI 2012 EM export layout: ``ROOT/train/{image,label}/00.png ...``.

    Grayscale images of dark membranes (grid-like lines) on bright cells; labels 0 = membrane,
    255 = cell interior (use ``mask_values={0: 0, 255: 1}``, ``in_channels=1``).

    Args:
        root: Output folder.
        n_slices: Consecutive slices.
        size: ``(height, width)``.
        seed: Random seed.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(n_slices):
        label = np.full((h, w), 255, dtype=np.uint8)
        for _ in range(3):
            label[int(rng.integers(0, h)), :] = 0
            label[:, int(rng.integers(0, w))] = 0
        image = np.where(label > 0, 200, 50).astype(np.int16) + rng.integers(-15, 16, (h, w))
        write_image(root / "train" / "image" / f"{i:02d}.png",
                    np.clip(image, 0, 255).astype(np.uint8))
        write_mask(root / "train" / "label" / f"{i:02d}.png", label)
    return root
