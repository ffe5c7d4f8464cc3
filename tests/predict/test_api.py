"""The Python API: Segmenter gives the masks `segpipe predict` writes, for arrays, PIL images,
paths and lists, with probabilities, tiling, eval resize and ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segpipe import Segmenter
from segpipe.cli import main as cli_main
from segpipe.data.io import ImageReadError, write_image
from tests.predict.conftest import COLORS, make_ckpt, noise_image

FAST = ["--no-progress", "--num-workers", "0", "--accelerator", "cpu", "--format", "mask"]


def _command_masks(ckpt: Path, src: Path, out: Path, *extra: str) -> dict[str, np.ndarray]:
    assert cli_main(["predict", "--ckpt_path", str(ckpt), "--input", str(src), "--output",
                     str(out), *FAST, *extra]) == 0
    return {p.stem: np.asarray(Image.open(p)) for p in out.glob("*.png")}


@pytest.mark.parametrize("extra, options", [([], {}), (["--tta"], {"tta": True}),
                                            (["--tile", "32"], {"tile": 32})])
def test_masks_equal_the_command(tmp_path: Path, unet_ckpt: Path, extra: list[str],
                                 options: dict) -> None:
    src = tmp_path / "in"
    sizes = {"a": (45, 37), "b": (64, 96), "c": (64, 96)}  # b and c batch together
    for name, (h, w) in sizes.items():
        write_image(src / f"{name}.png", noise_image(h, w, seed=h + w))
    expected = _command_masks(unet_ckpt, src, tmp_path / "out", *extra)
    seg = Segmenter.from_checkpoint(unet_ckpt, device="cpu", **options)
    got = seg.predict([src / "a.png", src / "b.png", src / "c.png"])
    for name, mask in zip("abc", got):
        assert mask.dtype == np.uint8 and mask.shape == sizes[name]
        assert np.array_equal(mask, expected[name]), name
        assert len(np.unique(mask)) > 1  # not a constant prediction
    # the same pixels as an array and as a PIL image
    pixels = noise_image(64, 96, seed=160)
    assert np.array_equal(seg.predict(pixels), expected["b"])
    assert np.array_equal(seg.predict(Image.fromarray(pixels)), expected["b"])


def test_probabilities_and_metadata(unet_ckpt: Path) -> None:
    seg = Segmenter.from_checkpoint(unet_ckpt, device="cpu", precision="32-true")
    image = noise_image(40, 50)
    proba = seg.predict_proba(image)
    assert proba.shape == (3, 40, 50) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=0), 1.0, atol=1e-4)
    assert np.array_equal(proba.argmax(axis=0), seg.predict(image))
    assert seg.class_names == ["bg", "red", "green"] and seg.palette[:3].tolist() == COLORS
    assert seg.palette[255].tolist() == [0, 0, 0]  # nodata: palette[mask] works on any mask
    assert seg(image).shape == (40, 50)


def test_uint16_float_and_grey_inputs_follow_the_checkpoint(tmp_path: Path) -> None:
    """ThresholdNet: class = third of [0, 1] the first band's scaled value falls in."""
    ckpt = make_ckpt(tmp_path / "t.ckpt", "tests.predict.nets.ThresholdNet",
                     {"in_channels": 3, "num_classes": 3}, mean=[0.0] * 3, std=[1.0] * 3)
    seg = Segmenter.from_checkpoint(ckpt, device="cpu", precision="32-true")
    values = np.array([[0.1, 0.5, 0.9]], np.float32)
    expected = np.array([[0, 1, 2]])
    as_uint16 = np.repeat((values * 65535).astype(np.uint16)[..., None], 3, axis=2)
    assert np.array_equal(seg.predict(as_uint16), expected)
    assert np.array_equal(seg.predict(values), expected)  # (H, W) float grey -> 3 channels
    assert np.array_equal(seg.predict((values * 255).astype(np.uint8)), expected)


