"""A trained network as prediction runs it, without the training task around it.

:class:`LogitsForward` is the one forward pass of a segpipe model: input normalisation
(``input_norm``), padding to the network's size step, channels-last memory, the check of the
network's first output, and the crop back to the input's size. The training task
(:class:`~segpipe.tasks.SegmentationTask`, a LightningModule) and :class:`InferenceNet` (a plain
``nn.Module`` that prediction rebuilds from a checkpoint) share it, so both compute the same
logits. This module does not import Lightning (nor the task's module): ``segpipe predict``
and :class:`~segpipe.predict.Segmenter` load a checkpoint without it (about 3 s of imports).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from segpipe.errors import ConfigError
from segpipe.models.base import pad_to_multiple
from segpipe.models.input_norm import input_norm_module

__all__ = ["InferenceNet", "LogitsForward", "build_network", "weight_differences"]


class LogitsForward:
    """The forward pass of a segmentation model around a network (a mixin of ``nn.Module`` s).

    The class mixing it in sets ``net``, ``input_norm`` (a module), ``pad_multiple``,
    ``min_size``, ``channels_last`` and ``num_classes``.
    """

    net: nn.Module
    input_norm: nn.Module
    pad_multiple: int
    min_size: int
    channels_last: bool
    num_classes: int

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of any size.

        Args:
            x: (N, C, H, W) normalised images.

        Returns:
            (N, num_classes, H, W) logits.
        """
        h, w = x.shape[-2:]
        return self.padded_logits(x)[..., :h, :w]

    def padded_logits(self, x: Tensor) -> Tensor:
        """Logits of ``x`` padded at the bottom and right to the network's size step (by
        reflection, see :func:`~segpipe.models.base.pad_to_multiple`), not cropped back.

        Training scores them whole, against masks padded alike
        (:func:`~segpipe.models.base.pad_labels_like`): cropped back, the strip next to the
        network's bottom and right edges never got a loss, and images that need no padding
        at test time put their own edges there (a 144² crop for a 32-step encoder left 16
        pixels untrained, and its predictions marked tumour along the right edge of every
        192² slice).

        Args:
            x: (N, C, H, W) normalised images.

        Returns:
            (N, num_classes, H', W') logits, H' and W' the padded sizes.
        """
        x, _ = pad_to_multiple(self.input_norm(x), self.pad_multiple, self.min_size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.net(x)
        if not self._output_checked:
            self._check_output(x, logits)
        return logits

    _output_checked = False

    def _check_output(self, x: Tensor, logits: Any) -> None:
        """The network's first output against the contract, in one line that says what is
        wrong (a dict, as torchvision's models return, failed as "unhashable type: 'slice'";
        other channels or sizes deep inside torchmetrics or the loss). Shapes only: no host
        synchronisation."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        name = type(self.net).__name__
        want = f"(N, {self.num_classes}, H, W) logits (data.num_classes {self.num_classes})"
        if not isinstance(logits, Tensor):
            keys = f" with keys {sorted(map(str, logits))}" if isinstance(logits, dict) else ""
            raise ConfigError(
                f"model.net {name} returned a {type(logits).__name__}{keys}, not a tensor of "
                f"{want}; wrap it so that forward returns the logits (for torchvision's "
                "segmentation models, their 'out')")
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise ConfigError(
                f"model.net {name} returned {tuple(logits.shape)} for an input of "
                f"{tuple(x.shape)}; expected {want}: check the network's num_classes")
        if tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):
            raise ConfigError(
                f"model.net {name} returned {logits.shape[-1]}x{logits.shape[-2]} logits for a "
                f"{x.shape[-1]}x{x.shape[-2]} input; the network must keep the input's size "
                "(upsample its output to it)")
        self._output_checked = True


class InferenceNet(LogitsForward, nn.Module):
    """A trained network with its input normalisation and padding: what prediction needs of a
    :class:`~segpipe.tasks.SegmentationTask`, and no more (no losses, metrics or Lightning).

    Its state dict has the task's names (``net.*``, ``input_norm.*``), so a task checkpoint's
    weights load into it as they are.

    Args:
        net: The network, ``(N, C, H, W)`` -> ``(N, num_classes, H, W)`` logits.
        num_classes: Classes it predicts (default: ``net.num_classes``).
        input_norm: ``none`` or ``per_image`` (as the task was trained with).
        channels_last: Run the network in channels-last memory.
    """

    def __init__(self, net: nn.Module, num_classes: int | None = None,
                 input_norm: str = "none", channels_last: bool = True) -> None:
        super().__init__()
        self.net = net
        self.input_norm = input_norm_module(input_norm)
        classes = num_classes if num_classes is not None else getattr(net, "num_classes", None)
        if classes is None:
            raise ConfigError(f"the network {type(net).__name__} has no num_classes attribute; "
                              "give num_classes")
        self.num_classes = int(classes)
        self.pad_multiple = int(getattr(net, "pad_multiple", 32))
        #: The least H and W the network takes (smp's PAN); smaller inputs are padded up.
        self.min_size = int(getattr(net, "min_size", 0) or 0)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)


def weight_differences(mine: Mapping[str, Any], theirs: Mapping[str, Any], here: str,
                       strict: bool = True) -> str:
    """How a checkpoint's state dict differs from a module's, in one line ("" when it fits).

    Args:
        mine: The module's state dict.
        theirs: The checkpoint's.
        here: Where ``mine`` is, for the message (``"here"``).
        strict: Count missing and unexpected keys too, not only other shapes.

    Returns:
        Up to two keys of another shape (and how many more), how many weights are missing and
        how many only in the checkpoint, each with an example; "" when none.
    """
    def shape(value: Any) -> tuple[int, ...] | None:  # None: a non-tensor entry (extra state)
        return tuple(value.shape) if isinstance(value, Tensor) else None

    mismatched = [k for k in mine if k in theirs and shape(theirs[k]) != shape(mine[k])]
    missing = [k for k in mine if k not in theirs] if strict else []
    unexpected = [k for k in theirs if k not in mine] if strict else []
    parts = [f"{k} is {shape(theirs[k])} in the checkpoint, {shape(mine[k])} {here}"
             for k in mismatched[:2]]
    if missing:
        parts.append(f"{len(missing)} weight(s) not in the checkpoint (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) only in the checkpoint (e.g. {unexpected[0]})")
    more = f" and {len(mismatched) - 2} more of another shape" if len(mismatched) > 2 else ""
    return "; ".join(parts) + more


class _NetHolder:
    """What LightningCLI parses a task's ``net`` argument as: a parameter typed ``nn.Module``."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """Instantiate a network from its ``{"class_path": ..., "init_args": {...}}`` config, as
    LightningCLI (jsonargparse) built it for training: the arguments are checked against the
    class's signature (untyped ones accepted as they are, as in training) and nested
    ``class_path`` values are instantiated too.

    Args:
        config: The ``model.net`` section a checkpoint saved.

    Returns:
        The network, with its constructor's weights.
    """
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(_NetHolder, "model", fail_untyped=False)
    parsed = parser.parse_object({"model": {"net": dict(config)}})
    return parser.instantiate_classes(parsed).model.net
