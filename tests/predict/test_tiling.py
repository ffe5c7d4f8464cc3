"""Sliding-window inference: tile grid, Gaussian map, strips, blocks, equality with whole-image
inference."""

from __future__ import annotations

import pytest
import torch

from segpipe.models import UNet
from segpipe.predict.tiling import (
    TensorSource,
    TileGrid,
    column_blocks,
    covering_tiles,
    gaussian_importance_map,
    gaussian_window,
    predict_tiled,
    same_shape_batches,
    sliding_window_blocks,
    spread_windows,
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


def test_tile_starts_cover_every_axis_flush() -> None:
    """Rounded, not floored: a floored start left the last pixel of 31 of these lengths (283,
    475, 524, ... with tile 32, overlap 0.25) under no tile, its probabilities NaN."""
    for tile in (32, 64, 128):
        for overlap in (0.0, 0.25, 0.5):
            stride = max(1, int(tile * (1 - overlap)))
            for length in range(tile + 1, 1200):
                starts = tile_starts(length, tile, overlap)
                assert starts[0] == 0 and starts[-1] + tile == length, (length, tile, overlap)
                assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))


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
    for blk in sliding_window_blocks(TensorSource(x), fn, 5, 40, 0.25, batch_size=2,
                                     on_tiles=tiles.append, block_cols=90):
        assert (blk.col0, blk.col1) == (0, 90)  # one block per strip
        rows += range(blk.row0, blk.row1)
        assert torch.equal(blk.labels(), blk.probs().argmax(0))
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


# ------------------------------------------------------------------ blocks
class _RecordingSource(TensorSource):
    """A TensorSource that records the windows read."""

    def __init__(self, image: torch.Tensor) -> None:
        super().__init__(image)
        self.windows: list[tuple[int, int, int, int]] = []

    def window(self, row0: int, row1: int, col0: int, col1: int) -> torch.Tensor:
        self.windows.append((row0, row1, col0, col1))
        return super().window(row0, row1, col0, col1)


def _assemble_blocks(x: torch.Tensor, fn, k: int, tile, overlap: float, batch_size: int,
                     block_cols: int, source: TensorSource | None = None):
    """(K, H, W) probabilities and labels from the blocks; checks each pixel comes once."""
    h, w = x.shape[-2:]
    probs = torch.full((k, h, w), float("nan"))
    labels = torch.full((h, w), -1, dtype=torch.int64)
    seen = torch.zeros((h, w), dtype=torch.int32)
    order = []
    for blk in sliding_window_blocks(source or TensorSource(x), fn, k, tile, overlap, batch_size,
                                     block_cols=block_cols):
        order.append((blk.row0, blk.col0))
        probs[:, blk.row0 : blk.row1, blk.col0 : blk.col1] = blk.probs()
        labels[blk.row0 : blk.row1, blk.col0 : blk.col1] = blk.labels()
        seen[blk.row0 : blk.row1, blk.col0 : blk.col1] += 1
    assert (seen == 1).all()
    assert order == sorted(order)  # strips top to bottom, blocks left to right
    return probs, labels


def _tiny_unet():
    torch.manual_seed(0)
    net = UNet(in_channels=3, num_classes=4, base_channels=4, depth=2).eval()
    return lambda x: net(x).softmax(1)  # noqa: E731


@torch.no_grad()
@pytest.mark.parametrize("shape,tile,overlap,block_cols", [
    ((150, 230), 64, 0.25, 100),     # blocks of one tile
    ((150, 230), 64, 0.25, 150),     # blocks of two tiles, carried halo
    ((150, 230), 64, 0.5, 4096),     # one block per strip
    ((97, 203), (32, 48), 0.0, 96),  # no overlap: blocks meet on tile edges
    ((130, 260), 40, 0.7, 90),       # overlap above 1/2: three strips share rows
    ((40, 300), 64, 0.25, 128),      # one strip (tile clamped to the height)
    ((150, 40), 64, 0.25, 128),      # one column (tile clamped to the width): taller than wide
    ((203, 97), (48, 32), 0.25, 64),  # tiles taller than wide
])
def test_blocks_equal_in_memory_predict_tiled(shape, tile, overlap, block_cols) -> None:
    """Same tiles, same Gaussian weights, same summation order: the blocked path gives the
    in-memory sliding window's probabilities (float rounding aside) with a real (tiny) U-Net."""
    fn = _tiny_unet()
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    ref = predict_tiled(x, fn, 4, tile, overlap, batch_size=3)
    probs, labels = _assemble_blocks(x, fn, 4, tile, overlap, 3, block_cols)
    assert torch.allclose(probs, ref, atol=1e-6, rtol=0)
    top2 = ref.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5  # not a near-tie
    assert torch.equal(labels[clear], ref.argmax(0)[clear])
    assert torch.equal(labels, probs.argmax(0))