def test_eval_resize_is_applied_and_undone(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "r.ckpt", "tests.predict.nets.PointwiseNet",
                     {"in_channels": 3, "num_classes": 3}, eval_resize=[32, 32])
    src = tmp_path / "in"
    write_image(src / "a.png", noise_image(45, 61, seed=3))
    expected = _command_masks(ckpt, src, tmp_path / "out")["a"]
    got = Segmenter.from_checkpoint(ckpt, device="cpu").predict(src / "a.png")
    assert got.shape == (45, 61) and np.array_equal(got, expected)


def test_a_plain_tiff_is_resized_like_a_png(tmp_path: Path, caplog) -> None:
    """The command sent every TIFF rasterio opens down the raster path, which never applied
    the checkpoint's eval_resize: a plain .tif (LGG's slices) was predicted at full size while
    the same picture as PNG, the API and `segpipe test` resized it (70 % of the pixels
    agreed). A georeferenced chip (no larger than the raster tile) is resized too, as `segpipe
    test` scores it, and keeps its georeference; a larger raster stays on the raster path, by
    windows at native resolution, with a warning, and the API reads it by the same windows."""
    import rasterio
    from affine import Affine

    ckpt = make_ckpt(tmp_path / "r.ckpt", "tests.predict.nets.PointwiseNet",
                     {"in_channels": 3, "num_classes": 3}, eval_resize=[16, 16])
    src = tmp_path / "in"
    image = noise_image(45, 61, seed=4)
    write_image(src / "a.png", image)
    write_image(src / "b.tif", image)
    masks = _command_masks(ckpt, src, tmp_path / "out")
    assert np.array_equal(masks["a"], masks["b"])
    api = Segmenter.from_checkpoint(ckpt, device="cpu").predict(src / "b.tif")
    assert np.array_equal(api, masks["b"])
    geo = tmp_path / "geo"
    geo.mkdir()
    with rasterio.open(geo / "g.tif", "w", driver="GTiff", width=61, height=45, count=3,
                       dtype="uint8", crs="EPSG:32633",
                       transform=Affine(10, 0, 500000, 0, -10, 5000000)) as ds:
        ds.write(np.moveaxis(image, -1, 0))
    with caplog.at_level("WARNING", logger="segpipe"):
        assert cli_main(["predict", "--ckpt_path", str(ckpt), "--input", str(geo), "--output",
                         str(tmp_path / "geo_out"), "--format", "geotiff", *FAST[:-2]]) == 0
    assert "native resolution" not in caplog.text
    with rasterio.open(tmp_path / "geo_out" / "g.tif") as ds:  # as the PNG's, georeferenced
        assert np.array_equal(ds.read(1), masks["a"]) and ds.crs == "EPSG:32633"
        assert ds.transform == Affine(10, 0, 500000, 0, -10, 5000000)
    big = noise_image(530, 600, seed=5)
    with rasterio.open(geo / "h.tif", "w", driver="GTiff", width=600, height=530, count=3,
                       dtype="uint8", crs="EPSG:32633",
                       transform=Affine(10, 0, 500000, 0, -10, 5000000)) as ds:
        ds.write(np.moveaxis(big, -1, 0))
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpipe"):
        assert cli_main(["predict", "--ckpt_path", str(ckpt), "--input", str(geo), "--output",
                         str(tmp_path / "geo_out"), "--format", "geotiff", *FAST[:-2]]) == 0
    assert "larger than 512 pixels, such as" in caplog.text and "native resolution" in caplog.text
    with rasterio.open(tmp_path / "geo_out" / "h.tif") as ds:
        command = ds.read(1)
    api = Segmenter.from_checkpoint(ckpt, device="cpu").predict(geo / "h.tif")
    assert api.shape == (530, 600) and np.array_equal(api, command)  # by the same windows


