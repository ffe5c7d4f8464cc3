"""Fixtures for the prediction tests: checkpoints of tiny networks, small inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.models import UNet
from segpipe.predict.checkpoint import save_predict_checkpoint

COLORS = [[10, 20, 30], [200, 0, 0], [0, 200, 0]]


def make_ckpt(path: Path, net: str, init_args: dict, **data) -> Path:
    """A checkpoint of ``net`` (a class path) with data hyperparameters ``data``."""
    data.setdefault("num_classes", init_args.get("num_classes", 3))
    data.setdefault("in_channels", init_args.get("in_channels", 3))
    return save_predict_checkpoint(path, net={"class_path": net, "init_args": init_args}, data=data)


@pytest.fixture(scope="session")
def pointwise_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1×1-conv model, 3 bands -> 3 classes, CamVid-like colours."""
    return make_ckpt(
        tmp_path_factory.mktemp("ckpt") / "pointwise.ckpt", "tests.predict.nets.PointwiseNet",
        {"in_channels": 3, "num_classes": 3}, class_colors=COLORS,
        class_names=["bg", "red", "green"],
    )


@pytest.fixture(scope="session")
def threshold_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Deterministic model: class from the first band's [0, 1] value (mean 0, std 1)."""
    return make_ckpt(
        tmp_path_factory.mktemp("ckpt") / "threshold.ckpt", "tests.predict.nets.ThresholdNet",
        {"in_channels": 3, "num_classes": 3}, class_colors=COLORS, mean=[0.0] * 3, std=[1.0] * 3,
    )


def noise_image(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    """Random uint8 (h, w, c) image."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.fixture(scope="session")
def unet_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real U-Net (random weights, a head strong enough to vary per pixel), odd normalisation."""
    torch.manual_seed(0)
    args = {"in_channels": 3, "num_classes": 3, "base_channels": 8, "depth": 3}
    net = UNet(**args)
    with torch.no_grad():
        net.head.weight.mul_(20.0)
    return save_predict_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "unet.ckpt",
        net={"class_path": "segpipe.models.UNet", "init_args": args},
        data={"num_classes": 3, "in_channels": 3, "class_colors": COLORS,
              "class_names": ["bg", "red", "green"], "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]},
        state_dict={f"net.{k}": v for k, v in net.state_dict().items()},
    )
