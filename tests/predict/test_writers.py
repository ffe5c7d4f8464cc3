"""Output formats, atomic commits, safe paths and windowed TIFF writing."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.enums import MaskFlags

from segpipe.data.spec import default_class_colors
from segpipe.data.io import RasterWriter
from segpipe.fileio import TMP_PREFIX, DiskFullError
from segpipe.predict.checkpoint import PredictConfig
from segpipe.predict.writers import (
    OutputMeta,
    PredictionWriter,
    RowChunk,
    UnsafeOutputPath,
    blend_overlay,
)


def config(num_classes: int = 3) -> PredictConfig:
    return PredictConfig(
        checkpoint="test.ckpt", num_classes=num_classes,
        class_names=[f"c{i}" for i in range(num_classes)],
        class_colors=default_class_colors(num_classes), in_channels=3, bands=None,
        mean=[0.5] * 3, std=[0.25] * 3,
    )


def test_more_than_255_classes_give_uint16_outputs(tmp_path: Path) -> None:
    cfg = config(300)
    assert cfg.mask_dtype == np.uint16 and cfg.nodata_value == 65535
    labels = (np.arange(20 * 30).reshape(20, 30) % 300).astype(np.uint16)
    writer = PredictionWriter(tmp_path, ["mask", "palette", "geotiff"], cfg)
    writer.write("a/img.jpg", ["mask", "palette", "geotiff"], RowChunk(labels), Path("img.jpg"))
    mask = np.asarray(Image.open(tmp_path / "a" / "img.png"))
    assert np.array_equal(mask.astype(np.int64), labels.astype(np.int64))
    colour = np.asarray(Image.open(tmp_path / "a" / "img_palette.png"))
    assert colour.shape == (20, 30, 3)  # no 16-bit palettes: an RGB picture instead
    assert np.array_equal(colour[0, 1], cfg.palette()[1])
    with rasterio.open(tmp_path / "a" / "img.tif") as ds:
        assert ds.dtypes[0] == "uint16" and ds.nodata == 65535
        assert np.array_equal(ds.read(1), labels)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    writer = PredictionWriter(tmp_path, ["mask", "geotiff", "probs"], config())
    meta = OutputMeta(Path("x.tif"), 40, 30)
    with pytest.raises(RuntimeError, match="killed"):
        with writer.open("sub/x.tif", ["mask", "geotiff", "probs"], meta) as sink:
            sink.write_rows(0, RowChunk(np.zeros((10, 30), np.uint8),
                                        probs=np.zeros((3, 10, 30), np.uint8)))
            raise RuntimeError("killed")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_an_unwritable_output_is_named_not_its_temporary_file(tmp_path: Path,
                                                               monkeypatch) -> None:
    """GDAL's open error named the hidden '.segpipe-tmp-….partial' file (a non-root user in a
    read-only folder; root writes anyway, so the open is made to fail here as GDAL does)."""
    from rasterio.errors import RasterioIOError

    import segpipe.data.io as io

    def refuse(path, *args, **kwargs):
        raise RasterioIOError(f"Attempt to create new tiff file '{path}' failed: Permission denied")

    monkeypatch.setattr(io, "_open_raster", refuse)
    writer = PredictionWriter(tmp_path, ["geotiff"], config())
    with pytest.raises(PermissionError) as err:
        with writer.open("sub/b.tif", ["geotiff"], OutputMeta(Path("b.tif"), 40, 30)):
            pass
    assert str(err.value) == f"cannot write {tmp_path / 'sub' / 'b.tif'}: Permission denied"
    assert TMP_PREFIX not in str(err.value)


def test_rows_must_complete_the_image(tmp_path: Path) -> None:
    writer = PredictionWriter(tmp_path, ["geotiff"], config())
    with pytest.raises(ValueError, match="rows must be written in order"):
        with writer.open("x.png", ["geotiff"], OutputMeta(Path("x.png"), 40, 30)) as sink:
            sink.write_rows(5, RowChunk(np.zeros((10, 30), np.uint8)))
    assert not list(tmp_path.iterdir())


def test_output_paths_stay_inside_the_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    writer = PredictionWriter(out, ["mask"], config())
    assert writer.target("a/b/c.jpg", "mask") == out / "a" / "b" / "c.png"
    for bad in ("../escape.png", "/etc/passwd.png", "a/../../x.png"):
        with pytest.raises(UnsafeOutputPath):
            writer.target(bad, "mask")
    (tmp_path / "elsewhere").mkdir()
    out.mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeOutputPath, match="outside the output folder"):
        writer.target("link/x.png", "mask")


def test_unknown_format_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown output format"):
        PredictionWriter(tmp_path, ["jpeg"], config())


def test_overlay_blends_and_keeps_nodata() -> None:
    display = np.full((2, 2, 3), 100, np.uint8)
    lut = np.zeros((256, 3), np.uint8)
    lut[1] = (200, 0, 0)
    labels = np.array([[0, 1], [255, 1]])
    out = blend_overlay(display, labels, lut, alpha=0.5, nodata=255)
    assert out[0, 1].tolist() == [150, 50, 50] and out[0, 0].tolist() == [50, 50, 50]
    assert out[1, 0].tolist() == [100, 100, 100]


def test_png_formats_refuse_rasters_above_the_pixel_limit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    writer = PredictionWriter(tmp_path, ["mask"], config())
    with pytest.raises(ValueError, match="use --format geotiff"):
        with writer.open("x.tif", ["mask"], OutputMeta(Path("x.tif"), 20, 20)):
            pass
    assert not list(tmp_path.iterdir())


def test_overlay_refuses_an_image_jpeg_cannot_hold_before_it_is_predicted(
        tmp_path: Path) -> None:
    """A 70 000-px-wide raster failed in Pillow only once predicted, with 'broken data stream',
    and its finished GeoTIFF went with it; the limit is checked as the outputs are opened."""
    from segpipe.predict.writers import JPEG_MAX_SIDE

    writer = PredictionWriter(tmp_path, ["geotiff", "overlay"], config())
    with pytest.raises(ValueError, match=r"65501×4 is too large .*at most 65500 pixels a side\): leave overlay out"):
        with writer.open("wide.tif", ["geotiff", "overlay"],
                         OutputMeta(Path("wide.tif"), 4, JPEG_MAX_SIDE + 1)):
            pytest.fail("the outputs were opened")  # pragma: no cover
    assert not list(tmp_path.iterdir())
    # the largest JPEG side is still written
    with writer.open("ok.tif", ["overlay"], OutputMeta(Path("ok.tif"), 2, JPEG_MAX_SIDE)) as sink:
        sink.write_rows(0, RowChunk(np.zeros((2, JPEG_MAX_SIDE), np.uint8)))
    assert Image.open(tmp_path / "ok_overlay.jpg").size == (JPEG_MAX_SIDE, 2)


def test_a_folder_in_an_outputs_place_is_named_not_the_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "a.png").mkdir()
    writer = PredictionWriter(tmp_path, ["mask"], config())
    with pytest.raises(OSError) as err:
        with writer.open("a.jpg", ["mask"], OutputMeta(Path("a.jpg"), 3, 4)) as sink:
            sink.write_rows(0, RowChunk(np.zeros((3, 4), np.uint8)))
    assert str(err.value) == f"cannot write {tmp_path / 'a.png'}: Is a directory"
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_raster_writer_rows_in_any_chunks(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 255, (2, 300, 70)).astype(np.uint8)
    path = tmp_path / "w.tif"
    with RasterWriter(path, width=70, height=300, count=2, dtype=np.uint8, blocksize=64) as w:
        row = 0
        for n in (1, 63, 64, 100, 50, 22):
            w.write_rows(row, data[:, row : row + n])
            row += n
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    with rasterio.open(path) as ds:
        assert np.array_equal(ds.read(), data) and ds.block_shapes[0] == (64, 64)


# ------------------------------------------------------------------ full disks
REPO = Path(__file__).resolve().parents[2]


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
@pytest.mark.parametrize("failing", ["mask", "palette", "overlay"])
def test_full_disk_keeps_the_previous_outputs(failing: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite (--overwrite) that runs out of space leaves every previous output as it was."""
    names = ["mask", "palette", "overlay"]
    writer = PredictionWriter(tmp_path, names, config(), overwrite=True)
    labels = np.random.default_rng(0).integers(0, 3, (60, 80)).astype(np.uint8)
    display = np.random.default_rng(1).integers(0, 255, (60, 80, 3)).astype(np.uint8)
    writer.write("d/x.png", names, RowChunk(labels, display=display), Path("x.png"))
    before = _outputs(tmp_path)
    real_write = os.write
    opened: list[str] = []  # files in the order they are written: mask, palette, overlay

    def write(fd: int, data: Any) -> int:  # the failing format's file hits a full disk
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name not in opened:
            opened.append(name)
        if opened.index(name) == names.index(failing):
            real_write(fd, bytes(memoryview(data)[: len(data) // 3]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(DiskFullError) as info:
        writer.write("d/x.png", names, RowChunk(255 - labels, display=display), Path("x.png"))
    monkeypatch.undo()
    assert info.value.path == writer.target("d/x.png", failing)
    assert str(tmp_path / "d") in str(info.value)
    assert _outputs(tmp_path) == before  # untouched, and no temporary file left


def test_full_disk_in_a_geotiff_write_is_disk_full_error(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """GDAL reports a failed write without errno; with no space left it is a full disk."""
    import shutil

    from rasterio.errors import RasterioIOError

    writer = PredictionWriter(tmp_path, ["geotiff", "mask"], config(), overwrite=True)
    labels = np.zeros((300, 40), np.uint8)
    writer.write("x.tif", ["geotiff", "mask"], RowChunk(labels), Path("x.tif"))
    before = _outputs(tmp_path)

    from segpipe.data import io as io_module

    class FailingWrites:
        """A dataset open for writing whose writes fail as GDAL's do on a full disk."""

        def __init__(self, ds: Any) -> None:
            self._ds = ds

        def write(self, *args: Any, **kwargs: Any) -> None:
            raise RasterioIOError("Write failed. See previous exception for details.")

        def __getattr__(self, name: str) -> Any:
            return getattr(self._ds, name)

    real_open = io_module._open_raster
    monkeypatch.setattr(io_module, "_open_raster", lambda path, *args, **kwargs: (
        FailingWrites(real_open(path, *args, **kwargs)) if args[:1] == ("w",)
        else real_open(path, *args, **kwargs)))
    with pytest.raises(RasterioIOError):  # plenty of room: GDAL's own error
        writer.write("x.tif", ["geotiff", "mask"], RowChunk(labels + 1), Path("x.tif"))
    assert _outputs(tmp_path) == before
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(DiskFullError) as info:
        writer.write("x.tif", ["geotiff", "mask"], RowChunk(labels + 1), Path("x.tif"))
    assert info.value.path == tmp_path / "x.tif"
    assert _outputs(tmp_path) == before


_GDAL_LIMIT_SCRIPT = """
import json, os, resource, shutil, signal, sys
from pathlib import Path
import numpy as np
from segpipe.fileio import TMP_PREFIX
from segpipe.predict.writers import PredictionWriter, RowChunk
from tests.predict.test_writers import config

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
root = Path(sys.argv[1])
labels = np.random.default_rng(0).integers(0, 3, (512, 512)).astype(np.uint8)
size = PredictionWriter(root / "probe", ["geotiff"], config()).write(
    "x.tif", ["geotiff"], RowChunk(labels), Path("x.tif"))[0].stat().st_size
out = root / "out"
writer = PredictionWriter(out, ["geotiff"], config(), overwrite=True)
writer.write("x.tif", ["geotiff"], RowChunk(np.zeros_like(labels)), Path("x.tif"))
good = (out / "x.tif").read_bytes()
real = shutil.disk_usage
results = []
for limit in (size // 2, size - 20):  # in the middle of the tiles; while GDAL closes the file
    for low in (False, True):
        shutil.disk_usage = (lambda p: real(p)._replace(free=1000)) if low else real
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            writer.write("x.tif", ["geotiff"], RowChunk(labels), Path("x.tif"))
            error = None
        except Exception as exc:
            error = (type(exc).__name__, str(getattr(exc, "path", "")), str(exc))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        results.append({"limit": limit, "low": low, "error": error,
                        "intact": (out / "x.tif").read_bytes() == good,
                        "files": sorted(p.name for p in out.iterdir())})
print(json.dumps({"size": size, "results": results}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_geotiff_write_hitting_a_real_limit_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """A real GDAL write failure (RLIMIT_FSIZE), also one GDAL swallows while closing the file."""
    res = subprocess.run([sys.executable, "-c", _GDAL_LIMIT_SCRIPT, str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(report["results"]) == 4
    for r in report["results"]:
        assert r["error"] is not None, r  # never a silent success
        assert r["intact"] and r["files"] == ["x.tif"], r  # no temporary file, old output kept
        if r["low"]:
            assert r["error"][:2] == ["DiskFullError", str(tmp_path / "out" / "x.tif")], r
        else:
            assert r["error"][0] != "DiskFullError", r


def test_probs_nodata_goes_to_a_mask_started_when_first_needed(tmp_path: Path) -> None:
    """One band per class leaves no value for nodata: an internal mask, only where needed."""
    cfg = config()
    writer = PredictionWriter(tmp_path, ["probs"], cfg)
    probs = np.full((3, 300, 40), 85, np.uint8)
    valid = np.ones((300, 40), bool)
    valid[280:, :5] = False  # nodata only after the first block of rows is on disk
    with writer.open("late.tif", ["probs"], OutputMeta(Path("late.tif"), 300, 40)) as sink:
        for r0 in range(0, 300, 60):
            sink.write_rows(r0, RowChunk(np.zeros((60, 40), np.uint8), probs=probs[:, r0:r0 + 60],
                                         valid=valid[r0:r0 + 60]))
    with rasterio.open(tmp_path / "late_probs.tif") as ds:
        assert ds.descriptions == tuple(cfg.class_names)
        assert np.array_equal(ds.dataset_mask() > 0, valid)
        assert np.array_equal(ds.read(), probs)
    # all valid: no mask at all; one band of confidence uses nodata 0 instead
    for mode, name in (("classes", "all"), ("max", "max")):
        w = PredictionWriter(tmp_path, ["probs"], cfg, probs_mode=mode)
        w.write(f"{name}.tif", ["probs"], RowChunk(np.zeros((20, 40), np.uint8),
                                                   probs=probs[:, :20]), Path("x.tif"))
    with rasterio.open(tmp_path / "all_probs.tif") as ds:
        assert ds.mask_flag_enums[0] == [MaskFlags.all_valid]
    with rasterio.open(tmp_path / "max_probs.tif") as ds:
        assert ds.count == 1 and ds.nodata == 0 and ds.descriptions == ("confidence",)