def test_onnx_segmenter_agrees_with_torch(tmp_path: Path, unet_ckpt: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = tmp_path / "model.onnx"
    assert cli_main(["export", "--ckpt_path", str(unet_ckpt), "--output", str(model)]) == 0
    image = noise_image(64, 80, seed=7)
    a = Segmenter.from_checkpoint(unet_ckpt, device="cpu", precision="32-true").predict(image)
    b = Segmenter.from_onnx(model).predict(image)
    assert (a == b).mean() >= 0.999


def test_a_model_file_of_the_other_kind_names_the_call_to_use(tmp_path: Path,
                                                              unet_ckpt: Path) -> None:
    """A checkpoint given to from_onnx was reported as a missing sidecar to re-export, and an
    export given to from_checkpoint as "not a PyTorch checkpoint", without the call to use."""
    from segpipe.predict.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"unet\.ckpt is a PyTorch checkpoint, not an ONNX "
                                              r"model: load it with Segmenter\.from_checkpoint"):
        Segmenter.from_onnx(unet_ckpt)
    renamed = tmp_path / "model.onnx"  # a checkpoint named as an export
    renamed.write_bytes(unet_ckpt.read_bytes())
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is a PyTorch checkpoint, not an ONNX model"):
        Segmenter.from_onnx(renamed)
    with pytest.raises(CheckpointError, match=r"model\.onnx is an ONNX model written by segpipe "
                                              r"export: load it with Segmenter\.from_onnx"):
        Segmenter.from_checkpoint(renamed)


def test_bad_inputs_say_what_to_give(unet_ckpt: Path) -> None:
    seg = Segmenter.from_checkpoint(unet_ckpt, device="cpu")
    with pytest.raises(TypeError, match="numpy array"):
        seg.predict(object())
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, C\)"):
        seg.predict(np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"in_channels=3 .*e\.g\. array\[\.\.\., :3\], or for every input Segmenter\.from_checkpoint\(\.\.\., bands=\[1, 2, 3\]\)"):
        seg.predict(np.zeros((8, 8, 5), np.uint8))
    # (C, H, W), as tensor.numpy() gives: the bands hint led to a wrong (3, 48) mask
    with pytest.raises(ValueError, match=r"looks channel-first .*array.transpose\(1, 2, 0\)"):
        seg.predict(np.zeros((3, 48, 64), np.uint8))
    five = np.random.default_rng(0).integers(0, 255, (8, 8, 5), np.uint8)
    picked = Segmenter.from_checkpoint(unet_ckpt, device="cpu", bands=[5, 1, 3]).predict(five)
    assert np.array_equal(picked, seg.predict(np.ascontiguousarray(five[:, :, [4, 0, 2]])))
    # rasterio's read() gives (bands, H, W): with bands, its columns were picked as the bands
    # and a (5, 37) mask came back
    banded = Segmenter.from_checkpoint(unet_ckpt, device="cpu", bands=[5, 1, 3])
    with pytest.raises(ValueError, match=r"\(5, 37, 53\) looks channel-first .*rasterio"):
        banded.predict(np.zeros((5, 37, 53), np.uint16))
    assert banded.predict(np.zeros((37, 53, 5), np.uint16)).shape == (37, 53)
    with pytest.raises(ValueError, match=r"bands picks 2 band\(s\) but the model takes 3"):
        Segmenter.from_checkpoint(unet_ckpt, device="cpu", bands=[1, 2])
    with pytest.raises(ValueError, match=r"the array of shape \(0, 0, 3\) holds no pixel"):
        seg.predict(np.zeros((0, 0, 3), np.uint8))
    # np.array(Image.open(rgba_png)): the hint named "this file" and a predict(bands=) that
    # does not exist
    with pytest.raises(ImageReadError) as err:
        seg.predict(np.zeros((8, 8, 4), np.uint8))
    assert ("pick 3 of this array's 4 channels, e.g. array[..., :3] (an RGBA image's colour), "
            "or for every input Segmenter.from_checkpoint(..., bands=[1, 2, 3])") in str(err.value)
    assert "file" not in str(err.value).split(":", 1)[1]


