"""TTA views for models whose training symmetries are unknown, and the averaging itself."""

from __future__ import annotations

import torch

from segpipe.predict.scoring import ProbabilityFn
from segpipe.tta import model_views, tta_mean, tta_views
from tests.test_tta import _Net as _SkyOnTop  # logits by row: has only seen the sky on top


def test_unrecorded_symmetries_average_horizontal_flips_only() -> None:
    """A checkpoint that does not record its training symmetries gets the horizontal flip
    alone: a vertical flip would wash out a model that knows up from down."""
    assert model_views(None, warn=False) == tta_views(["hflip"])
    x = torch.zeros(1, 3, 8, 8)
    plain = ProbabilityFn(_SkyOnTop(), tta=False)(x)
    unknown = ProbabilityFn(_SkyOnTop(), tta=True, symmetries=None)(x)
    torch.testing.assert_close(unknown, plain)


def test_tta_mean_is_the_mean_of_the_views() -> None:
    """The TTA result is the plain mean of the views' (mapped back) outputs, so a constant
    map stays the same constant whatever the number of views."""
    x = torch.randn(1, 2, 4, 6)
    for names in (["hflip"], ["hflip", "vflip"], ["hflip", "vflip", "rot90"]):
        out = tta_mean(lambda t: torch.full_like(t[:, :1], 0.25), x, tta_views(names))
        torch.testing.assert_close(out, torch.full((1, 1, 4, 6), 0.25))
