"""segpipe.callbacks found by mutation testing: EMA hands its decay and warm-up to the average it
builds (the CLI test checked the count only, so a callback that dropped either passed), and
weights_finite needs every parameter finite (only the whole-fit divergence test covered it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segpipe.callbacks import EMA, weights_finite
from segpipe.tasks import SegmentationTask
from tests.tasks.test_segmentation import PixelNet


@pytest.mark.parametrize("decay, warmup", [(0.9, False), (0.5, True)])
def test_the_callbacks_decay_and_warmup_reach_the_average(decay, warmup):
    task = SegmentationTask(PixelNet(), num_classes=3)
    ema = EMA(decay=decay, warmup=warmup)
    ema.setup(None, task, "fit")  # the trainer is not read
    model = ema._average_model
    assert model.decay == decay and model.warmup is warmup
    assert model.current_decay(1) == (min(decay, 2 / 11) if warmup else decay)
    assert model.current_decay(10_000) == decay
    assert task.optimizer_factory is not None  # handed back after the copy


def test_one_non_finite_parameter_makes_the_weights_not_finite():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 2, 1))
    assert weights_finite(net)
    with torch.no_grad():
        net[1].weight[0, 0, 0, 0] = float("nan")
    assert not weights_finite(net)  # one NaN tensor among finite ones
    with torch.no_grad():
        net[1].weight[0, 0, 0, 0] = float("inf")
    assert not weights_finite(net)


@pytest.mark.parametrize("warmup", [0, 1])
def test_throughput_counts_the_steps_after_its_warm_up(warmup: int) -> None:
    """With warmup_steps=0 its clock never started: nothing measured, nothing printed."""
    from segpipe.callbacks import Throughput
    from segpipe.errors import ConfigError

    meter = Throughput(warmup_steps=warmup)
    batch = {"image": torch.zeros(4, 1, 2, 2)}
    for i in range(5):
        meter.on_train_batch_start(None, None, batch, i)
        meter.on_train_batch_end(None, None, None, batch, i)
    assert meter.images == 4 * (5 - warmup) and meter.seconds > 0
    with pytest.raises(ConfigError, match="warmup_steps must be an int >= 0, got -1"):
        Throughput(warmup_steps=-1)
