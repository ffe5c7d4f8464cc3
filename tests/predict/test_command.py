"""End to end: `segpipe predict` on folders, GeoTIFFs, bad files, reruns and interruptions."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.enums import MaskFlags
from rasterio.transform import from_origin

from segpipe.cli import main as cli_main
from segpipe.data.io import write_image
from segpipe.fileio import TMP_PREFIX
from segpipe.predict.checkpoint import save_predict_checkpoint
from tests.predict.conftest import COLORS, make_ckpt, noise_image

REPO = Path(__file__).resolve().parents[2]
FAST = ["--no-progress", "--num-workers", "0", "--precision", "32-true", "--accelerator", "cpu"]


def run(ckpt: Path, src: Path, out: Path, *extra: str) -> int:
    return cli_main(["predict", "--ckpt_path", str(ckpt), "--input", str(src), "--output", str(out),
                     *FAST, *extra])


def outputs(root: Path) -> list[Path]:
    """The files under ``root`` but the hidden ones (the folder's .segpipe-predict.json)."""
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TMP_PREFIX)]


def write_geotiff(path: Path, data: np.ndarray, nodata: float | None = None) -> None:
    """(C, H, W) array as a georeferenced GeoTIFF (UTM 33N, 10 m pixels)."""
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
        dtype=data.dtype, crs="EPSG:32633", transform=from_origin(500000, 4600000, 10, 10),
        nodata=nodata,
    ) as ds:
        ds.write(data)


# ------------------------------------------------------------------ folders and formats
def test_outputs_mirror_nested_folders(tmp_path: Path, pointwise_ckpt: Path, capsys) -> None:
    src = tmp_path / "in"
    shapes = {"a/b/x.png": (45, 37), "y.jpg": (20, 70), "a/z.webp": (64, 96)}
    for rel, (h, w) in shapes.items():
        write_image(src / rel, noise_image(h, w, seed=h))
    out = tmp_path / "out"
    code = cli_main(["predict", "--ckpt_path", str(pointwise_ckpt), "--input", str(src),
                     "--output", str(out), "--no-progress", "--num-workers", "1",
                     "--format", "mask,palette", "overlay", "--batch-size", "2"])
    assert code == 0
    assert "predict: 3 written, 0 skipped (already done), 0 failed" in capsys.readouterr().out
    for rel, (h, w) in shapes.items():
        stem = Path(rel).with_suffix("")
        mask = np.asarray(Image.open(out / f"{stem}.png"))
        assert mask.shape == (h, w) and mask.dtype == np.uint8 and mask.max() < 3
        pal = Image.open(out / f"{stem}_palette.png")
        assert pal.mode == "P" and pal.size == (w, h)
        assert pal.getpalette()[:9] == [c for rgb in COLORS for c in rgb]
        assert pal.info.get("transparency") == 255  # nodata apart from a black class
        assert np.array_equal(np.asarray(pal), mask)
        assert Image.open(out / f"{stem}_overlay.jpg").size == (w, h)
    assert not leftovers(out)


def test_tiled_equals_whole_image_through_the_command(tmp_path: Path, pointwise_ckpt: Path) -> None:
    src = tmp_path / "in"
    write_image(src / "big.png", noise_image(150, 200, seed=3))
    assert run(pointwise_ckpt, src, tmp_path / "whole", "--format", "mask", "probs") == 0
    assert run(pointwise_ckpt, src, tmp_path / "tiled", "--format", "mask", "probs",
               "--tile", "64", "--overlap", "0.25", "--batch-size", "3") == 0
    whole = np.asarray(Image.open(tmp_path / "whole" / "big.png"))
    tiled = np.asarray(Image.open(tmp_path / "tiled" / "big.png"))
    assert np.array_equal(whole, tiled)
    with rasterio.open(tmp_path / "whole" / "big_probs.tif") as a, \
            rasterio.open(tmp_path / "tiled" / "big_probs.tif") as b:
        assert np.abs(a.read().astype(int) - b.read().astype(int)).max() <= 1


def test_tta_on_flip_invariant_model_changes_nothing(tmp_path: Path, pointwise_ckpt: Path) -> None:
    src = tmp_path / "in"
    write_image(src / "img.png", noise_image(40, 50, seed=4))
    assert run(pointwise_ckpt, src, tmp_path / "plain") == 0
    assert run(pointwise_ckpt, src, tmp_path / "tta", "--tta") == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain" / "img.png")),
                          np.asarray(Image.open(tmp_path / "tta" / "img.png")))


def test_predict_names_the_views_segpipe_test_scored(tmp_path: Path, caplog) -> None:
    """A checkpoint whose config scored test over flips and sizes: predict without them says
    which options make those masks; with them, from a plainly tested model or in tiles (which
    test does not score), it says nothing."""
    net = "tests.predict.nets.PointwiseNet"
    args = {"in_channels": 3, "num_classes": 3}
    tested = save_predict_checkpoint(
        tmp_path / "tested.ckpt", {"class_path": net, "init_args": args},
        {"symmetries": ["hflip"], "eval_resize": [32, 40]}, test_tta=True,
        test_tta_scales=[0.75, 1.0, 1.25])
    plain = make_ckpt(tmp_path / "plain.ckpt", net, args)
    src = tmp_path / "in"
    write_image(src / "img.png", noise_image(40, 50, seed=5))
    hint = "segpipe test scored this model's mean over other views"
    advice = "use --tta --tta_scales 0.75 1 1.25"
    with caplog.at_level("INFO", logger="segpipe"):
        assert run(tested, src, tmp_path / "a") == 0
    assert hint in caplog.text and advice in caplog.text and str(tested) in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="segpipe"):
        assert run(tested, src, tmp_path / "b", "--tta", "--tta_scales", "1.25") == 0
    assert advice in caplog.text  # other sizes than the scored ones
    caplog.clear()
    with caplog.at_level("INFO", logger="segpipe"):
        assert run(tested, src, tmp_path / "c", "--tta", "--tta_scales", "0.75", "1", "1.25") == 0
        assert run(plain, src, tmp_path / "d") == 0
        assert run(tested, src, tmp_path / "e", "--tile", "32") == 0  # tiles: not test's masks
    assert hint not in caplog.text


# ------------------------------------------------------------------ GeoTIFF
def test_geotiff_roundtrip_keeps_georeference_and_nodata(
    tmp_path: Path, pointwise_ckpt: Path, caplog
) -> None:
    ckpt = make_ckpt(
        tmp_path / "bands.ckpt", "tests.predict.nets.ThresholdNet",
        {"in_channels": 3, "num_classes": 3}, bands=[4, 2, 3], mean=[0.0] * 3, std=[1.0] * 3,
        class_colors=COLORS,
    )
    h, w = 150, 230  # not multiples of 32, several strips and tile columns
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, (h, w))
    data = rng.integers(1, 65535, (4, h, w)).astype(np.uint16)
    data[3] = ((classes + 0.5) / 3 * 65535).astype(np.uint16)  # band 4 decides the class
    data[:, :20, :30] = 0  # nodata corner (every band)
    src = tmp_path / "scenes"
    src.mkdir()
    write_geotiff(src / "scene.tif", data, nodata=0)
    out = tmp_path / "out"
    assert run(ckpt, src, out, "--tile", "64", "--format", "auto", "probs", "mask", "overlay") == 0
    with rasterio.open(src / "scene.tif") as a, rasterio.open(out / "scene.tif") as b:
        assert b.crs == a.crs and b.transform == a.transform
        assert (b.width, b.height) == (a.width, a.height)
        assert b.nodata == 255 and b.dtypes[0] == "uint8"
        assert b.profile["tiled"] and b.profile["compress"] == "deflate"
        assert b.colormap(1)[1][:3] == tuple(COLORS[1])
        labels = b.read(1)
    expected = classes.astype(np.uint8)
    expected[:20, :30] = 255
    assert np.array_equal(labels, expected)
    with rasterio.open(out / "scene_probs.tif") as p:
        assert p.count == 3 and p.crs == a.crs and p.transform == a.transform
        assert p.descriptions == ("class_0", "class_1", "class_2")  # the class names
        probs = p.read()
        valid = p.dataset_mask()  # nodata in an internal mask: 0 is a probability
        assert p.nodata is None and p.mask_flag_enums[0] == [MaskFlags.per_dataset]
    assert (probs[:, :20, :30] == 0).all()
    assert (valid[:20, :30] == 0).all() and valid[20:].all() and valid[:, 30:].all()
    assert not list(out.glob("*.msk"))  # internal, not a sidecar the rename would leave
    assert np.array_equal(probs[:, 20:].argmax(0), classes[20:])
    # PNG formats of a raster read by windows: same labels, nodata = 255
    assert np.array_equal(np.asarray(Image.open(out / "scene.png")), expected)
    assert Image.open(out / "scene_overlay.jpg").size == (w, h)

    # a non-georeferenced input asked for a GeoTIFF: a warning and a plain TIFF
    write_image(tmp_path / "plain" / "photo.png", noise_image(30, 40))
    assert run(pointwise_ckpt, tmp_path / "plain", tmp_path / "plain_out", "--format", "geotiff") == 0
    assert "not georeferenced" in caplog.text
    with rasterio.open(tmp_path / "plain_out" / "photo.tif") as t:
        assert t.crs is None and (t.width, t.height) == (40, 30)


