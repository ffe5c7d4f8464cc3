"""ONNX export with its preprocessing sidecar, and `segpipe predict --onnx` parity with torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.cli import main as cli_main
from segpipe.data.io import write_image
from segpipe.predict.checkpoint import save_predict_checkpoint
from tests.predict.conftest import COLORS, noise_image

pytest.importorskip("onnxruntime")

FAST = ["--no-progress", "--num-workers", "0", "--accelerator", "cpu", "--format", "mask"]


def test_export_writes_graph_and_sidecar(tmp_path: Path, unet_ckpt: Path, capsys) -> None:
    out = tmp_path / "model.onnx"
    assert cli_main(["export", "--ckpt_path", str(unet_ckpt), "--output", str(out)]) == 0
    assert out.stat().st_size > 1000
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["class_names"] == ["bg", "red", "green"] and meta["class_colors"] == COLORS
    assert meta["mean"] == [0.4, 0.5, 0.6] and meta["std"] == [0.2, 0.25, 0.3]
    assert meta["in_channels"] == 3 and meta["pad_multiple"] == 8
    assert meta["tile"] is None and meta["overlap"] is None  # none recorded: predict's defaults
    assert len(meta["onnx_sha256"]) == 64
    assert "segpipe predict --onnx" in capsys.readouterr().out


def test_the_sidecar_names_the_checkpoint_by_its_absolute_path(
        tmp_path: Path, unet_ckpt: Path, monkeypatch) -> None:
    """A relative path meant nothing once the pair was copied elsewhere."""
    monkeypatch.chdir(unet_ckpt.parent)
    out = tmp_path / "model.onnx"
    assert cli_main(["export", "--ckpt_path", unet_ckpt.name, "--output", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["checkpoint"] == str(unet_ckpt.resolve())


def _fcn_ckpt(path: Path) -> Path:
    """An FCN-8s (skip fusion, grouped fixed upsampling) with random weights."""
    import torch

    from segpipe.models import FCN

    torch.manual_seed(0)
    args = {"in_channels": 3, "num_classes": 3, "variant": "8s", "base_channels": 4}
    net = FCN(**args)
    with torch.no_grad():  # the zero-initialised skip scores take part too
        for name, param in net.named_parameters():
            if "score_pool" in name:
                param.normal_(0, 0.5)
    return save_predict_checkpoint(
        path, net={"class_path": "segpipe.models.FCN", "init_args": args},
        data={"num_classes": 3, "in_channels": 3, "class_colors": COLORS},
        state_dict={f"net.{k}": v for k, v in net.state_dict().items()})


@pytest.mark.parametrize("network", ["unet", "fcn8s"])
def test_onnx_prediction_agrees_with_torch(tmp_path: Path, unet_ckpt: Path, network: str) -> None:
    """U-Net, and FCN-8s (the README promises every model exports; none of it was tested)."""
    if network == "fcn8s":
        unet_ckpt = _fcn_ckpt(tmp_path / "fcn.ckpt")
    src = tmp_path / "in"
    sizes = [(45, 37), (64, 96), (120, 90)]  # odd sizes: pad, predict, crop back
    for i, (h, w) in enumerate(sizes):
        write_image(src / f"img{i}.png", noise_image(h, w, seed=i))
    model = tmp_path / "model.onnx"
    assert cli_main(["export", "--ckpt_path", str(unet_ckpt), "--output", str(model)]) == 0
    torch_out, onnx_out = tmp_path / "torch", tmp_path / "onnx"
    assert cli_main(["predict", "--ckpt_path", str(unet_ckpt), "--input", str(src), "--output",
                     str(torch_out), "--precision", "32-true", *FAST]) == 0
    assert cli_main(["predict", "--onnx", str(model), "--input", str(src), "--output",
                     str(onnx_out), *FAST]) == 0
    same = total = 0
    for i, (h, w) in enumerate(sizes):
        a = np.asarray(Image.open(torch_out / f"img{i}.png"))
        b = np.asarray(Image.open(onnx_out / f"img{i}.png"))
        assert a.shape == b.shape == (h, w)
        same += int((a == b).sum())
        total += a.size
        assert len(np.unique(a)) > 1  # not a degenerate constant prediction
    assert same / total >= 0.999


def test_the_training_dtype_travels_through_the_sidecar(tmp_path: Path) -> None:
    """The sidecar held input_dtype but loading dropped it: ONNX never warned of a uint16
    scene given to a uint8-trained model."""
    from segpipe.predict import Segmenter

    ckpt = save_predict_checkpoint(
        tmp_path / "u8.ckpt", net={"class_path": "segpipe.models.UNet", "init_args": {
            "in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2}},
        data={"input_dtype": "uint8"})
    model = tmp_path / "model.onnx"
    assert cli_main(["export", "--ckpt_path", str(ckpt), "--output", str(model)]) == 0
    seg = Segmenter.from_onnx(model)
    assert seg.config.input_dtype == "uint8"
    assert seg.config.dtype_warning("uint16", "scene.tif") is not None


def test_missing_sidecar_is_a_clear_error(tmp_path: Path, unet_ckpt: Path, capsys) -> None:
    model = tmp_path / "model.onnx"
    assert cli_main(["export", "--ckpt_path", str(unet_ckpt), "--output", str(model)]) == 0
    model.with_suffix(".json").unlink()
    write_image(tmp_path / "in" / "a.png", noise_image(16, 16))
    code = cli_main(["predict", "--onnx", str(model), "--input", str(tmp_path / "in"),
                     "--output", str(tmp_path / "out"), *FAST])
    assert code == 2
    assert "sidecar" in capsys.readouterr().err


def _export(ckpt: Path, out: Path, *extra: str) -> Path:
    assert cli_main(["export", "--ckpt_path", str(ckpt), "--output", str(out), *extra]) == 0
    return out


def test_a_sidecar_that_does_not_fit_its_graph_is_one_line(
    tmp_path: Path, unet_ckpt: Path, capsys
) -> None:
    model = _export(unet_ckpt, tmp_path / "m.onnx")
    side = model.with_suffix(".json")
    good = json.loads(side.read_text())
    write_image(tmp_path / "in" / "a.png", noise_image(16, 16))

    def predict_with(meta: object) -> str:
        side.write_text(json.dumps(meta))
        code = cli_main(["predict", "--onnx", str(model), "--input", str(tmp_path / "in"),
                         "--output", str(tmp_path / "out"), "--overwrite", *FAST])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        return err.strip().splitlines()[-1]

    unsigned = {k: v for k, v in good.items() if k != "onnx_sha256"}  # as a hand edit would
    assert "lacks ['mean']" in predict_with({k: v for k, v in good.items() if k != "mean"})
    # null was taken as "not given" and replaced by the ImageNet mean in silence
    assert "lacks ['mean']; export the model again" in predict_with({**good, "mean": None})
    assert "not a segpipe ONNX sidecar" in predict_with([1, 2])
    assert ("(format 'segpipe-onnx/9', this segpipe reads 'segpipe-onnx/1'); export the model "
            "again with segpipe export") in predict_with({**good, "format": "segpipe-onnx/9"})
    assert "sidecar.symmetries must be among" in predict_with({**unsigned, "symmetries": ["upside"]})
    assert "input_norm must be" in predict_with({**unsigned, "input_norm": "bogus"})
    assert "pad_multiple must be" in predict_with({**unsigned, "pad_multiple": 0})
    # a size step the graph cannot take: onnxruntime's "mismatched dimensions" on every file
    assert "does not run on a 14x21 input, a multiple of the pad_multiple 7" in predict_with(
        {**unsigned, "pad_multiple": 7})
    line = predict_with({**unsigned, "num_classes": 2, "class_names": ["a", "b"],
                         "class_colors": [[0, 0, 0], [9, 9, 9]]})
    assert "has 3 output classes but its sidecar m.json says num_classes=2" in line
    # the graph replaced under a sidecar that names its checksum: another export's pair
    other = _export(unet_ckpt, tmp_path / "other.onnx", "--opset", "13")
    side.write_text(json.dumps(good))
    model.write_bytes(other.read_bytes())
    assert "was written for another graph than" in predict_with(good)
    # a damaged graph under its own sidecar is unreadable, not "another export's pair"
    model.write_bytes(other.read_bytes()[:5000])
    assert "not a readable ONNX model" in predict_with(good)


def test_onnxruntime_prints_nothing_of_its_own_for_a_graph_that_fails(
        tmp_path: Path, unet_ckpt: Path, capfd) -> None:
    """A size step the graph cannot take printed onnxruntime's coloured "[E:onnxruntime:..."
    log line on stderr before segpipe's one line."""
    model = _export(unet_ckpt, tmp_path / "m.onnx")
    side = model.with_suffix(".json")
    meta = {k: v for k, v in json.loads(side.read_text()).items() if k != "onnx_sha256"}
    side.write_text(json.dumps({**meta, "pad_multiple": 7}))
    write_image(tmp_path / "in" / "a.png", noise_image(16, 16))
    capfd.readouterr()
    assert cli_main(["predict", "--onnx", str(model), "--input", str(tmp_path / "in"),
                     "--output", str(tmp_path / "out"), *FAST]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not run on a 14x21 input" in err[0], err


def test_reruns_with_an_onnx_model(tmp_path: Path, unet_ckpt: Path, caplog) -> None:
    """Its sidecar found through a link; a hand-edited sidecar is another model to the outputs
    made before the edit; an empty output is remade, not skipped as done; --accelerator gpu is
    named as ignored (onnxruntime runs on the CPU), not failed for a missing GPU."""
    import os

    model = _export(unet_ckpt, tmp_path / "exp" / "model.onnx")
    link = tmp_path / "models" / "latest.onnx"
    link.parent.mkdir()
    link.symlink_to(os.path.relpath(model, link.parent))
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        write_image(src / f"img{i}.png", noise_image(24, 32, seed=i))
    run = ["predict", "--onnx", str(link), "--input", str(src), "--output", str(out),
           "--no-progress", "--format", "mask"]
    assert cli_main(run) == 0  # the sidecar was looked for beside the link only
    first = (out / "img0.png").read_bytes()

    (out / "img1.png").write_bytes(b"")  # damaged outside segpipe (segpipe writes whole files)
    caplog.clear()
    with caplog.at_level("INFO", logger="segpipe"):
        assert cli_main([*run, "--accelerator", "gpu"]) == 0
    assert "--accelerator gpu is ignored with an ONNX model" in caplog.text
    assert (out / "img1.png").stat().st_size > 0 and (out / "img0.png").read_bytes() == first

    side = model.with_suffix(".json")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "mean": [0.1, 0.2, 0.3]}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="segpipe"):
        assert cli_main(run) == 0
    assert "were made with another checkpoint" in caplog.text  # not skipped in silence


