"""What every segpipe model shares: the interface it exposes and its argument/input checks.

Every model of :mod:`segpipe.models` is a plain ``torch.nn.Module`` that maps float images
``(N, in_channels, H, W)`` to logits ``(N, num_classes, H, W)`` and exposes the attributes
described by :class:`SegmentationModel`. Its constructor names the two size arguments
``in_channels`` and ``num_classes`` (the CLI links ``data.in_channels`` / ``data.num_classes``
into them).

The checks here raise ``ValueError`` with messages that name the argument, the allowed values
and, for inputs, the padded size to use; :func:`pad_to_multiple` is the padding that meets
``pad_multiple`` (the task's, and the ONNX stand-in's). They import nothing else of segpipe.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ModelArgumentError",
    "adapt_first_conv",
    "SegmentationModel",
    "check_choice",
    "check_input",
    "check_int",
    "no_pretrained_weights",
    "pad_labels_like",
    "pad_to_multiple",
    "padded_size",
    "round_up",
    "skip_input_checks",
]


#: Set while models are rebuilt whose weights come from elsewhere (a checkpoint).
_SKIP_PRETRAINED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "segpipe_skip_pretrained", default=False
)


@contextlib.contextmanager
def no_pretrained_weights() -> Iterator[None]:
    """Build :class:`~segpipe.models.SmpModel` s without reading ``encoder_weights`` (random
    encoder init).

    For code that rebuilds a model only to load a checkpoint's full state dict over it (e.g.
    :func:`segpipe.predict.load_predictor`): the pretrained weights would be overwritten, and
    reading them needs their file or cache, which a machine that only predicts may lack. Here,
    not in :mod:`segpipe.models.smp`, so that using it does not import smp and timm.
    """
    token = _SKIP_PRETRAINED.set(True)
    try:
        yield
    finally:
        _SKIP_PRETRAINED.reset(token)


class ModelArgumentError(ValueError):
    """A network's constructor argument has a value it cannot use; the message names the
    argument, what it accepts and what was given (``segpipe fit`` prints it as one line)."""


@runtime_checkable
class SegmentationModel(Protocol):
    """The interface of every segpipe model (structural: models do not inherit from it).

    ``isinstance(model, SegmentationModel)`` checks that the attributes exist.

    Attributes:
        in_channels: Channels ``C`` of the input ``(N, C, H, W)``; constructor argument of the
            same name.
        num_classes: Logit channels of the output ``(N, num_classes, H, W)``; constructor
            argument of the same name.
        pad_multiple: H and W of the input must be multiples of it (pad first, then crop the
            logits back).

    Optional method, used for transfer learning (``model.freeze_encoder_epochs`` and
    ``model.encoder_lr_mult`` of :class:`~segpipe.tasks.SegmentationTask`; not part of the
    ``isinstance`` check, so networks without it still work, without those options):

    * ``encoder_modules() -> list[nn.Module]``: the modules that make up the encoder, the part
      reused from pretraining that can be frozen and trained at a lower learning rate; all
      other parameters (decoder, head) are "the rest". :class:`~segpipe.models.UNet`:
      ``[inc, downs]`` (the contracting path); :class:`~segpipe.models.FCN`: ``[backbone]``;
      :class:`~segpipe.models.SmpModel`: ``[model.encoder]``.
    """

    in_channels: int
    num_classes: int
    pad_multiple: int

    def __call__(self, x: Tensor) -> Tensor:
        """Map ``(N, in_channels, H, W)`` float images to ``(N, num_classes, H, W)`` logits."""
        ...


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` if it is an ``int`` in ``[minimum, maximum]``, else raise.

    Args:
        name: Argument name, used in the message.
        value: The value given by the caller.
        minimum: Smallest allowed value.
        maximum: Largest allowed value, or ``None`` for no upper bound.

    Returns:
        The value, unchanged.

    Raises:
        ValueError: If ``value`` is not an int (bools are rejected) or out of range.
    """
    allowed = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelArgumentError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__}).")
    if value < minimum or (maximum is not None and value > maximum):
        raise ModelArgumentError(f"{name} must be {allowed}, got {value!r}.")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise.

    Args:
        name: Argument name, used in the message.
        value: The value given by the caller.
        choices: Allowed strings.

    Returns:
        The value, unchanged.

    Raises:
        ValueError: If ``value`` is not one of ``choices``.
    """
    if not isinstance(value, str) or value not in choices:
        raise ModelArgumentError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


def skip_input_checks() -> bool:
    """True while tracing/exporting, where Python shape checks would bake in guards."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def padded_size(size: int, multiple: int, min_size: int = 0) -> int:
    """The size :func:`pad_to_multiple` pads ``size`` to: the next multiple of ``multiple``,
    and at least ``min_size`` rounded up to one."""
    return max(round_up(size, multiple), round_up(min_size, multiple))


