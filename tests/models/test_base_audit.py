"""Audit tests for segpipe.models.base: padding helpers and the size messages."""

from __future__ import annotations

import re

import pytest
import torch

from segpipe.models import UNet
from segpipe.models.base import check_input, pad_to_multiple


def test_padding_as_large_as_the_image_still_reflects_or_replicates() -> None:
    """An image whose padding equals its size (4 px to a multiple of 8) is padded without
    error, to the multiple, and keeps its pixels in the top-left corner."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    padded, size = pad_to_multiple(x, 8)
    assert padded.shape == (1, 1, 8, 8) and size == (4, 4)
    assert torch.equal(padded[..., :4, :4], x)


@pytest.mark.parametrize("size", [(4, 10), (4, 9), (5, 5), (10, 6)])
def test_the_padded_size_for_a_too_small_input_is_accepted(size: tuple[int, int]) -> None:
    """The size the "needs H and W of at least" message tells the user to pad to is one the
    network takes: at least min_size and a multiple of pad_multiple on both sides."""
    model = UNet(in_channels=3, num_classes=2, base_channels=4, depth=2, norm="group").eval()
    assert (model.min_size, model.pad_multiple) == (8, 4)
    with pytest.raises(ValueError, match="at least 8") as info:
        model(torch.zeros(1, 3, *size))
    h, w = map(int, re.search(r"pad the input to (\d+)x(\d+)", str(info.value)).groups())
    assert h >= max(size[0], 8) and w >= max(size[1], 8)
    assert (h % 4, w % 4) == (0, 0)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, h, w)).shape == (1, 2, h, w)
    padded, _ = pad_to_multiple(torch.zeros(1, 3, *size), 4, min_size=8)
    assert tuple(padded.shape[-2:]) == (h, w)  # the same size segpipe's padding gives


def test_check_input_min_size_message_names_a_multiple() -> None:
    """check_input's padded size for a too-small input is a multiple of ``multiple``."""
    with pytest.raises(ValueError, match=r"pad the input to 64x96 "):
        check_input(torch.zeros(1, 1, 40, 70), "M", 1, 32, min_size=64)