def test_a_png_or_jpeg_with_a_world_file_keeps_its_georeference(
        tmp_path: Path, pointwise_ckpt: Path, caplog) -> None:
    """Orthophotos come as PNG/JPEG with a world file (.pgw, .jgw, .wld), which GDAL reads: they
    were called 'not georeferenced', their GeoTIFF got the identity transform, and `auto` wrote
    a plain PNG mask without a word."""
    src = tmp_path / "in"
    src.mkdir()
    world = "0.5\n0\n0\n-0.5\n600000.25\n4999999.75\n"
    write_image(src / "ortho.png", noise_image(30, 40, seed=1))
    (src / "ortho.pgw").write_text(world)
    write_image(src / "photo.jpg", noise_image(30, 40, seed=2))
    (src / "photo.JGW").write_text(world)  # either case, as GDAL reads them
    write_image(src / "plain.png", noise_image(30, 40, seed=3))
    out = tmp_path / "out"
    assert run(pointwise_ckpt, src, out, "--format", "auto") == 0
    for name in ("ortho.tif", "photo.tif"):
        with rasterio.open(out / name) as ds:
            assert tuple(ds.transform)[:6] == (0.5, 0.0, 600000.0, 0.0, -0.5, 5000000.0)
            assert (ds.width, ds.height) == (40, 30)
    assert sorted(p.name for p in outputs(out)) == ["ortho.tif", "photo.tif", "plain.png"]
    assert "not georeferenced" not in caplog.text
    # the same labels as a PNG mask of the same pixels
    assert run(pointwise_ckpt, src, tmp_path / "masks", "--format", "mask") == 0
    with rasterio.open(out / "ortho.tif") as ds:
        assert np.array_equal(ds.read(1), np.asarray(Image.open(tmp_path / "masks" / "ortho.png")))
    # a map tile's transparent collar holds no data, as a GeoTIFF's alpha band says (it got
    # classes); a plain RGBA PNG keeps its alpha dropped
    rgba = np.dstack([noise_image(30, 40, seed=4), np.full((30, 40), 255, np.uint8)])
    rgba[:, :10, 3] = 0
    tiles = tmp_path / "tiles"
    write_image(tiles / "tile.png", rgba)
    (tiles / "tile.pgw").write_text(world)
    write_image(tiles / "plain.png", rgba)
    # as a palette PNG whose transparent index (tRNS) marks the collar, as map tiles come
    quantized = Image.fromarray(rgba[:, :, :3]).quantize(colors=31)  # index 31 is free
    index = np.array(quantized)
    index[:, :10] = 31
    paletted = Image.fromarray(index, mode="P")
    paletted.putpalette(quantized.getpalette()[:93] + [0, 0, 0])
    paletted.save(tiles / "indexed.png", transparency=31)
    (tiles / "indexed.pgw").write_text(world)
    assert run(pointwise_ckpt, tiles, tmp_path / "tiles_out", "--format", "auto") == 0
    for name in ("tile.tif", "indexed.tif"):
        with rasterio.open(tmp_path / "tiles_out" / name) as ds:
            labels = ds.read(1)
        assert (labels[:, :10] == 255).all() and (labels[:, 10:] != 255).all(), name
    assert (np.asarray(Image.open(tmp_path / "tiles_out" / "plain.png"))[:, :10] != 255).all()
    # the API reads the collar alike (it predicted classes there), and the overlay shows it
    # black, as a raster's nodata (it showed the colours stored under alpha 0)
    from segpipe import Segmenter

    seg = Segmenter.from_checkpoint(pointwise_ckpt, device="cpu")
    with rasterio.open(tmp_path / "tiles_out" / "tile.tif") as ds:
        assert np.array_equal(seg.predict(tiles / "tile.png"), ds.read(1))
    assert run(pointwise_ckpt, tiles, tmp_path / "overlays", "--format", "overlay") == 0
    overlay = np.asarray(Image.open(tmp_path / "overlays" / "tile_overlay.jpg")).astype(int)
    assert overlay[:, :8].mean() < 8 and overlay[:, 12:].mean() > 40


def test_control_points_and_camera_models_are_kept(tmp_path: Path, pointwise_ckpt: Path,
                                                   caplog, capfd) -> None:
    """A raster georeferenced by GCPs or by RPCs only (no CRS, identity transform): its
    GeoTIFF output had neither (GCPs), or `auto` wrote a PNG (RPCs), without a word."""
    from rasterio.control import GroundControlPoint
    from rasterio.rpc import RPC

    src = tmp_path / "in"
    src.mkdir()
    gcps = [GroundControlPoint(r, c, 500000 + 10 * c, 4600000 - 10 * r)
            for r, c in ((0, 0), (0, 39), (29, 0), (29, 39))]
    rpcs = RPC(height_off=0, height_scale=100, lat_off=45, lat_scale=0.1, long_off=10,
               long_scale=0.1, line_off=15, line_scale=15, samp_off=20, samp_scale=20,
               line_num_coeff=[0, 1] + [0] * 18, line_den_coeff=[1] + [0] * 19,
               samp_num_coeff=[0, 0, 1] + [0] * 17, samp_den_coeff=[1] + [0] * 19)
    data = np.moveaxis(noise_image(30, 40, seed=5), -1, 0)
    for name, key, value in (("gcp", "gcps", (gcps, "EPSG:32633")), ("rpc", "rpcs", rpcs)):
        with rasterio.open(src / f"{name}.tif", "w", driver="GTiff", width=40, height=30,
                           count=3, dtype="uint8") as ds:
            setattr(ds, key, value)
            ds.write(data)
    out = tmp_path / "out"
    capfd.readouterr()
    assert run(pointwise_ckpt, src, out, "--format", "auto", "probs") == 0
    assert "not georeferenced" not in caplog.text
    # GDAL's own warning (on stderr) named the hidden temporary file: no geotransform is set
    assert "geotransform previously set" not in capfd.readouterr().err
    for name in ("gcp.tif", "gcp_probs.tif"):
        with rasterio.open(out / name) as ds:
            points, crs = ds.gcps
            assert crs == "EPSG:32633" and len(points) == 4
            assert (points[3].row, points[3].col, points[3].x) == (29, 39, 500390)
    for name in ("rpc.tif", "rpc_probs.tif"):  # auto: a GeoTIFF, not a PNG
        with rasterio.open(out / name) as ds:
            assert ds.rpcs is not None and ds.rpcs.samp_num_coeff[2] == 1
    assert not (out / "rpc.png").exists()


def test_band_count_mismatch_is_reported(tmp_path: Path, pointwise_ckpt: Path, capsys) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_geotiff(src / "five.tif", np.ones((5, 20, 20), np.uint8))
    assert run(pointwise_ckpt, src, tmp_path / "out") == 1
    out = capsys.readouterr().out
    assert "1 failed" in out and "five.tif" in out and "in_channels=3" in out
    # the fix named is the command's own option, not a training one the checkpoint cannot take
    assert "pick 3 of this file's 5 bands, e.g. --bands 1 2 3" in out and "data.in_channels" not in out
    # a file with fewer bands than the model takes gets no example it cannot follow
    write_geotiff(src / "two.tif", np.ones((2, 20, 20), np.uint8))
    assert run(pointwise_ckpt, src, tmp_path / "out2") == 1
    out = capsys.readouterr().out
    assert ("two.tif: image has 2 channel(s) but the model expects in_channels=3 (this file has 2 "
            "band(s), fewer than the 3 the model takes: use a model trained on such images)") in out


def test_bands_option_reads_other_bands_than_the_checkpoint(
    tmp_path: Path, capsys
) -> None:
    """A model trained on bands 4, 2, 3 predicts a scene from a sensor whose bands lie elsewhere."""
    ckpt = make_ckpt(
        tmp_path / "bands.ckpt", "tests.predict.nets.ThresholdNet",
        {"in_channels": 3, "num_classes": 3}, bands=[4, 2, 3], mean=[0.0] * 3, std=[1.0] * 3,
    )
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, (40, 50))
    trained = rng.integers(0, 255, (4, 40, 50)).astype(np.uint8)
    trained[3] = ((classes + 0.5) / 3 * 255).astype(np.uint8)  # band 4 decides the class
    other = np.stack([trained[3], trained[2], trained[1]])  # the same bands, another order
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_geotiff(tmp_path / "a" / "scene.tif", trained)
    write_geotiff(tmp_path / "b" / "scene.tif", other)
    assert run(ckpt, tmp_path / "a", tmp_path / "out_a") == 0
    assert run(ckpt, tmp_path / "b", tmp_path / "out_b") == 1  # 3 bands: no band 4
    out = capsys.readouterr().out
    assert "band 4 requested but the file has 3 band(s)" in out
    assert "the model was trained on bands [4, 2, 3] of its files; pick 3 of this file's 3" in out
    # --bands naming a band the file lacks: the model is not said to be trained on them
    assert run(ckpt, tmp_path / "b", tmp_path / "out_x", "--bands", "1", "3", "9") == 1
    out = capsys.readouterr().out
    assert "band 9 requested but the file has 3 band(s)" in out and "trained on bands" not in out
    # one band for a 3-channel model: grey, as training converts it; the hint can be followed
    (tmp_path / "g").mkdir()
    write_geotiff(tmp_path / "g" / "one.tif", trained[3:4])
    assert run(ckpt, tmp_path / "g", tmp_path / "out_g") == 1
    assert "read its one band as grey: --bands 1" in capsys.readouterr().out
    assert run(ckpt, tmp_path / "g", tmp_path / "out_g", "--bands", "1") == 0
    assert run(ckpt, tmp_path / "b", tmp_path / "out_b", "--bands", "1", "3", "2") == 0
    with rasterio.open(tmp_path / "out_a" / "scene.tif") as a, \
            rasterio.open(tmp_path / "out_b" / "scene.tif") as b:
        assert np.array_equal(a.read(1), classes) and np.array_equal(b.read(1), classes)
    # a selection that cannot feed the model, up front, with what to give
    assert run(ckpt, tmp_path / "b", tmp_path / "out_c", "--bands", "1", "3") == 2
    assert ("--bands picks 2 band(s) but the model takes 3 channel(s); give 3 band numbers "
            "(e.g. --bands 1 2 3)") in capsys.readouterr().err
    assert run(ckpt, tmp_path / "b", tmp_path / "out_c", "--bands", "0", "1", "2") == 2
    assert "--bands takes 1-based band numbers" in capsys.readouterr().err


