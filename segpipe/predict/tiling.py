"""Sliding-window inference with Gaussian blending (as nnU-Net), in strips of rows or in blocks.

Tiles of ``tile × tile`` pixels overlap by ``overlap`` (a fraction of the tile); each tile's class
probabilities are weighted by a Gaussian importance map (``sigma = tile / 8``, peak 1, clipped
away from zero) and the weighted sums are divided by the summed weights. Because the tile grid is
a Cartesian product and the importance map is separable, the summed weight of a pixel is
``wy[row] * wx[col]``: only two vectors are kept, never a weight image.

:func:`sliding_window_blocks` processes one row of tiles (a strip) at a time, split into column
blocks of at most ``block_cols`` columns (whole tiles; at least one tile). The block's
accumulator holds ``num_classes × tile × block_cols`` floats; what the block's tiles add to
columns the next block's tiles also cover (the horizontal halo, under one tile wide) is carried
to the next block, and what they add to rows the next strip's tiles also cover (the vertical
halo, the ``tile - stride`` overlap rows) is kept in a full-width band for the next strip. The
blocks are yielded left to right, strip by strip (:class:`FinishedBlock`), with the sums added in
the same order whatever the block size (tile rows top to bottom, tiles left to right), so the
results do not depend on it. Nothing is computed twice. Memory: ``num_classes × 4 bytes × (tile ×
block_cols + overlap_rows × width)``: the part that grows with the width is the overlap rows
only (a quarter of a strip at ``overlap=0.25``). The raster path of ``segpipe predict`` reads
each block's window from the file; :func:`predict_tiled` (in-memory images, whose output is
whole anyway) uses one block per strip.

The caller supplies pixels through a :class:`WindowSource`, so the same code serves in-memory
tensors and rasters read by windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from segpipe.decision import decide

__all__ = [
    "FinishedBlock",
    "ProbFn",
    "TensorSource",
    "TileGrid",
    "WindowSource",
    "column_blocks",
    "covering_tiles",
    "same_shape_batches",
    "spread_windows",
    "gaussian_importance_map",
    "gaussian_window",
    "predict_tiled",
    "raster_by_windows",
    "sliding_window_blocks",
    "tile_starts",
]

#: Maps a batch of normalised tiles (N, C, h, w) to class probabilities (N, K, h, w).
ProbFn = Callable[[Tensor], Tensor]


def raster_by_windows(info: Any, resized: bool, chip_size: int) -> bool:
    """Whether ``segpipe predict`` (and the Python API, to give the same masks) predicts a file
    as a raster, by windows at native resolution.

    Args:
        info: The file's raster header (:func:`~segpipe.data.io.probe_raster`), or None for a
            file rasterio does not read by windows (never a raster).
        resized: Whether images are predicted at the checkpoint's ``eval_resize``.
        chip_size: The largest side of a georeferenced raster predicted whole and resized as
            ``segpipe test`` scores it (a chip); TIFFs without georeference always are.

    Returns:
        True for every raster without ``resized``, else for georeferenced rasters larger than
        ``chip_size``.
    """
    if info is None:
        return False
    return not resized or (info.georeferenced and max(info.height, info.width) > chip_size)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles covering ``[0, length)``, evenly spread as in nnU-Net.

    The step is at most ``tile * (1 - overlap)``; the first tile starts at 0 and the last ends
    at ``length``. When ``tile >= length`` there is one tile (the caller clamps its size).

    Args:
        length: Image size along the axis.
        tile: Tile size along the axis.
        overlap: Fraction of the tile shared by neighbours, in ``[0, 1)``.

    Returns:
        Sorted start offsets.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if tile >= length:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    step = (length - tile) / (n - 1)
    return [int(round(i * step)) for i in range(n)]


@dataclass(frozen=True)
class TileGrid:
    """Tile positions for an image.

    Attributes:
        height: Image rows.
        width: Image columns.
        tile_h: Tile rows (the requested tile clamped to the image).
        tile_w: Tile columns.
        ys: Row offsets of the tile rows.
        xs: Column offsets of the tile columns.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @classmethod
    def make(
        cls, height: int, width: int, tile: int | Sequence[int], overlap: float
    ) -> TileGrid:
        """Grid for an ``height × width`` image with square (int) or ``(h, w)`` tiles."""
        th, tw = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
        th, tw = min(th, height), min(tw, width)
        return cls(
            height, width, th, tw,
            tuple(tile_starts(height, th, overlap)), tuple(tile_starts(width, tw, overlap)),
        )

    @property
    def num_tiles(self) -> int:
        """Number of tiles."""
        return len(self.ys) * len(self.xs)


