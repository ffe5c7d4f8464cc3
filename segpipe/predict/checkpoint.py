"""Everything prediction needs, from a checkpoint alone.

A checkpoint written by ``segpipe fit`` (LightningCLI) holds the task's hyperparameters: the
network as ``{"class_path", "init_args"}`` and the data spec (classes, colours, ignored label,
bands, normalisation, eval resize; :class:`~segpipe.data.spec.DataSpec`). :func:`load_predictor`
rebuilds the task and turns the spec into a :class:`PredictConfig`, which the predict command,
the ONNX export and the report share. Checkpoints written before the spec existed keep loading:
their spec is rebuilt from the task's and the data module's hyperparameters.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segpipe.data.spec import DataSpec, recorded_spec, spec_from_legacy
from segpipe.decision import check_positive_threshold
from segpipe.errors import (
    CHECKPOINT_READ_ERRORS,
    UnreadableCheckpointError,
    check_checkpoint_format,
)
from segpipe.models.base import no_pretrained_weights
from segpipe.tasks.inference import InferenceNet, build_network, weight_differences


__all__ = [
    "CheckpointError",
    "PredictConfig",
    "checkpoint_spec",
    "load_predictor",
    "matching_view_options",
    "read_checkpoint",
    "save_predict_checkpoint",
]

log = logging.getLogger(__name__)

_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for prediction; the message names the file and the fix."""


