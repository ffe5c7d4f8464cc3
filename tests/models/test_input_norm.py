"""PerImageStandardize and ``model.input_norm: per_image`` through task, checkpoint and ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.models import PerImageStandardize, UNet


def test_each_image_channel_is_standardised_and_gain_is_undone() -> None:
    x = torch.rand(3, 2, 11, 13)
    y = PerImageStandardize()(x)
    torch.testing.assert_close(y.mean(dim=(2, 3)), torch.zeros(3, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(2, 3), correction=0), torch.ones(3, 2), atol=1e-3, rtol=0)
    # an image twice as dark in one channel (another scanner) gives the same network input
    darker = x * torch.tensor([0.5, 1.0])[None, :, None, None] + 0.1
    torch.testing.assert_close(PerImageStandardize()(darker), y, atol=1e-3, rtol=0)  # eps


def test_constant_planes_become_zero_and_dtype_is_kept() -> None:
    x = torch.full((1, 2, 4, 4), 7.0, dtype=torch.bfloat16)
    y = PerImageStandardize()(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, torch.zeros_like(y))


def _task(input_norm: str):
    from segpipe.tasks import SegmentationTask

    torch.manual_seed(0)
    net = UNet(in_channels=3, num_classes=2, base_channels=4, depth=2)
    return SegmentationTask(net, input_norm=input_norm).eval()


def test_task_standardises_before_padding() -> None:
    task = _task("per_image")
    x = torch.rand(2, 3, 13, 19)  # not a multiple of pad_multiple: stats exclude the padding
    brighter = x * torch.tensor([2.0, 1.0, 3.0])[None, :, None, None] - 0.2
    with torch.no_grad():
        torch.testing.assert_close(task(brighter), task(x), atol=1e-4, rtol=1e-4)
        plain = _task("none")
        assert not torch.allclose(plain(brighter), plain(x), atol=1e-3)


def test_bad_input_norm_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"model.input_norm must be one of \['none', 'per_image'\]"):
        _task("per_patient")


def test_checkpoint_and_onnx_keep_it(tmp_path: Path) -> None:
    from segpipe.predict.checkpoint import load_predictor, save_predict_checkpoint

    args = {"in_channels": 3, "num_classes": 2, "base_channels": 4, "depth": 2}
    task = _task("per_image")
    ckpt = save_predict_checkpoint(
        tmp_path / "m.ckpt", net={"class_path": "segpipe.models.UNet", "init_args": args},
        state_dict=task.state_dict(), input_norm="per_image",
    )
    loaded, config = load_predictor(ckpt)
    assert config.input_norm == "per_image" and isinstance(loaded.input_norm, PerImageStandardize)
    x = torch.rand(1, 3, 13, 19) * 0.3
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), task(x))
    pytest.importorskip("onnxruntime")
    from segpipe.predict.onnx import export_onnx, load_onnx_predictor

    model, _ = export_onnx(ckpt, tmp_path / "m.onnx")
    onnx_task, onnx_config, meta = load_onnx_predictor(model)
    assert meta["input_norm"] == "per_image" == onnx_config.input_norm
    np.testing.assert_allclose(onnx_task(x).numpy(), task(x).detach().numpy(), atol=1e-3, rtol=1e-3)