# ------------------------------------------------------------------ failures and reruns
def _bad_folder(src: Path) -> dict[str, str]:
    write_image(src / "good1.png", noise_image(32, 48))
    write_image(src / "sub" / "good2.jpg", noise_image(33, 47))
    (src / "empty.png").write_bytes(b"")
    (src / "notes.jpg").write_text("<html>not an image</html>")
    write_image(src / "trunc.png", noise_image(64, 64))
    data = (src / "trunc.png").read_bytes()
    (src / "trunc.png").write_bytes(data[: len(data) // 2])
    write_geotiff(src / "cut.tif", np.random.default_rng(0).integers(0, 255, (3, 300, 300), np.uint8))
    data = (src / "cut.tif").read_bytes()
    (src / "cut.tif").write_bytes(data[: len(data) // 2])
    return {"empty.png": "0 bytes", "notes.jpg": "not an image", "trunc.png": "truncated",
            "cut.tif": "corrupt"}


def test_bad_files_are_skipped_and_reported(tmp_path: Path, pointwise_ckpt: Path, capsys) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    bad = _bad_folder(src)
    assert run(pointwise_ckpt, src, out, "--tile", "128") == 1
    text = capsys.readouterr().out
    assert "predict: 2 written, 0 skipped (already done), 4 failed" in text
    for name, reason in bad.items():
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(str(src / name)))
        assert reason in line, line
    assert sorted(p.relative_to(out).as_posix() for p in outputs(out)) == [
        "good1.png", "sub/good2.png"]


def test_fail_fast_stops_at_the_first_failure(tmp_path: Path, pointwise_ckpt: Path, capsys) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "a").mkdir(parents=True)
    (src / "a" / "broken.png").write_bytes(b"")
    for i in range(3):
        write_image(src / f"b{i}.png", noise_image(16, 16))
    assert run(pointwise_ckpt, src, out, "--fail-fast", "--batch-size", "1") == 1
    text = capsys.readouterr().out
    assert "stopped at the first failure" in text and "broken.png" in text
    assert not list(out.rglob("*.png"))
    # In one batch with later files, those after the failure are not written either.
    write_image(src / "a" / "a0.png", noise_image(16, 16))  # before it in natural order
    for extra in ((), ("--write_workers", "2")):
        shutil.rmtree(out, ignore_errors=True)
        assert run(pointwise_ckpt, src, out, "--fail-fast", "--batch-size", "8", *extra) == 1
        assert sorted(p.name for p in out.rglob("*.png")) == ["a0.png"], extra


def test_rerun_skips_done_outputs_and_cleans_unfinished_files(
    tmp_path: Path, pointwise_ckpt: Path, capsys
) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_image(src / "d" / f"im{i}.png", noise_image(24, 40, seed=i))
    assert run(pointwise_ckpt, src, out, "--format", "mask", "palette") == 0
    capsys.readouterr()
    # an interrupted run: one output missing, an unfinished temporary file left behind
    (out / "d" / "im1_palette.png").unlink()
    stale = out / "d" / f"{TMP_PREFIX}abc123.png"
    stale.write_bytes(b"\x89PNG truncated")
    hours_ago = time.time() - 7200
    os.utime(stale, (hours_ago, hours_ago))
    # another run's file being written right now (a fresh one) is not touched: deleting it
    # failed that run's output after its compute
    live = out / f"{TMP_PREFIX}live.tif.partial"
    live.write_bytes(b"II*\x00")
    before = (out / "d" / "im0.png").stat().st_mtime_ns
    assert run(pointwise_ckpt, src, out, "--format", "mask", "palette") == 0
    assert "predict: 1 written, 2 skipped (already done), 0 failed" in capsys.readouterr().out
    assert (out / "d" / "im1_palette.png").is_file() and not stale.exists() and live.exists()
    assert (out / "d" / "im0.png").stat().st_mtime_ns == before
    assert run(pointwise_ckpt, src, out, "--format", "mask", "palette", "--overwrite") == 0
    assert "predict: 3 written, 0 skipped" in capsys.readouterr().out


def test_an_output_folder_that_holds_the_input_folder(tmp_path: Path, pointwise_ckpt: Path,
                                                      capsys) -> None:
    """`--input proj/imgs --output proj` (or `--output .`) was refused with "choose an output
    folder outside the input", which it was; the output folder itself as input is refused."""
    src = tmp_path / "proj" / "imgs"
    write_image(src / "a.png", noise_image(16, 16))
    assert run(pointwise_ckpt, src, tmp_path / "proj") == 0
    assert (tmp_path / "proj" / "a.png").is_file()
    assert run(pointwise_ckpt, src, src) == 2
    assert "is the input folder" in capsys.readouterr().err


def test_output_inside_input_and_name_collisions(tmp_path: Path, pointwise_ckpt: Path, capsys) -> None:
    src = tmp_path / "in"
    write_image(src / "x.png", noise_image(16, 16))
    write_image(src / "x.jpg", noise_image(16, 16))
    out = src / "pred"
    assert run(pointwise_ckpt, src, out) == 1
    text = capsys.readouterr().out
    assert "1 written" in text and "its outputs would have the names of those of" in text
    assert run(pointwise_ckpt, src, out) == 1  # outputs in in/pred are not taken as inputs
    assert "0 written, 1 skipped (already done), 1 failed" in capsys.readouterr().out


def test_an_output_never_replaces_an_input(tmp_path: Path, pointwise_ckpt: Path, capsys) -> None:
    src = tmp_path / "in"
    write_image(src / "a.png", noise_image(16, 16))
    photo = (src / "a.png").read_bytes()
    for extra in ((), ("--overwrite",)):  # the mask of in/a.png would be in/a.png
        assert run(pointwise_ckpt, src / "a.png", src, "--format", "mask", *extra) == 2
        err = capsys.readouterr().err
        assert f"would write the mask output of {src / 'a.png'} over the input image" in err
    assert (src / "a.png").read_bytes() == photo
    # The input folder as output: a later run would read the masks as images.
    assert run(pointwise_ckpt, src, src) == 2
    assert f"--output {src} is the input folder" in capsys.readouterr().err
    assert (src / "a.png").read_bytes() == photo


def test_files_segpipe_did_not_write_are_never_taken_as_outputs(
    tmp_path: Path, pointwise_ckpt: Path, capsys, caplog
) -> None:
    """A rerun took any file of an output's name as done: `--output` at the ground-truth masks
    passed them off as predictions (with --overwrite it replaced them); an input replaced since
    kept its old outputs; another input's output (x_palette.png's mask) passed as x.png's
    palette; and another run's output folder inside the input was predicted as images."""
    data = tmp_path / "val"
    for i in range(2):
        write_image(data / "images" / f"r{i}.png", noise_image(16, 16, seed=i))
        write_image(data / "masks" / f"r{i}.png", np.full((16, 16), i, np.uint8))
    truth = (data / "masks" / "r0.png").read_bytes()
    for extra in ((), ("--overwrite",)):
        assert run(pointwise_ckpt, data / "images", data / "masks", *extra) == 1
        said = capsys.readouterr().out
        assert "0 written, 0 skipped (already done), 2 failed" in said
        assert f"{data / 'masks' / 'r0.png'} is in the way of its mask output and does not " \
               "say segpipe predict made it" in said
    assert (data / "masks" / "r0.png").read_bytes() == truth
    # an input replaced by another image of its name: made again, not skipped
    src, out = tmp_path / "in", tmp_path / "out"
    write_image(src / "x.png", noise_image(16, 16, seed=3))
    write_image(src / "x_palette.png", noise_image(16, 16, seed=4))
    assert run(pointwise_ckpt, src, out, "--format", "mask") == 0
    capsys.readouterr()
    write_image(src / "x.png", noise_image(20, 24, seed=5))
    assert run(pointwise_ckpt, src, out, "--format", "mask") == 0
    assert "1 written, 1 skipped (already done)" in capsys.readouterr().out
    assert Image.open(out / "x.png").size == (24, 20)
    # a later run's palette of x.png would be x_palette.png's mask: failed, naming it
    assert run(pointwise_ckpt, src, out, "--format", "palette") == 1
    assert f"{out / 'x_palette.png'}, the name of its palette output, holds the mask output " \
           "of x_palette.png" in capsys.readouterr().out
    assert Image.open(out / "x_palette.png").mode == "L"  # still x_palette.png's mask
    # another run's output folder inside the input is left out, and said so
    assert run(pointwise_ckpt, src, src / "pred_b", "--format", "mask") == 0
    assert run(pointwise_ckpt, src, src / "pred_c", "--format", "mask") == 0
    assert "2 written" in capsys.readouterr().out  # x.png, x_palette.png; not pred_b's masks
    # a record in the input folder itself (an earlier `--output .`) leaves out nothing
    assert run(pointwise_ckpt, src / "pred_b", src / "pred_b" / "again", "--format",
               "mask") == 0
    assert "2 written" in capsys.readouterr().out
    assert "in 1 other segpipe predict output folder(s) inside the input" in caplog.text
    assert not (src / "pred_c" / "pred_b").exists()
    caplog.clear()
    write_image(src / "pred_a" / "y.png", noise_image(16, 16))  # put there by hand: named
    assert run(pointwise_ckpt, src, src / "pred_a", "--format", "mask") == 0
    assert f"1 image(s) inside the output folder {src / 'pred_a'} are not predicted" in caplog.text
    # the folder of a segpipe that stamped no outputs: they are its outputs, done as before,
    # with a warning, until an --overwrite run has remade every output in it
    import json

    old = tmp_path / "old"
    record = json.loads((out / ".segpipe-predict.json").read_text())
    assert record.pop("outputs_stamped") is True
    write_image(old / "x.png", np.zeros((16, 16), np.uint8))
    write_image(old / "x_palette.png", np.zeros((16, 16), np.uint8))  # another format's
    (old / ".segpipe-predict.json").write_text(json.dumps(record))
    capsys.readouterr()
    caplog.clear()
    assert run(pointwise_ckpt, src / "x.png", old, "--format", "mask") == 0
    assert "0 written, 1 skipped (already done)" in capsys.readouterr().out
    assert "were made by a segpipe before 2026-12" in caplog.text
    assert "outputs_stamped" not in (old / ".segpipe-predict.json").read_text()
    assert run(pointwise_ckpt, src / "x.png", old, "--format", "mask", "--overwrite") == 0
    assert "outputs_stamped" not in (old / ".segpipe-predict.json").read_text()  # the palette
    assert run(pointwise_ckpt, src / "x.png", old, "--format", "palette", "--overwrite") == 0
    assert json.loads((old / ".segpipe-predict.json").read_text())["outputs_stamped"] is True
    capsys.readouterr()
    assert run(pointwise_ckpt, src / "x.png", old, "--format", "mask") == 0  # stamped now: done
    assert "0 written, 1 skipped (already done)" in capsys.readouterr().out


def test_checkpoint_without_net_is_a_clear_error(tmp_path: Path, capsys) -> None:
    import torch

    ckpt = tmp_path / "python.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"num_classes": 3}}, ckpt)
    write_image(tmp_path / "in" / "a.png", noise_image(8, 8))
    assert run(ckpt, tmp_path / "in", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no 'net' entry" in err and str(ckpt) in err
    assert run(tmp_path / "missing.ckpt", tmp_path / "in", tmp_path / "out") == 2
    assert "not found" in capsys.readouterr().err


def _signal_slow_predict(ckpt: Path, src: Path, out: Path, ready: Callable[[], bool],
                         sig: int, *extra: str, pause: float = 0.0,
                         group: bool = False) -> tuple[int, str, str]:
    """Run `segpipe predict` on ``src`` in a subprocess, slowly (64-pixel tiles, TTA, one per
    batch), send ``sig`` once ``ready()`` holds (and ``pause`` seconds more), to the whole
    process group with ``group``; its exit code, stdout and stderr."""
    cmd = [sys.executable, "-m", "segpipe.cli", "predict", "--ckpt_path", str(ckpt),
           "--input", str(src), "--output", str(out), "--tile", "64", "--batch-size", "1",
           "--tta", *FAST, *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                            start_new_session=group)
    try:
        deadline = time.monotonic() + 120
        while not ready() and proc.poll() is None:
            assert time.monotonic() < deadline, "prediction never got there"
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(pause)
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stdout, stderr


def _big_raster(src: Path) -> None:
    """A 1536-pixel GeoTIFF: minutes of 64-pixel tiles with TTA."""
    write_geotiff(src / "big.tif", np.random.default_rng(1).integers(0, 255, (3, 1536, 1536), np.uint8))


def test_killed_run_leaves_no_partial_output_and_rerun_completes(
    tmp_path: Path, pointwise_ckpt: Path, capsys
) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _big_raster(src)
    # the raster's own temporary (not the output folder's brief writability probe); then
    # mid-raster: some strips written to the temporary file
    _signal_slow_predict(pointwise_ckpt, src, out, lambda: out.is_dir() and any(
        p.name.endswith(".partial") for p in leftovers(out)), signal.SIGKILL, pause=0.3)
    assert not (out / "big.tif").exists()  # never a truncated file under the final name
    assert leftovers(out)
    assert run(pointwise_ckpt, src, out, "--tile", "256") == 0
    assert "1 written" in capsys.readouterr().out
    assert not leftovers(out)
    with rasterio.open(out / "big.tif") as ds:
        assert (ds.width, ds.height) == (1536, 1536) and ds.read(1).max() < 3


def test_a_killed_runs_outputs_keep_their_settings_record(
    tmp_path: Path, pointwise_ckpt: Path, threshold_ckpt: Path, caplog
) -> None:
    """The record of what made the outputs was written at the end only: after a SIGKILL a
    rerun with another checkpoint kept the first model's masks beside its own, silently."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    write_image(src / "a.png", noise_image(16, 16))
    _big_raster(src)
    _signal_slow_predict(pointwise_ckpt, src, out, (out / "a.png").exists, signal.SIGKILL)
    assert (out / ".segpipe-predict.json").is_file()
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(threshold_ckpt, src, out, "--tile", "256") == 0
    assert "were made with another checkpoint" in caplog.text


def test_an_output_folder_knows_its_checkpoint_by_content_not_by_place(
        tmp_path: Path, unet_ckpt: Path, caplog) -> None:
    """The checkpoint was known by path, size and whole-second time: a moved run folder was
    "another checkpoint" (and the folder marked mixed), and another checkpoint of the same size
    written at the same path within that second was the same one."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    write_image(src / "a.png", noise_image(16, 16))
    first = tmp_path / "run" / "last.ckpt"
    first.parent.mkdir()
    shutil.copy(unet_ckpt, first)
    assert run(first, src, out) == 0
    moved = tmp_path / "moved" / "last.ckpt"
    shutil.move(first.parent, moved.parent)
    write_image(src / "b.png", noise_image(16, 16, seed=1))
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(moved, src, out) == 0
    assert "made with another" not in caplog.text
    # another model in the same file, same size, same second
    state = torch.load(moved, map_location="cpu", weights_only=False)
    stamp = moved.stat().st_mtime
    for value in state["state_dict"].values():
        if value.is_floating_point():
            value.add_(0.5)
    torch.save(state, moved)
    assert moved.stat().st_size == (tmp_path / "moved" / "last.ckpt").stat().st_size
    os.utime(moved, (stamp, stamp))
    write_image(src / "c.png", noise_image(16, 16, seed=2))
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(moved, src, out) == 0
    assert "were made with another checkpoint" in caplog.text


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigterm_stops_a_prediction_as_ctrl_c_does(workers: str, tmp_path: Path,
                                                   pointwise_ckpt: Path) -> None:
    """A scheduler's SIGTERM was ignored: predict ran on to its end (exit 0) or to the
    SIGKILL after the grace period. Sent to the process group (as Slurm does), it killed the
    loader processes and the run failed with exit 1."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    write_image(src / "a.png", noise_image(16, 16))
    _big_raster(src)
    code, stdout, stderr = _signal_slow_predict(  # the whole group, loader processes included
        pointwise_ckpt, src, out, (out / "a.png").exists, signal.SIGTERM, "--num-workers",
        workers, group=True)
    assert code == 143, stderr[-2000:]
    assert "predict: stopped by SIGTERM; run the same command again to finish" in stdout
    assert "Traceback" not in stderr, stderr[-2000:]
    assert (out / "a.png").is_file() and not (out / "big.tif").exists() and not leftovers(out)


def test_an_interrupted_overwrite_run_is_named_on_a_plain_rerun(
        tmp_path: Path, pointwise_ckpt: Path, threshold_ckpt: Path, monkeypatch, caplog) -> None:
    """The record named the new checkpoint from its first output on: after an --overwrite run
    with another checkpoint was stopped, a plain rerun kept the older outputs silently."""
    from segpipe.predict import engine

    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(3):
        write_image(src / f"im{i}.png", noise_image(16, 16, seed=i))
    assert run(pointwise_ckpt, src, out) == 0
    real = engine.WritingCallback._write
    calls = []

    def stop_after_one(self, res):  # Ctrl-C after the first output of the overwrite run
        if calls:
            raise KeyboardInterrupt
        calls.append(res)
        return real(self, res)

    monkeypatch.setattr(engine.WritingCallback, "_write", stop_after_one)
    assert run(threshold_ckpt, src, out, "--overwrite", "--batch-size", "1") == 130
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(threshold_ckpt, src, out) == 0
    assert "an --overwrite run with these settings was stopped before it had remade" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(threshold_ckpt, src, out, "--overwrite") == 0  # finished: the mark goes
        assert run(threshold_ckpt, src, out) == 0
    assert "was stopped before" not in caplog.text and "made with another" not in caplog.text


def test_a_rerun_that_adds_outputs_of_other_settings_says_the_folder_mixes_them(
        tmp_path: Path, pointwise_ckpt: Path, caplog) -> None:
    """Masks made untiled, then palettes added with --tile: the warning spoke of the existing
    outputs only, and the record still named the first settings, so the next rerun with the
    second ones warned of nothing although the folder held both."""
    import json

    src, out = tmp_path / "in", tmp_path / "out"
    write_image(src / "a.png", noise_image(40, 40))
    assert run(pointwise_ckpt, src, out, "--format", "mask") == 0
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(pointwise_ckpt, src, out, "--format", "mask", "palette", "--tile", "32") == 0
    assert ("made with another --tile: they are kept and skipped as done, and the ones this "
            "run adds (other images or --format) are made with this run's settings, so the "
            "folder will mix the two") in caplog.text
    record = json.loads((out / ".segpipe-predict.json").read_text())
    assert record["tile"] == 32 and record["mixed_with_other_settings"] is True
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(pointwise_ckpt, src, out, "--format", "mask", "palette", "--tile", "32") == 0
    assert "were made with more than one checkpoint or set of options" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):  # remade: one setting
        assert run(pointwise_ckpt, src, out, "--format", "mask", "palette", "--tile", "32",
                   "--overwrite") == 0
        assert run(pointwise_ckpt, src, out, "--format", "mask", "palette", "--tile", "32") == 0
    assert "more than one" not in caplog.text and "made with another" not in caplog.text
    assert "mixed_with_other_settings" not in (out / ".segpipe-predict.json").read_text()
    caplog.clear()
    # a rerun with other settings that writes nothing leaves the record as it was
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(pointwise_ckpt, src, out, "--format", "mask") == 0
    assert "made with another --tile" in caplog.text
    assert json.loads((out / ".segpipe-predict.json").read_text())["tile"] == 32


def test_ctrl_c_mid_raster_leaves_no_partial_output(
    tmp_path: Path, pointwise_ckpt: Path, monkeypatch, capsys
) -> None:
    from segpipe.predict import engine

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    write_geotiff(src / "a.tif", np.random.default_rng(2).integers(0, 255, (3, 200, 200), np.uint8))
    original = engine.ProbabilityFn.__call__
    calls = {"n": 0}

    def interrupted(self, x):
        calls["n"] += 1
        if calls["n"] == 5:  # after some strips were written to the temporary file
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(engine.ProbabilityFn, "__call__", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    try:
        code = run(pointwise_ckpt, src, out, "--tile", "32", "--batch-size", "2")
        # ignored during the clean-up only (Lightning's loop ignored it from then on)
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, handler)
    assert code == 130
    assert "interrupted; run the same command again" in capsys.readouterr().out
    assert not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_ddp_writes_each_file_exactly_once(tmp_path: Path, pointwise_ckpt: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(5):
        write_image(src / f"im{i}.png", noise_image(20, 30, seed=i))
    cmd = [sys.executable, "-m", "segpipe.cli", "predict", "--ckpt_path", str(pointwise_ckpt),
           "--input", str(src), "--output", str(out), "--strategy", "ddp", "--devices", "2",
           *FAST]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "predict: 5 written, 0 skipped (already done), 0 failed" in res.stdout
    assert sorted(p.name for p in outputs(out)) == [f"im{i}.png" for i in range(5)]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_in_process_loop_writes_what_lightnings_does(tmp_path: Path, unet_ckpt: Path,
                                                        precision: str, monkeypatch,
                                                        capsys) -> None:
    """One device runs in a plain loop, not under a Lightning Trainer: the same files, bytes and
    counts, for images of two sizes, a raster read by windows, a bad file, TTA and bn_adapt."""
    from segpipe.predict import engine

    src = tmp_path / "in"
    for i in range(3):
        write_image(src / f"a{i}.png", noise_image(40, 56, seed=i))
    write_image(src / "sub" / "b.png", noise_image(48, 36, seed=7))
    write_geotiff(src / "scene.tif", np.random.default_rng(3).integers(0, 255, (3, 90, 70), np.uint8))
    (src / "bad.png").write_bytes(b"not an image")
    extra = ("--format", "mask", "probs", "overlay", "--tta", "--bn_adapt", "0.5",
             "--batch-size", "2", "--tile", "64", "--precision", precision)
    assert run(unet_ckpt, src, tmp_path / "plain", *extra) == 1  # the bad file failed
    plain = capsys.readouterr().out
    monkeypatch.setattr(engine, "in_process_device", lambda *args: None)  # Lightning's loop
    assert run(unet_ckpt, src, tmp_path / "lightning", *extra) == 1
    assert capsys.readouterr().out == plain
    assert "predict: 5 written, 0 skipped (already done), 1 failed" in plain
    files = sorted(p.relative_to(tmp_path / "plain") for p in outputs(tmp_path / "plain"))
    assert files == sorted(p.relative_to(tmp_path / "lightning")
                           for p in outputs(tmp_path / "lightning"))
    assert len(files) == 15
    for rel in files:
        assert (tmp_path / "plain" / rel).read_bytes() == (
            tmp_path / "lightning" / rel).read_bytes(), rel


def test_predicting_on_one_device_does_not_import_lightning(tmp_path: Path,
                                                            unet_ckpt: Path) -> None:
    """Lightning, torchmetrics and (for a U-Net) smp and timm cost about 3 s of a short run's
    start, albumentations 0.6 s; `segpipe predict` on one device imports none of them (the
    last only for a model evaluated at another size, data.eval_resize)."""
    write_image(tmp_path / "in" / "a.png", noise_image(20, 24))
    code = ("import sys\nfrom segpipe.cli import main\n"
            f"assert main(['predict', '--ckpt_path', {str(unet_ckpt)!r}, '--input', "
            f"{str(tmp_path / 'in')!r}, '--output', {str(tmp_path / 'out')!r}, "
            "'--no_progress']) == 0\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', "
            "'torchmetrics', 'segmentation_models_pytorch', 'timm', 'albumentations'}))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "a.png").is_file()


def test_unwritable_output_is_one_clear_error(tmp_path: Path, pointwise_ckpt: Path, capsys) -> None:
    src = tmp_path / "in"
    for i in range(3):
        write_image(src / f"{i}.png", noise_image(16, 16, seed=i))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert run(pointwise_ckpt, src, blocker / "out") == 2
    err = capsys.readouterr().err
    assert f"{blocker} is a file, not a folder" in err and "--output" in err
    assert err.count("error") == 1  # one error up front, not one failure per file


def test_killed_multi_file_run_resumes_to_the_uninterrupted_set(
    tmp_path: Path, pointwise_ckpt: Path
) -> None:
    """Kill a folder run mid-way; the rerun writes only what is missing and equals a clean run."""
    src = tmp_path / "in"
    for i in range(40):
        write_image(src / f"img{i:02d}.png", noise_image(96, 96, seed=i))
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert run(pointwise_ckpt, src, clean) == 0
    cmd = [sys.executable, "-m", "segpipe.cli", "predict", "--ckpt_path", str(pointwise_ckpt),
           "--input", str(src), "--output", str(out), "--batch-size", "1", "--tta", *FAST]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.png"))) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, "prediction never started writing"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 0 < len(done_before) < 40, "the kill should land mid-run"
    assert run(pointwise_ckpt, src, out) == 0
    assert not leftovers(out)
    for name, mtime in done_before.items():  # finished files were not rewritten
        assert (out / name).stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in clean.glob("*.png"))
    for p in clean.glob("*.png"):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(out / p.name)))


# ------------------------------------------------------------------ full disk
def _fill_disk_after(monkeypatch: pytest.MonkeyPatch, out: Path, files: int) -> None:
    """The output folder's disk fills up once it holds ``files`` finished outputs.

    Like a nearly full file system, a write then stores only part of its bytes and returns the
    short count, and the next one stores nothing (returns 0, no errno): the case Pillow's
    encoder used to take for success.
    """
    real_write = os.write
    root = str(out.resolve())

    def write(fd: int, data) -> int:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if not name.startswith(root):
            return real_write(fd, data)
        done = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(TMP_PREFIX)]
        if len(done) < files:
            return real_write(fd, data)
        if os.fstat(fd).st_size == 0:  # the first write to the file: a short one
            return real_write(fd, bytes(memoryview(data)[: min(len(data) - 1, 8192)]))
        return 0

    monkeypatch.setattr(os, "write", write)


def _complete(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()  # a truncated file raises here
        return np.asarray(img)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
@pytest.mark.parametrize("writers", ["0", "2"])
def test_full_disk_stops_with_one_error_and_the_rerun_resumes(
    tmp_path: Path, pointwise_ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys, writers: str
) -> None:
    """In turn (0 writing threads) or beside the forward (2): one error line, whatever was
    finished is complete, no temporary file, and the rerun completes the rest."""
    src, out, clean = tmp_path / "in", tmp_path / "out", tmp_path / "clean"
    for i in range(4):
        write_image(src / f"im{i}.png", noise_image(60, 80, seed=i))
    fmt = ["--format", "mask", "palette", "overlay", "--batch-size", "1",
           "--write-workers", writers]
    assert run(pointwise_ckpt, src, clean, *fmt) == 0
    capsys.readouterr()

    _fill_disk_after(monkeypatch, out, files=3)  # room for the first image's three outputs
    assert run(pointwise_ckpt, src, out, *fmt) == 2
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err
    assert errors[0].startswith("segpipe predict: error: no space left on the device")
    assert str(out) in errors[0] and "free some space" in errors[0]
    assert "complete" in errors[0] and "resumes where it stopped" in errors[0]
    assert "failed: " not in captured.out  # not one failure per remaining file
    assert not leftovers(out)
    if writers == "0":  # in turn: exactly the first image's outputs
        assert "predict: 1 written, 0 skipped (already done), 0 failed" in captured.out
        assert sorted(p.name for p in outputs(out)) == ["im0.png", "im0_overlay.jpg",
                                                        "im0_palette.png"]
    for p in outputs(out):
        assert p.read_bytes() == (clean / p.name).read_bytes()  # complete, not truncated

    monkeypatch.undo()  # space freed
    assert run(pointwise_ckpt, src, out, *fmt) == 0
    rerun = capsys.readouterr().out
    if writers == "0":
        assert "predict: 3 written, 1 skipped (already done), 0 failed" in rerun
    assert sorted(p.name for p in outputs(out)) == sorted(p.name for p in outputs(clean))
    for p in outputs(clean):
        assert np.array_equal(_complete(out / p.name), _complete(p))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_full_disk_while_writing_a_raster_stops_the_run(
    tmp_path: Path, pointwise_ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        write_geotiff(src / f"r{i}.tif",
                      np.random.default_rng(i).integers(0, 255, (3, 70, 90), np.uint8))
    _fill_disk_after(monkeypatch, out, files=2)  # the first raster's GeoTIFF and PNG fit
    assert run(pointwise_ckpt, src, out, "--format", "auto", "mask") == 2
    captured = capsys.readouterr()
    assert captured.err.count("segpipe predict: error: no space left") == 1, captured.err
    assert f"(writing {out / 'r1.png'})" in captured.err and "Traceback" not in captured.err
    assert sorted(p.name for p in outputs(out)) == ["r0.png", "r0.tif"]
    assert (out / ".segpipe-predict.json").is_file()  # what made them, recorded before them
    monkeypatch.undo()
    assert run(pointwise_ckpt, src, out, "--format", "auto", "mask") == 0
    assert "predict: 2 written, 1 skipped (already done), 0 failed" in capsys.readouterr().out
    assert not leftovers(out)
    for i in range(3):
        with rasterio.open(out / f"r{i}.tif") as ds:
            assert np.array_equal(ds.read(1), _complete(out / f"r{i}.png"))


# ------------------------------------------------------------------ writing threads
def test_writing_threads_write_the_same_files_and_counts(
    tmp_path: Path, pointwise_ckpt: Path, capsys
) -> None:
    """--write_workers: outputs are encoded beside the next batch's prediction; the files and
    the counts (in input order) are those of writing between batches, bad files included."""
    src = tmp_path / "in"
    bad = _bad_folder(src)
    for i in range(5):
        write_image(src / f"im{i}.png", noise_image(30 + i, 41, seed=i))
    fmt = ["--format", "mask", "palette", "overlay", "--batch-size", "2"]
    assert run(pointwise_ckpt, src, tmp_path / "serial", *fmt, "--write-workers", "0") == 1
    serial = capsys.readouterr().out
    assert run(pointwise_ckpt, src, tmp_path / "threads", *fmt, "--write-workers", "3") == 1
    threads = capsys.readouterr().out
    summary = "predict: 7 written, 0 skipped (already done), 4 failed"
    assert summary in serial and summary in threads
    report = serial[serial.index(summary):].splitlines()
    assert len(report) == 5 and threads[threads.index(summary):].splitlines() == report  # order
    files = sorted(p.relative_to(tmp_path / "serial") for p in outputs(tmp_path / "serial"))
    assert len(files) == 21 and files == sorted(
        p.relative_to(tmp_path / "threads") for p in outputs(tmp_path / "threads"))
    for rel in files:
        assert (tmp_path / "serial" / rel).read_bytes() == (tmp_path / "threads" / rel).read_bytes()
    assert not leftovers(tmp_path / "threads") and len(bad) == 4


def test_default_write_workers_leave_the_network_its_cores(monkeypatch) -> None:
    import torch

    from segpipe.predict import command
    from segpipe.predict.command import default_write_workers

    monkeypatch.setattr(command, "available_cpus", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert default_write_workers(on_accelerator=False) == 0  # 2 cores, both predicting
    monkeypatch.setattr(command, "available_cpus", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert default_write_workers(on_accelerator=False) == 4  # cores the network leaves free
    assert default_write_workers(on_accelerator=False, loader_workers=6) == 2
    assert default_write_workers(on_accelerator=True, loader_workers=4) == 4  # a GPU predicts
    monkeypatch.setattr(command, "available_cpus", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # as in each of 2 DDP processes
    assert default_write_workers(on_accelerator=False, processes=2) == 0  # both cores busy
    monkeypatch.setattr(command, "available_cpus", lambda: 32)
    assert default_write_workers(on_accelerator=True, loader_workers=4, processes=4) == 3


# ------------------------------------------------------------------ --bn_adapt
def test_bn_adapt_matches_the_python_api_and_is_refused_where_it_cannot_work(
    tmp_path: Path, unet_ckpt: Path, pointwise_ckpt: Path, capsys, caplog
) -> None:
    from segpipe.predict.api import Segmenter

    src = tmp_path / "in"
    images = {f"im{i}.png": noise_image(40, 56, seed=i) // (i + 2) for i in range(3)}  # darker
    for name, img in images.items():
        write_image(src / name, img)
    write_image(src / "big.png", noise_image(100, 90, seed=9) // 3)  # tiled: 4 tiles of 64
    assert run(unet_ckpt, src, tmp_path / "ad", "--bn_adapt", "0.5", "--batch-size", "2",
               "--tile", "64") == 0
    out = capsys.readouterr().out
    assert "BatchNorm statistics: 0.5 x the input images' statistics + 0.5 x training's, " \
           "estimated on 7 image(s) or tile(s)" in out  # 3 whole images + 4 tiles
    seg = Segmenter.from_checkpoint(unet_ckpt, precision="32-true", batch_size=2, tile=64,
                                    device="cpu")
    plain = seg.predict([str(src / n) for n in sorted(os.listdir(src))])
    adaptation = seg.adapt_batchnorm([str(src / n) for n in sorted(os.listdir(src))], 0.5)
    assert adaptation.num_images == 7
    for name, mask in zip(sorted(os.listdir(src)), seg.predict(
            [str(src / n) for n in sorted(os.listdir(src))])):
        assert np.array_equal(mask, np.asarray(Image.open(tmp_path / "ad" / name)))
    assert any(not np.array_equal(a, np.asarray(Image.open(tmp_path / "ad" / n)))
               for a, n in zip(plain, sorted(os.listdir(src))))  # the statistics mattered
    adaptation.restore()
    assert all(np.array_equal(a, b) for a, b in zip(
        plain, seg.predict([str(src / n) for n in sorted(os.listdir(src))])))

    assert run(pointwise_ckpt, src, tmp_path / "pw", "--bn_adapt", "0.5") == 2
    assert "has no BatchNorm layer" in capsys.readouterr().err

    # The batch size changes the adapted statistics: a rerun with another one said nothing
    # and mixed its masks with the first run's.
    (tmp_path / "ad" / "im0.png").unlink()
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(unet_ckpt, src, tmp_path / "ad", "--bn_adapt", "0.5", "--batch-size", "1",
                   "--tile", "64") == 0
    assert "were made with another --batch_size: they are kept and skipped as done" in caplog.text
    # A batch of one image whose bottleneck is 1 x 1 (depth 3, padded to 8 x 8): a traceback
    write_image(tmp_path / "one" / "dot.png", noise_image(1, 1))
    assert run(unet_ckpt, tmp_path / "one", tmp_path / "dot", "--bn_adapt", "0.5") == 2
    err = capsys.readouterr().err
    assert "bn_adapt: a BatchNorm layer got one value per channel" in err
    assert "Traceback" not in err and "--batch_size 2 or more" in err


def test_bn_adapt_reads_rasters_by_windows_without_nodata(
    tmp_path: Path, unet_ckpt: Path, capsys
) -> None:
    pixels = noise_image(40, 56, seed=3) // 3  # darker than the training statistics say
    write_image(tmp_path / "png" / "scene.png", pixels)
    (tmp_path / "geo").mkdir()
    write_geotiff(tmp_path / "geo" / "scene.tif", pixels.transpose(2, 0, 1).copy())
    # One window (the default raster tile, 512, holds the scene): the PNG's statistics.
    for name in ("png", "geo"):
        assert run(unet_ckpt, tmp_path / name, tmp_path / f"{name}_ad", "--bn_adapt", "1",
                   "--format", "mask") == 0
        assert "estimated on 1 image(s) or tile(s)" in capsys.readouterr().out
    assert run(unet_ckpt, tmp_path / "geo", tmp_path / "geo_plain", "--format", "mask") == 0
    adapted = np.asarray(Image.open(tmp_path / "geo_ad" / "scene.png"))
    assert np.array_equal(adapted, np.asarray(Image.open(tmp_path / "png_ad" / "scene.png")))
    assert not np.array_equal(adapted, np.asarray(Image.open(tmp_path / "geo_plain" / "scene.png")))

    # A nodata pixel keeps its window out of the statistics (its fill value is no pixel).
    holed = pixels.transpose(2, 0, 1).copy()
    holed[:, 0, 0] = 0
    holed[holed == 0] = 1
    holed[:, 0, 0] = 0
    scenes = tmp_path / "holed"
    scenes.mkdir()
    write_geotiff(scenes / "scene.tif", holed, nodata=0)
    assert run(unet_ckpt, scenes, tmp_path / "h1", "--bn_adapt", "0.5") == 2
    err = capsys.readouterr().err
    assert "none of the 1 raster(s) has a window of 512 px without nodata; use a smaller " \
           "--tile" in err and "Traceback" not in err
    # Windows of 16 px: rows and columns start at 0, 16, 24 and 0, 16, 32, 40; one has the hole.
    assert run(unet_ckpt, scenes, tmp_path / "h2", "--bn_adapt", "0.5", "--tile", "16") == 0
    assert "estimated on 11 image(s) or tile(s)" in capsys.readouterr().out
    write_image(scenes / "photo.png", pixels)  # beside an ordinary image, the raster is left out
    assert run(unet_ckpt, scenes, tmp_path / "h3", "--bn_adapt", "0.5") == 0
    out = capsys.readouterr().out
    assert "estimated on 1 image(s) or tile(s) in 14 BatchNorm layer(s) (1 raster(s) without " \
           "a window free of nodata left out)" in out


def test_tile_below_the_networks_size_step_is_refused_and_off_step_warned(
        tmp_path: Path, unet_ckpt: Path, capsys, caplog) -> None:
    src = tmp_path / "in"
    write_image(src / "a.png", noise_image(40, 52))
    assert run(unet_ckpt, src, tmp_path / "small", "--tile", "5") == 2  # depth 3: step 8
    err = capsys.readouterr().err
    assert "--tile 5 is smaller than the network's size step (8 px)" in err
    assert not (tmp_path / "small" / "a.png").exists()
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(unet_ckpt, src, tmp_path / "odd", "--tile", "30") == 0
    assert "--tile 30 is not a multiple of the network's size step (8 px): each tile is padded " \
           "to 32; --tile 32 costs the same" in caplog.text
    assert np.asarray(Image.open(tmp_path / "odd" / "a.png")).shape == (40, 52)
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(unet_ckpt, src, tmp_path / "even", "--tile", "32") == 0
    assert "size step" not in caplog.text


def test_tile_below_the_least_size_the_network_takes_is_warned(caplog) -> None:
    """PAN takes at least 128 px: --tile 64 was taken in silence and every tile padded to 128
    (four times the work, and masks less like the whole image's)."""
    from segpipe.predict.command import _check_tile

    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        _check_tile(64, 32, 128)
    assert ("--tile 64 is smaller than the least size this network takes (128 px): each tile "
            "is padded to 128") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        _check_tile(128, 32, 128)
        _check_tile(None, 32, 128)
    assert not caplog.text


def test_worker_precision_and_device_mistakes_are_one_line(tmp_path: Path, pointwise_ckpt: Path,
                                                          capsys) -> None:
    write_image(tmp_path / "in" / "a.png", noise_image(16, 16))
    for extra, words in [
        (("--num_workers", "-1"), "--num_workers must be >= 0"),
        (("--write_workers", "-2"), "--write_workers must be >= 0"),
        (("--precision", "17"), "--precision 17: Precision '17' is invalid"),
        (("--accelerator", "nosuchchip"), "--accelerator nosuchchip"),
        # Lightning's CPU accelerator raises TypeError for these: it was a traceback, exit 1
        (("--accelerator", "cpu", "--devices", "-1"), "should be an int > 0"),
    ]:
        code = cli_main(["predict", "--ckpt_path", str(pointwise_ckpt), "--input",
                         str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-progress",
                         *extra])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2 and err[-1].startswith("segpipe predict: error: ") and words in err[-1], err
        assert not any("Traceback" in ln for ln in err)
    assert not (tmp_path / "out" / "a.png").exists()


def test_options_that_would_do_nothing_or_cost_much_are_warned_about(
        tmp_path: Path, pointwise_ckpt: Path, caplog) -> None:
    write_image(tmp_path / "in" / "a.png", noise_image(16, 16))
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(pointwise_ckpt, tmp_path / "in", tmp_path / "out", "--format", "mask",
                   "--probs", "max", "--overlay_alpha", "0.3", "--tile", "64",
                   "--overlap", "0.9") == 0
    text = caplog.text
    assert "--probs max shapes the probs output, which --format does not ask for" in text
    assert "--overlay_alpha applies to the overlay output" in text
    assert "--overlap 0.9 moves each tile by 10 % of its size: about 100 times" in text
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(pointwise_ckpt, tmp_path / "in", tmp_path / "out2", "--format", "probs",
                   "overlay", "--probs", "max", "--overlay_alpha", "0.3") == 0
    assert "does not ask for" not in caplog.text and "--overlap" not in caplog.text


def test_a_4_band_model_reads_an_alpha_tagged_4th_band_as_data(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "rgbn.ckpt", "segpipe.models.UNet",
                     {"in_channels": 4, "num_classes": 3, "base_channels": 4, "depth": 2},
                     in_channels=4, mean=[0.5] * 4, std=[0.25] * 4)
    src = tmp_path / "in"
    src.mkdir()
    data = np.random.default_rng(3).integers(0, 256, (4, 40, 56), dtype=np.uint8)
    write_geotiff(src / "rgbn.tif", data)  # GDAL tags the 4th band of 4 uint8 bands alpha
    with rasterio.open(src / "rgbn.tif") as ds:
        assert ds.colorinterp[3].name == "alpha"
    assert run(ckpt, src, tmp_path / "out", "--format", "geotiff") == 0
    with rasterio.open(tmp_path / "out" / "rgbn.tif") as ds:
        mask = ds.read(1)
    assert mask.shape == (40, 56) and (mask < 3).all()  # no pixel taken for nodata


def test_fewer_images_than_processes_is_one_line(tmp_path: Path, pointwise_ckpt: Path, capsys) -> None:
    write_image(tmp_path / "in" / "a.png", noise_image(16, 16))
    code = cli_main(["predict", "--ckpt_path", str(pointwise_ckpt), "--input", str(tmp_path / "in"),
                     "--output", str(tmp_path / "out"), "--no_progress", "--accelerator", "cpu",
                     "--devices", "2", "--strategy", "ddp"])
    assert code == 2
    assert "1 input image(s) for 2 processes: each needs at least one; use --devices 1" in (
        capsys.readouterr().err)


def test_inputs_of_another_dtype_than_training_are_warned_about(tmp_path: Path, caplog) -> None:
    """A uint16 scene into a model trained on uint8 images came out as one class, silently:
    its values are divided by 65535, the training images' by 255."""
    ckpt = make_ckpt(tmp_path / "u8.ckpt", "tests.predict.nets.PointwiseNet",
                     {"in_channels": 3, "num_classes": 3}, input_dtype="uint8")
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        write_geotiff(src / f"{name}.tif", (np.moveaxis(noise_image(20, 30), -1, 0)
                                            .astype(np.uint16) * 40))
    write_image(src / "c.png", noise_image(20, 30))
    assert run(ckpt, src, tmp_path / "out") == 0
    said = [r.getMessage() for r in caplog.records if "but the model was trained on" in r.getMessage()]
    assert len(said) == 1, said  # once per type, not per file; the uint8 PNG says nothing
    assert ("a.tif: uint16 pixels, but the model was trained on uint8 images (uint16 values are "
            "divided by 65535, uint8 ones were divided by 255)") in said[0]
    from segpipe.predict import Segmenter

    caplog.clear()
    seg = Segmenter.from_checkpoint(ckpt, device="cpu")
    seg.predict(np.full((8, 8, 3), 0.7, np.float32))  # [0, 1] floats: the documented input
    assert "but the model was trained on" not in caplog.text
    for _ in range(2):
        seg.predict(np.full((8, 8, 3), 200.0, np.float32))  # 0..255 values as floats
    said = [r.getMessage() for r in caplog.records if "but the model was trained on" in r.getMessage()]
    assert len(said) == 1 and "float32 values are taken as they are" in said[0]
    caplog.clear()
    plain = make_ckpt(tmp_path / "old.ckpt", "tests.predict.nets.PointwiseNet",
                      {"in_channels": 3, "num_classes": 3})  # no dtype recorded: nothing said
    Segmenter.from_checkpoint(plain, device="cpu").predict(np.zeros((8, 8, 3), np.uint16))
    assert "but the model was trained on" not in caplog.text


def test_float_rasters_read_by_windows_are_checked_by_their_values(tmp_path: Path, caplog) -> None:
    """Raw reflectances (0..10000) as float32 into a uint16 model came out wrong without a
    word from the command (the API said it): a GeoTIFF is predicted by windows, so its value
    range was never known. A sample of its windows now gives it."""
    ckpt = make_ckpt(tmp_path / "u16.ckpt", "tests.predict.nets.PointwiseNet",
                     {"in_channels": 3, "num_classes": 3}, input_dtype="uint16")
    src = tmp_path / "in"
    src.mkdir()
    data = np.random.default_rng(0).uniform(0, 10000, (3, 40, 600)).astype(np.float32)
    data[:, :, 150:450] = np.nan  # the centre window holds no value: the others are read
    write_geotiff(src / "raw.tif", data)
    write_geotiff(src / "unit.tif", np.clip(data / 10000, 0, 1))  # [0, 1]: the documented input
    assert run(ckpt, src, tmp_path / "out") == 0
    said = [r.getMessage() for r in caplog.records if "but the model was trained on" in r.getMessage()]
    assert len(said) == 1 and "raw.tif: float32 pixels" in said[0], said


def test_warnings_during_a_prediction_are_one_line_each(tmp_path: Path, pointwise_ckpt: Path,
                                                       capsys, caplog) -> None:
    """They came with the library file and source line Python prints under a warning."""
    src = tmp_path / "in"
    src.mkdir()
    data = np.full((3, 20, 30), 0.5, np.float32)
    data[0, :4, :4] = -9999.0  # nodata in one band only: warned about
    write_geotiff(src / "partial.tif", data, nodata=-9999.0)
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(pointwise_ckpt, src, tmp_path / "out") == 0
    assert "partial.tif: some pixels are nodata (-9999.0) in only some of the bands" in caplog.text
    err = capsys.readouterr().err
    assert "UserWarning" not in err and "warnings.warn" not in err and ".py:" not in err, err


def test_overlays_of_16_bit_inputs_are_stretched_and_show_nodata_black(tmp_path: Path) -> None:
    """A 16-bit scene's [0, 1] scaling (12 bits of data) drew a nearly black overlay, and its
    nodata white; the picture now spans the training mean +- 2.5 std."""
    ckpt = make_ckpt(tmp_path / "u16.ckpt", "tests.predict.nets.PointwiseNet",
                     {"in_channels": 3, "num_classes": 3}, mean=[0.078] * 3, std=[0.045] * 3,
                     input_dtype="uint16")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 10200, (3, 40, 50)).astype(np.uint16)
    data[:, :5, :5] = 65535
    src = tmp_path / "in"
    src.mkdir()
    write_geotiff(src / "scene.tif", data, nodata=65535)
    write_image(src / "grey.png", data[0, 5:, 5:])  # a 16-bit PNG: read whole, not by windows
    out = tmp_path / "out"
    assert run(ckpt, src, out, "--format", "overlay", "--overlay_alpha", "0") == 0
    scene = np.asarray(Image.open(out / "scene_overlay.jpg")).astype(int)
    grey = np.asarray(Image.open(out / "grey_overlay.jpg")).astype(int)
    for picture in (scene[5:, 5:], grey):
        assert 90 < picture.mean() < 170 and picture.std() > 30  # not black, not white
    assert scene[:4, :4].max() < 40  # nodata: black (JPEG blurs its edge)


def test_an_overlay_shows_the_input_itself_when_the_model_takes_it_resized(
        tmp_path: Path) -> None:
    """With eval_resize the overlay's picture was the network's resized input scaled back up:
    a 2-pixel stripe pattern came out grey (mean difference 63.5 from the input)."""
    from tests.predict.conftest import make_ckpt

    ckpt = make_ckpt(tmp_path / "r.ckpt", "tests.predict.nets.PointwiseNet",
                     {"in_channels": 3, "num_classes": 3}, eval_resize=[12, 16])
    stripes = np.zeros((36, 48, 3), np.uint8)
    stripes[:, 2::4] = stripes[:, 3::4] = 255
    write_image(tmp_path / "in" / "s.png", stripes)
    assert run(ckpt, tmp_path / "in", tmp_path / "out", "--format", "overlay",
               "--overlay_alpha", "0") == 0
    shown = np.asarray(Image.open(tmp_path / "out" / "s_overlay.jpg").convert("RGB"))
    assert np.abs(shown.astype(int) - stripes).mean() < 12  # JPEG's own loss on stripes


def test_a_rerun_with_other_settings_says_the_old_outputs_are_kept(
        tmp_path: Path, pointwise_ckpt: Path, caplog) -> None:
    """A rerun with another --probs mode, --tta or checkpoint said "skipped (already done)" and
    kept the old files, silently."""
    write_image(tmp_path / "in" / "a.png", noise_image(16, 16))
    args = (pointwise_ckpt, tmp_path / "in", tmp_path / "out", "--format", "probs")
    assert run(*args, "--probs", "max") == 0
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(*args) == 0
    assert "were made with another --probs_mode: they are kept and skipped as done" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(*args, "--overwrite") == 0  # remade, and the folder's settings with them
        assert run(*args) == 0
    assert "were made with another" not in caplog.text
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(*args, "--tta_scales", "0.5", "1") == 0
    assert "were made with another --tta_scales: they are kept" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(*args, "--tta_scales", "1", "--overwrite") == 0  # [1]: the plain size
        assert run(*args) == 0
    assert "were made with another" not in caplog.text


def test_a_split_folder_with_its_masks_is_warned_about(tmp_path: Path, pointwise_ckpt: Path,
                                                        caplog) -> None:
    """`--input data/test` (images/ and masks/) predicted the masks as images too and wrote
    OUT/masks/x.png, named like a ground-truth mask, without a word."""
    split = tmp_path / "data" / "test"
    for sub in ("images", "masks"):
        write_image(split / sub / "a.png", noise_image(16, 16))
    write_image(tmp_path / "camvid" / "test" / "f.png", noise_image(16, 16))
    write_image(tmp_path / "camvid" / "testannot" / "f.png", noise_image(16, 16))
    write_image(tmp_path / "plain" / "masks" / "m.png", noise_image(16, 16))  # no images beside
    with caplog.at_level("WARNING", logger="segpipe"):
        assert run(pointwise_ckpt, split, tmp_path / "out") == 0
        assert run(pointwise_ckpt, tmp_path / "camvid", tmp_path / "out2") == 0
    assert (f"{split / 'masks'} looks like the masks of {split / 'images'} (a data split's "
            f"layout): its files are predicted as images too; give --input {split / 'images'}"
            in caplog.text)
    assert f"{tmp_path / 'camvid' / 'testannot'} looks like the masks of" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpipe"):
        assert run(pointwise_ckpt, tmp_path / "plain", tmp_path / "out3") == 0
    assert "looks like the masks" not in caplog.text


def test_overlay_bands_pick_the_channels_shown(tmp_path: Path, capsys, caplog) -> None:
    """The overlay showed the model's first three input channels as red, green and blue: blue,
    green and red of a Sentinel-2 model fed bands 2, 3, 4, 8, so every scene in false colour."""
    ckpt = make_ckpt(tmp_path / "b4.ckpt", "tests.predict.nets.PointwiseNet",
                     {"in_channels": 4, "num_classes": 3}, mean=[0.5] * 4, std=[0.2] * 4)
    data = np.stack([np.full((40, 50), v, np.uint8) for v in (10, 60, 120, 240)])
    src = tmp_path / "in"
    src.mkdir()
    write_geotiff(src / "geo.tif", data)  # by windows
    plain = src / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=50, height=40, count=4,
                       dtype="uint8") as ds:  # no georeference: read whole
        ds.write(data)
    for bands, colour in ((None, (10, 60, 120)), (["4", "3", "1"], (240, 120, 10)),
                          (["2"], (60, 60, 60))):
        out = tmp_path / f"out{bands}"
        extra = ["--overlay_bands", *bands] if bands else []
        assert run(ckpt, src, out, "--format", "overlay", "--overlay_alpha", "0", *extra) == 0
        for name in ("geo", "plain"):
            picture = np.asarray(Image.open(out / f"{name}_overlay.jpg")).astype(int)
            assert np.abs(picture[10:30, 10:40].mean(axis=(0, 1)) - colour).max() < 3, (
                name, bands, picture[20, 20])
    assert run(ckpt, src, tmp_path / "bad", "--overlay_bands", "5", "3", "1") == 2
    assert "--overlay_bands takes 3 channel numbers" in capsys.readouterr().err
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(ckpt, src, tmp_path / "masks", "--format", "mask", "--overlay_bands",
                   "3", "2", "1") == 0
    assert "--overlay_bands applies to the overlay output" in caplog.text
