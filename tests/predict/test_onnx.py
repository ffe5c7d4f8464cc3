"""ONNX export with its preprocessing sidecar, and `segpipe predict --onnx` parity with torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segpipe.cli import main as cli_main
from segpipe.data.io import write_image
from segpipe.models import UNet
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
    assert meta["tile"] == 512 and meta["overlap"] == 0.25
    assert "segpipe predict --onnx" in capsys.readouterr().out


def test_onnx_prediction_agrees_with_torch(tmp_path: Path, unet_ckpt: Path) -> None:
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


def test_missing_sidecar_is_a_clear_error(tmp_path: Path, unet_ckpt: Path, capsys) -> None:
    model = tmp_path / "model.onnx"
    assert cli_main(["export", "--ckpt_path", str(unet_ckpt), "--output", str(model)]) == 0
    model.with_suffix(".json").unlink()
    write_image(tmp_path / "in" / "a.png", noise_image(16, 16))
    code = cli_main(["predict", "--onnx", str(model), "--input", str(tmp_path / "in"),
                     "--output", str(tmp_path / "out"), *FAST])
    assert code == 2
    assert "sidecar" in capsys.readouterr().err
