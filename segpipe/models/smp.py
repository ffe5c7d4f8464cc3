"""Any segmentation-models-pytorch architecture behind segpipe's model interface.

:class:`SmpModel` wraps :func:`segmentation_models_pytorch.create_model` so that it
exposes ``in_channels``, ``num_classes`` and ``pad_multiple`` like segpipe's own
models, checks its arguments up front and can freeze its encoder.

Pretrained encoder weights come either from a local file (:func:`load_encoder_weights`) or by
name (``"imagenet"``, or a timm pretrained tag for ``"tu-"`` encoders), through smp's and
timm's own loading code and caches (:func:`resolve_pretrained`): smp's encoders read
``model.safetensors`` of a pinned revision of the Hugging Face repo ``smp-hub/<encoder>.<weights>``,
timm's read their ``pretrained_cfg`` (a Hugging Face repo such as ``timm/resnet18.a1_in1k``, or a
URL cached under torch hub's ``checkpoints`` folder). Offline (``HF_HUB_OFFLINE=1``) cached
weights load as usual; weights that are neither cached nor downloadable raise
:class:`PretrainedWeightsUnavailableError`, naming the weights, the cache folder and the
command that fetches them.
"""

from __future__ import annotations

import difflib
import inspect
import os
import pickle
import shlex
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

from .base import (
    _SKIP_PRETRAINED,
    ModelArgumentError,
    adapt_first_conv,
    check_input,
    check_int,
    no_pretrained_weights,
    skip_input_checks,
)

__all__ = [
    "REFUSED_ARGUMENTS",
    "PretrainedSource",
    "PretrainedWeightsUnavailableError",
    "SmpModel",
    "WeightsFileNotFoundError",
    "available_archs",
    "check_encoder_name",
    "encoder_stage_modules",
    "load_encoder_weights",
    "no_pretrained_weights",
    "resolve_pretrained",
]

#: smp arguments SmpModel refuses, and why: the one sentence both its own check and the command
#: line's hint give.
REFUSED_ARGUMENTS: dict[str, str] = {
    "classes": "SmpModel takes num_classes (--model.net.init_args.num_classes)",
    "activation": "SmpModel returns raw logits, which the loss, the metrics and predict's "
    "softmax take; leave activation out",
    "aux_params": "SmpModel has no auxiliary classification head (it returns the mask logits "
    "only); leave aux_params out",
}