def _bands_example(option: str, n: int) -> str:
    """``--bands 1 2 3`` on the command line; in Python the ``bands`` of the call that takes it,
    ``Segmenter.from_checkpoint(..., bands=[1, 2, 3])`` (``predict()`` has none)."""
    picks = list(range(1, n + 1))
    if option.startswith("-"):
        return f"{option} {' '.join(map(str, picks))}"
    return f"Segmenter.from_checkpoint(..., {option}={picks})"


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
        symmetries: Flips/rotations the model was trained with (TTA averages over these), or
            None when not known.
        input_norm: ``per_image`` when the model standardises each input image itself
            (``model.input_norm``; the ONNX stand-in applies it before the graph), else ``none``.
        min_size: The least H and W the network takes (padded up to it), 0 for any.
        bands_given: ``bands`` come from the prediction's own ``--bands`` (:meth:`with_bands`),
            not from the checkpoint.
        input_dtype: The training images' dtype (``data_spec.input_dtype``), or None.
        display_channels: 0-based channels of the model's input shown as red, green and blue
            (or the one shown grey) in overlays (:meth:`with_display_channels`); None: the
            first three.
        test_views: How the training config had ``segpipe test`` score the model
            (``model.test_tta`` and ``model.test_tta_scales``) as ``(tta, scales)``; None when
            it scored plain predictions or the checkpoint does not say. ``segpipe predict``
            names the options that make the same masks (:func:`matching_view_options`).
        positive_threshold: Two-class models: class 1 where its probability exceeds this
            (``model.positive_threshold``, :func:`segpipe.decision.decide`); None: the arg-max.
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
    symmetries: list[str] | None = None
    input_norm: str = "none"
    min_size: int = 0
    bands_given: bool = False
    input_dtype: str | None = None
    display_channels: list[int] | None = None
    test_views: tuple[bool, list[float] | None] | None = None
    positive_threshold: float | None = None

    @classmethod
    def from_spec(
        cls, spec: DataSpec, checkpoint: str = "", pad_multiple: int = 32, net: str = "",
        input_norm: str = "none", min_size: int = 0,
    ) -> PredictConfig:
        """The prediction settings of a data spec (default normalisation when it has none)."""
        mean, std = spec.normalization()
        return cls(
            checkpoint=str(checkpoint),
            num_classes=spec.num_classes,
            class_names=list(spec.class_names),
            class_colors=[list(c) for c in spec.class_colors],
            in_channels=spec.in_channels,
            bands=list(spec.bands) if spec.bands is not None else None,
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
            ignore_index=spec.ignore_index,
            eval_resize=tuple(spec.eval_resize) if spec.eval_resize else None,  # type: ignore[arg-type]
            pad_multiple=int(pad_multiple),
            net=net,
            symmetries=list(spec.symmetries) if spec.symmetries is not None else None,
            input_norm=input_norm,
            min_size=int(min_size),
            input_dtype=spec.input_dtype,
        )

    def with_bands(self, bands: Sequence[int] | None, option: str = "--bands") -> PredictConfig:
        """These settings reading the file bands ``bands`` instead of the checkpoint's.

        For inputs whose bands lie in another order or number than the training files' (another
        sensor or product); ``data.bands`` is what the checkpoint recorded.

        Args:
            bands: 1-based band numbers, one per channel the model takes (3 for a 1-channel
                model, or 1 for a 3-channel one, are converted as in training); None keeps the
                checkpoint's.
            option: The option's name, for messages.

        Raises:
            ValueError: Not a list of positive band numbers that fits the model's channels.
        """
        if bands is None:
            return self
        picks = list(bands)
        if not picks or any(isinstance(b, bool) or int(b) != b or b < 1 for b in picks):
            raise ValueError(f"{option} takes 1-based band numbers (1, 2, ...), got {picks}")
        n, want = len(picks), self.in_channels
        if n != want and {n, want} != {1, 3}:
            raise ValueError(f"{option} picks {n} band(s) but the model takes {want} channel(s); "
                             f"give {want} band numbers (e.g. {_bands_example(option, want)})")
        return replace(self, bands=[int(b) for b in picks], bands_given=True)

    def with_positive_threshold(
        self, value: float | None, option: str = "--positive_threshold"
    ) -> PredictConfig:
        """These settings labelling class 1 where its probability exceeds ``value`` instead of
        the checkpoint's ``model.positive_threshold`` (0.5 is the arg-max); None keeps it.

        Raises:
            ValueError: Not a number in (0, 1), or a model without exactly two classes.
        """
        if value is None:
            return self
        return replace(self, positive_threshold=check_positive_threshold(
            value, self.num_classes, option))

    def with_display_channels(
        self, channels: Sequence[int] | None, option: str = "--overlay_bands"
    ) -> PredictConfig:
        """These settings showing the 1-based model input ``channels`` in overlays (red, green,
        blue; or one, in grey) instead of the first three: for a model fed blue, green, red
        and near-infrared (Sentinel-2's ``data.bands: [2, 3, 4, 8]``), ``3 2 1`` is true colour.

        Raises:
            ValueError: Not 3 (or 1) channel numbers among the model's.
        """
        if channels is None:
            return self
        picks = list(channels)
        if len(picks) not in (1, 3) or any(isinstance(c, bool) or int(c) != c
                                           or not 1 <= c <= self.in_channels for c in picks):
            raise ValueError(
                f"{option} takes 3 channel numbers (red, green, blue) or 1 (grey) among the "
                f"model's {self.in_channels} input channels, 1-based (its inputs after "
                f"data.bands or --bands), got {picks}")
        return replace(self, display_channels=[int(c) - 1 for c in picks])

    def dtype_warning(
        self, dtype: str, source: str, value_range: tuple[float, float] | None = None
    ) -> str | None:
        """What to say of an input whose pixels are of ``dtype`` when the model was trained on
        images of another (their values are scaled otherwise: integers by the type's maximum,
        floats not at all), or None when they agree or the training dtype is not known.

        Float input to a model trained on integer images is the documented way to give
        [0, 1]-scaled pixels: it is warned about only when ``value_range`` (its finite minimum
        and maximum) is known and leaves [0, 1].
        """
        trained = self.input_dtype
        if trained is None or dtype == trained or (dtype[:5] == "float" == trained[:5]):
            return None
        if dtype.startswith("float") and np.dtype(trained).kind in "iub":
            if value_range is None or (value_range[0] >= 0.0 and value_range[1] <= 1.0):
                return None

        def scaling(name: str) -> str:
            kind = np.dtype(name).kind
            if kind in "iu":
                return f"divided by {np.iinfo(np.dtype(name)).max}"
            return "read as 0 and 1" if kind == "b" else "taken as they are"

        return (f"{source}: {dtype} pixels, but the model was trained on {trained} images "
                f"({dtype} values are {scaling(dtype)}, {trained} ones were {scaling(trained)}), "
                "so the model sees values unlike its training images and its masks may be "
                f"wrong; convert the input to {trained} with the training images' value range, "
                f"or use a model trained on {dtype} data")

    def warn_dtype_once(
        self, warned: set[str], dtype: str, source: str,
        value_range: Callable[[], tuple[float, float] | None] | None = None,
        once: str = "type",
    ) -> None:
        """Log :meth:`dtype_warning` for ``dtype`` unless ``warned`` holds it (then add it).

        Args:
            warned: The dtypes said already (the caller's, e.g. one per loader process).
            dtype: The input's pixels' dtype name.
            source: The input, for the message.
            value_range: Gives the input's finite (min, max) when a float input needs it.
            once: How often the message is said, for its end.
        """
        if dtype in warned:
            return
        trained = self.input_dtype
        # the range (which may mean reading a raster's windows) matters only for float input
        # to a model trained on integer images
        needed = (dtype.startswith("float") and trained is not None
                  and np.dtype(trained).kind in "iub")
        lo_hi = value_range() if value_range is not None and needed else None
        warning = self.dtype_warning(dtype, source, lo_hi)
        if warning is not None:
            warned.add(dtype)
            log.warning("%s (said once per %s)", warning, once)

    def channel_hint(self, option: str = "--bands", file_bands: int | None = None,
                     array: bool = False) -> str:
        """How to feed this model a file whose bands do not fit it (prediction messages).

        Args:
            option: The band option's name (``--bands``, or ``bands`` in Python).
            file_bands: The file's band count, when known: the example picks only bands it
                has, and a file with too few gets no example.
            array: The input is a numpy array (Python), not a file: its channels are sliced.
        """
        want = self.in_channels
        if self.bands and not self.bands_given:
            trained = f"the model was trained on bands {self.bands} of its files; "
        else:
            trained = ""
        if file_bands is not None and file_bands < want:
            if {file_bands, want} == {1, 3}:  # grey repeated to RGB, as in training
                return f"{trained}read its one band as grey: {_bands_example(option, 1)}"
            return (f"{trained}this file has {file_bands} band(s), fewer than the {want} the "
                    "model takes: use a model trained on such images")
        if array:
            of = f"this array's {file_bands} channels" if file_bands else "this array's channels"
            rgba = " (an RGBA image's colour)" if (file_bands, want) == (4, 3) else ""
            return (f"{trained}pick {want} of {of}, e.g. array[..., :{want}]{rgba}, or for every "
                    f"input {_bands_example(option, want)}, or use a model trained on such images")
        of = f"this file's {file_bands} bands" if file_bands is not None else "this file's bands"
        return (f"{trained}pick {want} of {of}, e.g. {_bands_example(option, want)}, "
                "or use a model trained on such images")

    @property
    def mask_dtype(self) -> np.dtype:
        """uint8 for up to 255 classes (255 stays free for nodata), else uint16."""
        return np.dtype(np.uint8) if self.num_classes <= 255 else np.dtype(np.uint16)

    @property
    def nodata_value(self) -> int:
        """Label written where the input is nodata: the largest value of :attr:`mask_dtype`."""
        return int(np.iinfo(self.mask_dtype).max)

    def eval_transform(self, resize: bool = True) -> Any:
        """The resize to :attr:`eval_resize` that the model was evaluated at, or None.

        Args:
            resize: False for inputs predicted at their own size (tiles, rasters).

        Returns:
            An albumentations pipeline, or None when ``resize`` is off or the model has no
            ``eval_resize``; albumentations (about 0.6 s to import) is loaded only then.
        """
        if not (resize and self.eval_resize):
            return None
        from segpipe.data.transforms import build_eval_transform

        return build_eval_transform(self.eval_resize)

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
        where = "is a folder" if p.is_dir() else "not found"
        raise FileNotFoundError(
            f"checkpoint {p} {where}; give a .ckpt file written by `segpipe fit` (e.g. "
            "RUN/checkpoints/last.ckpt)"
        )
    try:
        check_checkpoint_format(p)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from segpipe.callbacks import UnsafeCheckpointError

        raise CheckpointError(str(UnsafeCheckpointError(p, str(exc), fix=(
            "If you trust the file completely, load it once with torch.load(path, "
            "weights_only=False), drop or convert the objects (e.g. an argparse.Namespace in "
            "hyper_parameters into a dict) and torch.save it again; otherwise do not use it.")))
        ) from None
    except CHECKPOINT_READ_ERRORS as exc:
        raise CheckpointError(str(UnreadableCheckpointError(p, exc))) from None
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{p}: not a Lightning checkpoint (no state_dict); pass a .ckpt written by "
            "`segpipe fit`"
        )
    return dict(ckpt)


