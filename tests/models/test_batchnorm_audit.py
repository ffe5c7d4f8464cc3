"""Audit tests for segpipe.models.batchnorm: networks it cannot adapt give one clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segpipe.models.batchnorm import BatchNormAdaptError, adapt_batchnorm


def test_batchnorm_without_running_statistics_is_not_adapted() -> None:
    """BatchNorm built with track_running_stats=False keeps no statistics to re-estimate: the
    network is refused as one without BatchNorm statistics."""
    net = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)).eval()
    with pytest.raises(BatchNormAdaptError, match="no BatchNorm layer that keeps them"):
        adapt_batchnorm(net, [torch.randn(2, 2, 4, 4)], 0.5)


def test_a_single_image_after_global_pooling_is_explained_and_restored() -> None:
    """A batch of one image reaching BatchNorm after global pooling (one value per channel)
    gives a BatchNormAdaptError with the fix, and the training statistics stay in place."""
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(2)).eval()
    bn = net[1]
    bn.running_mean.fill_(3.0)
    bn.num_batches_tracked.fill_(7)
    with pytest.raises(BatchNormAdaptError, match="one value per channel.*batches of 2 or more"):
        adapt_batchnorm(net, [torch.randn(1, 2, 4, 4)], 0.5)
    torch.testing.assert_close(bn.running_mean, torch.full((2,), 3.0))
    assert int(bn.num_batches_tracked) == 7 and bn.momentum == 0.1 and not bn.training
