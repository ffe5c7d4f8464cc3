"""Any segmentation-models-pytorch architecture behind segpipe's model interface.

:class:`SmpModel` wraps :func:`segmentation_models_pytorch.create_model` so that it
exposes ``in_channels``, ``num_classes`` and ``pad_multiple`` like segpipe's own
models, checks its arguments up front, never downloads anything (pretrained encoder
weights come from a local file, see :func:`load_encoder_weights`) and can freeze its
encoder.
"""

from __future__ import annotations

import difflib
import inspect
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

from .base import check_input, check_int, skip_input_checks

__all__ = ["SmpModel", "load_encoder_weights", "check_encoder_name", "available_archs"]

WEIGHT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin", ".safetensors")
_WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state_dict")
_KEY_PREFIXES: tuple[str, ...] = ("module.", "model.", "encoder.")
# Top-level names of classification heads found in ImageNet checkpoints (torchvision,
# timm, efficientnet-pytorch, pretrainedmodels); smp encoders delete these layers.
_CLASSIFIER_NAMES: frozenset[str] = frozenset(
    {"fc", "_fc", "classifier", "last_linear", "head", "heads", "logits", "fc_norm"}
)
_EXAMPLE_ENCODERS = ("resnet18", "resnet34", "resnet50", "efficientnet-b0", "mobilenet_v2", "mit_b0")
_MAX_LISTED = 5
# smp's default ``upsampling`` of these archs only gives full-size logits at smp's own
# default encoder_depth (pspnet: 3, fpn: 5); derive it from encoder_depth instead.
_FULL_SIZE_UPSAMPLING: dict[str, Callable[[int], int]] = {
    "pspnet": lambda depth: 2**depth,  # the PSP module runs on the stride-2**depth map
    "fpn": lambda depth: 2 ** max(depth - 3, 0),  # the FPN decoder outputs at stride 2**(depth-3)
}