@pytest.mark.parametrize("source", ["onnx", "checkpoint"])
def test_segmenter_does_not_load_lightning(tmp_path: Path, unet_ckpt: Path, source: str) -> None:
    """The model side of prediction is Lightning-free: from an ONNX export, and from a
    checkpoint (rebuilt as an InferenceNet, not as the training task), about 3 s of imports.
    A U-Net checkpoint does not load smp and timm either, nor albumentations without
    eval_resize."""
    import subprocess
    import sys

    if source == "onnx":
        pytest.importorskip("onnxruntime")
        from segpipe.predict.onnx import export_onnx

        model = tmp_path / "model.onnx"
        export_onnx(unet_ckpt, model)
        build = f"Segmenter.from_onnx({str(model)!r})"
    else:
        build = f"Segmenter.from_checkpoint({str(unet_ckpt)!r})"
    code = (f"import sys, numpy as np\nfrom segpipe import Segmenter\n"
            f"seg = {build}\n"
            f"assert seg.predict(np.zeros((20, 24, 3), np.uint8)).shape == (20, 24)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'lightning', "
            f"'torchmetrics', 'segmentation_models_pytorch', 'timm', 'albumentations'}}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_nan_and_nodata_pixels_are_nodata_in_the_command_and_the_api(tmp_path: Path,
                                                                     unet_ckpt: Path) -> None:
    import rasterio
    from rasterio.transform import from_origin

    pixels = np.random.default_rng(0).random((3, 40, 56)).astype(np.float32)
    pixels[:, :8, :10] = np.nan
    profile = dict(driver="GTiff", height=40, width=56, count=3, dtype="float32",
                   crs="EPSG:32633", transform=from_origin(500000, 4600000, 10, 10))
    src = tmp_path / "in"
    src.mkdir()
    with rasterio.open(src / "tagged.tif", "w", nodata=float("nan"), **profile) as ds:
        ds.write(pixels)
    with rasterio.open(src / "untagged.tif", "w", **profile) as ds:  # NaN, no nodata tag
        ds.write(pixels)
    write_image(src / "plain.tif", pixels.transpose(1, 2, 0))  # an ordinary float TIFF
    expected = _command_masks(unet_ckpt, src, tmp_path / "out")
    hole = np.zeros((40, 56), bool)
    hole[:8, :10] = True
    for name in ("tagged", "untagged", "plain"):
        mask = expected[name]
        assert (mask[hole] == 255).all() and (mask[~hole] < 3).all(), name
        assert len(np.unique(mask[~hole])) > 1  # the rest is predicted, not poisoned by NaN
    assert np.array_equal(expected["tagged"], expected["untagged"])
    seg = Segmenter.from_checkpoint(unet_ckpt, device="cpu")
    for name in ("tagged", "untagged", "plain"):
        assert np.array_equal(seg.predict(src / f"{name}.tif"), expected[name]), name
    array = seg.predict(pixels.transpose(1, 2, 0))  # the same pixels as an array
    assert np.array_equal(array, expected["plain"])
    probs = seg.predict_proba(pixels.transpose(1, 2, 0))
    assert np.isfinite(probs).all() and (probs[:, hole] == 0).all()
    assert np.allclose(probs[:, ~hole].sum(axis=0), 1.0, atol=1e-3)


