"""scripts/analyse_errors.py: the threshold sweep and the predicted/true shares, with
unlabelled pixels and undecided probabilities."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from tests.predict.conftest import make_ckpt
from tests.scripts import load_script


class UndecidedNet(nn.Module):
    """Equal logits for every class: each class's probability is exactly 1 / num_classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.pad_multiple = 8
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        return x.new_zeros((n, self.num_classes, h, w)) + self.dummy


def _pair(tmp_path: Path, image: np.ndarray, truth: np.ndarray) -> list[str]:
    images, masks = tmp_path / "image", tmp_path / "label"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(image).save(images / "a.png")
    Image.fromarray(truth).save(masks / "a.png")
    return ["--images", str(images), "--masks", str(masks)]


def _sweep(out: str) -> dict[str, str]:
    line = re.search(r"probability >= t: (.*)", out).group(1)
    return dict(re.findall(r"([\d.]+): ([\d.]+ %)", line))


def test_unlabelled_pixels_count_in_no_share_and_no_threshold(tmp_path: Path, capsys) -> None:
    """Pixels of the ignore index are left out of the predicted-positive share and of the
    error at every threshold, as they are of the pixel error."""
    ckpt = make_ckpt(tmp_path / "t.ckpt", "tests.predict.nets.ThresholdNet",
                     {"in_channels": 1, "num_classes": 2}, mean=[0.0], std=[1.0],
                     ignore_index=255, class_names=["background", "cell"])
    image = np.full((8, 8), 64, dtype=np.uint8)  # predicted: background in columns 0-3 ...
    image[:, 4:] = 191  # ... cell in columns 4-7
    truth = np.ones((8, 8), dtype=np.uint8)  # truly cell everywhere ...
    truth[:, 6:] = 255  # ... but columns 6-7 are unlabelled: 48 scored pixels
    load_script("analyse_errors").main(["--ckpt", str(ckpt), *_pair(tmp_path, image, truth)])
    out = capsys.readouterr().out
    assert "all: pixel error 66.67 % over 48 pixels" in out, out  # columns 0-3 wrong
    assert "cell predicted on 33.3 % of the pixels, true on 100.0 %" in out, out  # columns 4-5
    assert set(_sweep(out).values()) == {"66.67 %"}, out


def test_a_probability_equal_to_the_threshold_counts_as_positive(tmp_path: Path, capsys) -> None:
    """The sweep predicts the positive class where its probability reaches t (>= t): an
    undecided model (probability 0.5 everywhere) predicts it everywhere up to t = 0.5, nowhere
    above."""
    ckpt = make_ckpt(tmp_path / "u.ckpt", "tests.test_analyse_errors_audit.UndecidedNet",
                     {"in_channels": 1, "num_classes": 2}, mean=[0.0], std=[1.0])
    truth = np.zeros((8, 8), dtype=np.uint8)
    truth[:, :2] = 1  # 16 positive pixels of 64
    load_script("analyse_errors").main(
        ["--ckpt", str(ckpt), *_pair(tmp_path, np.zeros((8, 8), np.uint8), truth)])
    sweep = _sweep(capsys.readouterr().out)
    assert sweep["0.45"] == sweep["0.5"] == "75.00 %"  # positive everywhere: 48 wrong
    assert sweep["0.55"] == sweep["0.7"] == "25.00 %"  # positive nowhere: 16 wrong