def check_input(x: Tensor, owner: str, in_channels: int, multiple: int, min_size: int = 0) -> None:
    """Check a model input's rank, channel count and spatial divisibility.

    Only Python int comparisons on ``x.shape``: cheap, no device synchronisation. Skipped
    while tracing or exporting (see :func:`skip_input_checks`).

    Args:
        x: Input batch of shape ``(N, C, H, W)``.
        owner: Model description for the message, e.g. ``"UNet(depth=4)"``.
        in_channels: Expected ``C``.
        multiple: ``H`` and ``W`` must be multiples of this.
        min_size: ``H`` and ``W`` must be at least this (0: any).

    Raises:
        ValueError: On a non-4D input, a wrong channel count, or ``H``/``W`` that are
            not multiples of ``multiple`` (the message names the padded size).
    """
    if skip_input_checks():
        return
    if x.dim() != 4:
        raise ValueError(
            f"{owner} expects a 4D input (N, C, H, W), got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0) for a single image."
        )
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"{owner} takes a floating-point input, got {x.dtype}; scale and normalise the "
            "image first (e.g. x.float() / 255, then the data's mean and std, as segpipe's "
            "data module and predict do)."
        )
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    if channels != in_channels:
        raise ValueError(
            f"{owner} was built with in_channels={in_channels}, got an input with "
            f"{channels} channels (shape {tuple(x.shape)})."
        )
    if min(height, width) < min_size:
        raise ValueError(
            f"{owner} needs H and W of at least {min_size}, got {height}x{width}; pad the input "
            f"to {padded_size(height, multiple, min_size)}x{padded_size(width, multiple, min_size)} "
            "(segpipe's task does) or use training crops of at least that size."
        )
    if height % multiple or width % multiple:
        raise ValueError(
            f"{owner} needs H and W to be multiples of {multiple}, got {height}x{width}; "
            f"pad the input to {round_up(height, multiple)}x{round_up(width, multiple)} "
            f"(e.g. with segpipe's pad-to-multiple) and crop the logits back to "
            f"{height}x{width}."
        )


def pad_to_multiple(
    x: Tensor, multiple: int, min_size: int = 0
) -> tuple[Tensor, tuple[int, int]]:
    """Pad the bottom/right of ``x`` so H and W are multiples of ``multiple`` (and at least
    ``min_size``, for networks such as smp's PAN whose deepest level needs a few pixels).

    Reflection padding keeps image statistics at the border; inputs too small to reflect are
    padded by replication.

    Args:
        x: (N, C, H, W) images.
        multiple: The factor H and W must divide by.
        min_size: The least H and W the network takes (0: any).

    Returns:
        The padded (N, C, H', W') tensor and the original (H, W) to crop back to.
    """
    h, w = x.shape[-2:]
    ph = padded_size(h, multiple, min_size) - h
    pw = padded_size(w, multiple, min_size) - w
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if _reflects((h, w), (ph, pw)) else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def _reflects(size: tuple[int, int], padding: tuple[int, int]) -> bool:
    """Whether :func:`pad_to_multiple` and :func:`pad_labels_like` pad a (H, W) side by
    reflection: only where each padding is smaller than its side (``F.pad``'s reflect needs
    that); else both replicate."""
    return padding[0] < size[0] and padding[1] < size[1]


def pad_labels_like(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """``labels`` (masks or pixel weights, any dtype) padded at the bottom and right to
    ``size`` as :func:`pad_to_multiple` pads their image: by reflection, or by replication
    where the padding is not smaller than the side.

    Args:
        labels: (..., H, W) labels of an (N, C, H, W) image batch, e.g. (N, H, W) masks.
        size: The padded (H', W'), each at least (H, W).

    Returns:
        (..., H', W') labels; ``labels`` itself when nothing is padded.
    """
    h, w = labels.shape[-2:]
    ph, pw = size[0] - h, size[1] - w
    if ph == 0 and pw == 0:
        return labels
    reflect = _reflects((h, w), (ph, pw))

    def index(n: int, padded: int) -> Tensor:
        i = torch.arange(padded, device=labels.device)
        return torch.where(i < n, i, 2 * (n - 1) - i) if reflect else i.clamp(max=n - 1)

    return labels.index_select(-2, index(h, size[0])).index_select(-1, index(w, size[1]))


def adapt_first_conv(weight: Tensor, new_in_channels: int) -> Tensor:
    """A first-convolution weight for another number of input channels, as smp adapts the
    first convolution of its pretrained encoders
    (``segmentation_models_pytorch.encoders._utils.patch_first_conv``).

    One channel: the sum over the original channels. Otherwise channel ``i`` takes original
    channel ``i mod C`` (slicing when there are fewer channels, repeating when there are more),
    scaled by ``C / new_in_channels`` so the response to a uniform input keeps its size.

    Args:
        weight: ``(out, C, kh, kw)``.
        new_in_channels: The new ``C``.

    Returns:
        ``(out, new_in_channels, kh, kw)``.
    """
    old = int(weight.shape[1])
    try:
        from segmentation_models_pytorch.encoders._utils import patch_first_conv
    except ImportError:  # pragma: no cover - smp moved it; same rule
        patch_first_conv = None
    if patch_first_conv is not None:
        conv = nn.Conv2d(old, weight.shape[0], tuple(weight.shape[2:]), bias=False)
        with torch.no_grad():
            conv.weight.copy_(weight.float())
        patch_first_conv(conv, new_in_channels, default_in_channels=old, pretrained=True)
        return conv.weight.detach().to(weight.dtype)
    if new_in_channels == 1:  # pragma: no cover
        return weight.sum(1, keepdim=True)
    index = torch.arange(new_in_channels) % old  # pragma: no cover
    return weight[:, index] * (old / new_in_channels)  # pragma: no cover