def checkpoint_spec(ckpt: Mapping[str, Any], path: str | Path = "checkpoint") -> DataSpec | None:
    """The data spec a checkpoint was trained with.

    Args:
        ckpt: The checkpoint dict (:func:`read_checkpoint`).
        path: The file, for messages.

    Returns:
        ``hyper_parameters["data_spec"]``; for checkpoints written before specs were saved, the
        spec rebuilt from the task's and the data module's hyperparameters; None when neither
        says how many classes there are.

    Raises:
        CheckpointError: When the saved spec is invalid.
    """
    hp = ckpt.get("hyper_parameters") or {}
    try:
        if hp.get("data_spec"):
            return DataSpec.from_dict(
                recorded_spec(hp, ckpt.get("datamodule_hyper_parameters")), where="data")
        return spec_from_legacy(hp, ckpt.get("datamodule_hyper_parameters"))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid data spec in the checkpoint ({exc})") from exc


def load_predictor(
    ckpt_path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[InferenceNet, PredictConfig]:
    """Rebuild the trained network from a checkpoint and collect its prediction settings.

    The network is built from the checkpoint's ``net`` config as training built it, and runs
    in an :class:`~segpipe.tasks.inference.InferenceNet` (the task's forward pass, without
    its losses, metrics or Lightning).

    Args:
        ckpt_path: Checkpoint written by ``segpipe fit`` (or :func:`save_predict_checkpoint`).
        map_location: The device to put the network on (a ``torch.device`` or its name).

    Returns:
        ``(network in eval mode, config)``.

    Raises:
        FileNotFoundError: Missing checkpoint.
        CheckpointError: Checkpoints that cannot rebuild their network, or whose data and model
            settings disagree.
    """
    path = Path(ckpt_path).expanduser()
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
    spec = checkpoint_spec(ckpt, path)
    try:
        # The spec is checked against the network below, with the checkpoint named.
        with no_pretrained_weights():  # the checkpoint's weights replace them anyway
            net = build_network(net_cfg)
        task = InferenceNet(
            net, num_classes=spec.num_classes if spec is not None else None,
            input_norm=str(hp.get("input_norm", "none")),
            channels_last=bool(hp.get("channels_last", True)))
    except Exception as exc:  # noqa: BLE001 - re-raised with the file and the likely fix
        raise CheckpointError(
            f"{path}: could not rebuild {net_cfg.get('class_path')} from the checkpoint "
            f"({type(exc).__name__}: {' '.join(str(exc).split())}); check that the model code "
            "matches the one used for training"
        ) from exc
    _load_weights(task, ckpt["state_dict"], path)
    try:
        task.to(torch.device(map_location)).eval()
    except (RuntimeError, TypeError, AssertionError) as exc:  # no such device here
        raise CheckpointError(f"{path}: cannot put the network on {map_location!r} "
                              f"({' '.join(str(exc).split())})") from exc
    num_classes = int(getattr(task.net, "num_classes", None) or task.num_classes)
    if spec is None:
        log.warning("%s has no data spec: using default normalisation and colours", path)
        spec = DataSpec.create(num_classes, ignore_index=hp.get("ignore_index"),
                               in_channels=int(getattr(task.net, "in_channels", 3)))
    if spec.num_classes != num_classes:
        raise CheckpointError(
            f"{path}: data.num_classes={spec.num_classes} but the model predicts {num_classes} "
            "classes; the checkpoint is inconsistent"
        )
    net_in = getattr(task.net, "in_channels", None)
    if net_in is not None and int(net_in) != spec.in_channels:
        raise CheckpointError(
            f"{path}: data.in_channels={spec.in_channels} but the network takes {net_in} "
            "channels; the checkpoint is inconsistent"
        )
    task.spec = spec
    config = PredictConfig.from_spec(
        spec, str(path), int(task.pad_multiple), str(net_cfg.get("class_path", "")),
        input_norm=str(hp.get("input_norm", "none")), min_size=int(task.min_size),
    )
    try:
        threshold = check_positive_threshold(hp.get("positive_threshold"), num_classes)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}; the checkpoint is inconsistent") from None
    return task, replace(config, test_views=_tested_views(hp), positive_threshold=threshold)


