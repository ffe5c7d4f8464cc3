"""The data spec: what a model was trained on, stated once.

A :class:`DataSpec` holds the classes (count, names, colours, ignored label) and the input
(channel count, band selection, normalisation) of a data set. It is written once in a config
(under ``data:``), linked by the CLI into the task (``model.data_spec``) and into the network's
``num_classes``/``in_channels``, saved in every checkpoint (``hyper_parameters["data_spec"]``)
and read back from there by prediction, ONNX export, the report and the Python API.

Normalisation: ``mean``/``std`` are per-channel statistics of images scaled to ``[0, 1]``
(:func:`~segpipe.data.io.to_float`). When a config gives none, :func:`default_mean_std` is used
for 8-bit RGB images (ImageNet's), and the data module measures them per band on the training
images for anything else (multi-band, 16-bit, grayscale) and stores the measured values in the
spec, so prediction normalises exactly as training did.

This module imports nothing heavier than the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from segpipe.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataSpec",
    "check_ignore_index",
    "default_class_colors",
    "default_class_names",
    "default_mean_std",
    "spec_from_legacy",
    "recorded_spec",
    "reads_leading_bands",
    "training_symmetries",
]

#: ImageNet statistics (RGB, ``[0, 1]`` scale), the default for 3-channel 8-bit images.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def default_class_names(num_classes: int) -> list[str]:
    """``["class_0", "class_1", ...]``.

    Args:
        num_classes: Number of names.

    Returns:
        The names.
    """
    return [f"class_{i}" for i in range(int(num_classes))]


def default_class_colors(num_classes: int) -> list[list[int]]:
    """A fixed, distinct palette (the Pascal VOC bit-interleaved colour map).

    Class 0 is black, class 1 dark red, class 2 green, ...; distinct for up to 256 classes.

    Args:
        num_classes: Number of colours.

    Returns:
        ``num_classes`` RGB triplets.
    """
    colors = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append([r, g, b])
    return colors


def default_mean_std(in_channels: int) -> tuple[list[float], list[float]]:
    """Fallback normalisation for ``[0, 1]`` images when none is given or measured.

    Args:
        in_channels: Number of channels.

    Returns:
        ImageNet mean/std for 3 channels, otherwise 0.5 / 0.25 per channel.
    """
    if in_channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [0.5] * in_channels, [0.25] * in_channels


@dataclass(frozen=True)
class DataSpec:
    """Classes and input of a data set (see the module docstring).

    Build it with :meth:`create`, which checks the values and fills the defaults; store it as
    the plain dict of :meth:`to_dict` (safe for ``torch.load(weights_only=True)``).

    Attributes:
        num_classes: Number of classes the model predicts.
        class_names: One name per class.
        class_colors: One RGB triplet per class.
        ignore_index: Label excluded from the loss and the metrics, or None.
        in_channels: Channels the model takes.
        bands: 1-based band selection applied when reading, or None (all bands).
        mean: Per-channel mean of ``[0, 1]``-scaled images, or None (not given or measured yet).
        std: Per-channel std, or None.
        stats_source: Where ``mean``/``std`` come from: ``config``, ``measured`` or ``default``
            (``""`` while unset).
        eval_resize: ``[height, width]`` images are resized to for evaluation and prediction
            (predictions are resized back), or None (native size).
        symmetries: The flips and rotations of the training augmentation (``hflip``,
            ``vflip``, ``rot90``); test-time augmentation averages over exactly these. None
            when not known (a data module that does not say).
        input_dtype: The numpy dtype of the training images as read (``uint8``, ``uint16``,
            ``float32``, ...), which sets how their values were scaled; prediction warns of
            inputs of another one. None when not known (mixed, or an older checkpoint).
    """

    num_classes: int
    class_names: list[str] = field(default_factory=list)
    class_colors: list[list[int]] = field(default_factory=list)
    ignore_index: int | None = None
    in_channels: int = 3
    bands: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    stats_source: str = ""
    eval_resize: list[int] | None = None
    symmetries: list[str] | None = None
    input_dtype: str | None = None

    @classmethod
    def create(
        cls,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        class_colors: Sequence[Sequence[int]] | None = None,
        ignore_index: int | None = None,
        in_channels: int = 3,
        bands: Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        stats_source: str | None = None,
        eval_resize: Sequence[int] | None = None,
        symmetries: Sequence[str] | None = None,
        input_dtype: str | None = None,
        where: str = "data",
    ) -> DataSpec:
        """A checked spec with default names and colours filled in.

        Args:
            num_classes: Number of classes (>= 1).
            class_names: One name per class (default ``class_0, ...``).
            class_colors: One RGB triplet per class (default :func:`default_class_colors`).
            ignore_index: Ignored label, or None.
            in_channels: Input channels (>= 1).
            bands: 1-based band selection, or None.
            mean: Per-channel mean, or None (with ``std`` given: :func:`default_mean_std`'s).
            std: Per-channel std (all > 0), or None (likewise).
            stats_source: Where mean/std come from (default ``config`` when given).
            eval_resize: ``[height, width]`` for evaluation and prediction, or None.
            symmetries: Training symmetries (subset of ``hflip``, ``vflip``, ``rot90``), or None.
            input_dtype: The training images' dtype name, or None.
            where: Prefix of the option names in messages (``data`` -> ``data.num_classes``).

        Returns:
            The spec.

        Raises:
            ValueError: Naming the option and what to give instead.
        """
        num_classes, in_channels = int(num_classes), int(in_channels)
        if num_classes < 1:
            raise ConfigError(f"{where}.num_classes must be >= 1, got {num_classes}")
        if in_channels < 1:
            raise ConfigError(f"{where}.in_channels must be >= 1, got {in_channels}")
        names = [str(n) for n in class_names] if class_names else default_class_names(num_classes)
        if len(names) != num_classes:
            raise ConfigError(
                f"{where}.class_names has {len(names)} names for num_classes={num_classes}; "
                "give one name per class"
            )
        colors = (
            [[int(v) for v in c] for c in class_colors]
            if class_colors
            else default_class_colors(num_classes)
        )
        if len(colors) != num_classes or any(len(c) != 3 for c in colors):
            raise ConfigError(
                f"{where}.class_colors must be {num_classes} RGB triplets, got {class_colors}"
            )
        if (mean is None) != (std is None):  # one given: the other is the default
            d_mean, d_std = default_mean_std(in_channels)
            mean, std = (d_mean if mean is None else mean), (d_std if std is None else std)
        if mean is not None and std is not None:
            mean, std = [float(v) for v in mean], [float(v) for v in std]
            if len(mean) != in_channels or len(std) != in_channels:
                raise ConfigError(
                    f"{where}.mean/{where}.std need {in_channels} values (one per input "
                    f"channel), got {len(mean)}/{len(std)}"
                )
            if any(not v > 0 for v in std):
                raise ConfigError(f"{where}.std values must be > 0, got {std}")
        if eval_resize is not None and (
            len(eval_resize) != 2 or any(int(v) < 1 for v in eval_resize)
        ):
            raise ConfigError(f"{where}.eval_resize must be [height, width], got {eval_resize}")
        if symmetries is not None and set(symmetries) - {"hflip", "vflip", "rot90"}:
            raise ConfigError(f"{where}.symmetries must be among hflip, vflip, rot90; got {symmetries}")
        source = stats_source if stats_source is not None else ("config" if mean else "")
        return cls(
            num_classes=num_classes,
            class_names=names,
            class_colors=colors,
            ignore_index=None if ignore_index is None else int(ignore_index),
            in_channels=in_channels,
            bands=[int(b) for b in bands] if bands is not None else None,
            mean=list(mean) if mean is not None else None,
            std=list(std) if std is not None else None,
            stats_source=source,
            eval_resize=[int(v) for v in eval_resize] if eval_resize is not None else None,
            symmetries=[str(v) for v in symmetries] if symmetries is not None else None,
            input_dtype=str(input_dtype) if input_dtype is not None else None,
        )

    # ------------------------------------------------------------------ normalisation
    @property
    def has_stats(self) -> bool:
        """Whether mean and std are set (given or measured)."""
        return self.mean is not None and self.std is not None

    def normalization(self) -> tuple[list[float], list[float]]:
        """``(mean, std)`` to normalise inputs with: the spec's, else :func:`default_mean_std`."""
        if self.mean is not None and self.std is not None:
            return list(self.mean), list(self.std)
        return default_mean_std(self.in_channels)

    def with_stats(self, mean: Sequence[float], std: Sequence[float], source: str) -> DataSpec:
        """A copy with normalisation statistics (checked like :meth:`create`)."""
        return DataSpec.create(**{**self.to_dict(), "mean": mean, "std": std,
                                  "stats_source": source})

    def resolved(self) -> DataSpec:
        """A copy whose mean/std are set (``default`` ones when none were given or measured)."""
        if self.has_stats:
            return self
        mean, std = default_mean_std(self.in_channels)
        return replace(self, mean=mean, std=std, stats_source="default")

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, ints, floats, str, None) for configs and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "data") -> DataSpec:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones defaulted."""
        keys = ("class_names", "class_colors", "ignore_index", "in_channels", "bands", "mean",
                "std", "stats_source", "eval_resize", "symmetries",
                "input_dtype")  # None: "default"
        kwargs = {k: data[k] for k in keys if data.get(k) is not None}
        if "num_classes" not in data:
            raise ConfigError(f"{where}: a data spec needs num_classes")
        return cls.create(int(data["num_classes"]), where=where, **kwargs)


def check_ignore_index(
    num_classes: int,
    ignore_index: int | None,
    mask_values: Mapping[int, int] | None = None,
    mask_colors: Sequence[Sequence[int]] | None = None,
) -> None:
    """Refuse an ignore index that is one of the classes ``0..num_classes-1``.

    Such a class would be neither learnt nor scored, yet the network keeps an output for it, and
    the metrics cannot treat it consistently (macro IoU drops it, Dice and the per-image scores
    would count it as 0). The fix gives the other classes ``0..C-2``: composed with the user's
    ``mask_values`` when there are some, by leaving the class's colour out of ``mask_colors``
    (unlisted colours read as the ignore index) for colour masks.

    Raises:
        ConfigError: naming the mapping and class count to use.
    """
    if ignore_index is None or not 0 <= int(ignore_index) < int(num_classes):
        return
    i, k = int(ignore_index), int(num_classes)
    head = (f"data.ignore_index {i} is one of the classes 0..{k - 1}: that class would be "
            "neither learnt nor scored while the network keeps an output for it. ")
    tail = f"data.num_classes {k - 1} and data.ignore_index 255"
    if k <= 2:  # leaving the class out would leave a single one, which cannot be learnt
        raise ConfigError(
            f"{head}With {k} classes, ignoring one leaves nothing to tell apart: set "
            "data.ignore_index null, or a value no class uses (255 where the masks mark "
            "unlabelled pixels with it); masks of 0 and 255 need data.mask_values "
            "'{0: 0, 255: 1}'")
    if mask_colors:
        colour = list(mask_colors[i])[:3] if i < len(mask_colors) else None
        raise ConfigError(
            f"{head}If class {i} marks unlabelled pixels, leave its colour {colour} out of "
            f"data.mask_colors (colours not listed read as the ignore index) and set {tail}")
    if mask_values:
        mapped = {int(r): (255 if int(c) == i else int(c) - (int(c) > i))
                  for r, c in mask_values.items()}
    else:
        mapped = {c: (255 if c == i else c - (c > i)) for c in range(k)}
    mapping = ", ".join(f"{r}: {c}" for r, c in sorted(mapped.items()))
    raise ConfigError(
        f"{head}If {i} marks unlabelled pixels, map the mask values with data.mask_values "
        f"'{{{mapping}}}' and set {tail}")


def spec_from_legacy(
    task_hparams: Mapping[str, Any] | None,
    data_hparams: Mapping[str, Any] | None,
    net: Any = None,
) -> DataSpec | None:
    """The spec of a checkpoint written before specs were saved (segpipe <= 0.1 layout).

    Those kept classes in the task's hyperparameters (``num_classes``, ``class_names``,
    ``ignore_index``) and the input in the data module's (``in_channels``, ``bands``, ``mean``,
    ``std``, ``class_colors``).

    Args:
        task_hparams: ``checkpoint["hyper_parameters"]``.
        data_hparams: ``checkpoint["datamodule_hyper_parameters"]``, or None.
        net: The rebuilt network (for ``num_classes``/``in_channels`` when nothing else says).

    Returns:
        The spec, or None when the number of classes cannot be told.
    """
    hp, dm = dict(task_hparams or {}), dict(data_hparams or {})
    num_classes = hp.get("num_classes") or dm.get("num_classes") or getattr(net, "num_classes", None)
    if num_classes is None:
        return None
    in_channels = dm.get("in_channels") or getattr(net, "in_channels", None) or 3
    return DataSpec.create(
        int(num_classes),
        class_names=hp.get("class_names") or dm.get("class_names"),
        class_colors=dm.get("class_colors"),
        ignore_index=hp.get("ignore_index", dm.get("ignore_index")),
        in_channels=int(in_channels),
        bands=dm.get("bands"),
        mean=dm.get("mean"),
        std=dm.get("std"),
        eval_resize=dm.get("eval_resize"),
        symmetries=training_symmetries(dm.get("augment", "default"), dm.get("hflip", True),
                                       dm.get("vflip", False), dm.get("rotate90", False))
        if dm else None,
    )


def reads_leading_bands(bands: Sequence[int] | None) -> bool:
    """Whether a 1-based ``bands`` selection is a file's first bands in order (``[1, 2, 3]``):
    a file with no more bands reads the same without it."""
    return bool(bands) and [int(b) for b in bands or ()] == list(range(1, len(bands or ()) + 1))


def recorded_spec(task_hparams: Mapping[str, Any] | None,
                  data_hparams: Mapping[str, Any] | None) -> dict[str, Any]:
    """A checkpoint's saved spec (``hyper_parameters["data_spec"]``, {} when it has none), its
    training symmetries taken from the data module's flips when the spec predates their record
    (``test --model.test_tta``, ``predict --tta`` and the API then average the same views).

    Args:
        task_hparams: ``checkpoint["hyper_parameters"]``.
        data_hparams: ``checkpoint["datamodule_hyper_parameters"]``, or None.
    """
    spec = dict((task_hparams or {}).get("data_spec") or {})
    dm = dict(data_hparams or {})
    if spec and "symmetries" not in spec and {"augment", "hflip", "vflip", "rotate90"} & set(dm):
        spec["symmetries"] = training_symmetries(dm.get("augment", "default"), dm.get("hflip", True),
                                                 dm.get("vflip", False), dm.get("rotate90", False))
    return spec


def training_symmetries(augment: str, hflip: bool, vflip: bool, rotate90: bool) -> list[str]:
    """The symmetries a training augmentation applies (``augment: none`` applies none).

    Args:
        augment: The preset (``none``, ``light``, ``default``, ``strong``).
        hflip: Random horizontal flips.
        vflip: Random vertical flips.
        rotate90: Random 90° rotations.

    Returns:
        Subset of ``["hflip", "vflip", "rot90"]``.
    """
    if augment == "none":
        return []
    return [n for n, on in (("hflip", hflip), ("vflip", vflip), ("rot90", rotate90)) if on]
