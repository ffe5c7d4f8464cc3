"""Transfer learning: start from another checkpoint, freeze the encoder, then fine-tune it.

Three pieces, driven by :class:`~segpipe.tasks.SegmentationTask`'s ``init_from``,
``freeze_encoder_epochs`` and ``encoder_lr_mult``:

* **Discriminative learning rates** (:func:`param_groups`, :func:`scale_encoder_lr`): the
  optimiser gets two parameter groups from the start, ``"decoder"`` (everything that is not the
  encoder: decoder, head) at the configured learning rate and ``"encoder"`` at
  ``encoder_lr_mult`` times it. Schedulers built on that optimiser scale both groups; ones that
  set every group's rate themselves (``OneCycleLR``/``CyclicLR`` with one ``max_lr``/``base_lr``)
  are caught by :func:`check_lr_ratio`.
* **Freeze, then fine-tune** (:class:`TransferLearning`): for the first ``freeze_encoder_epochs``
  epochs the encoder's parameters get ``requires_grad=False`` and its modules stay in eval mode
  (BatchNorm uses and keeps its running statistics, dropout is off); from then on it trains at
  its group's rate. The state is a function of the epoch, so a resumed run is frozen or not
  exactly as the uninterrupted one.
* **Start from any segpipe checkpoint** (:func:`load_init_from`): every tensor of the network
  whose name and shape match is loaded, the rest keeps its fresh initialisation (a head for
  another number of classes), and a different input channel count adapts the first convolution
  as segmentation-models-pytorch does for its encoders (:func:`adapt_first_conv`).

Why not Lightning's ``BackboneFinetuning``: it adds the backbone's parameters to the optimiser
as a new group when it unfreezes them. LR schedulers built before that (``CosineAnnealingLR``,
``StepLR``, ...) keep one base rate per group they saw and never scale the new group, and
LightningCLI builds the optimiser from ``model.optimizer`` without knowing about it. It also
ramps the backbone's rate up to the main rate instead of keeping a fixed multiple, needs a
``backbone`` attribute on the task, and its frozen BatchNorm layers normalise with batch
statistics (``track_running_stats=False`` in training mode) rather than the pretrained running
statistics. Here both groups exist from the first step (a frozen parameter has no gradient, so
the optimiser skips it), which keeps schedulers and checkpoints consistent across the unfreeze
and across a resume.

Networks say what their encoder is with an ``encoder_modules()`` method (see
:class:`~segpipe.models.base.SegmentationModel`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from segpipe.callbacks import UnsafeCheckpointError, load_checkpoint_file
from segpipe.errors import ConfigError, UnreadableCheckpointError
from segpipe.models.base import adapt_first_conv

__all__ = [
    "DECODER_GROUP",
    "ENCODER_GROUP",
    "InitFromError",
    "InitFromReport",
    "TransferLearning",
    "TransferLearningError",
    "adapt_first_conv",
    "check_lr_ratio",
    "encoder_modules",
    "encoder_parameters",
    "first_conv_name",
    "load_init_from",
    "param_groups",
    "scale_encoder_lr",
    "set_encoder_frozen",
]

#: ``name`` of the optimiser's parameter group for the encoder.
ENCODER_GROUP = "encoder"
#: ``name`` of the group for everything else (decoder and head).
DECODER_GROUP = "decoder"
_MAX_LISTED = 8


class TransferLearningError(ValueError):
    """A transfer-learning option cannot be applied. One line naming the option and the fix;
    ``segpipe fit`` reports it as ``segpipe: error: ...`` (exit code 2)."""


class InitFromError(TransferLearningError):
    """``model.init_from`` cannot be used: missing or unreadable file, nothing that fits, or an
    input channel count that cannot be adapted."""


# ---------------------------------------------------------------------------- the encoder
def encoder_modules(net: nn.Module, option: str = "model.freeze_encoder_epochs") -> list[nn.Module]:
    """The modules that make up ``net``'s encoder, from its ``encoder_modules()`` method.

    Args:
        net: The network.
        option: The option that needs the encoder, for the message.

    Returns:
        The encoder's modules (at least one).

    Raises:
        ConfigError: If ``net`` has no ``encoder_modules()`` or it returns no modules.
    """
    method = getattr(net, "encoder_modules", None)
    if not callable(method):
        raise ConfigError(
            f"{option} needs to know which part of the network is the encoder, but "
            f"{type(net).__name__} has no encoder_modules() method; use segpipe.models.UNet, FCN "
            "or SmpModel, or give your network an encoder_modules() that returns the encoder's "
            "modules (see segpipe.models.base.SegmentationModel)."
        )
    modules = list(method())
    if not modules or not all(isinstance(m, nn.Module) for m in modules):
        raise ConfigError(
            f"{type(net).__name__}.encoder_modules() must return a non-empty list of nn.Module, "
            f"got {modules!r}."
        )
    return modules


def encoder_parameters(net: nn.Module, option: str = "model.encoder_lr_mult") -> list[nn.Parameter]:
    """The encoder's parameters, each once, in module order.

    Args:
        net: The network (with ``encoder_modules()``).
        option: The option that needs the encoder, for the message.

    Returns:
        The parameters.
    """
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for module in encoder_modules(net, option):
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def _frozen_module_count(net: nn.Module | None) -> int:
    """How many modules a network built frozen keeps in eval mode while it trains: all of the
    encoder's with ``freeze_encoder: true``, those of the first stages with
    ``freeze_encoder_stages`` (:class:`~segpipe.models.SmpModel`); else 0."""
    if net is None:
        return 0
    if getattr(net, "encoder_frozen", False) is True:
        return len({id(sub) for module in encoder_modules(net) for sub in module.modules()})
    return len(getattr(net, "frozen_stage_modules", ()))


def set_encoder_frozen(
    net: nn.Module, frozen: bool, training: bool = True, trainable: Iterable[nn.Parameter] | None = None
) -> list[nn.Parameter]:
    """Freeze the encoder (no gradients, eval mode) or unfreeze it.

    Args:
        net: The network (with ``encoder_modules()``).
        frozen: True to freeze, False to unfreeze.
        training: When unfreezing, the mode to put the encoder's modules in (the task's).
        trainable: When unfreezing, the parameters to make trainable again (those this
            function returned when freezing); None means every encoder parameter.

    Returns:
        When freezing, the parameters that were trainable and are now frozen; else ``[]``.
    """
    modules = encoder_modules(net)
    if frozen:
        changed = []
        for module in modules:
            for param in module.parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
                    changed.append(param)
            module.eval()
        return changed
    params = encoder_parameters(net) if trainable is None else list(trainable)
    for param in params:
        param.requires_grad_(True)
    for module in modules:
        module.train(training)
    for module in getattr(net, "frozen_stage_modules", ()):  # frozen for the whole run
        module.training = False
    return []


# ------------------------------------------------------------------ discriminative learning rates
def param_groups(module: nn.Module, net: nn.Module) -> list[dict[str, Any]]:
    """Two parameter groups of ``module``'s parameters: ``"decoder"`` (all but the encoder) and
    ``"encoder"`` (those of ``net.encoder_modules()``).

    Args:
        module: The module whose parameters are optimised (the task).
        net: Its network.

    Returns:
        ``[{"params": [...], "name": "decoder"}, {"params": [...], "name": "encoder"}]``, for the
        optimiser factory; no ``lr`` keys, so the optimiser's own ``lr`` applies to both, and
        :func:`scale_encoder_lr` then scales the encoder's.
    """
    encoder_ids = {id(p) for p in encoder_parameters(net)}
    decoder: list[nn.Parameter] = []
    encoder: list[nn.Parameter] = []
    for param in module.parameters():
        (encoder if id(param) in encoder_ids else decoder).append(param)
    return [{"params": decoder, "name": DECODER_GROUP}, {"params": encoder, "name": ENCODER_GROUP}]


def _group(optimizer: torch.optim.Optimizer, name: str) -> dict[str, Any] | None:
    return next((g for g in optimizer.param_groups if g.get("name") == name), None)


def scale_encoder_lr(optimizer: torch.optim.Optimizer, mult: float) -> None:
    """Multiply the learning rate of the optimiser's ``"encoder"`` group by ``mult``.

    Call it before building the LR scheduler, which takes the groups' rates as its base rates.

    Args:
        optimizer: Optimiser built from :func:`param_groups`.
        mult: ``encoder_lr_mult``.
    """
    group = _group(optimizer, ENCODER_GROUP)
    if group is not None and mult != 1:
        group["lr"] = group["lr"] * mult


def check_lr_ratio(optimizer: torch.optim.Optimizer, mult: float, scheduler: object = None) -> None:
    """Check that the encoder's rate is still ``mult`` times the decoder's after the scheduler
    was built (schedulers such as ``OneCycleLR`` set every group's rate from their own value).

    Args:
        optimizer: Optimiser built from :func:`param_groups`.
        mult: ``encoder_lr_mult``.
        scheduler: The scheduler, for the message.

    Raises:
        ValueError: Naming the scheduler, both rates and the fix.
    """
    encoder, decoder = _group(optimizer, ENCODER_GROUP), _group(optimizer, DECODER_GROUP)
    if encoder is None or decoder is None:
        return
    enc_lr, dec_lr = float(encoder["lr"]), float(decoder["lr"])
    if dec_lr == 0.0:  # e.g. a warm-up starting at 0: nothing to compare yet
        return
    if not math.isclose(enc_lr / dec_lr, mult, rel_tol=1e-6):
        name = type(scheduler).__name__ if scheduler is not None else "the LR scheduler"
        raise ConfigError(
            f"model.encoder_lr_mult={mult} but {name} set the encoder's learning rate to {enc_lr:g} "
            f"and the decoder's to {dec_lr:g} (ratio {enc_lr / dec_lr:g}): it sets every parameter "
            "group's rate from its own arguments. Give it one value per group, in the order "
            f"[decoder, encoder] (e.g. OneCycleLR max_lr: [M, {mult:g} x M]), "
            "or use a scheduler that scales the optimiser's rates (CosineAnnealingLR, StepLR, "
            "LinearLR, ReduceLROnPlateau, ...)."
        )


# ------------------------------------------------------------------------------ init_from
def first_conv_name(net: nn.Module) -> str | None:
    """Name (in ``net.state_dict()``) of the weight of the first convolution that reads the
    input: the first ``Conv2d`` whose ``in_channels`` is ``net.in_channels``, or None."""
    in_channels = getattr(net, "in_channels", None)
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and (in_channels is None or module.in_channels == in_channels):
            return f"{name}.weight" if name else "weight"
    return None


@dataclass
class InitFromReport:
    """What :func:`load_init_from` did.

    Attributes:
        path: The checkpoint.
        loaded: Names of the network's tensors taken from the checkpoint.
        reinitialised: Names that kept their fresh initialisation (absent from the checkpoint or
            of another shape).
        adapted: ``(name, old in_channels, new in_channels)`` of an adapted first convolution.
        unused: Checkpoint tensors of the network with no place in this one.
        source: What the checkpoint holds (network class, classes, input channels), if known.
        foreign: The re-initialised layer weights (2-D or more) that another class count
            does not explain: absent from the checkpoint, or of another shape beyond the
            output channels (another depth or width: those layers start from random weights).
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    adapted: tuple[str, int, int] | None = None
    unused: list[str] = field(default_factory=list)
    source: str = ""
    foreign: list[str] = field(default_factory=list)
    encoder_layers: int = 0
    encoder_loaded: int = 0

    @property
    def encoder_random(self) -> bool:
        """Whether the network has an encoder of which no layer came from the checkpoint."""
        return self.encoder_layers > 0 and self.encoder_loaded == 0

    def foreign_warning(self) -> str | None:
        """One line when layers beyond the head start from random weights, else None."""
        if self.encoder_random:
            return (
                f"init_from {self.path}: none of the {self.encoder_layers} layers of this "
                f"network's encoder is in the checkpoint under its name and shape, so the whole "
                f"encoder starts from random weights and only "
                f"{len(self.loaded)} tensors of the decoder and head are transferred: the "
                f"checkpoint{f' ({self.source})' if self.source else ''} has another encoder "
                "(an smp encoder and its timm 'tu-' twin name their layers differently); start "
                "from a checkpoint with this network's encoder")
        if not self.foreign:
            return None
        names = ", ".join(self.foreign[:_MAX_LISTED])
        more = len(self.foreign) - min(len(self.foreign), _MAX_LISTED)
        return (
            f"init_from {self.path}: {len(self.foreign)} layers of this network are not in the "
            f"checkpoint or have another shape there ({names}{f', and {more} more' if more else ''}"
            f"), so they start from random weights, not only the head: the checkpoint"
            f"{f' ({self.source})' if self.source else ''} is of another architecture, depth or "
            "width; start from one of the same network to transfer every layer")

    def summary(self) -> str:
        """``loaded 52 tensors, re-initialised 2 (head.weight, head.bias)``."""
        text = f"loaded {len(self.loaded)} tensors, re-initialised {len(self.reinitialised)}"
        if self.reinitialised:
            names = self.reinitialised[:_MAX_LISTED]
            more = len(self.reinitialised) - len(names)
            text += f" ({', '.join(names)}{f', and {more} more' if more else ''})"
        return text

    def lines(self) -> list[str]:
        """The log lines: source, summary, adaptation and unused tensors."""
        out = [f"init_from {self.path}{f' ({self.source})' if self.source else ''}:", self.summary()]
        if self.adapted:
            name, old, new = self.adapted
            out.append(
                f"adapted the first convolution {name} from {old} to {new} input channels "
                "(as smp's patch_first_conv)"
            )
        if self.unused:
            listed = ", ".join(self.unused[:_MAX_LISTED])
            more = len(self.unused) - min(len(self.unused), _MAX_LISTED)
            out.append(
                f"{len(self.unused)} tensors of the checkpoint have no place in this network "
                f"({listed}{f', and {more} more' if more else ''})"
            )
        return out


def _network_state(ckpt: Any, path: str) -> dict[str, Tensor]:
    """The network's tensors from a segpipe checkpoint (``state_dict`` with ``net.`` keys) or a
    bare state dict of the network."""
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        state = ckpt["state_dict"]
        net = {
            k[len("net."):]: v for k, v in state.items() if k.startswith("net.") and isinstance(v, Tensor)
        }
        if net:
            return net
        return {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    if isinstance(ckpt, Mapping):
        tensors = {str(k): v for k, v in ckpt.items() if isinstance(v, Tensor)}
        if tensors:
            return {k.removeprefix("net."): v for k, v in tensors.items()}
    raise InitFromError(
        f"model.init_from: {path} holds no network weights (expected a segpipe checkpoint with a "
        "'state_dict', or a state dict of tensors); give a checkpoint written by `segpipe fit`, "
        "e.g. runs/<run>/checkpoints/last.ckpt."
    )


def _describe(ckpt: Any) -> tuple[str, int | None]:
    """``("UNet, 4 classes, 3 input channels", 3)`` from a checkpoint's hyperparameters."""
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    if not isinstance(hp, Mapping):
        return "", None
    parts = []
    net = hp.get("net")
    if isinstance(net, Mapping) and net.get("class_path"):
        parts.append(str(net["class_path"]).rsplit(".", 1)[-1])
    spec = hp.get("data_spec") if isinstance(hp.get("data_spec"), Mapping) else {}
    classes = spec.get("num_classes") or hp.get("num_classes")
    if classes:
        parts.append(f"{classes} classes")
    in_channels = spec.get("in_channels")
    if in_channels:
        parts.append(f"{in_channels} input channels")
    return ", ".join(parts), (int(in_channels) if in_channels else None)


def _encoder_layer_names(net: nn.Module) -> list[str]:
    """State-dict names of the layer weights (2-D or more) in ``net``'s encoder; none for a
    network without ``encoder_modules()``."""
    try:
        modules = encoder_modules(net)
    except ConfigError:
        return []
    inside = {id(p) for m in modules for p in m.parameters()}
    return [name for name, p in net.named_parameters() if id(p) in inside and p.dim() >= 2]


def _part_of(state: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> str | None:
    """The prefix (``"model.encoder."``) under which ``state`` is a part of the network
    ``target`` is the state dict of (an encoder saved alone): most of its tensors fit there by
    name and shape. None when it is not."""
    if not state:
        return None
    first = next(iter(state))
    best, fits = None, 0
    for name in target:
        if name.endswith("." + first):
            prefix = name[: -len(first)]
            n = sum(prefix + k in target and tuple(target[prefix + k].shape) == tuple(v.shape)
                    for k, v in state.items())
            if n > fits:
                best, fits = prefix, n
    return best if fits * 2 > len(state) else None


def load_init_from(net: nn.Module, path: str | os.PathLike[str],
                   dry_run: bool = False) -> InitFromReport:
    """Load the tensors of a checkpoint that fit ``net``; the rest keeps its initialisation.

    A tensor is loaded when the checkpoint has one of the same name (relative to the network)
    and shape. The first convolution is adapted when only its input channel count differs
    (:func:`adapt_first_conv`). Loading is in place (``copy_``), so parameters keep their
    identity, device and memory format. The checkpoint is read with ``weights_only=True``.

    Args:
        net: The freshly built network.
        path: A segpipe checkpoint (``.ckpt``), or a file holding the network's state dict.
        dry_run: Check only: the file is mapped, not read, and ``net`` is left as it is; the
            same errors are raised and the report says what would be loaded.

    Returns:
        The report; :meth:`InitFromReport.summary` is the line segpipe logs.

    Raises:
        InitFromError: Missing or unreadable file, no tensor that fits, or a different input
            channel count whose first convolution cannot be adapted (the reason is named).
    """
    file = Path(path).expanduser()
    where = f"model.init_from: {file}"
    if file.is_dir():
        found = sorted(str(p.relative_to(file)) for p in file.glob("**/*.ckpt"))[:3]
        raise InitFromError(
            f"{where}: a folder, not a checkpoint; give a checkpoint file in it"
            + (f", e.g. {file / found[0]}" if found else " (it holds no .ckpt)") + "."
        )
    if not file.is_file():
        raise InitFromError(
            f"{where}: no such file (relative paths are resolved against {os.getcwd()}); give the "
            "path of a segpipe checkpoint, e.g. runs/<run>/checkpoints/last.ckpt or best-*.ckpt."
        )
    try:
        ckpt = load_checkpoint_file(file, map_location="cpu", weights_only=True, mmap=dry_run)
    except UnsafeCheckpointError as exc:
        raise InitFromError(
            f"{where}: refusing to load it: besides tensors it holds pickled Python objects, and "
            "init_from reads checkpoints with weights_only=True only; save the weights alone "
            "(torch.save({'state_dict': model.state_dict()}, path)) from a process you trust."
        ) from exc
    except UnreadableCheckpointError as exc:  # truncated or corrupt: named with what to use
        raise InitFromError(f"model.init_from: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt/truncated file: one line with the reason
        raise InitFromError(
            f"{where}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})."
        ) from exc

    state = _network_state(ckpt, str(file))
    source, ckpt_in = _describe(ckpt)
    report = InitFromReport(path=str(file), source=source)
    target = net.state_dict()
    conv_name = first_conv_name(net)
    net_in = getattr(net, "in_channels", None)

    if ckpt_in is not None and net_in is not None and ckpt_in != int(net_in):
        reason = None
        conv = dict(net.named_modules()).get(conv_name.rsplit(".", 1)[0]) if conv_name else None
        if conv_name is None or conv_name not in state:
            reason = (
                f"the first convolution of {type(net).__name__} ({conv_name or 'none found'}) is "
                "not in the checkpoint"
            )
        elif isinstance(conv, nn.Conv2d) and conv.groups != 1:
            reason = f"its first convolution {conv_name} is grouped (groups={conv.groups})"
        elif state[conv_name].dim() != 4 or int(state[conv_name].shape[1]) != ckpt_in:
            reason = f"{conv_name} in the checkpoint has shape {tuple(state[conv_name].shape)}"
        if reason is not None:
            raise InitFromError(
                f"{where}: the checkpoint was trained on {ckpt_in} input channels and the network "
                f"takes {net_in}, but {reason}, so it cannot be adapted; use a checkpoint with "
                f"{net_in} input channels, or set data.in_channels to {ckpt_in}."
            )

    chosen: dict[str, Tensor] = {}
    for name, tensor in target.items():
        src = state.get(name)
        if src is None:
            report.reinitialised.append(name)
            if tensor.dim() >= 2:  # a layer the checkpoint does not have at all
                report.foreign.append(name)
        elif tuple(src.shape) == tuple(tensor.shape):
            chosen[name] = src
            report.loaded.append(name)
        elif (
            name == conv_name
            and src.dim() == 4
            and src.shape[0] == tensor.shape[0]
            and src.shape[2:] == tensor.shape[2:]
        ):
            chosen[name] = src if dry_run else adapt_first_conv(src, int(tensor.shape[1]))
            report.loaded.append(name)
            report.adapted = (name, int(src.shape[1]), int(tensor.shape[1]))
        else:
            report.reinitialised.append(name)
            if tensor.dim() >= 2 and tuple(src.shape[1:]) != tuple(tensor.shape[1:]):
                report.foreign.append(name)  # not a head of another class count
    report.unused = [k for k in state if k not in target]
    encoder = _encoder_layer_names(net)
    if getattr(net, "encoder_pretrained", False) is True:
        # an encoder built with pretrained weights keeps them where the checkpoint has none
        inside = set(encoder)
        report.foreign = [name for name in report.foreign if name not in inside]
    else:
        report.encoder_layers = len(encoder)
        report.encoder_loaded = sum(name in chosen for name in encoder)
    # Only a layer's weights (a convolution's kernels, a linear layer's matrix) carry what was
    # learnt; a few biases and BatchNorm step counters fitting by chance is no transfer.
    if not any(chosen[name].dim() >= 2 for name in chosen):
        part = _part_of(state, target)
        hint = (f" The file holds the weights of this network's {part.rstrip('.')!r} alone (its "
                f"names without the {part!r} prefix): "
                + ("give it as model.net.init_args.encoder_weights instead."
                   if part.rstrip(".").endswith("encoder") else
                   f"save them with the prefix, {{'{part}' + name: tensor}}.")) if part else ""
        raise InitFromError(
            f"{where}: no tensor of the checkpoint fits the network (checkpoint: "
            f"{source or 'unknown network'}, tensors {list(state)[:3]}...; this network: "
            f"{type(net).__name__}, tensors {list(target)[:3]}...; no layer's weights have the "
            "same name and shape); init_from needs a checkpoint of the same architecture and "
            f"width (the number of classes and input channels may differ).{hint}"
        )
    if dry_run:
        return report
    with torch.no_grad():
        for name, value in chosen.items():
            target[name].copy_(value.to(dtype=target[name].dtype))
    return report


# ------------------------------------------------------------------------------ the callback
def _check_ddp(trainer: L.Trainer) -> None:
    """DDP must tolerate parameters without gradients while the encoder is frozen."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy):
        return
    kwargs = getattr(strategy, "_ddp_kwargs", None)  # Lightning keeps DDP's kwargs here
    if not isinstance(kwargs, dict) or kwargs.get("find_unused_parameters") or kwargs.get("static_graph"):
        return
    raise ConfigError(
        "model.freeze_encoder_epochs with DDP: while the encoder is frozen its parameters get no "
        "gradients, which plain DDP waits for; use --trainer.strategy "
        "ddp_find_unused_parameters_true."
    )


class TransferLearning(L.Callback):
    """Applies ``init_from`` at the start of a new run and keeps the encoder frozen for the first
    ``freeze_encoder_epochs`` epochs. :class:`~segpipe.tasks.SegmentationTask` adds it by itself
    (``configure_callbacks``) when either option is set.

    It is always present (so that resuming a run with other transfer-learning options than it
    was trained with is caught in ``on_load_checkpoint``, before the optimiser's state is loaded
    into parameter groups that do not fit it), and does nothing when no option is set.

    ``init_from`` is applied in ``on_fit_start``: after the optimiser exists (loading is in
    place, so it keeps its parameters) and after ``--ckpt_path`` was read, so a resumed run is
    recognised (``trainer.ckpt_path``) and keeps its own weights. Only ``fit`` applies it.

    Freezing is decided from ``trainer.current_epoch`` at every training epoch start (and
    re-asserted before each training batch, in case something switched the modules back to
    training mode), so resuming in either phase continues correctly without any state of its own.
    At the end of ``fit`` the encoder is left trainable.

    Args:
        init_from: Checkpoint to start from, or None.
        freeze_encoder_epochs: Epochs to keep the encoder frozen (0: never).
    """

    def __init__(self, init_from: str | None = None, freeze_encoder_epochs: int = 0) -> None:
        super().__init__()
        self.init_from = init_from
        self.freeze_encoder_epochs = int(freeze_encoder_epochs)
        self._frozen: list[nn.Parameter] | None = None  # parameters this callback froze
        self._announced = False
        self.report: InitFromReport | None = None
        self._quiet_filter: tuple | None = None  # the filter setup added, dropped when fit ends

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        net = getattr(pl_module, "net", None)
        # frozen random features: freezing only makes sense for trained weights
        random_encoder = (stage == "fit" and getattr(net, "encoder_pretrained", True) is False
                          and not self.init_from)
        stages = getattr(net, "freeze_encoder_stages", 0)
        if random_encoder and getattr(net, "encoder_frozen", False) is True:
            rank_zero_warn(
                f"freeze_encoder: true keeps the randomly initialised encoder of "
                f"{type(net).__name__} (encoder_weights: null, no model.init_from) frozen for the "
                "whole run: the decoder learns on random features; give the encoder trained "
                "weights (encoder_weights, or model.init_from), or set "
                "model.net.init_args.freeze_encoder false")
        elif random_encoder and stages:
            rank_zero_warn(
                f"freeze_encoder_stages: {stages} keeps the first {stages} stages of "
                f"{type(net).__name__}'s randomly initialised encoder (encoder_weights: null, no "
                "model.init_from) frozen for the whole run: the rest learns on their random "
                "features; give the encoder trained weights (encoder_weights, or "
                "model.init_from), or set model.net.init_args.freeze_encoder_stages 0")
        quiet = _frozen_module_count(net) if stage == "fit" else 0
        if quiet:  # Lightning counts eval-mode modules at the start of training: these are meant
            # Lightning warns after setup returns, so no catch_warnings block here can scope the
            # filter; teardown (or on_exception) removes it, so later fits are warned as usual.
            warnings.filterwarnings(
                "ignore", message=rf"Found {quiet} module\(s\) in eval mode at the start of training")
            self._quiet_filter = warnings.filters[0]
        if stage == "fit" and self.freeze_encoder_epochs > 0:
            _check_ddp(trainer)
            epochs = trainer.max_epochs
            if epochs is not None and 0 <= epochs <= self.freeze_encoder_epochs:
                rank_zero_warn(
                    f"model.freeze_encoder_epochs={self.freeze_encoder_epochs} with "
                    f"trainer.max_epochs={epochs}: the encoder stays frozen for the whole run "
                    "and is never fine-tuned; freeze fewer epochs than the run has")
            if random_encoder:
                rank_zero_warn(
                    f"model.freeze_encoder_epochs={self.freeze_encoder_epochs} freezes a "
                    f"randomly initialised encoder ({type(net).__name__} without pretrained "
                    "weights, no model.init_from): its random features are kept for those "
                    "epochs; start from trained weights (model.init_from, or an SmpModel's "
                    "encoder_weights) or set --model.freeze_encoder_epochs 0")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.init_from:
            if trainer.ckpt_path:
                rank_zero_info(
                    f"init_from {self.init_from} not applied: resuming from {trainer.ckpt_path}, "
                    "whose weights are kept."
                )
            else:
                self.report = load_init_from(pl_module.net, self.init_from)
                for line in self.report.lines():
                    rank_zero_info(line)
                partial = self.report.foreign_warning()
                if partial and self.report.encoder_random and self.freeze_encoder_epochs > 0:
                    partial += (f"; model.freeze_encoder_epochs={self.freeze_encoder_epochs} "
                                "keeps those random features frozen for its epochs")
                elif partial and self.report.encoder_random and getattr(
                        pl_module.net, "encoder_frozen", False) is True:
                    partial += ("; freeze_encoder: true keeps those random features frozen for "
                                "the whole run")
                if partial:
                    rank_zero_warn(partial)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse to resume with parameter groups other than the checkpoint's optimiser has."""
        states = checkpoint.get("optimizer_states") or []
        if trainer.state.fn != "fit" or not states or not isinstance(states[0], Mapping):
            return
        saved = [g.get("name") for g in states[0].get("param_groups", [])]
        saved_two = saved == [DECODER_GROUP, ENCODER_GROUP]
        two = (
            getattr(pl_module, "freeze_encoder_epochs", 0) > 0
            or getattr(pl_module, "encoder_lr_mult", 1) != 1
        )
        hp = checkpoint.get("hyper_parameters") or {}
        where = f"--ckpt_path {trainer.ckpt_path}" if trainer.ckpt_path else "the checkpoint"
        if saved_two == two:
            # The optimiser's groups keep the learning rates they were saved with, so other
            # values would be logged and recorded but not used: refuse them.
            changed = [
                (key, hp.get(key, default), getattr(pl_module, key, default))
                for key, default in (("freeze_encoder_epochs", 0), ("encoder_lr_mult", 1.0))
                if float(hp.get(key, default)) != float(getattr(pl_module, key, default))
            ]
            if two and changed:
                given = ", ".join(f"model.{k}={now:g}" for k, _, now in changed)
                options = " ".join(f"--model.{k} {saved:g}" for k, saved, _ in changed)
                raise TransferLearningError(
                    f"{where}: that run was trained with other transfer options than this one "
                    f"({given}); the saved optimiser keeps its own learning rates, so resume "
                    f"with {options}, or start a new run from it with --model.init_from "
                    f"{trainer.ckpt_path or 'CKPT'} and the new options.")
            return
        if saved_two:
            options = (
                f"--model.freeze_encoder_epochs {hp.get('freeze_encoder_epochs', 0)} "
                f"--model.encoder_lr_mult {hp.get('encoder_lr_mult', 1.0)}"
            )
            raise TransferLearningError(
                f"{where}: that run trained the encoder in its own parameter group "
                "(model.freeze_encoder_epochs / model.encoder_lr_mult), but this one is configured "
                f"with a single group; resume with the options it was trained with: {options}."
            )
        raise TransferLearningError(
            f"{where}: that run was trained with one parameter group, but this one sets "
            f"model.freeze_encoder_epochs={pl_module.freeze_encoder_epochs} / "
            f"model.encoder_lr_mult={pl_module.encoder_lr_mult:g}, which need two (decoder, encoder); "
            "resume it without these options, or start a new run from it with "
            f"--model.init_from {trainer.ckpt_path or 'CKPT'} and these options."
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.freeze_encoder_epochs > 0:
            self._apply(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.freeze_encoder_epochs <= 0:
            return
        self._apply(trainer, pl_module)
        if self._frozen is not None:
            for module in encoder_modules(pl_module.net):
                if module.training:
                    module.eval()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._frozen is not None:  # leave the network as trainable as it came
            set_encoder_frozen(pl_module.net, False, pl_module.training, self._frozen)
            self._frozen = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._drop_quiet_filter()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._drop_quiet_filter()  # a failed fit skips the teardown hooks

    def _drop_quiet_filter(self) -> None:
        if self._quiet_filter is not None:
            if self._quiet_filter in warnings.filters:  # a catch_warnings exit may have done it
                warnings.filters.remove(self._quiet_filter)
            self._quiet_filter = None

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        frozen = trainer.current_epoch < self.freeze_encoder_epochs
        mult = f"{getattr(pl_module, 'encoder_lr_mult', 1.0):g}"
        if frozen and self._frozen is None:
            self._frozen = set_encoder_frozen(pl_module.net, True)
            rank_zero_info(
                f"epoch {trainer.current_epoch}: encoder frozen (eval mode, no gradients) until "
                f"epoch {self.freeze_encoder_epochs}; decoder and head train"
            )
        elif not frozen and self._frozen is not None:
            set_encoder_frozen(pl_module.net, False, pl_module.training, self._frozen)
            self._frozen = None
            rank_zero_info(
                f"epoch {trainer.current_epoch}: encoder unfrozen, trained at {mult} x the learning rate"
            )
        elif not frozen and not self._announced:  # e.g. resumed after the frozen epochs
            rank_zero_info(
                f"epoch {trainer.current_epoch}: encoder trains at {mult} x the learning rate "
                f"(frozen for epochs 0-{self.freeze_encoder_epochs - 1})"
            )
        self._announced = True