def _tested_views(hp: Mapping[str, Any]) -> tuple[bool, list[float] | None] | None:
    """``(test_tta, test_tta_scales)`` from a task's hyperparameters, the scales read as
    ``--tta_scales`` reads them (:func:`~segpipe.tta.check_scales`); None for plain views."""
    from segpipe.tta import check_scales

    tta = bool(hp.get("test_tta"))
    try:
        scales = check_scales(hp.get("test_tta_scales"))
    except ValueError:  # a hand-edited checkpoint: no advice rather than a failure
        scales = None
    return (tta, scales) if tta or scales else None


def matching_view_options(config: PredictConfig, tta: bool,
                          scales: Sequence[float] | None) -> str | None:
    """The ``segpipe predict`` options that average the views ``segpipe test`` scored, when
    ``tta`` and ``scales`` (the run's own) differ from them; None when they agree or the
    checkpoint scored plain predictions."""
    from segpipe.tta import predict_view_options

    if config.test_views is None:
        return None
    want_tta, want_scales = config.test_views
    given = [float(s) for s in scales] if scales else None
    if bool(tta) == want_tta and given == want_scales:
        return None
    return " ".join(predict_view_options(want_tta, want_scales))


def _load_weights(task: InferenceNet, state: Mapping[str, Any], path: Path) -> None:
    """Load a task checkpoint's ``net.*`` and ``input_norm.*`` weights (its losses' and
    metrics' buffers are not needed), or say in one line how they differ from the network."""
    prefixes = tuple(f"{name}." for name, _ in task.named_children())
    theirs = {k: v for k, v in state.items() if k.startswith(prefixes)}
    mine = task.state_dict()
    differences = weight_differences(mine, theirs, "in the network its config builds")
    if differences:
        others = [k for k in state if not k.startswith(prefixes)]
        if others and any(k not in theirs for k in mine):  # saved under other names?
            differences += (f"; {len(others)} other entr(ies) in the checkpoint, not the "
                            f"network's (e.g. {others[0]})")
        raise CheckpointError(
            f"{path}: the checkpoint's weights do not fit the network its config builds: "
            f"{differences}; check that the model code matches the one used for training")
    task.load_state_dict(theirs)


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
        data: The data spec's fields (``num_classes``, ``class_names``, ``class_colors``,
            ``ignore_index``, ``in_channels``, ``bands``, ``mean``, ``std``, ``eval_resize``);
            ``num_classes``/``in_channels`` default to the network's.
        state_dict: The task's weights (keys ``net.*``); the freshly initialised network's
            weights when None.
        **task_kwargs: Other :class:`SegmentationTask` arguments (``num_classes``, ...).

    Returns:
        The written path.
    """
    import lightning
    from lightning.pytorch.cli import instantiate_module

    from segpipe.fileio import atomic_open
    from segpipe.tasks import SegmentationTask

    net_cfg = {"class_path": net["class_path"], "init_args": dict(net.get("init_args") or {})}
    hparams: dict[str, Any] = {"net": net_cfg, **task_kwargs}
    if state_dict is None:
        task = instantiate_module(SegmentationTask, hparams)
        state_dict = task.state_dict()
    spec_hp = {k: v for k, v in dict(data or {}).items() if v is not None}
    init_args = net_cfg["init_args"]
    spec_hp.setdefault("num_classes", task_kwargs.get("num_classes") or init_args.get("num_classes"))
    spec_hp.setdefault("in_channels", init_args.get("in_channels", 3))
    if "ignore_index" in task_kwargs:
        spec_hp.setdefault("ignore_index", task_kwargs["ignore_index"])
    spec = DataSpec.from_dict(spec_hp, where="data")
    ckpt = {
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": dict(state_dict),
        "hyper_parameters": {**hparams, "data_spec": spec.to_dict(), "_instantiator": _INSTANTIATOR},
    }
    with atomic_open(path) as fh:  # checked writes: a full disk raises DiskFullError
        torch.save(ckpt, fh)
    return Path(path)