# ----------------------------------------------------------------------- names
def available_archs() -> list[str]:
    """Architecture names accepted by ``smp.create_model`` (lower case)."""
    mapping = getattr(smp, "MODEL_ARCHITECTURES_MAPPING", None)
    if mapping is not None:
        return list(mapping.keys())
    return ["unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "pan"]


def check_encoder_name(name: object, arg: str = "encoder_name") -> str:
    """Return ``name`` if segmentation-models-pytorch can build that encoder.

    Accepts smp's own encoder names (``smp.encoders.get_encoder_names()``) and
    ``"tu-<timm model>"`` names.

    Args:
        name: Encoder name to check.
        arg: Argument name used in the error message.

    Returns:
        The name, unchanged.

    Raises:
        ValueError: If the name is unknown; the message lists examples and close matches.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{arg} must be a non-empty string naming an smp encoder, got {name!r}.")
    if name.startswith("tu-"):
        import timm

        if timm.is_model(name[3:]):
            return name
        raise ValueError(
            f"{arg}={name!r} names no timm model ({name[3:]!r} is unknown to timm "
            f"{timm.__version__}); use 'tu-' followed by a name from timm.list_models(), "
            "e.g. 'tu-resnet18'."
        )
    names = smp.encoders.get_encoder_names()
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"{arg} must be one of segmentation-models-pytorch's {len(names)} encoders "
        f"(e.g. {', '.join(repr(e) for e in _EXAMPLE_ENCODERS)}; full list: "
        f"smp.encoders.get_encoder_names()) or 'tu-<timm model name>', got {name!r}.{hint}"
    )


# --------------------------------------------------------------------- weights
def _resolve_weights_path(path: object, arg: str = "encoder_weights") -> Path:
    """Turn a user-given weights location into an existing local file path.

    Raises:
        ValueError: For download names such as ``"imagenet"``, non-strings, or an
            unsupported suffix.
        FileNotFoundError: If it looks like a path but no such file exists.
    """
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise ValueError(
            f"{arg} must be None or a local weights file path ({', '.join(WEIGHT_SUFFIXES)}), "
            f"got {path!r}; segpipe never downloads weights."
        )
    text = os.fspath(path)
    candidate = Path(text).expanduser()
    looks_like_path = (
        candidate.suffix.lower() in WEIGHT_SUFFIXES or "/" in text or os.sep in text or candidate.exists()
    )
    if not looks_like_path:
        raise ValueError(
            f"{arg}={text!r} looks like the name of pretrained weights to download, but segpipe "
            "never downloads weights: give a local file instead (a state dict saved as "
            f"{', '.join(WEIGHT_SUFFIXES)}, e.g. torch.save(model.encoder.state_dict(), "
            "'resnet34_encoder.pth') on a machine that has the weights), or None for random init."
        )
    if not candidate.is_file():
        raise FileNotFoundError(
            f"{arg}: weights file {str(candidate)!r} does not exist "
            f"(relative paths are resolved against {os.getcwd()!r})."
        )
    if candidate.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ValueError(
            f"{arg}={text!r} has the suffix {candidate.suffix!r}; allowed suffixes are "
            f"{', '.join(WEIGHT_SUFFIXES)} (torch.save or safetensors state dicts)."
        )
    return candidate


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a tensor state dict from ``path``, unwrapping "state_dict"/"model" nesting."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled objects refused by weights_only, ...
        raise ValueError(
            f"could not read encoder weights from {str(path)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    while isinstance(obj, Mapping):
        nested = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not nested:
            break
        obj = obj[nested[0]]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"encoder weights file {str(path)!r} holds a {type(obj).__name__}, not a state dict; "
            "save one with torch.save(model.encoder.state_dict(), path)."
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(
            f"encoder weights file {str(path)!r} holds no tensors (top-level keys: "
            f"{list(obj.keys())[:_MAX_LISTED]}); save one with torch.save(model.encoder.state_dict(), path)."
        )
    return tensors


def _match_key(key: str, targets: Mapping[str, Tensor], target_prefix: str) -> tuple[str, bool, bool]:
    """Map a checkpoint key onto the encoder's keys by stripping wrapper prefixes.

    Returns:
        ``(name, via_encoder, matched)``: the encoder-side name (fully stripped when
        nothing matched), whether an ``"encoder."`` prefix was stripped on the way,
        and whether ``name`` is one of the encoder's keys.
    """
    candidates = [(key, False)]
    stripped, via_encoder = key, False
    while True:
        prefix = next((p for p in _KEY_PREFIXES if stripped.startswith(p)), None)
        if prefix is None:
            break
        stripped = stripped[len(prefix) :]
        via_encoder = via_encoder or prefix == "encoder."
        candidates.append((stripped, via_encoder))
    for name, via in candidates:
        if name in targets:
            return name, via, True
        if target_prefix and target_prefix + name in targets:
            return target_prefix + name, via, True
    return stripped, via_encoder, False


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def load_encoder_weights(encoder: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local state dict into an (smp) encoder, with strict, explained checks.

    Accepts a plain state dict or one nested under ``"state_dict"``/``"model"``
    (Lightning / training checkpoints). Key prefixes ``"module."``, ``"model."`` and
    ``"encoder."`` are stripped as needed, so the encoder's own ``state_dict()``, a
    whole smp model's, a DDP-wrapped one or a Lightning checkpoint all load. Keys of a
    classification head (``fc.*``, ``classifier.*``, ...) and, for whole-model
    checkpoints, decoder/head keys are dropped; any other leftover key only warns.

    Args:
        encoder: Module to load into, e.g. ``SmpModel(...).encoder``.
        path: ``.pth``/``.pt``/``.bin`` (read with ``torch.load(weights_only=True)``)
            or ``.safetensors`` file.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If ``path`` is a download name like ``"imagenet"``, has an unknown
            suffix, cannot be read, or does not fit the encoder (missing keys or shape
            mismatches; the message names the first offending keys and both shapes).
    """
    file = _resolve_weights_path(path, arg="path")
    loaded = _read_state_dict(file)
    targets = encoder.state_dict()
    target_prefix = "model." if targets and all(k.startswith("model.") for k in targets) else ""
    whole_model = any(_match_key(k, targets, target_prefix)[1] for k in loaded)

    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in loaded.items():
        name, via_encoder, matched = _match_key(key, targets, target_prefix)
        if matched:
            mapped[name] = tensor
        elif whole_model and not via_encoder:
            continue  # decoder / segmentation head of a whole-model checkpoint
        elif name.split(".", 1)[0] in _CLASSIFIER_NAMES:
            continue  # ImageNet classifier: the encoder has no place for it
        else:
            unexpected.append(key)

    mismatched = [
        f"{name}: file {_shape(t)} vs model {_shape(targets[name])}"
        for name, t in mapped.items()
        if _shape(t) != _shape(targets[name])
    ]
    missing = [
        f"{name}: model {_shape(t)}, absent from the file"
        for name, t in targets.items()
        if name not in mapped and not name.endswith("num_batches_tracked")
    ]
    if mismatched or missing:
        problems = mismatched + missing
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        counts = f"{len(mismatched)} shape mismatch(es), {len(missing)} missing key(s)"
        if not mapped:
            listed += (
                f". No key of the file matched the encoder: file keys start "
                f"{list(loaded)[:3]}, encoder keys start {list(targets)[:3]}"
            )
        raise ValueError(
            f"encoder weights {str(file)!r} do not fit the {type(encoder).__name__} "
            f"({counts}): {listed}{more}. Fix: use weights saved from the same encoder_name "
            "built with the same in_channels and encoder_depth (e.g. torch.save("
            "model.encoder.state_dict(), path)), or pass encoder_weights=None to train from scratch."
        )
    if unexpected:
        warnings.warn(
            f"encoder weights {str(file)!r}: ignored {len(unexpected)} key(s) the "
            f"{type(encoder).__name__} has no place for, e.g. {unexpected[:_MAX_LISTED]}.",
            stacklevel=2,
        )
    encoder.load_state_dict(mapped, strict=False)


# ----------------------------------------------------------------------- model
class SmpModel(nn.Module):
    """A segmentation-models-pytorch model with segpipe's interface.

    Args:
        arch: smp architecture, case-insensitive: ``"unet"``, ``"unetplusplus"``,
            ``"fpn"``, ``"deeplabv3plus"``, ``"pspnet"``, ``"linknet"``, ``"manet"``,
            ``"pan"``, ... (see :func:`available_archs`).
        encoder_name: smp encoder (``smp.encoders.get_encoder_names()``) or
            ``"tu-<timm model>"``.
        in_channels: Input channels; smp adapts the first conv when it is not 3.
        num_classes: Number of output logit channels (smp's ``classes``).
        encoder_depth: Number of encoder stages (smp's ``encoder_depth``), 1..5; some
            architectures accept fewer values (smp then refuses it).
        encoder_weights: ``None`` (random init) or a local ``.pth``/``.pt``/``.bin``/
            ``.safetensors`` file with the encoder's state dict, loaded with
            :func:`load_encoder_weights`. Names such as ``"imagenet"`` are refused:
            segpipe never downloads weights.
        freeze_encoder: If True, encoder parameters get ``requires_grad=False`` and the
            encoder stays in eval mode (BatchNorm statistics frozen, no dropout) even
            after ``model.train()``; the decoder and head still train.
        **kwargs: Passed on to the smp architecture (e.g. ``decoder_channels``,
            ``encoder_output_stride``). ``classes``, ``activation`` and ``aux_params``
            are refused: the model returns logits only, and names the architecture does
            not take are refused too (smp would silently drop them). For ``"pspnet"``
            and ``"fpn"`` the final ``upsampling`` defaults to the factor that gives
            full-size logits at the chosen ``encoder_depth``.

    Attributes:
        in_channels: As given.
        num_classes: As given.
        pad_multiple: ``2**encoder_depth``; H and W must be multiples of it.
        model: The wrapped smp model (``model.encoder``, ``model.decoder``,
            ``model.segmentation_head``).

    Raises:
        ValueError: On an unknown architecture or encoder, bad ranges, refused kwargs,
            a download name as ``encoder_weights``, or weights that do not fit.
        FileNotFoundError: If ``encoder_weights`` names a file that does not exist.
    """

    def __init__(
        self,
        arch: str = "unet",
        encoder_name: str = "resnet34",
        in_channels: int = 3,
        num_classes: int = 2,
        encoder_depth: int = 5,
        encoder_weights: str | None = None,
        freeze_encoder: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        archs = available_archs()
        if not isinstance(arch, str) or arch.lower() not in archs:
            close = difflib.get_close_matches(str(arch).lower(), archs, n=2)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"arch must be one of segmentation-models-pytorch's {archs}, got {arch!r}.{hint}"
            )
        check_encoder_name(encoder_name)
        check_int("in_channels", in_channels, 1)
        check_int("num_classes", num_classes, 1)
        check_int("encoder_depth", encoder_depth, 1, 5)
        if not isinstance(freeze_encoder, bool):
            raise ValueError(f"freeze_encoder must be a bool, got {freeze_encoder!r}.")
        weights_path = None if encoder_weights is None else _resolve_weights_path(encoder_weights)
        if "classes" in kwargs:
            raise ValueError(f"pass num_classes, not classes (got classes={kwargs['classes']!r}).")
        for name in ("activation", "aux_params"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name} must be None (SmpModel returns raw logits only), got {kwargs[name]!r}."
                )

        self._check_extra_kwargs(arch.lower(), encoder_name, kwargs)

        self.arch = arch.lower()
        self.encoder_name = encoder_name
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.pad_multiple = 2**encoder_depth
        self.encoder_frozen = freeze_encoder

        if self.arch in _FULL_SIZE_UPSAMPLING and "upsampling" not in kwargs:
            kwargs["upsampling"] = _FULL_SIZE_UPSAMPLING[self.arch](encoder_depth)

        try:
            self.model = smp.create_model(
                self.arch,
                encoder_name=encoder_name,
                encoder_weights=None,
                in_channels=in_channels,
                classes=num_classes,
                encoder_depth=encoder_depth,
                **kwargs,
            )
        except (KeyError, ValueError, TypeError, AssertionError, RuntimeError) as exc:
            extra = f" and extra arguments {sorted(kwargs)}" if kwargs else ""
            raise ValueError(
                f"segmentation-models-pytorch could not build arch={self.arch!r} with "
                f"encoder_name={encoder_name!r}, encoder_depth={encoder_depth}, "
                f"in_channels={in_channels}{extra}: {type(exc).__name__}: {exc}"
            ) from exc

        if weights_path is not None:
            load_encoder_weights(self.model.encoder, weights_path)
        if freeze_encoder:
            for param in self.model.encoder.parameters():
                param.requires_grad_(False)
            self.model.encoder.eval()

    @staticmethod
    def _check_extra_kwargs(arch: str, encoder_name: str, kwargs: Mapping[str, Any]) -> None:
        """Refuse kwargs that smp would silently ignore (it forwards leftovers to timm only)."""
        mapping = getattr(smp, "MODEL_ARCHITECTURES_MAPPING", None)
        if not kwargs or mapping is None or encoder_name.startswith("tu-"):
            return
        params = inspect.signature(mapping[arch].__init__).parameters
        accepted = {
            name
            for name, p in params.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        } | {"decoder_use_batchnorm"}  # deprecated alias smp still pops from kwargs
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            named = {"encoder_name", "encoder_weights", "in_channels", "classes", "encoder_depth"}
            options = sorted(accepted - named)
            raise ValueError(
                f"smp arch {arch!r} takes no argument(s) {unknown} (with a non-timm encoder "
                f"{encoder_name!r} smp would silently ignore them); extra arguments allowed: {options}."
            )

    @property
    def encoder(self) -> nn.Module:
        """The smp encoder (``self.model.encoder``)."""
        return self.model.encoder

    def train(self, mode: bool = True) -> SmpModel:
        """Set training mode; a frozen encoder stays in eval mode.

        Args:
            mode: True for training mode, False for evaluation mode.

        Returns:
            self
        """
        super().train(mode)
        if self.encoder_frozen:
            self.model.encoder.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Per-pixel logits, as :class:`~segpipe.models.base.SegmentationModel` describes.

        Raises:
            ValueError: From :func:`~segpipe.models.base.check_input`: H or W not a multiple of
                ``pad_multiple`` (the message names the padded size) or wrong channels.
        """
        check_input(
            x,
            f"SmpModel(arch={self.arch!r}, encoder_depth={self.encoder_depth})",
            self.in_channels,
            self.pad_multiple,
        )
        logits = self.model(x)
        if logits.shape[-2:] != x.shape[-2:] and not skip_input_checks():
            raise RuntimeError(
                f"SmpModel(arch={self.arch!r}, encoder_name={self.encoder_name!r}, "
                f"encoder_depth={self.encoder_depth}) returned {tuple(logits.shape[-2:])} logits for a "
                f"{tuple(x.shape[-2:])} input; set its upsampling= argument so that they match."
            )
        return logits

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, encoder_name={self.encoder_name!r}, in_channels={self.in_channels}, "
            f"num_classes={self.num_classes}, encoder_depth={self.encoder_depth}, "
            f"encoder_frozen={self.encoder_frozen}"
        )