@torch.no_grad()
def test_blocks_are_bit_identical_for_a_batch_independent_net() -> None:
    fn = _pointwise()
    x = torch.randn(3, 170, 333)
    ref = predict_tiled(x, fn, 5, 48, 0.25, batch_size=4)
    probs, _ = _assemble_blocks(x, fn, 5, 48, 0.25, 2, 100)
    assert torch.equal(probs, ref)


@torch.no_grad()
def test_blocks_read_bounded_windows_and_count_every_tile_once() -> None:
    fn = _pointwise()
    x = torch.randn(3, 200, 1000)
    src = _RecordingSource(x)
    tiles: list[int] = []
    grid = TileGrid.make(200, 1000, 64, 0.25)
    for _ in sliding_window_blocks(src, fn, 5, 64, 0.25, batch_size=3, block_cols=200,
                                   on_tiles=tiles.append):
        pass
    assert sum(tiles) == grid.num_tiles  # nothing computed twice
    assert max(tiles) <= 3
    assert all(c1 - c0 <= 200 and r1 - r0 == 64 for r0, r1, c0, c1 in src.windows)
    assert len(src.windows) == len(grid.ys) * len(column_blocks(grid.xs, 64, 200))


@pytest.mark.parametrize("xs,tw,cols,expected", [
    ([0, 48, 96, 136], 64, 120, [(0, 2), (2, 4)]),
    ([0, 48, 96, 136], 64, 10, [(0, 1), (1, 2), (2, 3), (3, 4)]),  # at least one tile
    ([0, 48, 96, 136], 64, 4096, [(0, 4)]),
    ([0], 64, 32, [(0, 1)]),
])
def test_column_blocks_partition_the_tiles(xs, tw, cols, expected) -> None:
    assert column_blocks(xs, tw, cols) == expected


def test_covering_tiles_cover_every_pixel_without_overlap_but_at_the_edges() -> None:
    image = torch.arange(2 * 100 * 90, dtype=torch.float32).reshape(2, 100, 90)
    assert covering_tiles(image, None)[0] is image and covering_tiles(image, 100)[0] is image
    tiles = covering_tiles(image, 64)  # rows 0, 36 and columns 0, 26: flush with the edges
    assert len(tiles) == 4 and all(t.shape == (2, 64, 64) for t in tiles)
    torch.testing.assert_close(tiles[3], image[:, 36:, 26:])
    seen = torch.zeros(100, 90, dtype=torch.bool)
    for r in (0, 36):
        for c in (0, 26):
            seen[r:r + 64, c:c + 64] = True
    assert bool(seen.all())
    assert len(covering_tiles(torch.zeros(1, 130, 40), 64)) == 3  # rows 0, 64, 66; one column


def test_same_shape_batches_stack_equal_shapes_as_soon_as_full() -> None:
    a, b = torch.zeros(3, 4, 4), torch.ones(3, 5, 4)
    shapes = [tuple(x.shape) for x in same_shape_batches([a, b, a, a, b, a], 2)]
    assert shapes == [(2, 3, 4, 4), (2, 3, 5, 4), (2, 3, 4, 4)]
    assert [x.shape[0] for x in same_shape_batches([a, b, a], 2)] == [2, 1]


def test_spread_windows_sample_the_covering_grid_evenly() -> None:
    # Small enough: every window covering_tiles would cut, clipped to the image.
    assert spread_windows(40, 56, 16, 32) == [
        (r, r + 16, c, c + 16) for r in (0, 16, 24) for c in (0, 16, 32, 40)]
    assert spread_windows(30, 20, 512, 32) == [(0, 30, 0, 20)]
    # A 128 x 128 grid of 512 px windows: 5 rows x 6 columns of it, spread over the whole raster.
    windows = spread_windows(65536, 65536, 512, 32)
    rows, cols = sorted({w[0] for w in windows}), sorted({w[2] for w in windows})
    assert len(windows) == 30 and len(rows) == 5 and len(cols) == 6
    assert rows[0] < 65536 // 5 and rows[-1] > 65536 * 4 // 5  # not only the top
    assert cols[0] < 65536 // 6 and cols[-1] > 65536 * 5 // 6
    assert all(r % 512 == 0 and c % 512 == 0 and r1 - r == c1 - c == 512
               for r, r1, c, c1 in windows)
    # A strip one window high: up to `most` windows along it.
    assert len(spread_windows(400, 65536, 512, 32)) == 32