WEIGHT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
_WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state_dict")
# "net." is a segpipe task's network (``net.model.encoder.*`` in its checkpoints).
_KEY_PREFIXES: tuple[str, ...] = ("module.", "net.", "model.", "encoder.")
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
# These archs take one decoder block per encoder stage; smp's default lists five.
_DECODER_CHANNELS_PER_STAGE: dict[str, tuple[int, ...]] = {
    "unet": (256, 128, 64, 32, 16), "unetplusplus": (256, 128, 64, 32, 16),
    "manet": (256, 128, 64, 32, 16),
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
        raise ModelArgumentError(f"{arg} must be a non-empty string naming an smp encoder, got {name!r}.")
    if name.startswith("tu-"):
        import timm

        if timm.is_model(name[3:]):
            return name
        raise ModelArgumentError(
            f"{arg}={name!r} names no timm model ({name[3:]!r} is unknown to timm "
            f"{timm.__version__}); use 'tu-' followed by a name from timm.list_models(), "
            "e.g. 'tu-resnet18'."
        )
    names = smp.encoders.get_encoder_names()
    if name in names:
        return name
    equivalent = getattr(smp.encoders, "is_equivalent_to_timm_universal", None)
    if equivalent is not None and equivalent(name):
        # smp's older "timm-" names of timm models (timm-regnetx_002, timm-resnest14d, ...),
        # which smp still builds as "tu-" encoders
        import timm

        model = name.replace("timm-", "tf_" if "mobilenetv3" in name else "", 1)
        if timm.is_model(model):
            return name
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ModelArgumentError(
        f"{arg} must be one of segmentation-models-pytorch's {len(names)} encoders "
        f"(e.g. {', '.join(repr(e) for e in _EXAMPLE_ENCODERS)}; full list: "
        f"smp.encoders.get_encoder_names()) or 'tu-<timm model name>', got {name!r}.{hint}"
    )


# --------------------------------------------------------------------- weights
def _is_weights_name(value: object) -> bool:
    """True for a string that names pretrained weights (``"imagenet"``) rather than a file."""
    if not isinstance(value, str) or not value:
        return False
    candidate = Path(value).expanduser()
    # A bare word is a name even when a file or folder of that name is in the working folder
    # (a folder called imagenet must not turn the weights name into a missing file); such a
    # file is given as ./imagenet.pth, with its suffix.
    looks_like_path = candidate.suffix.lower() in WEIGHT_SUFFIXES or "/" in value or os.sep in value
    return not looks_like_path


def _resolve_weights_path(path: object, arg: str = "encoder_weights") -> Path:
    """Turn a user-given weights location into an existing local file path.

    Raises:
        ValueError: For names such as ``"imagenet"`` (only :class:`SmpModel` resolves those),
            non-strings, or an unsupported suffix.
        FileNotFoundError: If it looks like a path but no such file exists.
    """
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise ModelArgumentError(
            f"{arg} must be None, the name of pretrained weights (e.g. 'imagenet') or a local "
            f"weights file path ({', '.join(WEIGHT_SUFFIXES)}), got {path!r}."
        )
    text = os.fspath(path)
    if not text.strip():
        raise ModelArgumentError(
            f"{arg} is empty; give null for a random encoder, the name of pretrained weights "
            f"(e.g. 'imagenet') or a local weights file ({', '.join(WEIGHT_SUFFIXES)}).")
    candidate = Path(text).expanduser()
    if _is_weights_name(text):
        raise ModelArgumentError(
            f"{arg}={text!r} looks like the name of pretrained weights, but this function reads "
            "local files only: give a state dict saved as "
            f"{', '.join(WEIGHT_SUFFIXES)} (e.g. torch.save(model.encoder.state_dict(), "
            "'resnet34_encoder.pth')), or load named weights with "
            f"SmpModel(encoder_weights={text!r}), which uses smp's and timm's caches."
        )
    if text.startswith("file://"):
        local = text[len("file://"):]
        raise ModelArgumentError(
            f"{arg}={text!r} is a file:// URL; give the file's path itself: "
            f"{arg}: {local or '/path/to/weights.pth'}")
    if "://" in text or text.startswith("file:"):
        raise ModelArgumentError(
            f"{arg}={text!r} is a URL; give the weights file's local path (download it first, "
            "or name pretrained weights such as 'imagenet', which smp and timm fetch and cache).")
    if candidate.is_dir():
        found = sorted(p.name for p in candidate.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES)
        raise ModelArgumentError(
            f"{arg}: {str(candidate)!r} is a folder; give the weights file in it"
            + (f", e.g. {str(candidate / found[0])!r}" if found else
               f" (it holds no {'/'.join(WEIGHT_SUFFIXES)} file)") + ".")
    if not candidate.is_file():
        raise WeightsFileNotFoundError(
            f"{arg}: weights file {str(candidate)!r} does not exist "
            f"(relative paths are resolved against {os.getcwd()!r}); give the path of a state "
            "dict saved with torch.save or safetensors, or null for a random encoder."
        )
    if candidate.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelArgumentError(
            f"{arg}={text!r} has the suffix {candidate.suffix!r}; allowed suffixes are "
            f"{', '.join(WEIGHT_SUFFIXES)} (torch.save or safetensors state dicts)."
        )
    return candidate


# ------------------------------------------------------------ named weights
class WeightsFileNotFoundError(ModelArgumentError, FileNotFoundError):
    """``encoder_weights`` names a local file that is not there (a ``ModelArgumentError``, so
    the command line says it in one line, and a ``FileNotFoundError``)."""


class PretrainedWeightsUnavailableError(RuntimeError):
    """Named pretrained encoder weights are not cached and cannot be downloaded.

    The message is one line naming the weights, the cache folder and the command that fetches
    them; ``segpipe fit`` reports it as ``segpipe: error: ...`` (exit code 2).
    """


def _hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline()) if callable(is_offline) else bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hf_cache_dir() -> str:
    """The Hugging Face hub cache folder that ``hf_hub_download`` uses (``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


@dataclass(frozen=True)
class PretrainedSource:
    """Where smp or timm load the named pretrained weights of an encoder from.

    Attributes:
        encoder_name: The encoder as given (``"resnet34"``, ``"tu-convnext_tiny"``).
        weights: The weights name as given (``"imagenet"``, a timm tag).
        build_name: Encoder name handed to smp (for timm: ``tu-<model>.<tag>``).
        build_weights: ``encoder_weights`` handed to smp (a name; ``True`` for timm).
        hf_repo: Hugging Face repo the weights come from, or None.
        hf_revision: Revision (commit) of ``hf_repo``; None means ``main``.
        hf_files: Files of ``hf_repo`` the library reads.
        hf_any_file: True if any one of ``hf_files`` suffices (timm tries
            ``model.safetensors`` then ``pytorch_model.bin``), False if all are read (smp).
        url: Download URL cached by torch hub (timm weights without a Hugging Face repo), or None.
    """

    encoder_name: str
    weights: str
    build_name: str
    build_weights: str | bool
    hf_repo: str | None = None
    hf_revision: str | None = None
    hf_files: tuple[str, ...] = ()
    hf_any_file: bool = False
    url: str | None = None

    @property
    def cache_folder(self) -> str:
        """The folder the weights are cached in (created by the library when it downloads)."""
        if self.hf_repo is not None:
            return os.path.join(_hf_cache_dir(), "models--" + self.hf_repo.replace("/", "--"))
        import torch.hub

        return os.path.join(torch.hub.get_dir(), "checkpoints")

    def cached_files(self) -> list[str]:
        """The cached files the library would read (empty when nothing is cached)."""
        if self.hf_repo is not None:
            from huggingface_hub import try_to_load_from_cache

            found = []
            for name in self.hf_files:
                hit = try_to_load_from_cache(self.hf_repo, name, revision=self.hf_revision)
                if isinstance(hit, str):
                    found.append(hit)
            return found
        if self.url is not None:
            file = os.path.join(self.cache_folder, os.path.basename(urlparse(self.url).path))
            return [file] if os.path.isfile(file) else []
        return []

    def is_cached(self) -> bool:
        """Whether loading can succeed without network access."""
        found = self.cached_files()
        if self.hf_repo is not None and not self.hf_any_file:
            return len(found) == len(self.hf_files)
        return bool(found)

    def describe(self) -> str:
        """Which weights, from where (for messages)."""
        if self.hf_repo is not None:
            rev = f", revision {self.hf_revision}" if self.hf_revision else ""
            files = (" or " if self.hf_any_file else " and ").join(self.hf_files)
            noun = "file" if self.hf_any_file or len(self.hf_files) == 1 else "files"
            where = f"Hugging Face repo {self.hf_repo}{rev}, {noun} {files}"
        else:
            where = f"URL {self.url}"
        return f"pretrained weights {self.weights!r} of encoder {self.encoder_name!r} ({where})"

    def fetch_command(self) -> str:
        """A shell command that downloads the weights into the cache (run it online)."""
        code = (
            "from segpipe.models import SmpModel; "
            f"SmpModel(encoder_name='{self.encoder_name}', encoder_weights='{self.weights}')"
        )
        quoted = f'"{code}"' if not set(code) & set('"$`\\') else shlex.quote(code)
        command = f"HF_HUB_OFFLINE=0 python -c {quoted}"
        if self.hf_repo is not None:
            files = self.hf_files[:1] if self.hf_any_file else self.hf_files
            rev = f" --revision {self.hf_revision}" if self.hf_revision else ""
            command += f" (or: hf download {self.hf_repo} {' '.join(files)}{rev})"
        return command

    def unavailable_message(self, reason: str) -> str:
        """The one-line message of :class:`PretrainedWeightsUnavailableError`."""
        return (
            f"encoder_weights={self.weights!r}: the {self.describe()} are not in the cache "
            f"folder {self.cache_folder} and {reason}. Fetch them once with internet access: "
            f"{self.fetch_command()}; on an offline machine, copy that cache folder there (or point "
            f"{'HF_HOME' if self.hf_repo is not None else 'TORCH_HOME'} at a copy). Or set "
            "encoder_weights to a local .pth/.safetensors file, or to null for a random init."
        )


def _smp_settings(name: str) -> dict[str, Any] | None:
    """smp's pretrained settings of a (non-timm) encoder, or None for timm-backed names."""
    equivalent = getattr(smp.encoders, "is_equivalent_to_timm_universal", None)
    if equivalent is not None and equivalent(name):
        return None  # smp builds these "timm-" names as "tu-" encoders
    entry = smp.encoders.encoders.get(name)
    return None if entry is None else dict(entry.get("pretrained_settings") or {})