def test_a_masked_array_is_predicted_as_its_raster_file_is(tmp_path: Path, unet_ckpt: Path) -> None:
    """rasterio's read(masked=True), the usual way to get a scene with its nodata: the mask was
    dropped and the nodata border predicted as classes, where the file itself gives 255."""
    import rasterio
    from rasterio.transform import from_origin

    pixels = np.random.default_rng(1).integers(1, 255, (3, 40, 56)).astype(np.uint8)
    pixels[:, :, :12] = 0  # a nodata border
    pixels[0, 20:, 30:] = 0  # one band's zeros are data: nodata needs every band
    profile = dict(driver="GTiff", height=40, width=56, count=3, dtype="uint8", nodata=0,
                   crs="EPSG:32633", transform=from_origin(500000, 4600000, 10, 10))
    path = tmp_path / "scene.tif"
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(pixels)
    with rasterio.open(path) as ds:
        masked = np.moveaxis(ds.read(masked=True), 0, -1)
    seg = Segmenter.from_checkpoint(unet_ckpt, device="cpu")
    expected = seg.predict(path)
    assert (expected[:, :12] == 255).all() and (expected[:, 12:] < 3).all()
    assert np.array_equal(seg.predict(masked), expected)
    assert np.array_equal(seg.predict(masked, tile=32), seg.predict(path, tile=32))
    probs = seg.predict_proba(masked)
    assert (probs[:, :, :12] == 0).all() and np.allclose(probs[:, :, 12:].sum(0), 1, atol=1e-3)
    plain = np.ma.getdata(masked)  # the same pixels without their mask: every pixel a class
    assert (seg.predict(plain) < 3).all()


def test_tensors_and_wide_integer_arrays_are_named(unet_ckpt: Path, caplog) -> None:
    import torch

    seg = Segmenter.from_checkpoint(unet_ckpt, device="cpu")
    with pytest.raises(TypeError, match=r"torch.Tensor of shape \(3, 8, 8\): .*permute\(1, 2, 0\)"):
        seg.predict(torch.zeros(3, 8, 8))
    pixels = noise_image(16, 24)
    with caplog.at_level("WARNING", logger="segpipe.predict.api"):
        seg.predict(pixels.astype(np.int64))
    assert "a int64 array with values up to 255 is scaled by its type's maximum" in caplog.text
    assert ".astype(np.uint8)" in caplog.text


def test_a_checkpoint_that_is_a_folder_is_named_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path} is a folder; give a "
                       r"\.ckpt file"):
        Segmenter.from_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found; give a .ckpt file") as exc:
        Segmenter.from_checkpoint(tmp_path / "nope.ckpt")
    assert "--ckpt_path" not in str(exc.value)  # an option of the command, not of Python


def test_a_pil_photo_is_read_upright_as_its_file_is(tmp_path: Path, unet_ckpt: Path) -> None:
    """An EXIF-rotated JPEG opened with PIL gave a mask of the other shape than its path."""
    exif = Image.Exif()
    exif[0x0112] = 6  # 90 degrees clockwise
    path = tmp_path / "r.jpg"
    Image.fromarray(noise_image(48, 64)).save(path, exif=exif.tobytes())
    seg = Segmenter.from_checkpoint(unet_ckpt, device="cpu", precision="32-true")
    from_path = seg.predict(path)
    assert from_path.shape == (64, 48)
    assert np.array_equal(seg.predict(Image.open(path)), from_path)


