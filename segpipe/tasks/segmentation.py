"""The Lightning task: loss, metrics, optimisation and prediction around an injected network.

The task never reads files and never builds networks by name: ``net`` is any ``nn.Module`` mapping
``(N, C, H, W)`` to ``(N, num_classes, H, W)`` logits, picked in YAML with ``class_path``/``init_args``.
"""

from __future__ import annotations

import inspect
import math
import random
import typing
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any, Literal

import numpy as np

import lightning.pytorch as L
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from segpipe.data.spec import (
    DataSpec,
    check_ignore_index,
    default_class_names,
    reads_leading_bands,
    recorded_spec,
)
from segpipe.decision import check_positive_threshold, decide, decision_description
from segpipe.errors import BatchFormatError, ConfigError
from segpipe.models.base import pad_labels_like, pad_to_multiple
from segpipe.models.batchnorm import BatchNormAdaptation, adapt_batchnorm, check_bn_adapt
from segpipe.models.input_norm import input_norm_module
from segpipe.metrics import (
    IOU_METRICS,
    CaseConfusions,
    ThresholdSweep,
    WeightedMean,
    build_metrics,
    case_score_logs,
    case_scores,
    flatten_metrics,
    undefined_when_nothing_scored,
    metrics_report,
    monitor_mode,
    nothing_scored,
    per_image_scores,
)
from segpipe.tasks.finetune import (
    TransferLearning,
    check_lr_ratio,
    encoder_modules,
    param_groups,
    scale_encoder_lr,
)
from segpipe.tasks.inference import LogitsForward, weight_differences
from segpipe.tasks.losses import LovaszSoftmaxLoss
from segpipe.tasks.schedules import training_progress
from segpipe.tta import check_scales, resize_view

__all__ = ["EVALUATION_OPTIONS", "PerImageDiceLoss", "PixelWeightedCrossEntropy", "RNG_STATE_KEY",
           "SegmentationTask", "check_spec_fits", "fused_optimizer", "get_rng_state",
           "pad_to_multiple", "set_rng_state", "to_mask_size"]

#: Checkpoint key of the global RNG states saved by :class:`SegmentationTask`.
RNG_STATE_KEY = "segpipe_rng_state"

#: :class:`SegmentationTask` arguments that choose how a run evaluates, not what the model is:
#: ``segpipe test/validate --ckpt_path`` does not restore them from the checkpoint's
#: hyperparameters, so ``--model.test_tta true`` (or the config's value) holds; everything else
#: (network, loss, data spec) comes from the checkpoint.
EVALUATION_OPTIONS = ("test_tta", "test_tta_scales", "bn_adapt", "num_worst_images")

_PYTHON_ONLY = ("net", "optimizer", "lr_scheduler")