def gaussian_window(size: int, sigma_scale: float = 1.0 / 8, min_value: float = 1e-3) -> Tensor:
    """One axis of nnU-Net's Gaussian importance map.

    Args:
        size: Tile size along the axis.
        sigma_scale: ``sigma = size * sigma_scale`` (nnU-Net: 1/8).
        min_value: Floor of the window (keeps every pixel's weight above zero).

    Returns:
        float32 (size,) with peak 1 at the centre.
    """
    centre = (size - 1) / 2.0
    sigma = max(size * sigma_scale, 1e-6)
    pos = torch.arange(size, dtype=torch.float64)
    g = torch.exp(-0.5 * ((pos - centre) / sigma) ** 2)
    g = g / g.max()
    return g.clamp_min(min_value).to(torch.float32)


def gaussian_importance_map(
    tile_h: int, tile_w: int, sigma_scale: float = 1.0 / 8, min_value: float = 1e-3
) -> Tensor:
    """The 2-D importance map, the outer product of two :func:`gaussian_window`.

    Returns:
        float32 (tile_h, tile_w), peak 1, minimum ``min_value ** 2``.
    """
    return torch.outer(
        gaussian_window(tile_h, sigma_scale, min_value),
        gaussian_window(tile_w, sigma_scale, min_value),
    )


class WindowSource(Protocol):
    """Where :func:`sliding_window_blocks` gets its pixels.

    Attributes:
        height: Image rows.
        width: Image columns.
    """

    height: int
    width: int

    def window(self, row0: int, row1: int, col0: int, col1: int) -> Any:
        """Load rows ``[row0, row1)`` of columns ``[col0, col1)``."""

    def tile(self, window: Any, col0: int, col1: int) -> Tensor:
        """Normalised (C, rows, col1 - col0) float32 tile cut from ``window``; the columns
        count from the window's first column."""


class TensorSource:
    """A :class:`WindowSource` over an in-memory (C, H, W) tensor."""

    def __init__(self, image: Tensor) -> None:
        self.image = image
        self.height, self.width = int(image.shape[-2]), int(image.shape[-1])

    def window(self, row0: int, row1: int, col0: int, col1: int) -> Tensor:
        return self.image[:, row0:row1, col0:col1]

    def tile(self, window: Tensor, col0: int, col1: int) -> Tensor:
        return window[:, :, col0:col1]


@dataclass
class FinishedBlock:
    """Rows ``[row0, row1)`` of columns ``[col0, col1)`` whose blending is complete.

    Valid only until the generator that produced it advances (its tensors are views of the
    accumulator).

    Attributes:
        row0: First image row.
        row1: End row (exclusive).
        col0: First image column.
        col1: End column (exclusive).
        window: What ``source.window()`` returned for the block's tiles; it starts at
            ``(row0, col0)`` and covers at least the finished rows and columns.
        acc: (K, row1 - row0, col1 - col0) Gaussian-weighted probability sums.
        weight_y: (row1 - row0,) summed row weights.
        weight_x: (col1 - col0,) summed column weights.
    """

    row0: int
    row1: int
    col0: int
    col1: int
    window: Any
    acc: Tensor
    weight_y: Tensor
    weight_x: Tensor

    def probs(self) -> Tensor:
        """Blended probabilities: float32 (K, rows, cols)."""
        return self.acc / (self.weight_y[:, None] * self.weight_x[None, :])

    def labels(self, positive_threshold: float | None = None) -> Tensor:
        """Labels: int64 (rows, cols), the arg-max class or, with ``positive_threshold``,
        :func:`segpipe.decision.decide`'s. The weight of a pixel is the same for every class,
        so either decision on the weighted sums is that on the probabilities."""
        return decide(self.acc, positive_threshold, dim=0)


def _axis_weights(length: int, starts: Sequence[int], window: Tensor) -> Tensor:
    out = torch.zeros(length, dtype=torch.float32)
    size = window.shape[0]
    for s in starts:
        out[s : s + size] += window
    return out