def resolve_pretrained(encoder_name: str, weights: str) -> PretrainedSource:
    """Find where smp/timm load the named pretrained ``weights`` of ``encoder_name`` from.

    Nothing is downloaded. For smp's own encoders ``weights`` is one of the names smp lists for
    it (``"imagenet"``, ``"ssl"``, ...), read from the pinned revision of the Hugging Face repo
    smp names. For ``"tu-<model>"`` encoders ``"imagenet"`` means timm's default pretrained
    weights of the model (or the tag in the name, ``"tu-resnet18.a1_in1k"``), and any other
    value is a timm pretrained tag of the model (``"a1_in1k"``, ``"tv_in1k"``).

    Args:
        encoder_name: smp encoder name or ``"tu-<timm model>"``.
        weights: Name of the weights.

    Returns:
        The source, with :meth:`PretrainedSource.is_cached` and the fetch command.

    Raises:
        ValueError: If smp/timm know no such weights for the encoder (the message lists the
            names they know).
    """
    settings = None if encoder_name.startswith("tu-") else _smp_settings(encoder_name)
    if settings is not None:
        if weights not in settings:
            known = sorted(settings) or ["none"]
            raise ModelArgumentError(
                f"encoder_weights={weights!r}: segmentation-models-pytorch has no such pretrained "
                f"weights for encoder {encoder_name!r}; it has {known}. Or give a local "
                f"{'/'.join(WEIGHT_SUFFIXES)} file, or null for a random init."
            )
        entry = settings[weights]
        if "repo_id" not in entry:  # an older smp layout (URLs); let smp load it
            return PretrainedSource(encoder_name, weights, encoder_name, weights, url=entry.get("url"))
        return PretrainedSource(
            encoder_name, weights, encoder_name, weights, hf_repo=entry["repo_id"],
            hf_revision=entry.get("revision"), hf_files=("config.json", "model.safetensors"),
        )

    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    model = encoder_name[3:] if encoder_name.startswith("tu-") else encoder_name
    if not encoder_name.startswith("tu-"):  # an smp "timm-" name built as a timm model
        model = encoder_name.replace("timm-", "tf_" if "mobilenetv3" in encoder_name else "", 1)
    base, tag = split_model_name_tag(model)
    if weights != "imagenet":
        if tag and tag != weights:
            raise ModelArgumentError(
                f"encoder_weights={weights!r} contradicts the pretrained tag {tag!r} in "
                f"encoder_name={encoder_name!r}; state the tag once."
            )
        tag = weights
    name = f"{base}.{tag}" if tag else base
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{base}.*")]
        known = f"its pretrained tags are {tags}" if tags else "it has no pretrained weights in timm"
        raise ModelArgumentError(
            f"encoder_weights={weights!r}: timm {timm.__version__} has no pretrained weights "
            f"{name!r} for encoder {encoder_name!r}; {known} (use 'imagenet' for the default "
            "tag or one of these tags)."
        )
    build_name = f"tu-{base}.{cfg.tag}" if getattr(cfg, "tag", None) else f"tu-{name}"
    if cfg.hf_hub_id:
        from timm.models._hub import hf_split

        repo, revision = hf_split(cfg.hf_hub_id)
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
        return PretrainedSource(
            encoder_name, weights, build_name, True, hf_repo=repo, hf_revision=revision,
            hf_files=files, hf_any_file=True,
        )
    return PretrainedSource(encoder_name, weights, build_name, True, url=cfg.url)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a tensor state dict from ``path``, unwrapping "state_dict"/"model" nesting."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            with open(path, "rb") as fh:
                head = fh.read(4)
            if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # zip or pickle
                raise ModelArgumentError(
                    f"encoder weights file {str(path)!r} is not a PyTorch checkpoint (it starts "
                    f"with {head!r}); give a state dict saved with torch.save or safetensors.")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except ModelArgumentError:
        raise
    except pickle.UnpicklingError as exc:  # weights_only refused pickled Python objects
        raise ModelArgumentError(
            f"encoder weights file {str(path)!r} holds pickled Python objects besides tensors, "
            "which segpipe does not unpickle (weights_only=True); save the tensors alone with "
            "torch.save(model.encoder.state_dict(), path) in a process you trust."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - corrupt or truncated: one line with the reason
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ModelArgumentError(
            f"could not read encoder weights from {str(path)!r} (truncated or corrupt?): "
            f"{type(exc).__name__}: {reason}"
        ) from exc
    while isinstance(obj, Mapping):
        nested = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not nested:
            break
        obj = obj[nested[0]]
    if not isinstance(obj, Mapping):
        raise ModelArgumentError(
            f"encoder weights file {str(path)!r} holds a {type(obj).__name__}, not a state dict; "
            "save one with torch.save(model.encoder.state_dict(), path)."
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ModelArgumentError(
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

    # The first convolution of weights trained on another channel count is adapted, as smp
    # adapts its named pretrained weights and init_from adapts a checkpoint's.
    first = next((n for n, t in targets.items() if t.dim() == 4), None)
    src = mapped.get(first) if first is not None else None
    if (src is not None and src.dim() == 4 and src.shape[0] == targets[first].shape[0]
            and src.shape[2:] == targets[first].shape[2:] and src.shape[1] != targets[first].shape[1]):
        mapped[first] = adapt_first_conv(src, int(targets[first].shape[1]))
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
        raise ModelArgumentError(
            f"encoder weights {str(file)!r} do not fit the {type(encoder).__name__} "
            f"({counts}): {listed}{more}. Fix: use weights saved from the same encoder_name "
            "built with the same in_channels and encoder_depth (e.g. torch.save("
            "model.encoder.state_dict(), path)), or pass encoder_weights=None to train from scratch."
        )
    if unexpected and len(unexpected) >= 0.25 * (len(unexpected) + len(mapped)):
        raise ModelArgumentError(
            f"encoder weights {str(file)!r}: {len(unexpected)} of the file's "
            f"{len(unexpected) + len(mapped)} encoder keys have no place in the "
            f"{type(encoder).__name__}, e.g. {unexpected[:_MAX_LISTED]}: most likely the weights "
            "of a larger encoder of the family (resnet34 weights for resnet18), whose extra "
            "layers would be dropped. Fix: use weights saved from the same encoder_name.")
    if unexpected:
        warnings.warn(
            f"encoder weights {str(file)!r}: ignored {len(unexpected)} key(s) the "
            f"{type(encoder).__name__} has no place for, e.g. {unexpected[:_MAX_LISTED]}.",
            stacklevel=2,
        )
    encoder.load_state_dict(mapped, strict=False)


def _key_counts(message: str) -> str:
    """``"12 missing keys, 4 unexpected"`` from torch's load_state_dict error text."""
    import re

    counts = []
    for label, kind in (("Missing key(s)", "missing"), ("Unexpected key(s)", "unexpected"),
                        ("size mismatch", "of another shape")):
        if label == "size mismatch":
            n = message.count("size mismatch for ")
        else:
            found = re.search(re.escape(label) + r" in state_dict: (.*)", message)
            n = found.group(1).count('"') // 2 if found else 0
        if n:
            counts.append(f"{n} {kind}")
    return ", ".join(counts) + " tensor(s)" if counts else "tensors that do not fit"


# ----------------------------------------------------------------------- encoder stages
def encoder_stage_modules(encoder: nn.Module, stages: int, encoder_name: str) -> list[nn.Module]:
    """The modules of an smp encoder's first ``stages`` stages (stage k ends at stride ``2**k``).

    timm encoders (``"tu-"``) name each stage's last module in their ``feature_info``; their
    modules run in the order they are registered, so the stages are every module up to the end
    of that one. smp's own encoders mark only their stride-16 and stride-32 stages
    (``get_stages()``), so for them the first 3 or 4 stages are everything else.

    Args:
        encoder: ``model.encoder`` of an smp model.
        stages: How many stages, from the input: 1 .. 4.
        encoder_name: For messages.

    Returns:
        Those modules, each with its whole subtree among them (so that each can be put in
        eval mode alone), in registration order; the encoder itself is not among them.

    Raises:
        ValueError: If the encoder has no stage ending at stride ``2**stages``, or does not
            say where its stages are.
    """
    fix = "freeze the whole encoder (freeze_encoder: true) or none of it"
    timm_model = getattr(encoder, "model", None)
    info = getattr(timm_model, "feature_info", None)
    if timm_model is not None and info is not None:
        reductions = [int(r) for r in info.reduction()]
        if 2**stages not in reductions:
            possible = [r.bit_length() - 1 for r in reductions[:-1] if r & (r - 1) == 0]
            raise ModelArgumentError(
                f"freeze_encoder_stages={stages}: encoder {encoder_name!r} has no stage ending at "
                f"stride {2**stages} (its stages end at strides {reductions}); use one of "
                f"{possible}, or {fix}.")
        end_name = info.module_name()[reductions.index(2**stages)]
        named = list(timm_model.named_modules())
        names = [name for name, _ in named]
        found = next((n for n in (end_name, end_name.replace(".", "_")) if n in names), None)
        if found is None:
            raise ModelArgumentError(
                f"freeze_encoder_stages={stages}: encoder {encoder_name!r} names its stride-"
                f"{2**stages} stage {end_name!r}, a module it does not have; {fix}.")
        end = max(i for i, n in enumerate(names) if n == found or n.startswith(found + "."))
        region = [module for _, module in named[1:end + 1]]
    else:
        get_stages = getattr(encoder, "get_stages", None)
        try:
            later = get_stages() if callable(get_stages) else None
        except (AttributeError, IndexError, TypeError):  # a depth that dropped a stage
            later = None
        if not isinstance(later, Mapping) or not {16, 32} <= set(later) or stages not in (3, 4):
            raise ModelArgumentError(
                f"freeze_encoder_stages={stages}: encoder {encoder_name!r} does not say where its "
                f"stages 1-{stages} end"
                + (" (smp's own encoders mark only the stride-16 and stride-32 stages, so 3 or 4 "
                   "here)" if isinstance(later, Mapping) else "")
                + f"; use a timm encoder ('tu-...'), or {fix}.")
        kept = {id(sub) for stride, modules in later.items() if stride > 2**stages
                for module in modules for sub in module.modules()}
        region = [m for m in encoder.modules() if m is not encoder and id(m) not in kept]
    inside = {id(m) for m in region}
    return [m for m in region if all(id(sub) in inside for sub in m.modules())]


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
            architectures accept fewer values (smp then refuses it). None: smp's default for
            the architecture (4 for ``"dpt"``, else 5).
        encoder_weights: ``None`` (random init); the name of pretrained weights that smp
            or timm know for the encoder (``"imagenet"``; smp's other names such as
            ``"ssl"``; for ``"tu-"`` encoders a timm pretrained tag such as ``"a1_in1k"``, see
            :func:`resolve_pretrained`), loaded by smp/timm from their cache or downloaded
            into it; or a local ``.pth``/``.pt``/``.bin``/``.safetensors`` file with the
            encoder's state dict, loaded with :func:`load_encoder_weights`. Inside
            :func:`no_pretrained_weights` it is not read (random init).
        freeze_encoder: If True, encoder parameters get ``requires_grad=False`` and the
            encoder stays in eval mode (BatchNorm statistics frozen, no dropout) even
            after ``model.train()``; the decoder and head still train.
        freeze_encoder_stages: Freeze the encoder's first N stages only (stage k ends at
            stride ``2**k``; 1 .. ``encoder_depth - 1``), in the same way and for the whole
            run; the later stages, the decoder and the head train. Training then skips those
            stages' backward pass, which at fine strides is much of an encoder's: smp's U-Net
            on EfficientNet-Lite0, 256² crops, batch 8, bf16 on a 2-core CPU
            (``scripts/bench_nets.py``) took 1216 ms a training step, 1021 with N=2, 845 with
            N=3 and 608 with N=4. 0 (default): none. See :func:`encoder_stage_modules`.
        smp_kwargs: More arguments of the smp architecture, as a mapping: the form a YAML
            config or the command line can give (``init_args: {smp_kwargs:
            {decoder_attention_type: scse, decoder_channels: [128, 64, 32, 16, 8]}}``, or
            ``--model.net.init_args.smp_kwargs '{decoder_attention_type: scse}'``); the
            checkpoint records them, so ``predict`` rebuilds the same network.
        **kwargs: Passed on to the smp architecture (e.g. ``decoder_channels``,
            ``encoder_output_stride``), from Python; the same rules as ``smp_kwargs``. ``classes``, ``activation`` and ``aux_params``
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
            weights names smp/timm do not know for the encoder, or weights that do not fit.
        FileNotFoundError: If ``encoder_weights`` names a file that does not exist.
        PretrainedWeightsUnavailableError: If named weights are not cached and offline mode
            (``HF_HUB_OFFLINE=1``) or a failed download keeps them from being fetched.
    """

    def __init__(
        self,
        arch: str = "unet",
        encoder_name: str = "resnet34",
        in_channels: int = 3,
        num_classes: int = 2,
        encoder_depth: int | None = None,
        encoder_weights: str | None = None,
        freeze_encoder: bool = False,
        freeze_encoder_stages: int = 0,
        smp_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if smp_kwargs is not None:
            if not isinstance(smp_kwargs, Mapping):
                raise ModelArgumentError(
                    f"smp_kwargs must be a mapping of smp argument names to values, e.g. "
                    f"{{decoder_attention_type: scse}}, got {smp_kwargs!r}.")
            twice = sorted(set(smp_kwargs) & set(kwargs))
            if twice:
                raise ModelArgumentError(f"{twice} given both in smp_kwargs and as keyword "
                                         "arguments; give each once.")
            kwargs = {**smp_kwargs, **kwargs}
        archs = available_archs()
        if not isinstance(arch, str) or arch.lower() not in archs:
            close = difflib.get_close_matches(str(arch).lower(), archs, n=2)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ModelArgumentError(
                f"arch must be one of segmentation-models-pytorch's {archs}, got {arch!r}.{hint}"
            )
        check_encoder_name(encoder_name)
        if encoder_depth is None:
            encoder_depth = 4 if str(arch).lower() == "dpt" else 5
        if str(arch).lower() == "dpt" and encoder_name.startswith("tu-"):
            # timm's vision transformers take their pretraining size only, unless told otherwise
            kwargs.setdefault("dynamic_img_size", True)
        check_int("SmpModel in_channels", in_channels, 1)
        check_int("SmpModel num_classes", num_classes, 1)
        check_int("SmpModel encoder_depth", encoder_depth, 1, 5)
        if not isinstance(freeze_encoder, bool):
            raise ModelArgumentError(f"freeze_encoder must be a bool, got {freeze_encoder!r}.")
        check_int("SmpModel freeze_encoder_stages", freeze_encoder_stages, 0, encoder_depth)
        if freeze_encoder_stages == encoder_depth or (freeze_encoder and freeze_encoder_stages):
            raise ModelArgumentError(
                f"freeze_encoder_stages={freeze_encoder_stages} with freeze_encoder="
                f"{freeze_encoder} and encoder_depth={encoder_depth}: to freeze the whole "
                f"encoder give freeze_encoder: true alone; freeze_encoder_stages freezes the first "
                f"1 .. {encoder_depth - 1} of its stages.")
        if str(arch).lower() == "unetplusplus" and encoder_depth < 2:
            # smp builds it, and its nested decoder fails at the first batch (KeyError 'x_0_-1')
            raise ModelArgumentError(
                f"arch='unetplusplus' needs encoder_depth >= 2 (its nested decoder joins at "
                f"least two stages), got {encoder_depth}; use 2 or more, or arch='unet'.")
        weights_path: Path | None = None
        source: PretrainedSource | None = None
        skip = _SKIP_PRETRAINED.get()  # rebuilt for a checkpoint's weights: read nothing
        if encoder_weights is not None and _is_weights_name(encoder_weights):
            try:
                source = None if skip else resolve_pretrained(encoder_name, encoder_weights)
            except ModelArgumentError as exc:
                if not Path(encoder_weights).expanduser().exists():
                    raise
                raise ModelArgumentError(
                    f"{exc} ({encoder_weights!r} is read as a weights name; for the file or "
                    f"folder of that name here, give a path with the file's suffix, e.g. "
                    f"./{encoder_weights}.pth)") from None
        elif encoder_weights is not None and not skip:
            weights_path = _resolve_weights_path(encoder_weights)
        if "classes" in kwargs:
            raise ModelArgumentError(f"pass num_classes, not classes (got classes={kwargs['classes']!r}).")
        for name in ("activation", "aux_params"):
            if kwargs.get(name) is not None:
                raise ModelArgumentError(
                    f"{name} must be None, got {kwargs[name]!r}: {REFUSED_ARGUMENTS[name]}."
                )

        self._check_extra_kwargs(arch.lower(), encoder_name, kwargs)

        self.arch = arch.lower()
        self.encoder_name = encoder_name
        #: Whether the encoder starts from trained weights (named or a local file).
        self.encoder_pretrained = encoder_weights is not None
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.pad_multiple = 2**encoder_depth
        #: The least H and W the network takes: PAN's feature pyramid attention pools its
        #: deepest map three times, which needs 8 px there; that map is at stride
        #: 2**encoder_depth, or the encoder's output stride (smp's default 16) when smaller.
        #: The task pads smaller inputs up.
        self.min_size = (
            8 * min(2**encoder_depth, int(kwargs.get("encoder_output_stride") or 16))
            if self.arch == "pan" else 0)
        self.encoder_frozen = freeze_encoder

        if self.arch in _FULL_SIZE_UPSAMPLING and "upsampling" not in kwargs:
            kwargs["upsampling"] = _FULL_SIZE_UPSAMPLING[self.arch](encoder_depth)
        if (self.arch in _DECODER_CHANNELS_PER_STAGE and "decoder_channels" not in kwargs
                and encoder_depth != 5):  # one decoder block per stage: the last ones
            kwargs["decoder_channels"] = _DECODER_CHANNELS_PER_STAGE[self.arch][-encoder_depth:]

        if source is not None and _hub_offline() and not source.is_cached():
            raise PretrainedWeightsUnavailableError(
                source.unavailable_message("HF_HUB_OFFLINE=1 forbids downloading them")
            )
        try:
            self.model = smp.create_model(
                self.arch,
                encoder_name=encoder_name if source is None else source.build_name,
                encoder_weights=None if source is None else source.build_weights,
                in_channels=in_channels,
                classes=num_classes,
                encoder_depth=encoder_depth,
                **kwargs,
            )
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            if source is not None and not source.is_cached():
                raise PretrainedWeightsUnavailableError(
                    source.unavailable_message(
                        f"downloading them failed ({type(exc).__name__}: {reason})"
                    )
                ) from exc
            if source is not None and type(exc).__name__ == "SafetensorError":
                # a cache copied half-way to an offline machine, or an interrupted download
                raise PretrainedWeightsUnavailableError(
                    f"encoder_weights={source.weights!r}: the cached {source.describe()} in "
                    f"{source.cache_folder} cannot be read ({reason}); delete that folder and "
                    f"fetch them again: {source.fetch_command()}") from exc
            if source is not None and "Error(s) in loading state_dict" in str(exc):
                # a cache holding another encoder's weights (a mis-copied folder): torch's
                # message lists every key over many lines
                raise PretrainedWeightsUnavailableError(
                    f"encoder_weights={source.weights!r}: the cached {source.describe()} in "
                    f"{source.cache_folder} do not fit encoder {encoder_name!r} ({reason.rstrip(':')}"
                    f"; {_key_counts(str(exc))}): another encoder's weights are there; delete "
                    f"that folder and fetch them again: {source.fetch_command()}") from exc
            if not isinstance(exc, (KeyError, ValueError, TypeError, AssertionError, RuntimeError)):
                raise
            if self.arch == "dpt" and "dynamic_img_size" in str(exc):  # set above, not by the user
                raise ModelArgumentError(
                    f"arch='dpt' needs a vision-transformer encoder from timm (its decoder reads "
                    f"patch tokens), e.g. encoder_name='tu-vit_tiny_patch16_224'; "
                    f"{encoder_name!r} is not one: use another arch for it, such as 'unet'"
                ) from exc
            extra = f" and extra arguments {sorted(kwargs)}" if kwargs else ""
            raise ModelArgumentError(
                f"segmentation-models-pytorch could not build arch={self.arch!r} with "
                f"encoder_name={encoder_name!r}, encoder_depth={encoder_depth}, "
                f"in_channels={in_channels}{extra}"
                + (f", encoder_weights={encoder_weights!r}" if source is not None else "")
                + f": {type(exc).__name__}: {exc}"
            ) from exc

        if self.arch == "dpt":  # the decoder fuses the patch grid with one at half its size
            stride = int(getattr(self.model.encoder, "output_stride", 0) or 0)
            self.pad_multiple = max(self.pad_multiple, 2 * stride)
        if weights_path is not None:
            load_encoder_weights(self.model.encoder, weights_path)
        if freeze_encoder:
            for param in self.model.encoder.parameters():
                param.requires_grad_(False)
            self.model.encoder.eval()
        self.freeze_encoder_stages = freeze_encoder_stages
        #: The modules of the frozen first stages (kept in eval mode), see freeze_encoder_stages.
        self.frozen_stage_modules: list[nn.Module] = (
            encoder_stage_modules(self.model.encoder, freeze_encoder_stages, encoder_name)
            if freeze_encoder_stages else [])
        for module in self.frozen_stage_modules:
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
            module.training = False

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
            named = {"encoder_name", "encoder_weights", "in_channels", "encoder_depth",
                     *REFUSED_ARGUMENTS}  # the model's own, or refused
            options = sorted(accepted - named)
            raise ModelArgumentError(
                f"smp arch {arch!r} takes no argument(s) {unknown} (with a non-timm encoder "
                f"{encoder_name!r} smp would silently ignore them); extra arguments allowed: {options}."
            )

    @property
    def encoder(self) -> nn.Module:
        """The smp encoder (``self.model.encoder``)."""
        return self.model.encoder

    def encoder_modules(self) -> list[nn.Module]:
        """The encoder, for freezing and discriminative learning rates: ``[model.encoder]``.

        See :class:`~segpipe.models.base.SegmentationModel`.
        """
        return [self.model.encoder]

    def train(self, mode: bool = True) -> SmpModel:
        """Set training mode; a frozen encoder, or its frozen first stages, stay in eval mode.

        Args:
            mode: True for training mode, False for evaluation mode.

        Returns:
            self
        """
        super().train(mode)
        if self.encoder_frozen:
            self.model.encoder.eval()
        for module in self.frozen_stage_modules:
            module.training = False
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
            self.min_size,
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
            + (f", freeze_encoder_stages={self.freeze_encoder_stages}"
               if self.freeze_encoder_stages else "")
        )