def _built_from_config() -> bool:
    """True while LightningCLI (or ``load_from_checkpoint``) instantiates the task from a config."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older/newer Lightning
        return False
    return _given_hyperparameters.get() is not None

LossName = Literal["ce", "dice", "ce+dice", "focal", "lovasz", "ce+lovasz"]
Stage = Literal["train", "val", "test"]


def get_rng_state() -> dict[str, Any]:
    """This process's global RNG states (torch CPU and CUDA, numpy, Python) as plain tensors.

    Only tensors, ints, floats and None, so checkpoints holding it still load with
    ``torch.load(weights_only=True)``.

    Returns:
        State for :func:`set_rng_state`.
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states from :func:`get_rng_state`.

    Args:
        state: Saved states.
    """
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def to_mask_size(x: Tensor, mask_hw: tuple[int, int], sizes: Tensor | None = None) -> Tensor:
    """A batch computed on resized images (``data.eval_resize``) brought to its masks' size.

    Args:
        x: (N, K, h, w) logits, probabilities or images.
        mask_hw: (H, W) of the batch's masks (padded to the largest mask).
        sizes: (N, 2) each mask's own size (the batch's ``"size"``), or None: all (H, W).

    Returns:
        (N, K, H, W) float32: each item bilinearly resized to its own mask's size, as
        ``segpipe predict`` resizes probabilities back to an image's size, zero where its mask
        is padding.
    """
    from segpipe.predict.scoring import to_size

    hw_list = None if sizes is None else sizes.tolist()  # one host read per batch
    if hw_list is None or all(tuple(s) == tuple(mask_hw) for s in hw_list):
        return F.interpolate(x.float(), size=tuple(mask_hw), mode="bilinear", align_corners=False)
    out = x.new_zeros((*x.shape[:2], *mask_hw), dtype=torch.float32)
    for i, (h, w) in enumerate(hw_list):
        out[i, :, :h, :w] = to_size(x[i], (h, w))
    return out


def _one_pass(loader: Any) -> Any:
    """``loader`` for one pass of its own. A DataLoader with persistent workers hands every
    ``iter()`` its one iterator, which Lightning's test loop has already taken: a pass of
    ours (the ``bn_adapt`` estimate) emptied it, and the test then scored no image."""
    from torch.utils.data import DataLoader, IterableDataset

    if not getattr(loader, "persistent_workers", False) or not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.dataset, IterableDataset):  # batching without a sampler
        batching: dict[str, Any] = {"batch_size": loader.batch_size, "drop_last": loader.drop_last}
    elif loader.batch_sampler is None:  # batch_size=None: the dataset's items are batches
        batching = {"batch_size": None, "sampler": loader.sampler}
    else:
        batching = {"batch_sampler": loader.batch_sampler}
    # its own class: a loader whose workers send batches in shared slots turns them back
    return type(loader)(
        loader.dataset, **batching, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        pin_memory_device=getattr(loader, "pin_memory_device", ""),
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        prefetch_factor=loader.prefetch_factor, timeout=loader.timeout,
        generator=loader.generator, persistent_workers=False)


def _plateau_mode(scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau, monitor: str) -> None:
    """Set a ReduceLROnPlateau's mode to its metric's direction: torch's default ``min`` on
    ``val/mIoU`` (larger is better) cut the learning rate at every improvement."""
    wanted = monitor_mode(monitor)
    if wanted is None or scheduler.mode == wanted:
        return
    scheduler._init_is_better(mode=wanted, threshold=scheduler.threshold,
                              threshold_mode=scheduler.threshold_mode)
    scheduler._reset()
    rank_zero_warn(
        f"model.lr_scheduler ReduceLROnPlateau watches {monitor}, which is "
        f"{'larger' if wanted == 'max' else 'smaller'} when the model is better: its mode is "
        f"set to {wanted!r} (with {'min' if wanted == 'max' else 'max'!r} it cut the learning "
        f"rate at every improvement); give --model.lr_scheduler.mode {wanted} to say so")


class SegmentationTask(LogitsForward, L.LightningModule):
    """Semantic segmentation around any network.

    The classes and the input the model was trained on are one :class:`~segpipe.data.spec.DataSpec`
    (:attr:`spec`): from ``data_spec`` (the CLI links it from the ``data:`` section), else from the
    ``num_classes``/``ignore_index``/``class_names`` shorthands and the network; during training
    the data module's spec (with measured normalisation statistics) is adopted. It is saved in
    every checkpoint as ``hyper_parameters["data_spec"]``, which prediction reads.

    Args:
        net: The network, ``(N, C, H, W) -> (N, num_classes, H, W)`` logits. It should expose
            ``num_classes`` and ``pad_multiple``; inputs are padded to ``pad_multiple`` and the
            logits cropped back, so any image size works.
        data_spec: The data spec as a dict (:meth:`DataSpec.to_dict`), or None.
        num_classes: Number of classes (shorthand when there is no ``data_spec``); taken from
            ``net.num_classes`` when omitted.
        loss: ``ce`` (cross-entropy), ``dice`` (smp's multiclass Dice), ``ce+dice`` (their sum),
            ``focal`` (smp's focal loss; it scores each class one-vs-rest with a sigmoid, so
            the softmax that prediction and TTA average is not what it optimised), ``lovasz``
            (the Lovász-softmax, a surrogate of the IoU of each class present in the batch:
            smp's loss, batched over the classes in
            :class:`~segpipe.tasks.losses.LovaszSoftmaxLoss`, without host synchronisation) or
            ``ce+lovasz`` (their sum).
        late_loss: A training loss for the end of the training (from ``late_loss_start`` of it
            on), one of ``loss``'s choices, built with the same class weights and options, e.g.
            ``ce+lovasz`` to fine-tune for per-class IoU once cross-entropy has placed the
            classes (as Berman et al. fine-tune with Lovász). The switch happens at an epoch's
            start, is announced on the log and holds again after a resume; validation and test
            losses stay ``loss``'s. None (default): ``loss`` throughout.
        late_loss_start: Fraction of the planned training (of the time budget's epochs, else of
            ``max_epochs``/``max_steps``; see :func:`~segpipe.tasks.schedules.training_progress`)
            after which ``late_loss`` trains, in (0, 1).
        class_weights: One weight per class for ``ce``/``ce+dice``/``dice``/``focal`` and the
            cross-entropy of ``ce+lovasz`` (e.g. median frequency balancing), or None.
        dice_per_image: With ``dice``/``ce+dice``, score the Dice of each image and class
            present in it, then average, instead of smp's Dice over the batch's pooled pixels.
            Each image's objects then count alike, however small (a small lesion weighs as much
            as a large one, as in a per-patient mean Dice); the batch-pooled Dice lets large
            objects dominate.
        ohem_fraction: Online hard example mining for the cross-entropy (of ``ce``,
            ``ce+dice``, ``ce+lovasz``): in training, it averages only this fraction of the
            batch's pixels, those with the highest loss (e.g. 0.25), so pixels the network
            already gets right stop diluting the thin and rare ones. Validation and test losses
            use every pixel. None (default) averages every pixel. With ``ohem_threshold``, it
            is instead the least fraction kept (mmseg's ``min_kept``), ranked by probability.
        ohem_threshold: Online hard example mining as in mmseg's ``OHEMPixelSampler`` (PSPNet's
            and DeepLab's Cityscapes recipes use 0.7): in training, the cross-entropy averages
            only the pixels whose predicted probability of their true class is below this
            threshold (and at least the ``ohem_fraction`` least probable ones, if given). Unlike
            a fixed fraction, a class the network gets right leaves the mean only while it stays
            right: once its pixels drop below the threshold they are back. None (default): off.
        label_smoothing: Label smoothing of the cross-entropy (of ``ce``, ``ce+dice``,
            ``ce+lovasz``; ``nn.CrossEntropyLoss``'s): each pixel's target is 1 - this on its
            class plus this / num_classes spread over all classes (e.g. 0.1), so the network
            is not pushed to ever more confident logits on noisy or ambiguous labels (object
            borders). In every stage's loss, with the class weights. 0 (default): off. On
            CamVid (``camvid_lite0.yaml``) 0.1 cost 1.6 mIoU points, thin classes most.
        ignore_index: Label excluded from the loss and from every metric, or None (shorthand
            when there is no ``data_spec``).
        class_names: Names used to label per-class metrics (shorthand); taken from the data
            module when omitted, else ``class_0..``.
        optimizer: Callable building the optimiser from the parameters (LightningCLI
            ``OptimizerCallable``); AdamW(lr=1e-3) by default.
        lr_scheduler: Callable building a scheduler from the optimiser, or None.
        scheduler_interval: Step the scheduler every ``epoch`` or every ``step``.
        monitor: Metric that ``ReduceLROnPlateau`` watches.
        channels_last: Run the network in channels-last memory format (faster on CPUs with
            oneDNN and on tensor-core GPUs).
        log_train_metrics: Also accumulate the IoU metrics (per-class IoU, mIoU, micro IoU) on
            training batches (Dice and accuracy are for val and test only). Off by default:
            on a CPU the update costs about 5 % of a training step, and scores on augmented
            crops say less than the val scores.
        num_worst_images: How many of the test images with the lowest IoU to keep (prediction
            and truth) for the evaluation report's gallery.
        test_tta: In ``test``, score the average prediction over the flips/rotations the
            model was trained with (:mod:`segpipe.tta`, from the data spec), as
            ``segpipe predict --tta`` does; the loss stays that of the plain prediction.
        test_tta_scales: In ``test``, also average over input sizes (multi-scale inference,
            :func:`segpipe.tta.multiscale_probabilities`): ``data.eval_resize`` (else each
            image's size) times each factor, e.g. ``[0.5, 0.75, 1, 1.25, 1.5]``, as
            ``segpipe predict --tta_scales`` does. Each view is resized from the test image at
            its native size, so the data module is asked for native images
            (:meth:`~segpipe.data.SegmentationDataModule.keep_test_images_native`); the loss
            stays that of the plain prediction. None: the evaluation size alone.
        positive_threshold: Two-class models only: label a pixel class 1 where its
            probability exceeds this (:func:`segpipe.decision.decide`) instead of the arg-max
            (0.5), in validation, ``test`` and every prediction from the checkpoint
            (``segpipe predict``, :class:`~segpipe.predict.api.Segmenter`, ONNX exports), so
            ``best`` is selected and masks are written as scored. Lower it for a scarce
            foreground class that the model under-segments (LGG tumours: 0.35 gained 0.4 point
            of mean Dice over patients across five folds). None (default): the arg-max.
        bn_adapt: In ``test``, first re-estimate the BatchNorm statistics on the test images
            (no labels used) and blend them with the training ones: this weight x theirs +
            (1 - weight) x training's (:mod:`segpipe.models.batchnorm`; 1 is AdaBN). For test
            images from another camera, scanner or lighting than training; ``segpipe predict
            --bn_adapt`` does the same on the images it predicts. 0 (default): off. The
            training statistics are put back after the test.
        freeze_encoder_epochs: Train decoder and head only, with the encoder frozen (no
            gradients, eval mode: BatchNorm keeps its statistics), for this many epochs; then
            the encoder trains too, at ``encoder_lr_mult`` x the learning rate. The network
            names its encoder with ``encoder_modules()`` (UNet: ``inc`` + ``downs``; FCN: its
            backbone; SmpModel: ``model.encoder``). See :mod:`segpipe.tasks.finetune`.
        encoder_lr_mult: Learning-rate factor of the encoder (discriminative learning rates):
            with a value other than 1 or with ``freeze_encoder_epochs``, the optimiser gets two
            parameter groups, ``decoder`` (all but the encoder, at the optimiser's ``lr``) and
            ``encoder`` (at ``lr`` x this), which LR schedulers scale alike.
        init_from: A segpipe checkpoint to start a new run from (``fit`` only, and not when
            resuming with ``--ckpt_path``): every tensor of the network whose name and shape
            match is loaded, the others (e.g. the head, for another number of classes) keep their
            initialisation, and a different input channel count adapts the first convolution;
            logged as ``loaded N tensors, re-initialised M (names)``. The file is read with
            ``weights_only=True`` when training starts, never when a checkpoint of this run is
            loaded.
        input_norm: ``per_image``: standardise each image's channels (zero mean, unit
            variance over its pixels) before the network
            (:class:`~segpipe.models.PerImageStandardize`), for data whose intensity scale
            varies between images (MRI from several scanners); ``none``: the data set's
            normalisation alone. Part of the model: checkpoints and ONNX exports keep it.
        compile: Compile the network with ``torch.compile`` for ``fit`` (``true``, or a
            mapping of its options such as ``{mode: max-autotune}``). Opt-in: compiling costs
            start-up time (tens of seconds to minutes) that short runs do not win back, and
            needs a C/C++ compiler for its default backend. The network is compiled in place,
            so checkpoints keep the plain parameter names; prediction runs uncompiled.
    """

    def __init__(
        self,
        net: nn.Module,
        data_spec: dict[str, Any] | None = None,
        num_classes: int | None = None,
        loss: LossName = "ce",
        late_loss: LossName | None = None,
        late_loss_start: float = 0.75,
        class_weights: list[float] | None = None,
        dice_per_image: bool = False,
        ohem_fraction: float | None = None,
        ohem_threshold: float | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int | None = None,
        class_names: list[str] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        monitor: str = "val/mIoU",
        channels_last: bool = True,
        log_train_metrics: bool = False,
        num_worst_images: int = 8,
        test_tta: bool = False,
        test_tta_scales: list[float] | None = None,
        positive_threshold: float | None = None,
        bn_adapt: float = 0.0,
        freeze_encoder_epochs: int = 0,
        encoder_lr_mult: float = 1.0,
        init_from: str | None = None,
        input_norm: Literal["none", "per_image"] = "none",
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        self._labels_checked: set[str] = set()  # stages whose first batch's labels were checked
        # From a config (LightningCLI) every argument is plain data, saved so that the checkpoint
        # alone rebuilds the task; built in Python, module and callables are no hyperparameters.
        # Unset shorthands are not saved: the spec states them (and loggers refuse hparams that
        # the data module also has with another value).
        unset = {"num_classes": num_classes, "ignore_index": ignore_index, "class_names": class_names}
        ignore = [k for k, v in unset.items() if v is None]
        if not _built_from_config():
            ignore += list(_PYTHON_ONLY)
        self.save_hyperparameters(ignore=ignore)
        self.net = net
        self.input_norm = input_norm_module(input_norm)
        spec = _task_spec(net, data_spec, num_classes, ignore_index, class_names)
        num_classes = spec.num_classes
        if num_classes < 2:
            raise ConfigError(
                f"SegmentationTask needs num_classes >= 2 (background counts as a class), got {num_classes}."
            )
        if class_weights is not None and len(class_weights) != num_classes:
            raise ConfigError(
                f"model.class_weights has {len(class_weights)} values but data.num_classes is "
                f"{num_classes}; give one weight per class, in class order."
            )
        if class_weights is not None and (
            not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0
                    for w in class_weights) or not any(w > 0 for w in class_weights)):
            raise ConfigError(
                f"model.class_weights must be finite numbers >= 0, at least one > 0 (a class's "
                f"share of the loss), got {list(class_weights)}; 0 drops a class from the loss.")
        #: Refused when training starts (an older checkpoint with both still loads to predict).
        self._weights_unused = class_weights is not None and "lovasz" in (loss, late_loss)
        #: Whether the class names were given (else the data module's are taken in setup).
        self._names_given = bool(class_names) or bool(data_spec and data_spec.get("class_names"))
        self.spec = spec
        ignore_index = spec.ignore_index
        self.pad_multiple = int(getattr(net, "pad_multiple", 32))
        #: The least H and W the network takes (smp's PAN); smaller inputs are padded up.
        self.min_size = int(getattr(net, "min_size", 0) or 0)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.monitor = monitor
        self.channels_last = channels_last
        self.log_train_metrics = log_train_metrics
        self.num_worst_images = num_worst_images
        self.test_tta = bool(test_tta)
        self.test_tta_scales = check_scales(test_tta_scales, "model.test_tta_scales")
        try:
            self.positive_threshold = check_positive_threshold(positive_threshold, num_classes)
        except ValueError as exc:
            raise ConfigError(f"{exc}.") from None
        self.bn_adapt = check_bn_adapt(bn_adapt)
        self._bn_adaptation: BatchNormAdaptation | None = None
        loss_options = (class_weights, ignore_index, dice_per_image, ohem_fraction,
                        ohem_threshold, label_smoothing)
        #: The loss of validation and test, and of training until ``late_loss`` takes over.
        self.criterion = self._build_loss(loss, *loss_options)
        #: ``late_loss``'s criterion (None without one); see :attr:`training_criterion`.
        self.late_criterion: nn.Module | None = None
        if late_loss is not None:
            if late_loss == loss:
                raise ConfigError(f"model.late_loss {late_loss!r} is model.loss already; give "
                                  f"another loss for the end of the training, or drop late_loss.")
            if not (isinstance(late_loss_start, (int, float)) and 0.0 < late_loss_start < 1.0):
                raise ConfigError(f"model.late_loss_start is a fraction of the training in (0, 1) "
                                  f"(e.g. 0.75), got {late_loss_start!r}")
            self.late_criterion = self._build_loss(late_loss, *loss_options,
                                                   option="model.late_loss")
        self.late_loss_start = float(late_loss_start)
        self._late_loss_on = False
        for name, value, does in (("ohem_fraction", ohem_fraction, "mines"),
                                  ("ohem_threshold", ohem_threshold, "mines"),
                                  ("label_smoothing", label_smoothing or None, "smooths")):
            for option, given, criterion in (("loss", loss, self.criterion),
                                             ("late_loss", late_loss, self.late_criterion)):
                if value is not None and criterion is not None and not _has_cross_entropy(criterion):
                    raise ConfigError(
                        f"model.{name} {does} the cross-entropy of loss ce, ce+dice or ce+lovasz, "
                        f"not model.{option} {given!r}; set one of those or drop {name}.")
        self._init_transfer(freeze_encoder_epochs, encoder_lr_mult, init_from)
        if not isinstance(compile, (bool, dict)):
            raise ConfigError(f"model.compile must be true, false or a mapping of torch.compile "
                              f"options, got {compile!r}.")
        self.compile_options: dict[str, Any] | None = (
            dict(compile) if isinstance(compile, dict) else ({} if compile else None)
        )
        if self.compile_options:
            _check_compile_options(self.compile_options)

        # Training (when log_train_metrics) updates only the IoU metrics, which share one
        # confusion-matrix state: the full collection's three states cost about three times as much.
        self.train_metrics = build_metrics(num_classes, ignore_index, only=IOU_METRICS).clone(
            prefix="train/"
        )
        self.val_metrics = build_metrics(num_classes, ignore_index).clone(prefix="val/")
        self.test_metrics = build_metrics(num_classes, ignore_index, confusion_matrix=True).clone(
            prefix="test/"
        )
        # the loss's epoch means over every process (see WeightedMean); no checkpoint state
        self.loss_means = nn.ModuleDict({"val": WeightedMean(), "test": WeightedMean()})
        self.train_loss_mean = WeightedMean()  # ("train" is nn.Module's train(), not a key)
        self.test_images: list[dict[str, Any]] = []
        self.worst_images: list[dict[str, Any]] = []
        # per-case confusions of val and test images that belong to cases (patients, sequences)
        self.case_confusions = {stage: CaseConfusions(num_classes, ignore_index)
                                for stage in ("val", "test")}
        #: Two-class models: test labels at thresholds of p(class 1) besides the one used.
        self.threshold_sweep = ThresholdSweep(ignore_index) if num_classes == 2 else None
        self.test_report: dict[str, Any] | None = None
        self._pending_rng_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ building blocks
    def _init_transfer(
        self, freeze_encoder_epochs: int, encoder_lr_mult: float, init_from: str | None
    ) -> None:
        """Check and keep the transfer-learning options (see :mod:`segpipe.tasks.finetune`)."""
        epochs_ok = isinstance(freeze_encoder_epochs, int) and not isinstance(freeze_encoder_epochs, bool)
        if not epochs_ok or freeze_encoder_epochs < 0:
            raise ConfigError(
                f"model.freeze_encoder_epochs must be an int >= 0 (0: never frozen), got "
                f"{freeze_encoder_epochs!r}."
            )
        mult_ok = isinstance(encoder_lr_mult, (int, float)) and not isinstance(encoder_lr_mult, bool)
        if not mult_ok or not encoder_lr_mult > 0:
            raise ConfigError(
                f"model.encoder_lr_mult must be a number > 0 (the encoder's learning rate is the "
                f"optimiser's lr times it), got {encoder_lr_mult!r}; to keep the encoder fixed, "
                "freeze it (model.freeze_encoder_epochs, or SmpModel's freeze_encoder)."
            )
        if init_from is not None and (not isinstance(init_from, str) or not init_from):
            raise ConfigError(f"model.init_from must be a checkpoint path or null, got {init_from!r}.")
        if freeze_encoder_epochs > 0:
            encoder_modules(self.net, "model.freeze_encoder_epochs")
            if getattr(self.net, "encoder_frozen", False):
                raise ConfigError(
                    "model.freeze_encoder_epochs unfreezes the encoder after "
                    f"{freeze_encoder_epochs} epochs, but the network was built with "
                    "freeze_encoder: true, which freezes it for the whole run; set only one."
                )
        if encoder_lr_mult != 1:
            encoder_modules(self.net, "model.encoder_lr_mult")
            if getattr(self.net, "encoder_frozen", False):
                raise ConfigError(
                    f"model.encoder_lr_mult={encoder_lr_mult} sets the encoder's learning rate, "
                    "but the network was built with freeze_encoder: true, so the encoder never "
                    "trains; drop one (or train it later with model.freeze_encoder_epochs "
                    "instead of freeze_encoder)."
                )
        self.freeze_encoder_epochs = freeze_encoder_epochs
        self.encoder_lr_mult = float(encoder_lr_mult)
        self.init_from = init_from

    def _build_loss(
        self, loss: str, class_weights: list[float] | None, ignore_index: int | None,
        dice_per_image: bool = False, ohem_fraction: float | None = None,
        ohem_threshold: float | None = None, label_smoothing: float = 0.0,
        option: str = "model.loss",
    ) -> nn.Module:
        if dice_per_image and loss not in ("dice", "ce+dice"):
            raise ConfigError(f"model.dice_per_image applies to the Dice of loss dice or ce+dice, "
                              f"not to {option} {loss!r}; set one of those or drop dice_per_image.")
        if ohem_fraction is not None and not 0.0 < ohem_fraction < 1.0:
            raise ConfigError(f"model.ohem_fraction is the fraction of pixels kept, in (0, 1) "
                              f"(e.g. 0.25), or null for all; got {ohem_fraction}")
        if ohem_threshold is not None and not 0.0 < ohem_threshold <= 1.0:
            raise ConfigError(f"model.ohem_threshold is a probability in (0, 1] (e.g. 0.7): pixels "
                              f"whose true class is predicted with less are kept; got {ohem_threshold}")
        if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
            raise ConfigError(f"model.label_smoothing is the share of each pixel's target spread "
                              f"over all classes, in [0, 1) (e.g. 0.1; 0 is off); got "
                              f"{label_smoothing!r}")
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        ce = PixelWeightedCrossEntropy(
            weight=weight, ignore_index=-100 if ignore_index is None else ignore_index,
            hard_fraction=ohem_fraction, hard_threshold=ohem_threshold,
            label_smoothing=float(label_smoothing),
        )
        if loss == "ce":
            return ce
        dice = (PerImageDiceLoss if dice_per_image else smp.losses.DiceLoss)(
            mode="multiclass", ignore_index=ignore_index, class_weights=class_weights
        )
        if loss == "dice":
            return dice
        if loss == "ce+dice":
            return _SumLoss(ce, dice)
        if loss == "focal":
            return _SkipAllIgnored(smp.losses.FocalLoss(
                mode="multiclass", ignore_index=ignore_index, class_weights=class_weights
            ), ignore_index)
        if loss in ("lovasz", "ce+lovasz"):
            lovasz = LovaszSoftmaxLoss(ignore_index=ignore_index)
            return lovasz if loss == "lovasz" else _SumLoss(ce, lovasz)
        raise ConfigError(f"{option} must be one of {', '.join(typing.get_args(LossName))}; "
                          f"got {loss!r}.")

    # ------------------------------------------------------------------ the data spec
    @property
    def spec(self) -> DataSpec:
        """Classes and input of the data the model is trained on."""
        return self._spec

    @spec.setter
    def spec(self, spec: DataSpec) -> None:
        self._spec = spec
        # Saved with the checkpoint (Lightning writes ``hparams`` at every save).
        self.hparams["data_spec"] = spec.to_dict()

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.spec.num_classes

    @property
    def ignore_index(self) -> int | None:
        """Label excluded from the loss and the metrics."""
        return self.spec.ignore_index

    @property
    def class_names(self) -> list[str]:
        """One name per class."""
        return list(self.spec.class_names)

    def setup(self, stage: str) -> None:
        """Adopt the data module's spec (names, colours, measured statistics); check it agrees."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dm_spec = getattr(dm, "spec", None)
        if isinstance(dm_spec, DataSpec):
            self._check_classes(dm_spec.num_classes)
            if dm_spec.ignore_index != self.ignore_index:
                raise ConfigError(
                    f"The data ignores label {dm_spec.ignore_index} but the model was built to "
                    f"ignore {self.ignore_index}; set data.ignore_index once (the CLI links it "
                    "into the model)."
                )
            if not dm_spec.has_stats and self.spec.has_stats:  # e.g. testing a checkpoint
                dm_spec = dm_spec.with_stats(self.spec.mean, self.spec.std, self.spec.stats_source)
            self.spec = dm_spec
        elif dm is not None:  # any LightningDataModule: take what it states
            dm_classes = getattr(dm, "num_classes", None)
            if dm_classes is not None:
                self._check_classes(int(dm_classes))
            names = getattr(dm, "class_names", None)
            if names and not self._names_given:
                if len(names) != self.num_classes:  # it spoke of a data.class_names not given
                    raise ConfigError(
                        f"{self._data_name()} names {len(names)} classes (its class_names: "
                        f"{list(names)[:5]}{', ...' if len(names) > 5 else ''}) but the network "
                        f"predicts {self.num_classes}; set the network's num_classes (e.g. "
                        f"--model.net.init_args.num_classes {len(names)}) or give the module "
                        "one name per class")
                self.spec = DataSpec.create(**{**self.spec.to_dict(), "class_names": names})
        if stage == "test" and self.test_tta_scales and self.spec.eval_resize:
            # multi-scale views are resized from native images, not from eval_resize's
            keep_native = getattr(dm, "keep_test_images_native", None)
            if keep_native is not None:
                keep_native()
        if stage in ("fit", "validate", "test"):
            check_ignore_index(self.num_classes, self.ignore_index)
        if stage == "fit" and getattr(dm, "pixel_weighting", False):
            self._check_pixel_weights()
        if stage == "fit":
            self._check_crop(getattr(dm, "train_crop_size", None), getattr(dm, "batch_size", None))
            if self._weights_unused:
                raise ConfigError(
                    "model.class_weights weigh the cross-entropy, Dice or focal loss; "
                    "Lovász-softmax (lovasz, here as model.loss or model.late_loss) takes none. "
                    "Use ce+lovasz (the weights go to its cross-entropy) or drop class_weights.")
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if stage == "fit" and self.compile_options is not None:
            # In place (nn.Module.compile): the state dict keeps its names.
            self.net.compile(**self.compile_options)

    def _check_crop(self, crop: int | None, batch_size: int | None) -> None:
        """A training crop no larger than the network's size step leaves its deepest level one
        pixel: BatchNorm cannot train on one value per channel (batch size 1), and the level
        sees nothing anyway. Refuse the first, warn of the second."""
        if not isinstance(crop, int) or crop > self.pad_multiple:
            return
        from segpipe.models.batchnorm import batchnorm_layers

        text = (f"data.crop_size={crop} is no larger than the network's size step "
                f"{self.pad_multiple}, so its deepest level sees one pixel per crop")
        if batch_size == 1 and batchnorm_layers(self.net):
            raise ConfigError(f"{text}, and BatchNorm cannot train on one value per channel at "
                              f"data.batch_size=1; use data.crop_size >= {2 * self.pad_multiple} "
                              "or a larger batch")
        rank_zero_warn(f"{text}; a crop of at least {2 * self.pad_multiple} gives it context")

    def _check_pixel_weights(self) -> None:
        """Per-pixel weights (the data's ``"weight"``) weigh the cross-entropy; refuse a loss
        without one rather than ignore them."""
        for option, criterion in (("loss", self.criterion), ("late_loss", self.late_criterion)):
            if criterion is not None and not _has_cross_entropy(criterion):
                raise ConfigError(
                    f"The training data carry per-pixel loss weights (data.boundary_weight_class), "
                    f"which weigh the cross-entropy, but model.{option} is "
                    f"{self.hparams[option]!r}; use ce, ce+dice or ce+lovasz, or drop "
                    f"data.boundary_weight_class."
                )

    def _check_classes(self, data_classes: int) -> None:
        if data_classes != self.num_classes:
            raise ConfigError(
                f"The data has {data_classes} classes but the model predicts {self.num_classes}; "
                "set data.num_classes (the CLI links it into the network)."
            )

    @staticmethod
    def _own_sizes(image: Tensor, sizes: Tensor) -> Iterator[Tensor]:
        """Each (1, C, h, w) image of a batch padded to the largest (PadCollate), cut back to
        its own (h, w) from ``sizes`` (N, 2), the batch's ``"image_size"``: one host read."""
        for i, (h, w) in enumerate(sizes.tolist()):
            yield image[i : i + 1, :, :h, :w]

    def _each_image(self, image: Tensor, sizes: Tensor, run: Any) -> Tensor:
        """``run`` on each image of a padded batch at its own size, as ``segpipe predict`` runs
        it: zero-padding seen as image content would change the predictions near its edges.

        Args:
            image: (N, C, H, W) batch of images padded to the largest (PadCollate).
            sizes: (N, 2) each image's own (h, w) (the batch's ``"image_size"``).
            run: (1, C, h, w) -> (1, K, h, w) scores.

        Returns:
            (N, K, H, W) scores, zero where an image is padding (its mask is ignored there).
        """
        out: Tensor | None = None
        for i, own in enumerate(self._own_sizes(image, sizes)):
            scores = run(own)
            if out is None:
                out = scores.new_zeros((image.shape[0], scores.shape[1], *image.shape[-2:]))
            out[i, :, : own.shape[-2], : own.shape[-1]] = scores[0]
        assert out is not None
        return out

    def _data_name(self) -> str:
        """The data module, for messages: ``the data module my.data.Module``."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return "the data"
        return f"the data module {type(dm).__module__}.{type(dm).__qualname__}"

    def _checked_batch(self, batch: Any, stage: Stage) -> dict[str, Any]:
        """``batch`` when it is segpipe's ``{"image": float (N, C, H, W), "mask": int64 (N, H,
        W)}`` (integer masks of another dtype are made int64); a :class:`BatchFormatError`
        that says what to change otherwise. A data module of the user's got a 50-100-line
        traceback from inside the loss for each of these. The first batch of each stage also
        has its labels checked against the classes (one host synchronisation)."""
        def refuse(what: str, fix: str) -> BatchFormatError:
            return BatchFormatError(
                f"{self._data_name()} gives {stage} batches that are not segpipe's "
                f'{{"image": float (N, C, H, W), "mask": int64 (N, H, W)}}: {what}; {fix}')

        if not isinstance(batch, dict):
            size = f" of {len(batch)}" if isinstance(batch, (list, tuple)) else ""
            raise refuse(f"got a {type(batch).__name__}{size}",
                         'return {"image": image, "mask": mask} from the dataset\'s __getitem__')
        missing = [key for key in ("image", "mask") if key not in batch]
        if missing:
            raise refuse(f"no {' or '.join(map(repr, missing))} key (keys: "
                         f"{', '.join(map(repr, sorted(map(str, batch))))})",
                         "name the image 'image' and the labels 'mask'")
        image, mask = batch["image"], batch["mask"]
        if not isinstance(image, Tensor) or not isinstance(mask, Tensor):
            raise refuse(f"image is a {type(image).__name__}, mask a {type(mask).__name__}",
                         "give tensors (torch.as_tensor)")
        if image.ndim != 4:
            raise refuse(f"image of shape {tuple(image.shape)}", "give (N, C, H, W) batches")
        channels = getattr(self.net, "in_channels", None)
        if isinstance(channels, int) and image.shape[1] != channels:
            last = image.shape[-1] == channels
            raise refuse(
                f"image of shape {tuple(image.shape)}, {image.shape[1]} channels, where the "
                f"network takes {channels}",
                "put the channels before the rows: image.permute(0, 3, 1, 2)" if last else
                "set model.net.init_args.in_channels to the data's channels")
        if not image.is_floating_point() or (  # float64 only for a float64 network
                image.dtype == torch.float64
                and getattr(next(self.net.parameters(), None), "dtype", None) != torch.float64):
            raise refuse(f"image is {image.dtype}",
                         "give float32 images, normalised (e.g. image.float() / 255, then the "
                         "bands' mean and std)")
        if mask.ndim == 4 and mask.shape[1] == 1:
            raise refuse(f"mask of shape {tuple(mask.shape)}", "drop the channel: mask[:, 0]")
        if mask.ndim != 3 or mask.shape[0] != image.shape[0]:
            raise refuse(f"mask of shape {tuple(mask.shape)} for images {tuple(image.shape)}",
                         "give one (H, W) mask of class indices per image")
        if mask.is_floating_point() or mask.dtype in (torch.bool, torch.complex64,
                                                      torch.complex128):
            raise refuse(f"mask is {mask.dtype}", "give class indices: mask.long()")
        if mask.dtype != torch.int64:
            batch = {**batch, "mask": mask.long()}
        if stage not in self._labels_checked:
            self._labels_checked.add(stage)
            labels = batch["mask"]
            if self.ignore_index is not None:
                labels = labels[labels != self.ignore_index]
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            if bad.numel():
                values = bad.unique()[:10].tolist()
                ignore = ("" if self.ignore_index is None
                          else f" or model.ignore_index={self.ignore_index}")
                raise refuse(f"mask labels {values} are no class of 0..{self.num_classes - 1}"
                             f"{ignore}", "map them to classes or to the ignored label, or set "
                             "the network's num_classes")
        return batch

    def _shared_step(self, batch: dict[str, Any], stage: Stage) -> Tensor:
        batch = self._checked_batch(batch, stage)
        image, mask = batch["image"], batch["mask"]
        sizes = batch.get("image_size") if stage != "train" else None
        eval_size = self._native_eval_size(batch) if stage == "test" else None
        pixel_weight = batch.get("weight")
        if stage == "train":
            # Every logit the network makes is trained: crops that are not a multiple of its
            # size step are padded (by reflection), and so are their masks and weights.
            logits = self.padded_logits(image)
            padded = (int(logits.shape[-2]), int(logits.shape[-1]))
            mask = pad_labels_like(mask, padded)
            if pixel_weight is not None:
                pixel_weight = pad_labels_like(pixel_weight, padded)
        elif eval_size is not None:  # native images (test_tta_scales): the plain view resized here
            plain = partial(self._at_eval_size, size=eval_size)
            logits = plain(image) if sizes is None else self._each_image(image, sizes, plain)
        else:
            logits = self(image) if sizes is None else self._each_image(image, sizes, self)
        # data.eval_resize: the network saw resized images; score at the masks' native size.
        resized = stage != "train" and tuple(logits.shape[-2:]) != tuple(mask.shape[-2:])
        if pixel_weight is not None:
            self._check_pixel_weights()
        n = image.shape[0]
        scores = self._to_masks(logits, batch) if resized else logits.float()
        criterion = self.training_criterion if stage == "train" else self.criterion
        loss = criterion(scores, mask, **(
            {} if pixel_weight is None else {"pixel_weight": pixel_weight}))
        if stage == "train":
            # Lightning converts progress-bar values to numbers after every step (a host-device
            # synchronisation); segpipe's progress bar reads the training loss when it refreshes.
            # The step's value is this process's; the epoch's (train/loss_epoch) the mean over
            # every process's images, synced once at the epoch's end (a logged tensor gave
            # process 0's alone).
            mean = self.train_loss_mean
            mean(loss, n)
            self.log("train/loss", mean, on_step=True, on_epoch=True, batch_size=n)
        else:
            # Each batch's loss weighs by its scored pixels, not its images: for cross-entropy
            # the epoch's figure is then the mean over every scored pixel, whatever
            # data.eval_batch_size (weighted by images it moved with it), and nothing scored
            # counts for nothing (NaN when no pixel is). With class (or pixel) weights, by
            # those pixels' weights: the divisor of cross-entropy's weighted mean (by their
            # count it moved with the batch size). No host synchronisation.
            ce = next((m for m in self.criterion.modules()
                       if isinstance(m, PixelWeightedCrossEntropy)), None)
            if ce is not None:
                scored = ce.pixel_weights(mask, pixel_weight).sum()
            elif self.ignore_index is not None:
                scored = (mask != self.ignore_index).sum()
            else:
                scored = mask.new_tensor(mask.numel())
            mean = self.loss_means[stage]
            mean.update(loss, scored)
            self.log(f"{stage}/loss", mean, on_step=False, on_epoch=True, prog_bar=True,
                     batch_size=n)
        if stage == "train" and not self.log_train_metrics:
            return loss
        threshold = self.positive_threshold  # None: the arg-max (of logits or probabilities)
        sweep = self.threshold_sweep if stage == "test" else None
        if stage == "test" and self.test_tta_scales:
            views = partial(self._scale_probabilities, base_size=eval_size)
            probs = views(image) if sizes is None else self._each_image(image, sizes, views)
        elif stage == "test" and self.test_tta:
            probs = (self._tta_probabilities(image, logits.detach()) if sizes is None
                     else self._each_image(image, sizes, self._tta_probabilities))
        elif resized or threshold is not None:
            # probabilities resized as segpipe predict resizes them: the same masks
            probs = logits.detach().float().softmax(dim=1)
        else:
            probs = None  # the arg-max of the logits is that of the probabilities
        if probs is not None and resized:
            probs = self._to_masks(probs, batch)
        preds = decide(logits.detach() if probs is None else probs, threshold)
        if sweep is not None:
            scores = probs if probs is not None else logits.detach().float().softmax(dim=1)
            sweep.update(scores[:, 1], mask, batch.get("case"))
        getattr(self, f"{stage}_metrics").update(preds, mask)
        if batch.get("case") is not None and stage != "train":
            self.case_confusions[stage].update(preds, mask, batch["case"])
        if stage == "test":
            self._record_test_images(batch.get("path", [""] * n), preds, mask)
        return loss

    @property
    def training_criterion(self) -> nn.Module:
        """The loss training uses now: ``late_loss``'s once the training has reached
        ``late_loss_start`` (see :meth:`on_train_epoch_start`), else ``loss``'s."""
        if self._late_loss_on and self.late_criterion is not None:
            return self.late_criterion
        return self.criterion

    def on_train_epoch_start(self) -> None:
        """Switch training to ``late_loss`` at the first epoch that starts at or past
        ``late_loss_start`` of the planned training (callbacks, the time budget's planner among
        them, have made this epoch's plan by now). A resumed run switches again from its
        restored progress."""
        if self.late_criterion is None or self._late_loss_on:
            return
        progress = training_progress(self.trainer)
        if progress >= self.late_loss_start:
            self._late_loss_on = True
            rank_zero_info(f"Epoch {self.current_epoch + 1} on: training loss "
                           f"{self.hparams.late_loss} (model.late_loss), {100 * progress:.0f} % "
                           f"into the planned training")

    def _to_masks(self, scores: Tensor, batch: dict[str, Any]) -> Tensor:
        """``scores`` of resized images (``data.eval_resize``) at the size of ``batch``'s
        masks (see :func:`to_mask_size`)."""
        return to_mask_size(scores, tuple(batch["mask"].shape[-2:]), batch.get("size"))

    def _record_test_images(self, paths: list[str], preds: Tensor, mask: Tensor) -> None:
        """Per-image scores, and the k worst images' prediction and truth for the report."""
        scores = per_image_scores(preds, mask, self.num_classes, self.ignore_index)
        for i, (path, score) in enumerate(zip(paths, scores)):
            self.test_images.append({"path": str(path), **score})
            if self.num_worst_images <= 0 or score["IoU"] is None:
                continue
            worst = self.worst_images
            if len(worst) < self.num_worst_images or score["IoU"] < worst[-1]["IoU"]:
                worst.append(
                    {"path": str(path), **score,
                     "pred": preds[i].cpu().numpy(), "mask": mask[i].cpu().numpy()}
                )
                worst.sort(key=lambda row: row["IoU"])
                del worst[self.num_worst_images :]

    def _tta_description(self) -> str:
        """How test predictions were made, for ``test_metrics.json`` and the report."""
        scales = ""
        if self.test_tta_scales:
            base = ("data.eval_resize " + "x".join(map(str, self.spec.eval_resize))
                    if self.spec.eval_resize else "each image's size")
            scales = (f" at {len(self.test_tta_scales)} scales "
                      f"({', '.join(f'{s:g}' for s in self.test_tta_scales)} x {base}, each "
                      "resized from the native image)")
        if not self.test_tta:
            return f"mean over sizes{scales}" if scales else "none (plain predictions)"
        from segpipe.tta import model_views

        views = model_views(self.spec.symmetries, warn=False)
        recorded = self.spec.symmetries
        names = "hflip; not recorded, assumed" if recorded is None else ", ".join(recorded) or "none"
        return f"mean of {len(views)} view(s) over the training symmetries ({names}){scales}"

    def _native_eval_size(self, batch: dict[str, Any]) -> tuple[int, int] | None:
        """``data.eval_resize`` when ``test_tta_scales`` gets ``batch``'s images at their native
        size (the plain view and each scale are then resized from them here), else None.

        Raises:
            ConfigError: When the data module resized the images to ``eval_resize``: enlarged
                views of them would be blurred copies (see :mod:`segpipe.tta`).
        """
        eval_size = self.spec.eval_resize
        if not (self.test_tta_scales and eval_size):
            return None
        image_hw, mask_hw = tuple(batch["image"].shape[-2:]), tuple(batch["mask"].shape[-2:])
        if image_hw != mask_hw:
            raise ConfigError(
                f"model.test_tta_scales resizes each view from the test images at their native "
                f"size, but {self._data_name()} resized them to data.eval_resize "
                f"{list(eval_size)} ({list(image_hw)} images, {list(mask_hw)} masks): give it a "
                "keep_test_images_native() method that stops that for the test split (as "
                "segpipe's SegmentationDataModule has), or leave model.test_tta_scales out")
        return (int(eval_size[0]), int(eval_size[1]))

    def _at_eval_size(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """Logits of native ``image`` (N, C, H, W) seen at the evaluation ``size`` (resized as
        ``data.eval_resize`` resizes), brought back to (N, K, H, W)."""
        return resize_view(self(resize_view(image, size)).float(), image.shape[-2:])

    def _scale_probabilities(self, image: Tensor,
                             base_size: tuple[int, int] | None = None) -> Tensor:
        """(N, K, H, W) probabilities averaged over ``test_tta_scales`` (and with ``test_tta``
        the training symmetries) of ``base_size`` (None: the image's size)."""
        from segpipe.tta import model_views, multiscale_probabilities

        views = model_views(self.spec.symmetries, warn=False) if self.test_tta else [(0, ())]
        assert self.test_tta_scales is not None
        return multiscale_probabilities(self, image, views, self.test_tta_scales, base_size)

    def _tta_probabilities(self, image: Tensor, logits: Tensor | None = None) -> Tensor:
        """(N, K, H, W) probabilities averaged over the training symmetries; ``logits``, when
        given, are ``self(image)``, reused for the identity view."""
        from segpipe.tta import model_views, tta_probabilities

        views = model_views(self.spec.symmetries, warn=False)
        return tta_probabilities(self, image, views, identity_logits=logits)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    # ------------------------------------------------------------------ epoch ends
    def _log_epoch(self, stage: Stage) -> dict[str, Tensor]:
        collection = getattr(self, f"{stage}_metrics")
        updated = any(metric.update_called for metric in collection.values())
        if self._trainer is not None and self.trainer.world_size > 1:
            # A rank that got no batch (more ranks than images) must still join the sync.
            updated = self.trainer.strategy.reduce_boolean_decision(updated, all=False)
        if not updated:
            return {}
        computed = {k.removeprefix(f"{stage}/"): v for k, v in collection.compute().items()}
        if stage == "val" and not self._warned_nothing_scored and nothing_scored(computed) \
                and not (self._trainer is not None and self.trainer.sanity_checking):
            self._warned_nothing_scored = True
            rank_zero_warn(
                "validation scored no pixel: every val mask pixel is data.ignore_index, so "
                "the val figures are NaN and the best-* checkpoint is merely the first "
                "validation's (--ckpt_path best means nothing); check the val masks "
                "(data.mask_values, data.ignore_index)")
        computed = undefined_when_nothing_scored(computed)
        names = self.class_names
        flat = flatten_metrics(computed, names, prefix=f"{stage}/", keep_undefined=stage == "val")
        # Already synced across ranks by torchmetrics; sync_dist averages identical values.
        self.log(f"{stage}/mIoU", flat.pop(f"{stage}/mIoU"), prog_bar=True, sync_dist=True)
        self.log_dict(flat, sync_dist=True)
        collection.reset()
        return computed

    def _log_case_means(self, stage: Stage) -> dict[str, Any] | None:
        """Log the epoch's means over cases (``{stage}/mDice_mean_over_cases`` and
        ``mIoU_mean_over_cases``; in validation also ``val/Dice_mean_over_cases/<class>``, which
        a ``checkpoint.monitor`` can select on: test's per-class ones are in its report) and
        return :func:`case_scores`' table, or None when no image had a case."""
        tracker = self.case_confusions[stage]
        world_size = self.trainer.world_size if self._trainer is not None else 1
        confusions, counts = tracker.merged(world_size)
        tracker.reset()
        if not confusions:
            return None
        per_case = case_scores(confusions, counts, self.class_names)
        if self._trainer is not None:  # already gathered; sync_dist averages identical values
            self.log_dict(case_score_logs(per_case, self.class_names, prefix=f"{stage}/",
                                          per_class=stage == "val"), sync_dist=True)
        return per_case

    def on_train_epoch_end(self) -> None:
        if self.log_train_metrics:
            self._log_epoch("train")
        self.check_weights()  # for runs that validate rarely or never

    def on_validation_epoch_start(self) -> None:
        self.case_confusions["val"].reset()  # nothing left from a validation cut short

    def on_validation_epoch_end(self) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit" and \
                not self.trainer.sanity_checking and self.loss_means["val"].update_called:
            loss = self.loss_means["val"].compute()  # synced across processes
            # NaN without a scored pixel (every val pixel ignored) is no divergence; the
            # weight is the one summed over every process, so all of them decide alike
            if bool(self.loss_means["val"].computed_weight > 0) and not bool(torch.isfinite(loss)):
                self.loss_means["val"].reset()
                self._diverged(f"the validation loss is {float(loss)}")
        self._log_epoch("val")
        self._log_case_means("val")

    _weights_checked_at: int | None = None
    _warned_nothing_scored = False

    def check_weights(self) -> None:
        """Stop a diverged fit (:meth:`_diverged`) when a weight is NaN or infinite: one host
        synchronisation, at most once per step (``LastCheckpoint`` asks before each save, and
        the epoch's end asks too)."""
        if self._weights_checked_at == self.global_step:
            return
        from segpipe.callbacks import weights_finite

        if not weights_finite(self):
            self._diverged("some weights are NaN or infinite")
        self._weights_checked_at = self.global_step

    def _diverged(self, what: str) -> None:
        """Stop a diverged fit before its checkpoints are written: a NaN model scores every
        pixel as class 0, and its constant mIoU passed for a result."""
        from segpipe.errors import TrainingDivergedError

        precision = str(getattr(self.trainer, "precision", ""))
        raise TrainingDivergedError(
            f"training diverged in epoch {self.current_epoch} (step {self.global_step}): {what}. "
            + ("--trainer.precision 16-true keeps the weights in float16, which overflows: use "
               "bf16-mixed or 32-true" if precision == "16-true" else
               "Lower model.optimizer.init_args.lr (the usual cause)")
            + "; checkpoints written before this epoch are intact (--ckpt_path last).")

    def on_test_start(self) -> None:
        """``bn_adapt``: blend the test images' BatchNorm statistics in before scoring."""
        self._bn_adaptation = None
        if not self.bn_adapt:
            return
        reduce = None
        if self.trainer.world_size > 1:  # each process saw a share of the test images
            strategy = self.trainer.strategy
            reduce = lambda t: strategy.reduce(t, reduce_op="sum")  # noqa: E731
        with self.trainer.precision_plugin.forward_context():
            self._bn_adaptation = adapt_batchnorm(self.net, self._test_images(), self.bn_adapt,
                                                  forward=self, reduce=reduce)
        described = self._bn_adaptation.describe("test images")
        rank_zero_info(f"model.bn_adapt: BatchNorm statistics = {described}")

    def _test_images(self) -> Any:
        """The test loaders' (N, C, H, W) images, on this device and normalised as in
        ``test_step``."""
        loaders = self.trainer.test_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        datamodule = self.trainer.datamodule
        for idx, loader in enumerate(loaders):
            for batch in _one_pass(loader):
                batch = self.transfer_batch_to_device(batch, self.device, idx)
                if datamodule is not None:
                    batch = datamodule.on_after_batch_transfer(batch, idx)
                batch = self.on_after_batch_transfer(batch, idx)
                sizes = batch.get("image_size")
                eval_size = self._native_eval_size(batch)
                # each at its own size, as scored: the zero padding is no statistic
                images = [batch["image"]] if sizes is None else self._own_sizes(batch["image"],
                                                                                 sizes)
                for image in images:  # native (test_tta_scales): the plain view, as scored
                    yield image if eval_size is None else resize_view(image, eval_size)

    def on_test_end(self) -> None:
        """Put the training BatchNorm statistics back after ``bn_adapt``."""
        if self._bn_adaptation is not None:
            self._bn_adaptation.restore()

    def on_test_epoch_start(self) -> None:
        self.test_images = []
        self.worst_images = []
        self.case_confusions["test"].reset()
        if self.threshold_sweep is not None:
            self.threshold_sweep.reset()
        self.test_report = None

    def on_test_epoch_end(self) -> None:
        computed = self._log_epoch("test")
        if not computed:
            if self._trainer is not None and self.trainer.limit_test_batches != 0:
                # Not one batch anywhere: an empty split is refused before this, so this is a
                # fault; exit 0 without metrics passed for a test in `fit && test` pipelines.
                raise RuntimeError("segpipe test scored no image: the test loaders gave no "
                                   "batch, so there are no metrics to write")
            return
        names = self.class_names
        images, worst = self.test_images, self.worst_images
        if self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (images, worst))
            # Each image was tested on exactly one rank (UnrepeatedSampler: rank r has images
            # r, r + R, ...); interleaving the ranks' rows restores the data set's order.
            parts = [part[0] for part in gathered]
            images = [
                part[i] for i in range(max(map(len, parts), default=0)) for part in parts
                if i < len(part)
            ]
            worst = sorted((row for part in gathered for row in part[1]), key=lambda r: r["IoU"])
            worst = worst[: self.num_worst_images]
        report = metrics_report(computed, names, self.ignore_index)
        if report.get("warning"):
            rank_zero_warn(f"segpipe test: {report['warning']}")
        report["num_images"] = len(images)
        # As logged (test/loss): the loss over every scored pixel (NaN when none is).
        loss = float(self.loss_means["test"].compute())
        report["loss"] = None if math.isnan(loss) else loss  # JSON: null, as other figures
        report["test_time_augmentation"] = self._tta_description()
        if self.positive_threshold is not None:  # absent: the arg-max, as before the option
            report["decision"] = decision_description(self.positive_threshold, self.class_names)
        report["batchnorm_statistics"] = (
            "training's (plain)" if self._bn_adaptation is None
            else self._bn_adaptation.describe("test images"))
        per_case = self._log_case_means("test")
        if per_case is not None:
            # Images whose path the case pattern finds no case in: pooled, in no case.
            per_case["images_without_case"] = len(images) - sum(
                row["num_images"] for row in per_case["cases"])
            report["per_case"] = per_case
        if self.threshold_sweep is not None:
            sweep = self.threshold_sweep.summary(names[1], self.trainer.world_size)
            if sweep is not None:
                report["threshold_sweep"] = sweep
        report["per_image"] = images
        report["worst_images"] = worst  # with numpy arrays: for the report, not for JSON
        self.test_report = report

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the global RNG states (dropout, random ops) of every rank.

        Data order and augmentation do not need them (they are functions of the seed, epoch
        and index), but anything drawing from torch's global generator in the model does; with
        them a resumed run continues exactly where the interrupted one stopped.
        """
        state = get_rng_state()
        if self._trainer is not None and self.trainer.world_size > 1:
            states: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint[RNG_STATE_KEY] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint's weights fit this task (one line, before Lightning's
        40-line state-dict error); take the saved normalisation statistics when this task has
        none; keep this rank's saved RNG state to restore when training resumes."""
        saved = recorded_spec(checkpoint.get("hyper_parameters"),
                              checkpoint.get("datamodule_hyper_parameters"))
        self._check_checkpoint_fits(checkpoint.get("state_dict"), saved)
        self._warn_evaluation_differs(saved)
        self._adopt_trained_labels(saved)
        if not self.spec.has_stats and saved.get("mean") is not None and saved.get("std") is not None:
            self.spec = self.spec.with_stats(saved["mean"], saved["std"],
                                             saved.get("stats_source") or "measured")
        states = checkpoint.get(RNG_STATE_KEY)
        self._pending_rng_state = None
        if not states or self._trainer is None:
            return
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if len(states) == world:
            self._pending_rng_state = states[rank]

    def _warn_evaluation_differs(self, saved_spec: dict[str, Any]) -> None:
        """Warn when a test or validate scores otherwise than the checkpoint's data spec says:
        another ``eval_resize`` (not the size ``segpipe predict`` predicts at), another
        ignore index (other pixels scored than training ignored) or other ``bands``. A resumed
        fit records the new values, so it is not warned."""
        if self._trainer is not None and self.trainer.state.fn not in ("validate", "test"):
            return
        whys = {
            "eval_resize": "its figures are not those of the masks segpipe predict writes with it",
            "ignore_index": "it scores other pixels than training ignored (the masks are the same)",
            "bands": "the model reads other bands of the files than it was trained on (right "
                     "only where these files hold their bands in another order)",
        }
        for key, why in whys.items():
            if key not in saved_spec:  # a checkpoint older than the spec's key
                continue
            was, now = saved_spec[key], getattr(self.spec, key)
            if (list(was) if isinstance(was, (list, tuple)) else was) == (
                    list(now) if isinstance(now, (list, tuple)) else now):
                continue
            if key == "bands" and now is None and reads_leading_bands(was):
                continue  # the files' own first bands, all of which this run reads
            shown = ("null" if was is None
                     else f"'{list(was)}'" if isinstance(was, (list, tuple)) else str(was))
            rank_zero_warn(
                f"the checkpoint was trained with data.{key}={shown} but this run has "
                f"data.{key}={'null' if now is None else now}: {why}; to score as trained, "
                f"pass --data.{key} {shown} or the run's config.yaml")

    def _adopt_trained_labels(self, saved_spec: dict[str, Any]) -> None:
        """In a test or validate, take what describes the trained model from the checkpoint,
        not from this run's data options: the class names and colours (the figures are
        labelled as the model was trained; data.class_names given otherwise are warned about,
        since they would relabel every per-class figure) and the symmetries it was trained
        with (``model.test_tta`` averages over those, as ``segpipe predict --tta`` does)."""
        if self._trainer is None or self.trainer.state.fn not in ("validate", "test"):
            return
        updates: dict[str, Any] = {}
        if "symmetries" in saved_spec and saved_spec["symmetries"] != self.spec.symmetries:
            updates["symmetries"] = saved_spec["symmetries"]
        names = saved_spec.get("class_names")
        if (names and list(names) != self.class_names
                and list(names) != default_class_names(self.num_classes)):
            if self.class_names != default_class_names(self.num_classes):
                rank_zero_warn(
                    f"the checkpoint's classes are {list(names)} but this run's "
                    f"data.class_names are {self.class_names}: the figures are labelled with "
                    "the checkpoint's names (class i is what the model learnt as class i)")
            updates["class_names"] = list(names)
            if saved_spec.get("class_colors"):
                updates["class_colors"] = saved_spec["class_colors"]
        if updates:
            self.spec = DataSpec.create(**{**self.spec.to_dict(), **updates})

    def _check_checkpoint_fits(self, state: Any, saved_spec: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` naming the difference when the checkpoint's weights cannot
        be loaded into this task: another class or channel count (the data options), or
        another network."""
        if not isinstance(state, dict):
            return
        check_spec_fits(saved_spec, self.spec.num_classes, self.spec.in_channels)
        differences = weight_differences(self.state_dict(), state, "here", self.strict_loading)
        if differences:
            raise ConfigError(f"the checkpoint's network is not this run's "
                              f"({type(self.net).__name__}): {differences}; {_NOT_THIS_RUN_FIX}")

    def on_train_start(self) -> None:
        """Check the schedule's horizon (:meth:`_check_scheduler_horizon`) and restore the RNG
        state of a resumed run right before its first training batch.

        The horizon is checked here, not in :meth:`configure_optimizers`: counting the run's
        steps there (``estimated_stepping_batches``, for a run capped in epochs) made Lightning
        build the training loader before the checkpoint was restored, and keep it without the
        saved position, so a run resumed mid-epoch trained its epoch's first batches again and
        never saw its last ones.
        """
        for config in self.trainer.lr_scheduler_configs:
            self._check_scheduler_horizon(config.scheduler)
        if self._pending_rng_state is not None:
            set_rng_state(self._pending_rng_state)
            self._pending_rng_state = None

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        two_groups = self.freeze_encoder_epochs > 0 or self.encoder_lr_mult != 1
        try:  # torch's own argument checks ("Invalid learning rate: -1.0"), named as options
            if two_groups:  # "decoder" at lr, "encoder" at lr x encoder_lr_mult (finetune.py)
                optimizer = self.optimizer_factory(param_groups(self, self.net))
                scale_encoder_lr(optimizer, self.encoder_lr_mult)
            else:
                optimizer = self.optimizer_factory(self.parameters())
            trainer = self._trainer
            optimizer = fused_optimizer(optimizer, None if trainer is None else trainer.precision)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"model.optimizer: {exc}") from exc
        if self.scheduler_factory is None:
            return optimizer
        try:
            scheduler = self.scheduler_factory(optimizer)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"model.lr_scheduler: {exc}") from exc
        if two_groups:
            check_lr_ratio(optimizer, self.encoder_lr_mult, scheduler)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # Lightning's ReduceLROnPlateau (its CLI's) names its own metric
            config["monitor"] = getattr(scheduler, "monitor", None) or self.monitor
            if self.scheduler_interval != "epoch":
                raise ConfigError(
                    "model.lr_scheduler ReduceLROnPlateau steps on the validation score "
                    f"({config['monitor']}), which exists once per validation, but "
                    f"model.scheduler_interval is {self.scheduler_interval!r}; set "
                    "--model.scheduler_interval epoch")
            _plateau_mode(scheduler, config["monitor"])
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _check_scheduler_horizon(self, scheduler: Any) -> None:
        """A schedule shorter than the run: OneCycleLR stops it with torch's "Tried to step N
        times" in the middle of training (refused here, before it starts), and a cosine or
        polynomial horizon counted in the other unit than ``model.scheduler_interval`` (a
        ``T_max`` in epochs stepped per step) makes the learning rate cycle (warned). Called
        at :meth:`on_train_start`, where the training loader is built."""
        trainer = self.trainer
        per_step = self.scheduler_interval == "step"
        try:
            planned = float(trainer.estimated_stepping_batches) if per_step else float(
                trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf)
        except Exception:  # noqa: BLE001 - a run Lightning cannot count: nothing to say
            return
        if not math.isfinite(planned):
            return  # a time budget: the length is not known
        unit = "optimiser steps" if per_step else "epochs"
        other = "epoch" if per_step else "step"
        lr_sched = torch.optim.lr_scheduler
        if isinstance(scheduler, lr_sched.OneCycleLR):
            if scheduler.total_steps < planned:
                raise ConfigError(
                    f"model.lr_scheduler OneCycleLR has total_steps={scheduler.total_steps} but "
                    f"this run takes {int(planned)} {unit} (model.scheduler_interval "
                    f"{self.scheduler_interval}); torch stops the run when they run out: give "
                    f"total_steps {int(planned)}")
            return
        horizon = {lr_sched.CosineAnnealingLR: "T_max", lr_sched.PolynomialLR: "total_iters"}
        name = next((key for cls, key in horizon.items() if isinstance(scheduler, cls)), None)
        value = getattr(scheduler, name, None) if name else None
        if isinstance(value, int) and value < planned:
            rank_zero_warn(
                f"model.lr_scheduler {type(scheduler).__name__} has {name}={value}, counted in "
                f"{unit} (model.scheduler_interval {self.scheduler_interval}), but this run "
                f"takes {int(planned)}: the learning rate "
                f"{'rises again' if name == 'T_max' else 'stays at its end'} after {value}; give "
                f"{name} {int(planned)}, or set --model.scheduler_interval {other} if {name} "
                f"is meant in {other}s")

    def configure_callbacks(self) -> list[L.Callback]:
        """:class:`~segpipe.tasks.finetune.TransferLearning`: applies ``init_from`` and
        ``freeze_encoder_epochs``, and checks that a resumed run has the checkpoint's parameter
        groups (it does nothing else when neither option is set)."""
        return [TransferLearning(self.init_from, self.freeze_encoder_epochs)]


#: Optimisers with a fused kernel on CPU and CUDA in every torch segpipe admits (2.4 on).
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def fused_optimizer(optimizer: torch.optim.Optimizer,
                    precision: str | int | None = None) -> torch.optim.Optimizer:
    """``optimizer`` built again with ``fused=True`` where torch has a fused kernel for it and
    the configuration left the choice to torch (neither ``fused`` nor ``foreach`` given).

    One kernel updates every parameter, where torch's default loops over the parameters on a
    CPU (AdamW for the U-Net base 16: 6.4 ms per step on this 2-core CPU, fused 1.0 ms) and
    launches a few kernels per list of tensors on a GPU, host work that a small network's
    step waits on. Kept as it is: other optimisers, parameters off CPU and CUDA, and fp16
    mixed precision (Lightning unscales its gradients outside the optimiser, and refuses
    gradient clipping with a fused one). ``model.optimizer.init_args.fused: false`` (or
    ``foreach``) keeps torch's choice.

    Args:
        optimizer: Built by ``model.optimizer``, before any step.
        precision: The trainer's precision, e.g. ``"bf16-mixed"``.

    Returns:
        The same optimiser, or one of its class over the same parameter groups and options.
    """
    defaults = optimizer.defaults
    if (type(optimizer) not in FUSED_OPTIMIZERS or str(precision) in ("16", "16-mixed")
            or any(defaults.get(k) is not None for k in ("fused", "foreach"))
            or defaults.get("differentiable") or defaults.get("capturable")):
        return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or any(p.device.type not in ("cpu", "cuda") or not p.is_floating_point()
                         for p in params):
        return optimizer
    accepted = inspect.signature(type(optimizer)).parameters
    options = {k: v for k, v in defaults.items() if k in accepted and k != "params"}
    return type(optimizer)([{**group, "fused": True} for group in optimizer.param_groups],
                           **{**options, "fused": True})


def _check_compile_options(options: dict[str, Any]) -> None:
    """Refuse ``model.compile`` options torch.compile would reject at the first training step
    (a traceback after the data checks and the model's start): unknown keys, an unknown mode."""
    import inspect

    accepted = [k for k in inspect.signature(torch.compile).parameters if k != "model"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"model.compile: torch.compile takes no {', '.join(unknown)}; it takes "
                          f"{', '.join(accepted)}")
    mode = options.get("mode")
    if mode is not None:
        try:
            from torch._inductor import list_mode_options

            modes = list(list_mode_options())
        except Exception:  # noqa: BLE001 - a torch without the listing: torch checks it later
            return
        if mode not in modes:
            raise ConfigError(f"model.compile: mode {mode!r} is not one of torch.compile's "
                              f"modes: {', '.join(modes)}")


class PerImageDiceLoss(smp.losses.DiceLoss):
    """smp's multiclass Dice loss, scored per image and class instead of over the batch.

    smp pools the pixels of the whole batch per class, so a batch's large objects dominate its
    Dice. Here each (image, class) pair with true pixels in that image gets its own soft Dice
    (smp's ``compute_score`` over the pixels only); pairs without true pixels count as 0, as
    smp counts absent classes, and the loss is the mean over images and classes (class weights
    as smp applies them). For one image it equals smp's loss. (smp has no per-image option and
    MONAI's ``DiceLoss(batch=False)`` would add a dependency for this one reduction.)

    Shapes: logits (N, C, H, W), target int64 (N, H, W) -> scalar.
    """

    def __init__(self, mode: str = "multiclass", **kwargs: Any) -> None:
        if mode != "multiclass":
            raise ValueError(f"PerImageDiceLoss is multiclass only, got mode {mode!r}")
        super().__init__(mode, **kwargs)

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        n, c = y_pred.shape[:2]
        prob = (y_pred.log_softmax(dim=1).exp() if self.from_logits else y_pred).reshape(n, c, -1)
        target = y_true.reshape(n, -1)
        if self.ignore_index is not None:
            valid = (target != self.ignore_index).unsqueeze(1)
            onehot = nn.functional.one_hot(target.masked_fill(~valid[:, 0], 0), c)
            onehot = onehot.permute(0, 2, 1) * valid
            prob = prob * valid
        else:
            onehot = nn.functional.one_hot(target, c).permute(0, 2, 1)
        onehot = onehot.type_as(prob)
        scores = self.compute_score(prob, onehot, smooth=self.smooth, eps=self.eps, dims=(2,))
        loss = -torch.log(scores.clamp_min(self.eps)) if self.log_loss else 1.0 - scores
        loss = loss * (onehot.sum(2) > 0).to(loss.dtype)  # (N, C): only classes in the image
        if self.classes is not None:
            loss = loss[:, self.classes]
        return self.aggregate_loss(loss.mean(0))  # linear: the mean of the images' losses


_NOT_THIS_RUN_FIX = ("test or resume it with the config it was trained with (config.yaml in its "
                     "run folder), or train a new model from its weights with --model.init_from "
                     "CKPT")


def check_spec_fits(saved_spec: Mapping[str, Any], num_classes: int | None,
                    in_channels: int | None) -> None:
    """Raise :class:`ConfigError` when a checkpoint's classes or channels (its saved data spec)
    are not this run's (``data.num_classes``, ``data.in_channels``; None: not known yet).

    Args:
        saved_spec: The checkpoint's ``data_spec`` (:func:`recorded_spec`).
        num_classes: This run's number of classes.
        in_channels: This run's number of input channels.
    """
    for key, option, now in (("num_classes", "data.num_classes", num_classes),
                             ("in_channels", "data.in_channels", in_channels)):
        was = saved_spec.get(key)
        if was is not None and now is not None and int(was) != int(now):
            raise ConfigError(f"the checkpoint was trained with {key}={was} but this run has "
                              f"{option}={now}; {_NOT_THIS_RUN_FIX}")


class PixelWeightedCrossEntropy(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` that also takes a weight per pixel (e.g. the U-Net paper's border
    weights, :func:`~segpipe.data.transforms.boundary_weight_map`) and can mine hard pixels.

    A pixel's weight is its class weight times its pixel weight, and the loss is the weighted
    mean over the pixels not ignored, as torch's class-weighted mean: the pixel weights move
    emphasis between pixels without changing the loss's scale. With ``hard_fraction`` (online
    hard example mining), in training mode only that fraction of the batch's pixels, those with
    the highest weighted loss, enter the mean (a ``topk``, no host synchronisation); in eval
    mode every pixel does. With ``hard_threshold`` (mmseg's ``OHEMPixelSampler``) the pixels kept
    are those whose softmax probability of their true class is below it, and at least the
    ``hard_fraction`` least probable ones when that is given too (a ``kthvalue``, again no host
    synchronisation). Otherwise it is ``nn.CrossEntropyLoss`` (``reduction="mean"`` only).

    Args:
        hard_fraction: Fraction of the pixels kept in training, in (0, 1), or None for all;
            with ``hard_threshold``, the least fraction kept.
        hard_threshold: Keep the pixels whose true class has a probability below this, or None.
        **kwargs: ``nn.CrossEntropyLoss``'s arguments.
    """

    def __init__(
        self, *args: Any, hard_fraction: float | None = None, hard_threshold: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.hard_fraction = hard_fraction
        self.hard_threshold = hard_threshold

    def forward(  # type: ignore[override]
        self, input: Tensor, target: Tensor, pixel_weight: Tensor | None = None
    ) -> Tensor:
        """Loss of (N, C, H, W) logits against (N, H, W) labels, with (N, H, W) pixel weights."""
        mine = self.hard_fraction is not None and self.training
        threshold = self.hard_threshold is not None and self.training
        # One path for every case: the weighted mean over the pixels kept, 0 (and no NaN) for a
        # batch whose pixels are all ignored, without a host synchronisation.
        per_pixel = F.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction="none", label_smoothing=self.label_smoothing,
        )  # (N, H, W): class weight x -log p, 0 where ignored
        weight = self.pixel_weights(target, pixel_weight).to(per_pixel.dtype)
        if pixel_weight is not None:
            per_pixel = per_pixel * pixel_weight
        if threshold:
            keep = self._below_threshold(input, target).to(per_pixel.dtype)
            per_pixel, weight = per_pixel * keep, weight * keep
        elif mine:
            # The hardest fraction of the pixels that are not ignored: ranked by a sort (their
            # count stays on the device; topk would need it on the host).
            valid = (target != self.ignore_index).sum()
            kept = torch.ceil(float(self.hard_fraction) * valid).clamp_min(1)
            per_pixel, index = per_pixel.flatten().sort(descending=True)
            rank = torch.arange(per_pixel.numel(), device=per_pixel.device)
            keep = (rank < kept).to(per_pixel.dtype)
            per_pixel, weight = per_pixel * keep, weight.flatten()[index] * keep
        total = weight.sum()
        return per_pixel.sum() / total.clamp_min(torch.finfo(total.dtype).tiny)

    def pixel_weights(self, target: Tensor, pixel_weight: Tensor | None = None) -> Tensor:
        """(N, H, W) weight of each pixel in the mean: its class weight times its pixel weight,
        0 where ignored. Their sum is the mean's divisor (without mining)."""
        weight = (target != self.ignore_index).float()
        if self.weight is not None:
            weight = weight * self.weight[target.clamp(0, self.weight.numel() - 1)]
        return weight if pixel_weight is None else weight * pixel_weight

    @torch.no_grad()
    def _below_threshold(self, logits: Tensor, target: Tensor) -> Tensor:
        """(N, H, W) bool: the pixels mmseg's OHEM keeps (true-class probability below the
        threshold, or among the ``hard_fraction`` least probable); never an ignored pixel."""
        num_classes = logits.shape[1]
        prob = logits.float().softmax(1).gather(1, target.clamp(0, num_classes - 1)[:, None])[:, 0]
        valid = (target >= 0) & (target < num_classes) & (target != self.ignore_index)
        prob = prob.masked_fill(~valid, 2.0)  # never kept, and last in the ranking
        keep = prob < float(self.hard_threshold)  # type: ignore[arg-type]
        if self.hard_fraction is not None:  # at least that fraction of the valid pixels
            kept = torch.ceil(float(self.hard_fraction) * valid.sum()).clamp_min(1)
            ranked = prob.flatten().sort().values  # ignored pixels (2.0) last
            keep |= prob <= ranked.gather(0, (kept.long() - 1).view(1))
        return keep & valid


def _has_cross_entropy(criterion: nn.Module) -> bool:
    """Whether the loss (or a term of a :class:`_SumLoss`) is :class:`PixelWeightedCrossEntropy`."""
    terms = criterion.losses if isinstance(criterion, _SumLoss) else [criterion]
    return any(isinstance(term, PixelWeightedCrossEntropy) for term in terms)


class _SkipAllIgnored(nn.Module):
    """A loss that is 0 (with zero gradient) for a batch whose pixels are all ignored, where
    smp's focal loss returns NaN. It indexes the valid pixels already (a host synchronisation),
    so this check adds none of another kind."""

    def __init__(self, loss: nn.Module, ignore_index: int | None) -> None:
        super().__init__()
        self.loss = loss
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.ignore_index is not None and not bool((target != self.ignore_index).any()):
            return logits.sum() * 0.0
        return self.loss(logits, target)


class _SumLoss(nn.Module):
    """Sum of losses (e.g. cross-entropy + Dice); a pixel weight goes to the cross-entropy."""

    def __init__(self, *losses: nn.Module) -> None:
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, logits: Tensor, target: Tensor, pixel_weight: Tensor | None = None) -> Tensor:
        return sum(  # type: ignore[return-value]
            loss(logits, target, pixel_weight=pixel_weight)
            if pixel_weight is not None and isinstance(loss, PixelWeightedCrossEntropy)
            else loss(logits, target)
            for loss in self.losses
        )


def _task_spec(
    net: nn.Module,
    data_spec: dict[str, Any] | None,
    num_classes: int | None,
    ignore_index: int | None,
    class_names: list[str] | None,
) -> DataSpec:
    """The task's spec from ``data_spec`` or the shorthands, checked against the network."""
    net_classes = getattr(net, "num_classes", None)
    net_in = getattr(net, "in_channels", None)
    if data_spec:
        spec = DataSpec.from_dict(data_spec, where="model.data_spec")
        given = {"num_classes": num_classes, "ignore_index": ignore_index,
                 "class_names": list(class_names) if class_names else None}
        for key, value in given.items():
            if value is not None and value != getattr(spec, key):
                raise ConfigError(
                    f"model.{key} {value!r} (SegmentationTask's {key}) disagrees with "
                    f"data.{key} {getattr(spec, key)!r} (the data spec); state it once, under "
                    "data: in the config (the command line gives it to the model)."
                )
    else:
        if num_classes is None:
            if net_classes is None:
                raise ConfigError(
                    "SegmentationTask needs num_classes: the network "
                    f"{type(net).__name__} has no num_classes attribute; set data.num_classes."
                )
            num_classes = int(net_classes)
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(
                f"class_names has {len(class_names)} names but there are {num_classes} classes; "
                "give one name per class."
            )
        spec = DataSpec.create(
            int(num_classes), class_names=class_names, ignore_index=ignore_index,
            in_channels=int(net_in) if net_in is not None else 3, where="model",
        )
    if net_classes is not None and int(net_classes) != spec.num_classes:
        raise ConfigError(
            f"SegmentationTask(num_classes={spec.num_classes}) disagrees with the network, which "
            f"outputs {net_classes} classes; set data.num_classes (the CLI links it into the "
            "network) and drop num_classes from model.net.init_args."
        )
    if net_in is not None and int(net_in) != spec.in_channels:
        raise ConfigError(
            f"The data spec has {spec.in_channels} input channels but the network "
            f"{type(net).__name__} takes {net_in}; set data.in_channels (the CLI links it into "
            "the network)."
        )
    return spec