def column_blocks(
    xs: Sequence[int], tile_w: int, block_cols: int
) -> list[tuple[int, int]]:
    """Split a row of tiles into consecutive groups spanning at most ``block_cols`` columns.

    Args:
        xs: Tile column offsets (sorted).
        tile_w: Tile width.
        block_cols: Most columns a group's tiles may span (at least one tile per group).

    Returns:
        ``(first, end)`` index ranges into ``xs``, left to right, covering every tile once.
    """
    limit = max(int(block_cols), tile_w)
    groups: list[tuple[int, int]] = []
    first = 0
    for b in range(1, len(xs) + 1):
        if b == len(xs) or xs[b] + tile_w - xs[first] > limit:
            groups.append((first, b))
            first = b
    return groups


def sliding_window_blocks(
    source: WindowSource,
    prob_fn: ProbFn,
    num_classes: int,
    tile: int | Sequence[int],
    overlap: float = 0.25,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    on_tiles: Callable[[int], None] | None = None,
    block_cols: int = 4096,
) -> Iterator[FinishedBlock]:
    """Gaussian-blended sliding-window probabilities, yielded block by block.

    Memory is bounded by the block except for a full-width band of the overlap rows (see the
    module docstring); the results do not depend on ``block_cols``.

    Args:
        source: Pixels (see :class:`WindowSource`).
        prob_fn: (N, C, h, w) normalised tiles -> (N, K, h, w) probabilities.
        num_classes: K.
        tile: Tile size, int or ``(h, w)``; clamped to the image.
        overlap: Fraction of a tile shared with its neighbour, in ``[0, 1)``.
        batch_size: Tiles per ``prob_fn`` call (a batch never spans two blocks).
        device: Device of the tiles and the accumulators (CPU when None).
        on_tiles: Called with the number of tiles done after each batch (progress bars).
        block_cols: Most columns a block's tiles span (at least one tile).

    Yields:
        :class:`FinishedBlock`, strip by strip top to bottom and left to right within a strip;
        the blocks of a strip share its rows and cover ``[0, width)`` once, so every pixel is
        yielded exactly once. A strip is complete when a block ends at ``width``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    grid = TileGrid.make(source.height, source.width, tile, overlap)
    th, tw, height, width = grid.tile_h, grid.tile_w, grid.height, grid.width
    ys, xs = grid.ys, grid.xs
    gy, gx = gaussian_window(th), gaussian_window(tw)
    importance = torch.outer(gy, gx).to(device)
    weight_y = _axis_weights(height, ys, gy).to(device)
    weight_x = _axis_weights(width, xs, gx).to(device)
    groups = column_blocks(xs, tw, block_cols)
    spans = [(xs[a], xs[b - 1] + tw, xs[b] if b < len(xs) else width) for a, b in groups]
    acc_buf = torch.empty(
        (num_classes, th, max(hi - lo for lo, hi, _ in spans)), dtype=torch.float32, device=device
    )
    # Rows the next strip's tiles also cover: what this strip's tiles add there waits here.
    band_rows = max((ys[i - 1] + th - ys[i] for i in range(1, len(ys))), default=0)
    band = (
        torch.empty((num_classes, band_rows, width), dtype=torch.float32, device=device)
        if band_rows > 0 else None
    )
    batch_size = max(1, int(batch_size))
    for i, y in enumerate(ys):
        pending = ys[i - 1] + th - y if i > 0 else 0  # rows of `band` that belong to this strip
        y_next = ys[i + 1] if i + 1 < len(ys) else height
        done = y_next - y
        carry: Tensor | None = None  # columns [lo, carry_hi) of the previous block, all rows
        carry_hi = 0
        for (a, b), (lo, hi, fin_hi) in zip(groups, spans):
            acc = acc_buf[:, :, : hi - lo]
            acc.zero_()
            kept = 0
            if carry is not None:
                kept = carry_hi - lo
                acc[:, :, :kept].copy_(carry)
            if pending > 0 and band is not None:
                acc[:, :pending, kept:].copy_(band[:, :pending, lo + kept : hi])
            window = source.window(y, y + th, lo, hi)
            for s in range(a, b, batch_size):
                cols = xs[s : min(b, s + batch_size)]
                x = torch.stack([source.tile(window, c - lo, c - lo + tw) for c in cols])
                probs = prob_fn(x.to(device)).float()
                if probs.shape[1] != num_classes or probs.shape[-2:] != (th, tw):
                    raise ValueError(
                        f"prob_fn returned {tuple(probs.shape)} for tiles of {tuple(x.shape)}; "
                        f"expected (N, {num_classes}, {th}, {tw})"
                    )
                for j, c in enumerate(cols):
                    acc[:, :, c - lo : c - lo + tw].addcmul_(probs[j], importance)
                if on_tiles is not None:
                    on_tiles(len(cols))
            # Columns [fin_hi, hi) are also covered by the next block's tiles: carry them.
            carry = acc[:, :, fin_hi - lo :].clone() if fin_hi < hi else None
            carry_hi = hi
            if i + 1 < len(ys) and band is not None and done < th:
                # Rows [y_next, y + th) are also covered by the next strip's tiles. The band's
                # columns [lo, fin_hi) of this strip were read above (or by earlier blocks).
                band[:, : th - done, lo:fin_hi].copy_(acc[:, done:, : fin_hi - lo])
            yield FinishedBlock(
                y, y_next, lo, fin_hi, window, acc[:, :done, : fin_hi - lo],
                weight_y[y:y_next], weight_x[lo:fin_hi],
            )


def predict_tiled(
    image: Tensor,
    prob_fn: ProbFn,
    num_classes: int,
    tile: int | Sequence[int],
    overlap: float = 0.25,
    batch_size: int = 4,
    on_tiles: Callable[[int], None] | None = None,
) -> Tensor:
    """Sliding-window probabilities of one in-memory image.

    Args:
        image: (C, H, W) normalised image (on the device to compute on).
        prob_fn: See :func:`sliding_window_blocks`.
        num_classes: K.
        tile: Tile size.
        overlap: Tile overlap fraction.
        batch_size: Tiles per batch.
        on_tiles: Progress callback.

    Returns:
        float32 (K, H, W) probabilities on ``image``'s device.
    """
    height, width = int(image.shape[-2]), int(image.shape[-1])
    out = torch.empty((num_classes, height, width), dtype=torch.float32, device=image.device)
    for blk in sliding_window_blocks(
        TensorSource(image), prob_fn, num_classes, tile, overlap, batch_size,
        device=image.device, on_tiles=on_tiles, block_cols=width,
    ):
        out[:, blk.row0 : blk.row1, blk.col0 : blk.col1] = blk.probs()
    return out


def _covering_starts(length: int, tile: int) -> list[int]:
    """Starts of the non-overlapping ``tile`` windows covering ``length`` pixels, the last one
    flush with the end (one window at 0 when ``length <= tile``)."""
    return sorted({*range(0, max(length - tile, 0) + 1, tile), max(length - tile, 0)})


def covering_tiles(image: Tensor, tile: int | None) -> list[Tensor]:
    """``image`` (C, H, W) whole when it fits in ``tile`` (or ``tile`` is None), else the
    non-overlapping ``tile`` squares that cover it, the last row and column of squares flush
    with its edges (views, no copies)."""
    h, w = image.shape[-2:]
    if tile is None or (h <= tile and w <= tile):
        return [image]
    return [image[..., r:r + tile, c:c + tile]
            for r in _covering_starts(h, tile) for c in _covering_starts(w, tile)]


def spread_windows(height: int, width: int, tile: int, most: int) -> list[tuple[int, int, int, int]]:
    """At most ``most`` of the windows :func:`covering_tiles` would cut, spread evenly over the
    image: every ``k``-th row and column of the grid, so a sample of a large raster sees all of
    it, not its top.

    Returns:
        ``(row0, row1, col0, col1)`` windows, row by row.
    """
    rows, cols = _covering_starts(height, tile), _covering_starts(width, tile)
    if len(rows) * len(cols) > most:
        keep_rows = max(1, min(len(rows), math.isqrt(most * len(rows) // len(cols))))
        keep_cols = max(1, min(len(cols), most // keep_rows))
        rows = [rows[(2 * i + 1) * len(rows) // (2 * keep_rows)] for i in range(keep_rows)]
        cols = [cols[(2 * j + 1) * len(cols) // (2 * keep_cols)] for j in range(keep_cols)]
    return [(r, min(r + tile, height), c, min(c + tile, width)) for r in rows for c in cols]


def same_shape_batches(images: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Stack (C, h, w) ``images`` into (N, C, h, w) batches of at most ``batch_size`` equal-shaped
    ones, each batch as soon as it is full, the partial ones at the end (in order of first
    appearance)."""
    groups: dict[tuple[int, ...], list[Tensor]] = {}
    for image in images:
        group = groups.setdefault(tuple(image.shape), [])
        group.append(image)
        if len(group) == batch_size:
            yield torch.stack(group)
            group.clear()
    for group in groups.values():
        if group:
            yield torch.stack(group)
