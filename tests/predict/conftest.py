"""Fixtures for the prediction tests: checkpoints of tiny networks, small inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
