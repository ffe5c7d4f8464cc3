"""Output formats: what each written file holds, pixel by pixel (found by a mutation audit)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from segpipe.predict.writers import OutputInTheWay, OutputMeta, PredictionWriter, RowChunk, blend_overlay
from tests.predict.test_writers import config


def test_overlay_alpha_weights_the_mask_colour_not_the_picture() -> None:
    """With alpha 0.5 (the only value tested) swapping the weights changes nothing."""
    display = np.full((1, 2, 3), 100, np.uint8)
    lut = np.zeros((256, 3), np.uint8)
    lut[1] = (200, 200, 200)
    out = blend_overlay(display, np.array([[1, 0]]), lut, alpha=0.25)
    assert out[0, 0].tolist() == [125, 125, 125]  # 0.75 × 100 + 0.25 × 200
    assert out[0, 1].tolist() == [75, 75, 75]  # 0.75 × 100 + 0.25 × 0


def test_overlay_blends_every_row_of_a_tall_image() -> None:
    """Blended 256 rows at a time; the rows at the seams (255, 511) must be blended too."""
    h = 600
    display = np.full((h, 3, 3), 100, np.uint8)
    lut = np.zeros((256, 3), np.uint8)
    lut[1] = (200, 0, 0)
    out = blend_overlay(display, np.ones((h, 3), np.int64), lut, alpha=0.5, nodata=255)
    assert (out == np.array([150, 50, 50], np.uint8)).all(axis=-1).all()


def test_streamed_overlay_rows_land_where_they_belong(tmp_path: Path) -> None:
    """A raster's rows reach the overlay strip by strip; each strip at its own rows."""
    cfg = config()
    writer = PredictionWriter(tmp_path, ["overlay"], cfg, overlay_alpha=1.0)
    h, w, strip = 96, 40, 32
    labels = (np.arange(h)[:, None] // strip % 3).repeat(w, axis=1).astype(np.uint8)
    with writer.open("r.tif", ["overlay"], OutputMeta(Path("r.tif"), h, w)) as sink:
        for r0 in range(0, h, strip):
            sink.write_rows(r0, RowChunk(labels[r0:r0 + strip],
                                         display=np.zeros((strip, w, 3), np.uint8)))
    got = np.asarray(Image.open(tmp_path / "r_overlay.jpg")).astype(int)
    lut = cfg.palette().astype(int)
    for r0 in range(0, h, strip):  # the middle of each strip (JPEG blurs its edges)
        mid = got[r0 + 8:r0 + strip - 8, 8:-8].reshape(-1, 3).mean(axis=0)
        assert np.abs(mid - lut[labels[r0, 0]]).max() < 12, (r0, mid)


def test_palette_png_keeps_nodata_transparent(tmp_path: Path) -> None:
    """Nodata is black in the palette, as class colours may be: transparency tells it apart."""
    cfg = config()
    writer = PredictionWriter(tmp_path, ["palette"], cfg)
    labels = np.array([[0, 1], [cfg.nodata_value, 2]], np.uint8)
    writer.write("p.png", ["palette"], RowChunk(labels), Path("p.png"))
    img = Image.open(tmp_path / "p_palette.png")
    assert img.mode == "P" and img.info.get("transparency") == cfg.nodata_value
    assert np.array_equal(np.asarray(img), labels)


def test_geotiff_colour_map_holds_every_class_and_nodata(tmp_path: Path) -> None:
    """The existing test only looks at class 1 of 3; the last class lost its colour."""
    cfg = config(4)
    writer = PredictionWriter(tmp_path, ["geotiff"], cfg)
    writer.write("g.png", ["geotiff"], RowChunk(np.arange(8, dtype=np.uint8).reshape(2, 4) % 4),
                 Path("g.png"))
    lut = cfg.palette()
    with rasterio.open(tmp_path / "g.tif") as ds:
        cmap = ds.colormap(1)
    for k in range(cfg.num_classes):
        assert cmap[k] == (*lut[k].tolist(), 255), k
    assert cmap[cfg.nodata_value] == (0, 0, 0, 0)


def test_probs_max_mode_writes_the_winning_probability(tmp_path: Path) -> None:
    """The ``max`` band is the confidence (the largest probability), not any band."""
    cfg = config()
    writer = PredictionWriter(tmp_path, ["probs"], cfg, probs_mode="max")
    probs = np.stack([np.full((4, 5), v, np.uint8) for v in (30, 200, 25)])
    writer.write("m.tif", ["probs"], RowChunk(np.ones((4, 5), np.uint8), probs=probs), Path("m.tif"))
    with rasterio.open(tmp_path / "m_probs.tif") as ds:
        assert (ds.read(1) == 200).all()


# ------------------------------------------------------------------ what counts as done
def _stamped_output(writer: PredictionWriter, src: Path) -> Path:
    writer.write("a.png", ["mask"], RowChunk(np.zeros((4, 4), np.uint8)), src)
    return writer.target("a.png", "mask")


def _input_and_writer(tmp_path: Path) -> tuple[Path, PredictionWriter]:
    """``in/a.png`` and a mask writer into ``out`` reading from ``in``."""
    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(src)
    writer = PredictionWriter(tmp_path / "out", ["mask"], config())
    writer.input_root = str(src.parent.resolve())
    return src, writer


def test_an_empty_output_is_made_again(tmp_path: Path) -> None:
    """Outputs are named into place whole, so a 0-byte file was damaged outside."""
    src, writer = _input_and_writer(tmp_path)
    target = _stamped_output(writer, src)
    assert writer.pending("a.png", ["mask"], src) == []
    target.write_bytes(b"")
    assert writer.pending("a.png", ["mask"], src) == ["mask"]


def test_another_input_folders_output_is_neither_done_nor_replaced(tmp_path: Path) -> None:
    """The same name from another input folder (whose image differs) is in the way."""
    first, second = tmp_path / "in1" / "a.png", tmp_path / "in2" / "a.png"
    for i, path in enumerate((first, second)):
        path.parent.mkdir()
        Image.fromarray(np.full((4, 4, 3), 50 * i, np.uint8)).save(path)
    writer = PredictionWriter(tmp_path / "out", ["mask"], config())
    writer.input_root = str(first.parent.resolve())
    _stamped_output(writer, first)
    writer.input_root = str(second.parent.resolve())
    for overwrite in (False, True):
        writer.overwrite = overwrite
        with pytest.raises(OutputInTheWay, match="another input folder"):
            writer.pending("a.png", ["mask"], second)
    # the same image moved to another folder is still done
    writer.overwrite = False
    moved = tmp_path / "moved" / "a.png"
    moved.parent.mkdir()
    shutil.copy2(first, moved)  # as `cp -p` or `rsync -a` move a folder
    writer.input_root = str(moved.parent.resolve())
    assert writer.pending("a.png", ["mask"], moved) == []


def test_pending_without_a_source_follows_overwrite(tmp_path: Path) -> None:
    """With no input to compare with, an existing output is done unless ``overwrite``."""
    writer = PredictionWriter(tmp_path, ["mask"], config())
    _stamped_output(writer, Path("a.png"))
    assert writer.pending("a.png", ["mask"]) == []
    writer.overwrite = True
    assert writer.pending("a.png", ["mask"]) == ["mask"]


def test_stamps_name_the_input_its_folder_and_its_content(tmp_path: Path) -> None:
    """The stamp's fingerprint is what tells a replaced input from the one outputs came from."""
    from segpipe.data.io import input_fingerprint, read_output_stamp

    src, writer = _input_and_writer(tmp_path)
    target = _stamped_output(writer, src)
    stamp = json.loads(read_output_stamp(target))
    assert stamp == {"input": "a.png", "root": writer.input_root, "format": "mask",
                     "input_fingerprint": input_fingerprint(src)}


def test_a_failed_commit_leaves_no_temporary_file_of_the_other_outputs(tmp_path: Path) -> None:
    """The mask cannot be named into place (a folder there): the palette, encoded and
    waiting for its own commit, must not stay behind as a hidden temporary file."""
    from segpipe.fileio import TMP_PREFIX

    (tmp_path / "a.png").mkdir()
    writer = PredictionWriter(tmp_path, ["mask", "palette"], config())
    with pytest.raises(OSError, match="cannot write"):
        writer.write("a.jpg", ["mask", "palette"], RowChunk(np.zeros((3, 4), np.uint8)),
                     Path("a.jpg"))
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(TMP_PREFIX)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
