"""Test-time re-estimation of BatchNorm statistics (segpipe.models.batchnorm)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segpipe.models import UNet
from segpipe.models.batchnorm import adapt_batchnorm, batchnorm_layers, check_bn_adapt


def _net() -> nn.Sequential:
    """BatchNorm straight on the input (so its statistics are the images'), then dropout."""
    net = nn.Sequential(nn.BatchNorm2d(2), nn.Dropout(0.5), nn.Conv2d(2, 2, 1))
    bn = net[0]
    bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.running_var.copy_(torch.tensor([4.0, 9.0]))
    bn.num_batches_tracked.fill_(123)
    return net.eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shift = torch.tensor([5.0, 2.0])[None, :, None, None]
    return [torch.randn(3, 2, 16, 16, generator=g) * 0.5 + shift for _ in range(4)]


def test_weight_one_is_adabn_and_a_half_blends_and_restore_undoes_it() -> None:
    net, batches = _net(), _batches()
    weights = [p.detach().clone() for p in net.parameters()]
    pixels = torch.cat([b.transpose(0, 1).reshape(2, -1) for b in batches], dim=1)
    mean = pixels.mean(dim=1)
    # Training's estimate: the mean over the batches of each batch's unbiased variance.
    var = torch.stack([b.transpose(0, 1).reshape(2, -1).var(dim=1) for b in batches]).mean(0)

    adapted = adapt_batchnorm(net, batches, 1.0)
    bn = net[0]
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert (adapted.num_layers, adapted.num_images) == (1, 12)
    assert not net.training and not bn.training and bn.momentum == 0.1  # modes and momentum back
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))  # no weight moved
    adapted.restore()
    torch.testing.assert_close(bn.running_mean, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(bn.running_var, torch.tensor([4.0, 9.0]))
    assert int(bn.num_batches_tracked) == 123

    half = adapt_batchnorm(net, batches, 0.5)
    torch.testing.assert_close(bn.running_mean, (mean + torch.tensor([1.0, -1.0])) / 2)
    torch.testing.assert_close(bn.running_var, (var + torch.tensor([4.0, 9.0])) / 2)
    assert half.describe().startswith("0.5 x the input images' statistics + 0.5 x training's")
    assert "12 image(s) or tile(s) in 1 BatchNorm layer(s)" in half.describe()


def test_dropout_stays_off_and_a_training_network_stays_in_training_mode() -> None:
    net = _net().train()
    seen = []
    net[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    adapt_batchnorm(net, _batches()[:1], 1.0)
    assert seen == [False]  # dropout would have zeroed half the features the next layer sees
    assert net.training and net[0].training and net[1].training


def test_reduce_sums_over_processes_weighted_by_their_batches() -> None:
    """Two processes, one with three batches and one with one: the statistics are the mean
    over all four batches, as one process would have computed them."""
    batches = _batches()
    alone = _net()
    adapt_batchnorm(alone, batches, 1.0)
    other = _net()
    adapt_batchnorm(other, batches[3:], 1.0)  # the second process's estimate
    peer = {"running_mean": other[0].running_mean.clone(), "n": torch.tensor(1.0),
            "running_var": other[0].running_var.clone()}
    calls = []

    def reduce(t: torch.Tensor) -> torch.Tensor:  # this process's value + the peer's
        calls.append(t.clone())
        if len(calls) == 1:
            return t + 3.0  # the image count: 9 here + 3 there
        if len(calls) == 4:
            return t + peer["n"]  # the batches
        key = "running_mean" if len(calls) == 2 else "running_var"
        return t + peer[key] * peer["n"]  # the statistics, times the batches

    net = _net()
    adapted = adapt_batchnorm(net, batches[:3], 1.0, reduce=reduce)
    assert adapted.num_images == 12 and len(calls) == 4
    torch.testing.assert_close(net[0].running_mean, alone[0].running_mean)
    torch.testing.assert_close(net[0].running_var, alone[0].running_var)


def test_a_layer_the_forward_pass_never_reaches_keeps_its_statistics() -> None:
    net = _net()
    unused = nn.BatchNorm2d(2)
    unused.running_mean.fill_(7.0)
    net.add_module("aux", unused)  # e.g. an auxiliary head that prediction does not run
    adapted = adapt_batchnorm(net, _batches(), 1.0, forward=lambda x: net[2](net[1](net[0](x))))
    assert adapted.num_layers == 1
    torch.testing.assert_close(unused.running_mean, torch.full((2,), 7.0))
    assert int(unused.num_batches_tracked) == 0 and unused.momentum == 0.1
    adapted = adapt_batchnorm(net, _batches(), 1.0, reduce=lambda t: t,
                              forward=lambda x: net[2](net[1](net[0](x))))
    torch.testing.assert_close(unused.running_mean, torch.full((2,), 7.0))  # no 0 / 0


def test_a_forward_callable_runs_the_batches() -> None:
    net = _net()
    calls = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return net(x * 0.0)  # e.g. a task that normalises first

    adapt_batchnorm(net, _batches(), 1.0, forward=forward)
    assert calls == [3, 3, 3, 3]
    torch.testing.assert_close(net[0].running_mean, torch.zeros(2))


def test_unet_statistics_follow_a_brightness_shift() -> None:
    torch.manual_seed(0)
    net = UNet(in_channels=3, num_classes=2, base_channels=4, depth=2).eval()
    layers = batchnorm_layers(net)
    assert len(layers) == 10 and all(int(m.num_batches_tracked) == 0 for m in layers)
    before = [m.running_mean.clone() for m in layers]
    adapted = adapt_batchnorm(net, [torch.rand(2, 3, 32, 32) + 3.0], 0.5)
    assert adapted.num_layers == 10
    assert not torch.allclose(layers[0].running_mean, before[0])
    adapted.restore()
    assert all(torch.equal(m.running_mean, b) for m, b in zip(layers, before))


@pytest.mark.parametrize("weight", [-0.1, 1.5, "half", None])
def test_weights_outside_zero_to_one_are_refused_with_the_option_name(weight) -> None:
    with pytest.raises(ValueError, match=r"--bn_adapt is the weight .* from 0 .* to 1"):
        check_bn_adapt(weight, "--bn_adapt")


def test_errors_leave_the_training_statistics_in_place() -> None:
    net = _net()
    with pytest.raises(ValueError, match="no image"):
        adapt_batchnorm(net, [], 0.5)
    torch.testing.assert_close(net[0].running_mean, torch.tensor([1.0, -1.0]))
    assert net[0].momentum == 0.1

    def failing():
        yield _batches()[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        adapt_batchnorm(net, failing(), 0.5)
    torch.testing.assert_close(net[0].running_var, torch.tensor([4.0, 9.0]))
    assert int(net[0].num_batches_tracked) == 123
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        adapt_batchnorm(nn.Sequential(nn.Conv2d(2, 2, 1), nn.GroupNorm(1, 2)), _batches(), 0.5)
    with pytest.raises(ValueError, match="above 0"):
        adapt_batchnorm(net, _batches(), 0.0)