def test_a_broken_onnx_file_and_bad_export_options_are_one_line(
    tmp_path: Path, unet_ckpt: Path, capsys
) -> None:
    model = _export(unet_ckpt, tmp_path / "m.onnx")
    model.write_bytes(model.read_bytes()[:5000])  # truncated
    meta = json.loads(model.with_suffix(".json").read_text())
    meta.pop("onnx_sha256")
    model.with_suffix(".json").write_text(json.dumps(meta))
    write_image(tmp_path / "in" / "a.png", noise_image(16, 16))
    assert cli_main(["predict", "--onnx", str(model), "--input", str(tmp_path / "in"),
                     "--output", str(tmp_path / "out"), *FAST]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    from segpipe import Segmenter
    from segpipe.predict.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        Segmenter.from_onnx(model)
    for extra, message in ((["--opset", "5"], "--opset must be between 9 and"),
                           (["--opset", "99"], "--opset must be between 9 and"),
                           (["--tile", "3"], "--tile must be at least the network's size step 8"),
                           (["--overlap", "5"], "--overlap must be a fraction")):
        assert cli_main(["export", "--ckpt_path", str(unet_ckpt), "--output",
                         str(tmp_path / "new.onnx"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "new.onnx").exists()
    # an existing export is not replaced without --overwrite
    assert cli_main(["export", "--ckpt_path", str(unet_ckpt), "--output", str(model)]) == 2
    assert "already exist" in capsys.readouterr().err
    assert cli_main(["export", "--ckpt_path", str(unet_ckpt), "--output", str(model),
                     "--overwrite"]) == 0


def test_recorded_tile_and_overlap_are_the_onnx_defaults(tmp_path: Path, unet_ckpt: Path) -> None:
    from segpipe import Segmenter

    image = noise_image(150, 170, seed=3)
    write_image(tmp_path / "in" / "big.png", image)
    model = _export(unet_ckpt, tmp_path / "m.onnx", "--tile", "64", "--overlap", "0.5")
    seg = Segmenter.from_onnx(model, device="cpu")
    assert (seg.tile, seg.overlap) == (64, 0.5)
    tiled = Segmenter.from_checkpoint(unet_ckpt, device="cpu", precision="32-true", tile=64,
                                      overlap=0.5).predict(image)
    assert (seg.predict(image) == tiled).mean() >= 0.999
    assert cli_main(["predict", "--onnx", str(model), "--input", str(tmp_path / "in"),
                     "--output", str(tmp_path / "out"), *FAST]) == 0
    assert (np.asarray(Image.open(tmp_path / "out" / "big.png")) == tiled).mean() >= 0.999
    # a sidecar from before the checksum recorded tile 512 by default: not taken as a choice
    side = model.with_suffix(".json")
    old = {k: v for k, v in json.loads(side.read_text()).items() if k != "onnx_sha256"}
    side.write_text(json.dumps({**old, "tile": 512, "overlap": 0.25}))
    assert Segmenter.from_onnx(model).tile is None
    with pytest.raises(ValueError, match="runs on the CPU"):
        Segmenter.from_onnx(model, device="cuda")
    with pytest.raises(TypeError, match="folded its BatchNorm statistics"):
        seg.adapt_batchnorm([image])
    with pytest.raises(ValueError, match="tile must be at least the network's size step 8"):
        seg.predict(image, tile=3)


def test_onnx_option_takes_an_onnx_file(tmp_path: Path, unet_ckpt: Path, capsys) -> None:
    write_image(tmp_path / "in" / "a.png", noise_image(16, 16))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", "--onnx", str(unet_ckpt), "--input", str(tmp_path / "in"),
                  "--output", str(tmp_path / "out"), *FAST])
    assert exit_info.value.code == 2
    assert "--onnx takes a model.onnx written by segpipe export" in capsys.readouterr().err


def test_a_missing_onnx_package_is_an_import_error_and_one_line(
        tmp_path: Path, unet_ckpt: Path, monkeypatch, capsys) -> None:
    """from_onnx raised SystemExit (a notebook's `except Exception` could not catch it; the
    command exited 1), and export blamed the opset for a missing onnx package."""
    from segpipe.errors import MissingExtraError
    from segpipe.predict import Segmenter

    model = _export(unet_ckpt, tmp_path / "m.onnx")
    write_image(tmp_path / "in" / "a.png", noise_image(16, 16))
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # not installed
    with pytest.raises(ImportError, match=r"needs onnxruntime: pip install 'segpipe\[onnx\]'"):
        Segmenter.from_onnx(model)
    assert cli_main(["predict", "--onnx", str(model), "--input", str(tmp_path / "in"),
                     "--output", str(tmp_path / "out"), *FAST]) == 2
    assert "needs onnxruntime: pip install" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(MissingExtraError):
        from segpipe.predict.onnx import export_onnx

        export_onnx(unet_ckpt, tmp_path / "n.onnx")
    assert cli_main(["export", "--ckpt_path", str(unet_ckpt), "--output",
                     str(tmp_path / "n.onnx")]) == 2
    err = capsys.readouterr().err
    assert "ONNX export needs the onnx package: pip install 'segpipe[onnx]'" in err
    assert "opset" not in err


def test_an_architecture_onnx_cannot_express_is_one_line(tmp_path: Path, capfd) -> None:
    """PSPNet pools to a fixed grid: torch printed its whole TorchScript graph (hundreds of
    lines) on stdout before segpipe's one-line error, which gave no reason."""
    ckpt = save_predict_checkpoint(
        tmp_path / "psp.ckpt",
        net={"class_path": "segpipe.models.SmpModel",
             "init_args": {"arch": "pspnet", "encoder_name": "resnet18", "encoder_weights": None,
                           "in_channels": 3, "num_classes": 3}},
        data={"num_classes": 3, "in_channels": 3})
    capfd.readouterr()
    rc = cli_main(["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "psp.onnx")])
    out, err = capfd.readouterr()
    assert rc == 2
    assert "Torch IR graph" not in out and len(out.splitlines()) <= 2
    assert "adaptive_avg_pool2d" in err and "pools to a fixed grid, as PSPNet" in err
    assert "Please feel free to request support" not in err
    assert not (tmp_path / "psp.onnx").exists()
