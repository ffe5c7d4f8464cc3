"""Sliding-window inference: tile grid, Gaussian map, strips, equality with whole-image inference."""

from __future__ import annotations

import pytest
import torch

from segpipe.models import UNet
from segpipe.predict.tiling import (
    TensorSource,
    TileGrid,
    gaussian_importance_map,
    gaussian_window,
    predict_tiled,
    sliding_window,
    tile_starts,
)


@pytest.mark.parametrize("length,tile,overlap", [(360, 256, 0.25), (1000, 100, 0.5), (97, 32, 0.0),
                                                 (512, 512, 0.25), (50, 64, 0.25), (33, 32, 0.9)])
def test_tile_starts_cover_the_axis(length: int, tile: int, overlap: float) -> None:
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert starts == sorted(set(starts))
    steps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(0 < s <= max(1, int(tile * (1 - overlap))) for s in steps)


def test_tile_starts_rejects_bad_overlap() -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 10, 1.0)


def test_gaussian_map_as_nnunet() -> None:
    g = gaussian_window(64)
    assert g.max() == pytest.approx(1.0) and g.argmax() in (31, 32)
    assert torch.allclose(g, g.flip(0))  # symmetric
    assert g.min() >= 1e-3  # clipped away from zero
    m = gaussian_importance_map(32, 48)
    assert m.shape == (32, 48) and m.min() > 0
    # sigma = tile / 8: one sigma from the centre the weight is exp(-1/2)
    big = gaussian_window(801, min_value=0.0)  # sigma = 100.125, centre 400
    assert big[400 + 100].item() == pytest.approx(float(torch.exp(torch.tensor(-0.5))), rel=2e-3)


def _pointwise(k: int = 5, c: int = 3):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c, k, 1)
    return lambda x: conv(x).softmax(1)


@torch.no_grad()
@pytest.mark.parametrize("tile,overlap", [(32, 0.25), (64, 0.5), (50, 0.0), (300, 0.25), ((20, 70), 0.3)])
def test_tiled_equals_whole_for_pointwise_model(tile, overlap) -> None:
    fn = _pointwise()
    x = torch.randn(3, 97, 203)
    whole = fn(x[None])[0]
    tiled = predict_tiled(x, fn, 5, tile, overlap, batch_size=3)
    assert torch.allclose(tiled, whole, atol=1e-5)
    assert torch.equal(tiled.argmax(0), whole.argmax(0))


@torch.no_grad()
def test_strips_cover_every_row_once_and_labels_match_probs() -> None:
    fn = _pointwise()
    x = torch.randn(3, 150, 90)
    rows: list[int] = []
    tiles = []
    for fin in sliding_window(TensorSource(x), fn, 5, 40, 0.25, batch_size=2, on_tiles=tiles.append):
        rows += range(fin.row0, fin.row1)
        assert torch.equal(fin.labels(), fin.probs().argmax(0))
        assert torch.equal(fin.labels(10, 50), fin.probs(10, 50).argmax(0))
    assert rows == list(range(150))
    assert sum(tiles) == TileGrid.make(150, 90, 40, 0.25).num_tiles


@torch.no_grad()
def test_tiled_unet_stays_close_to_whole_image() -> None:
    torch.manual_seed(0)
    net = UNet(in_channels=3, num_classes=4, base_channels=4, depth=2).eval()
    fn = lambda x: net(x).softmax(1)  # noqa: E731
    x = torch.randn(3, 128, 192)
    whole = fn(x[None])[0]
    tiled = predict_tiled(x, fn, 4, 64, 0.5, batch_size=4)
    agree = (tiled.argmax(0) == whole.argmax(0)).float().mean().item()
    assert agree > 0.97, agree
    assert (tiled - whole).abs().mean().item() < 0.02