def test_adapting_twice_blends_with_the_training_statistics(unet_ckpt: Path) -> None:
    """A second adapt_batchnorm blended with the first's statistics (0.75 of the new ones at
    weight 0.5), and its restore() brought the first blend back, not the training ones."""
    seg = Segmenter.from_checkpoint(unet_ckpt, device="cpu", precision="32-true")
    images = [noise_image(40, 56, seed=i) // 3 for i in range(3)]
    bn = next(m for m in seg.task.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    trained = bn.running_mean.clone()
    seg.adapt_batchnorm(images, 0.5)
    once = bn.running_mean.clone()
    assert not torch.allclose(once, trained)
    second = seg.adapt_batchnorm(images, 0.5)
    assert torch.allclose(bn.running_mean, once, atol=1e-6)
    second.restore()
    assert torch.equal(bn.running_mean, trained)


def test_multiscale_views_are_resized_from_the_native_image(tmp_path: Path) -> None:
    """With eval_resize, each scale's view is the native image resized to eval_resize x scale
    (as data.eval_resize resizes, bilinear): resized from the 16x16 evaluation image instead,
    the enlarged views were blurred copies, and on CamVid that option gained nothing."""
    import torch.nn.functional as F

    ckpt = make_ckpt(tmp_path / "r.ckpt", "tests.predict.nets.PointwiseNet",
                     {"in_channels": 3, "num_classes": 3}, eval_resize=[16, 16])
    image = noise_image(48, 64, seed=5)
    seg = Segmenter.from_checkpoint(ckpt, device="cpu", precision="32-true",
                                    tta_scales=[0.5, 1, 2])
    seen: list[tuple[int, int]] = []
    seg.task.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    probs = seg.predict_proba(image)
    assert seen == [(8, 8), (16, 16), (32, 32)] and probs.shape == (3, 48, 64)
    native = seg._prepared(image, resize=False)["image"][None]
    expected = sum(
        F.interpolate(seg.task(F.interpolate(native, size=(s, s), mode="bilinear",
                                             align_corners=False)).softmax(1),
                      size=(48, 64), mode="bilinear", align_corners=False)
        for s in (8, 16, 32)) / 3
    np.testing.assert_allclose(probs, expected[0].detach().numpy(), atol=1e-5)
    # per call: [1] is the evaluation size alone, the plain prediction
    plain = Segmenter.from_checkpoint(ckpt, device="cpu", precision="32-true").predict_proba(image)
    np.testing.assert_allclose(seg.predict_proba(image, tta_scales=[1]), plain, atol=1e-6)
    assert not np.allclose(probs, plain, atol=1e-3)
    with pytest.raises(ValueError, match=r"tta_scales holds 0"):
        Segmenter.from_checkpoint(ckpt, device="cpu", tta_scales=[0, 1])


@pytest.mark.parametrize("extra, options", [
    (["--tta_scales", "0.5", "1", "1.5"], {"tta_scales": [0.5, 1, 1.5]}),
    (["--tta", "--tta_scales", "0.75", "1.25"], {"tta": True, "tta_scales": [0.75, 1.25]}),
    (["--tta_scales", "0.5", "1", "--tile", "32"], {"tta_scales": [0.5, 1], "tile": 32}),
])
def test_multiscale_masks_equal_the_command(tmp_path: Path, extra: list[str],
                                            options: dict) -> None:
    """The same views in `segpipe predict --tta_scales` and the API, with eval_resize, with
    flips, and tile by tile (each tile scaled from its own size)."""
    from segpipe.models import UNet
    from segpipe.predict.checkpoint import save_predict_checkpoint

    torch.manual_seed(0)
    args = {"in_channels": 3, "num_classes": 3, "base_channels": 4, "depth": 2}
    net = UNet(**args)
    with torch.no_grad():
        net.head.weight.mul_(20.0)  # strong enough to vary per pixel
    ckpt = save_predict_checkpoint(
        tmp_path / "r.ckpt", net={"class_path": "segpipe.models.UNet", "init_args": args},
        data={"num_classes": 3, "in_channels": 3, "eval_resize": [24, 32]},
        state_dict={f"net.{k}": v for k, v in net.state_dict().items()})
    src = tmp_path / "in"
    for name, (h, w) in {"a": (45, 37), "b": (64, 96), "c": (64, 96)}.items():
        write_image(src / f"{name}.png", noise_image(h, w, seed=h + w))
    expected = _command_masks(ckpt, src, tmp_path / "out", *extra)
    seg = Segmenter.from_checkpoint(ckpt, device="cpu", **options)
    for name, mask in expected.items():
        assert np.array_equal(seg.predict(src / f"{name}.png"), mask), name
    plain = _command_masks(ckpt, src, tmp_path / "plain")
    assert any(not np.array_equal(plain[n], expected[n]) for n in plain)


def test_bad_tta_scales_are_one_line(tmp_path: Path, unet_ckpt: Path, capsys) -> None:
    src = tmp_path / "in"
    write_image(src / "a.png", noise_image(16, 16))
    code = cli_main(["predict", "--ckpt_path", str(unet_ckpt), "--input", str(src), "--output",
                     str(tmp_path / "out"), *FAST, "--tta_scales", "1", "-0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--tta_scales holds -0.5: each factor of the evaluation size must be a number > 0" in err
