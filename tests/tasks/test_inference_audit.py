"""The forward pass prediction runs (:class:`~segpipe.tasks.inference.InferenceNet`) and the
one-line account of a checkpoint that does not fit a network (``weight_differences``), checked
where the existing tests ran them without looking (found by mutation testing)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from segpipe.errors import ConfigError
from segpipe.tasks.inference import InferenceNet, weight_differences
from tests.predict.nets import PointwiseNet


class _Recording(nn.Module):
    """A 1×1 convolution that keeps the inputs it was given; ``pad_multiple``/``min_size``
    only when they are passed (otherwise the network states none)."""

    def __init__(self, num_classes: int | None = 3, **attrs: int) -> None:
        super().__init__()
        if num_classes is not None:
            self.num_classes = num_classes
        for name, value in attrs.items():
            setattr(self, name, value)
        self.conv = nn.Conv2d(3, num_classes or 3, 1)
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x)
        return self.conv(x)


def _image(h: int, w: int, seed: int = 0) -> Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_logits_have_the_inputs_height_and_width_when_they_differ():
    """A 20×45 image gives 20×45 logits, each pixel's those of the network at that pixel
    (the padding is cropped off the bottom and right, not a transposed corner)."""
    net = PointwiseNet()
    model = InferenceNet(net, channels_last=False).eval()
    x = _image(20, 45)
    with torch.no_grad():
        out = model(x)
        want = net(x)
    assert out.shape == (1, 3, 20, 45)
    torch.testing.assert_close(out, want)


def test_a_network_without_a_size_step_gets_inputs_padded_to_32():
    """A network that states no ``pad_multiple`` is given H and W padded to multiples of 32
    (the usual five halvings of an encoder), and the logits are cropped back."""
    net = _Recording()
    model = InferenceNet(net, channels_last=False)
    out = model(_image(20, 45))
    assert tuple(net.seen[-1].shape[-2:]) == (32, 64)
    assert out.shape == (1, 3, 20, 45)


def test_a_network_with_a_least_size_gets_small_inputs_padded_up_to_it():
    """A network with ``min_size`` (smp's PAN) is never given a smaller input: a 10×12 image
    reaches it padded to 64×64, and the logits are 10×12."""
    net = _Recording(pad_multiple=8, min_size=64)
    model = InferenceNet(net, channels_last=False)
    out = model(_image(10, 12))
    assert tuple(net.seen[-1].shape[-2:]) == (64, 64)
    assert out.shape == (1, 3, 10, 12)


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_is_the_memory_the_network_runs_in(channels_last):
    """``channels_last=True`` gives the network channels-last inputs, ``False`` plain
    contiguous ones (for networks whose layers do not take the other layout)."""
    net = _Recording(pad_multiple=1)
    InferenceNet(net, channels_last=channels_last)(_image(8, 8))
    x = net.seen[-1]
    assert x.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert x.is_contiguous() is not channels_last


def test_the_number_of_classes_can_be_given_for_a_network_that_states_none():
    """A network without a ``num_classes`` attribute is usable with ``num_classes`` given,
    and refused in one line naming the fix without it."""
    net = _Recording(num_classes=None, pad_multiple=1)
    model = InferenceNet(net, num_classes=3, channels_last=False)
    assert model.num_classes == 3
    assert model(_image(4, 4)).shape == (1, 3, 4, 4)
    with pytest.raises(ConfigError, match="has no num_classes attribute; give num_classes"):
        InferenceNet(_Recording(num_classes=None), channels_last=False)


def test_per_image_input_norm_is_applied_before_the_network():
    """``input_norm="per_image"`` standardises each image first, so an image and a brighter,
    higher-contrast copy of it give the same logits (``"none"`` does not)."""
    x = _image(16, 16)
    brighter = 4.0 * x + 2.0
    net = PointwiseNet()
    norm = InferenceNet(net, input_norm="per_image", channels_last=False).eval()
    plain = InferenceNet(net, input_norm="none", channels_last=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(norm(x), norm(brighter), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(plain(x), plain(brighter), atol=1e-2)


def _state(**shapes: tuple[int, ...]) -> dict[str, Tensor]:
    return {k: torch.zeros(s) for k, s in shapes.items()}


def test_weight_differences_names_two_keys_of_another_shape_and_counts_the_rest():
    """Up to two keys of another shape are named (with both shapes), and the others are
    counted: with three, one more; with two, no count."""
    mine = _state(a=(2,), b=(3,), c=(4,))
    theirs = _state(a=(5,), b=(6,), c=(7,))
    said = weight_differences(mine, theirs, "here")
    assert said == ("a is (5,) in the checkpoint, (2,) here; b is (6,) in the checkpoint, "
                    "(3,) here and 1 more of another shape")
    two = weight_differences(_state(a=(2,), b=(3,)), _state(a=(5,), b=(6,)), "here")
    assert two == "a is (5,) in the checkpoint, (2,) here; b is (6,) in the checkpoint, (3,) here"
    four = weight_differences(_state(a=(1,), b=(1,), c=(1,), d=(1,)),
                              _state(a=(2,), b=(2,), c=(2,), d=(2,)), "here")
    assert four.endswith(" and 2 more of another shape")


def test_weight_differences_counts_missing_and_extra_keys_only_when_strict():
    """Strict, a checkpoint without some of the module's weights, or with weights the module
    lacks, is told of with a count and an example; not strict (``strict_loading`` false),
    only other shapes count, so a partial checkpoint fits."""
    mine = _state(a=(2,), b=(2,), c=(2,))
    theirs = _state(a=(2,), d=(2,))
    assert weight_differences(mine, theirs, "here") == (
        "2 weight(s) not in the checkpoint (e.g. b); 1 weight(s) only in the checkpoint (e.g. d)")
    assert weight_differences(mine, theirs, "here", strict=False) == ""
    assert weight_differences(mine, dict(mine), "here") == ""
