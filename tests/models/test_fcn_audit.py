"""Audit tests for segpipe.models.FCN: a fresh 16s/8s net starts from the coarser scores."""

from __future__ import annotations

import pytest
import torch

from segpipe.models import FCN


@pytest.mark.parametrize("variant", ["16s", "8s"])
def test_fresh_skip_score_layers_add_nothing(variant: str) -> None:
    """The pool4/pool3 score layers start at zero (weights and bias), so a freshly built
    FCN-16s/8s outputs exactly the upsampled coarse scores, whatever the input."""
    torch.manual_seed(0)
    model = FCN(in_channels=3, num_classes=3, variant=variant, base_channels=2).eval()
    x = torch.randn(2, 3, 64, 64) * 5
    with torch.no_grad():
        pool3, pool4, pool5 = model.backbone(x)
        assert torch.count_nonzero(model.score_pool4(pool4)) == 0
        score = model.upscore2(model.score_fr(model.fc7(model.fc6(pool5))))
        if variant == "8s":
            assert torch.count_nonzero(model.score_pool3(pool3)) == 0
            score = model.upscore_pool4(score)
        torch.testing.assert_close(model(x), model.upscore(score), rtol=0, atol=0)
