"""Everything prediction needs, from a checkpoint alone.

A checkpoint written by ``segpipe fit`` (LightningCLI) holds the task's hyperparameters, including
the network as ``{"class_path", "init_args"}``, and the data module's hyperparameters (classes,
colours, bands, normalisation, eval resize). :func:`load_predictor` rebuilds the task and gathers
the preprocessing and palette in a :class:`PredictConfig`; the predict command and the ONNX export
share it.
"""

from __future__ import annotations

import inspect
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segpipe.data.datamodule import SegmentationDataModule, default_class_colors
from segpipe.data.transforms import default_mean_std
from segpipe.tasks import SegmentationTask

__all__ = [
    "CheckpointError",
    "PredictConfig",
    "load_predictor",
    "read_checkpoint",
    "save_predict_checkpoint",
]

log = logging.getLogger(__name__)

_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for prediction; the message names the file and the fix."""


@dataclass(frozen=True)
class PredictConfig:
    """Preprocessing and output palette of a trained model.

    Attributes:
        checkpoint: The checkpoint file.
        num_classes: Classes the model predicts.
        class_names: One name per class.
        class_colors: One RGB triplet per class (``data.class_colors``).
        in_channels: Channels the model takes.
        bands: 1-based band selection applied when reading (``data.bands``), or None.
        mean: Per-channel mean of [0, 1]-scaled inputs.
        std: Per-channel std.
        ignore_index: Label ignored in training (never predicted), or None.
        eval_resize: ``(height, width)`` images were resized to for evaluation, or None.
        pad_multiple: H and W of the network input must divide by it (the task pads).
        net: The network's ``class_path`` (for messages).
    """

    checkpoint: str
    num_classes: int
    class_names: list[str]
    class_colors: list[list[int]]
    in_channels: int
    bands: list[int] | None
    mean: list[float]
    std: list[float]
    ignore_index: int | None = None
    eval_resize: tuple[int, int] | None = None
    pad_multiple: int = 32
    net: str = ""

    @property
    def mask_dtype(self) -> np.dtype:
        """uint8 for up to 255 classes (255 stays free for nodata), else uint16."""
        return np.dtype(np.uint8) if self.num_classes <= 255 else np.dtype(np.uint16)

    @property
    def nodata_value(self) -> int:
        """Label written where the input is nodata: the largest value of :attr:`mask_dtype`."""
        return int(np.iinfo(self.mask_dtype).max)

    def palette(self) -> np.ndarray:
        """Colour lookup table indexed by label, with black for the nodata value.

        Returns:
            uint8 array (nodata_value + 1, 3).
        """
        lut = np.zeros((self.nodata_value + 1, 3), dtype=np.uint8)
        colors = np.asarray(self.class_colors, dtype=np.int64).reshape(-1, 3)
        lut[: len(colors)] = np.clip(colors, 0, 255).astype(np.uint8)
        return lut


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's dict safely (``weights_only=True``) onto the CPU.

    Args:
        path: Checkpoint file.

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: When the file does not exist.
        CheckpointError: When it is not a readable (Lightning) checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint {p} not found; pass --ckpt_path with a .ckpt file written by "
            "`segpipe fit` (e.g. RUN/checkpoints/last.ckpt)"
        )
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{p}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "pass a .ckpt written by `segpipe fit`"
        ) from None
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{p}: not a Lightning checkpoint (no state_dict); pass a .ckpt written by "
            "`segpipe fit`"
        )
    return dict(ckpt)


def _datamodule_hparams(hp: Mapping[str, Any] | None) -> SegmentationDataModule | None:
    """The data module rebuilt from saved hyperparameters (fills defaults; touches no disk)."""
    if not hp:
        return None
    params = inspect.signature(SegmentationDataModule.__init__).parameters
    kwargs = {k: v for k, v in hp.items() if k in params and k != "self"}
    kwargs.setdefault("root", ".")
    return SegmentationDataModule(**kwargs)


def load_predictor(
    ckpt_path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[SegmentationTask, PredictConfig]:
    """Rebuild the task from a checkpoint and collect its prediction settings.

    Args:
        ckpt_path: Checkpoint written by ``segpipe fit`` (or :func:`save_predict_checkpoint`).
        map_location: Where to load the weights.

    Returns:
        ``(task in eval mode, config)``.

    Raises:
        FileNotFoundError: Missing checkpoint.
        CheckpointError: Checkpoints that cannot rebuild their network, or whose data and model
            settings disagree.
    """
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path)
    hp = ckpt.get("hyper_parameters") or {}
    net_cfg = hp.get("net")
    if not isinstance(net_cfg, Mapping) or "class_path" not in net_cfg:
        raise CheckpointError(
            f"{path}: the checkpoint's hyperparameters have no 'net' entry (the task was built "
            "in Python, where the network object is not saved), so the network cannot be "
            "rebuilt from the checkpoint alone. Train with `segpipe fit --config ...`, or save "
            "the weights with segpipe.predict.save_predict_checkpoint(path, net={'class_path': "
            "..., 'init_args': {...}}, data={...}, state_dict=task.state_dict())."
        )
    try:
        task = SegmentationTask.load_from_checkpoint(
            path, map_location=map_location, weights_only=True
        )
    except Exception as exc:  # noqa: BLE001 - re-raised with the file and the likely fix
        raise CheckpointError(
            f"{path}: could not rebuild {net_cfg.get('class_path')} from the checkpoint "
            f"({type(exc).__name__}: {exc}); check that the model code matches the one used "
            "for training"
        ) from exc
    task.eval()

    try:
        dm = _datamodule_hparams(ckpt.get("datamodule_hyper_parameters"))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: invalid data hyperparameters in the checkpoint ({exc})"
        ) from exc
    net = task.net
    num_classes = int(task.num_classes)
    if dm is not None:
        if dm.num_classes != num_classes:
            raise CheckpointError(
                f"{path}: data.num_classes={dm.num_classes} but the model predicts {num_classes} "
                "classes; the checkpoint is inconsistent"
            )
        in_channels = dm.in_channels
        bands, mean, std = dm.bands, list(dm.mean), list(dm.std)
        colors = [list(c) for c in dm.class_colors]
        names = list(task.class_names or dm.class_names)
        ignore_index = dm.ignore_index
        resize = dm.hparams.get("eval_resize")
    else:
        log.warning(
            "%s has no data hyperparameters: using default normalisation and colours", path
        )
        in_channels = int(getattr(net, "in_channels", 3))
        bands = None
        mean, std = default_mean_std(in_channels)
        colors = default_class_colors(num_classes)
        names = list(task.class_names or [f"class_{i}" for i in range(num_classes)])
        ignore_index = task.ignore_index
        resize = None
    net_in = getattr(net, "in_channels", None)
    if net_in is not None and int(net_in) != in_channels:
        raise CheckpointError(
            f"{path}: data.in_channels={in_channels} but the network takes {net_in} channels; "
            "the checkpoint is inconsistent"
        )
    config = PredictConfig(
        checkpoint=str(path),
        num_classes=num_classes,
        class_names=names,
        class_colors=colors,
        in_channels=int(in_channels),
        bands=list(bands) if bands is not None else None,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        ignore_index=ignore_index,
        eval_resize=(int(resize[0]), int(resize[1])) if resize else None,
        pad_multiple=int(task.pad_multiple),
        net=str(net_cfg.get("class_path", "")),
    )
    return task, config


def save_predict_checkpoint(
    path: str | Path,
    net: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    **task_kwargs: Any,
) -> Path:
    """Write a checkpoint that :func:`load_predictor` (and ``segpipe predict``) can use.

    For models trained in Python (whose checkpoints cannot rebuild the network) and for tests.

    Args:
        path: Output ``.ckpt``.
        net: ``{"class_path": "segpipe.models.UNet", "init_args": {...}}``.
        data: Data hyperparameters (``num_classes``, ``class_colors``, ``mean``, ``bands``...).
        state_dict: The task's weights (keys ``net.*``); the freshly initialised network's
            weights when None.
        **task_kwargs: Other :class:`SegmentationTask` arguments (``num_classes``, ...).

    Returns:
        The written path.
    """
    import lightning
    from lightning.pytorch.cli import instantiate_module

    from segpipe.fileio import atomic_path

    net_cfg = {"class_path": net["class_path"], "init_args": dict(net.get("init_args") or {})}
    hparams: dict[str, Any] = {"net": net_cfg, **task_kwargs}
    if state_dict is None:
        task = instantiate_module(SegmentationTask, hparams)
        state_dict = task.state_dict()
        hparams.setdefault("num_classes", task.num_classes)
    data_hp = dict(data or {})
    data_hp.setdefault("root", ".")
    ckpt = {
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": dict(state_dict),
        "hyper_parameters": {**hparams, "_instantiator": _INSTANTIATOR},
        "datamodule_hyper_parameters": {**data_hp, "_instantiator": _INSTANTIATOR},
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return Path(path)
