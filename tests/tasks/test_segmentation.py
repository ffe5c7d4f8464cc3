"""SegmentationTask with a 1x1-conv network: steps, losses, metrics, prediction, errors."""

import math

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import segmentation_models_pytorch as smp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segpipe.tasks import SegmentationTask, pad_to_multiple
from segpipe.tasks.segmentation import (
    PerImageDiceLoss,
    PixelWeightedCrossEntropy,
    to_mask_size,
)


class PixelNet(nn.Module):
    """1x1 conv: a network whose receptive field is one pixel."""

    def __init__(self, in_channels=3, num_classes=3):
        super().__init__()
        self.in_channels, self.num_classes, self.pad_multiple = in_channels, num_classes, 8
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x):
        assert x.shape[-1] % 8 == 0 and x.shape[-2] % 8 == 0, "task must pad to pad_multiple"
        return self.conv(x)


class ArgmaxData(Dataset):
    """Label = argmax over channels; learnable by a 1x1 conv. Odd size to exercise padding."""

    def __init__(self, n=16, size=(13, 21), classes=3, ignore=None):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, classes, *size, generator=g)
        self.masks = self.images.argmax(1)
        if ignore is not None:
            self.masks[:, 0, :] = ignore

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i], "path": f"img_{i}.png"}


class DM(L.LightningDataModule):
    def __init__(self, ignore=None):
        super().__init__()
        self.num_classes, self.class_names = 3, ["bg", "a", "b"]
        self.ds = ArgmaxData(ignore=ignore)

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=4, shuffle=True)

    val_dataloader = test_dataloader = lambda self: DataLoader(self.ds, batch_size=4)


def _trainer(**kw):
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kw,
    )


@pytest.mark.parametrize("loss", ["ce", "dice", "ce+dice", "focal", "lovasz", "ce+lovasz"])
def test_fast_dev_run_every_loss(loss):
    weights = None if loss == "lovasz" else [1.0, 2.0, 2.0]  # Lovász takes no class weights
    task = SegmentationTask(PixelNet(), loss=loss, class_weights=weights, ignore_index=255)
    _trainer(fast_dev_run=True).fit(task, DM(ignore=255))


@pytest.mark.parametrize("loss, ohem", [
    *((loss, None) for loss in ["ce", "dice", "ce+dice", "focal", "lovasz", "ce+lovasz"]),
    *((loss, 0.25) for loss in ["ce", "ce+dice", "ce+lovasz"]),  # OHEM mines the cross-entropy
])
def test_a_batch_whose_pixels_are_all_ignored_has_loss_zero(loss, ohem):
    """Void-only crops happen (CamVid's void, padding): 0 and a zero gradient, never NaN or an
    empty tensor that stops the run."""
    task = SegmentationTask(PixelNet(), loss=loss, ignore_index=255, ohem_fraction=ohem)
    task.criterion.train()
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    value = task.criterion(logits, torch.full((2, 4, 5), 255))
    assert value.shape == () and float(value) == 0.0
    value.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_class_weights_a_loss_cannot_use_are_refused():
    for bad in ([0.0, 0.0, 0.0], [1.0, float("nan"), 1.0], [1.0, -1.0, 1.0]):
        with pytest.raises(ValueError, match="model.class_weights must be finite numbers >= 0"):
            SegmentationTask(PixelNet(), loss="ce", class_weights=bad)
    SegmentationTask(PixelNet(), loss="ce", class_weights=[0.0, 1.0, 1.0])  # a class left out
    # refused when training starts; built (an older checkpoint with both predicts) it is not
    unused = SegmentationTask(PixelNet(), loss="lovasz", class_weights=[1.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="Lovász-softmax .* takes none. Use ce\+lovasz"):
        _trainer(fast_dev_run=True).fit(unused, DM(ignore=255))
    late = SegmentationTask(PixelNet(), loss="ce", late_loss="lovasz", class_weights=[1.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="Lovász-softmax .*model.late_loss.* takes none"):
        _trainer(fast_dev_run=True).fit(late, DM(ignore=255))


class LossCalls(L.Callback):
    """Records, per training epoch, which of the task's two criteria its training steps called,
    and which one validation called."""

    def __init__(self, task: SegmentationTask) -> None:
        self.train: dict[int, set[str]] = {}
        self.val: set[str] = set()
        for name in ("criterion", "late_criterion"):
            getattr(task, name).register_forward_hook(
                lambda module, args, out, name=name: self._called(task, name))

    def _called(self, task: SegmentationTask, name: str) -> None:
        if task.trainer.sanity_checking or not task.training:
            self.val.add(name)
        else:
            self.train.setdefault(task.current_epoch, set()).add(name)


def _late_task(**kw) -> SegmentationTask:
    return SegmentationTask(PixelNet(), loss="ce", late_loss="ce+lovasz", late_loss_start=0.5,
                            class_weights=[1.0, 2.0, 2.0], ignore_index=255, **kw)


def test_late_loss_trains_from_its_point_of_the_training_on(caplog):
    task = _late_task()
    calls = LossCalls(task)
    with caplog.at_level("INFO"):
        _trainer(max_epochs=4, callbacks=[calls]).fit(task, DM(ignore=255))
    # two of four epochs done (progress 0.5) when epoch 2 starts: epochs 2 and 3 are late
    assert calls.train == {0: {"criterion"}, 1: {"criterion"},
                           2: {"late_criterion"}, 3: {"late_criterion"}}
    assert calls.val == {"criterion"}  # validation's loss stays model.loss's
    assert "Epoch 3 on: training loss ce+lovasz (model.late_loss), 50 % into" in caplog.text
    # the late criterion is built with the same options: the class weights on its cross-entropy
    ce = task.late_criterion.losses[0]
    assert isinstance(ce, PixelWeightedCrossEntropy)
    torch.testing.assert_close(ce.weight, torch.tensor([1.0, 2.0, 2.0]))


def test_a_resumed_run_trains_with_the_late_loss_where_it_had(tmp_path):
    task = _late_task()
    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1,
                                        filename="{epoch}")
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_epochs=4,
              enable_model_summary=False, callbacks=[saver]).fit(task, DM(ignore=255))
    for ckpt, expected in (("epoch=0.ckpt", {1: {"criterion"}, 2: {"late_criterion"},
                                             3: {"late_criterion"}}),
                           ("epoch=2.ckpt", {3: {"late_criterion"}})):
        resumed = _late_task()
        calls = LossCalls(resumed)
        _trainer(max_epochs=4, callbacks=[calls]).fit(resumed, DM(ignore=255),
                                                      ckpt_path=str(tmp_path / ckpt))
        assert calls.train == expected, ckpt


def test_late_loss_refusals():
    for kw, match in (
        ({"loss": "ce", "late_loss": "ce"}, "model.late_loss 'ce' is model.loss already"),
        ({"late_loss": "lovasz", "late_loss_start": 1.0},
         r"model.late_loss_start is a fraction of the training in \(0, 1\)"),
        ({"late_loss": "lovasz", "late_loss_start": 0},
         r"model.late_loss_start is a fraction of the training in \(0, 1\)"),
        ({"late_loss": "lovasz", "ohem_fraction": 0.25},
         "model.ohem_fraction mines the cross-entropy of .* not model.late_loss 'lovasz'"),
        ({"loss": "ce+dice", "dice_per_image": True, "late_loss": "ce+lovasz"},
         "dice_per_image applies to the Dice of loss dice or ce\+dice, not to model.late_loss"),
        ({"late_loss": "hinge"}, "model.late_loss must be one of ce, dice"),
    ):
        with pytest.raises(ValueError, match=match):
            SegmentationTask(PixelNet(), **kw)
    # without late_loss its start is not read, and nothing switches
    task = SegmentationTask(PixelNet(), late_loss_start=0.5)
    assert task.late_criterion is None and task.training_criterion is task.criterion


def test_fast_dev_run_dice_per_image():
    task = SegmentationTask(PixelNet(), loss="ce+dice", dice_per_image=True,
                            class_weights=[1.0, 2.0, 2.0], ignore_index=255)
    _trainer(fast_dev_run=True).fit(task, DM(ignore=255))
    with pytest.raises(ValueError, match="model.dice_per_image applies to the Dice of loss dice"):
        SegmentationTask(PixelNet(), loss="ce", dice_per_image=True)


@pytest.mark.parametrize("kw", [{}, {"ignore_index": 255}, {"weight": torch.tensor([1.0, 3.0, 0.5])},
                                {"weight": torch.tensor([1.0, 3.0, 0.5]), "ignore_index": 255}])
def test_pixel_weighted_cross_entropy_is_a_weighted_mean(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 6), generator=g)
    if "ignore_index" in kw:
        target[:, 0] = 255
    loss = PixelWeightedCrossEntropy(**kw)
    plain = nn.CrossEntropyLoss(**kw)
    torch.testing.assert_close(loss(logits, target), plain(logits, target))
    torch.testing.assert_close(loss(logits, target, pixel_weight=torch.full((2, 5, 6), 4.0)),
                               plain(logits, target))  # uniform weights: the plain loss
    pixel_weight = torch.rand(2, 5, 6, generator=g) * 5
    nll = -torch.log_softmax(logits, 1).gather(1, target.clamp(0, 2)[:, None])[:, 0]
    class_weight = kw["weight"][target.clamp(0, 2)] if "weight" in kw else torch.ones(2, 5, 6)
    w = class_weight * pixel_weight * (target != kw.get("ignore_index", -100))
    torch.testing.assert_close(loss(logits, target, pixel_weight=pixel_weight),
                               (w * nll).sum() / w.sum())
    loss(logits, target, pixel_weight=pixel_weight).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("weighted", [False, True])
def test_ohem_averages_the_hardest_pixels_in_training_only(weighted):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, 5, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 5), generator=g)
    target[0, 0] = 255
    class_weight = torch.tensor([1.0, 2.0, 0.5])
    loss = PixelWeightedCrossEntropy(weight=class_weight, ignore_index=255, hard_fraction=0.25)
    pixel_weight = torch.rand(2, 6, 5, generator=g) + 0.5 if weighted else None
    nll = -torch.log_softmax(logits, 1).gather(1, target.clamp(0, 2)[:, None])[:, 0]
    w = class_weight[target.clamp(0, 2)] * (target != 255)
    if weighted:
        w = w * pixel_weight
    # a quarter of the 55 pixels that are not ignored (not of all 60)
    hardest = (w * nll).flatten().argsort(descending=True)[:14]
    expected = (w * nll).flatten()[hardest].sum() / w.flatten()[hardest].sum()
    torch.testing.assert_close(loss(logits, target, pixel_weight=pixel_weight), expected)
    loss(logits, target, pixel_weight=pixel_weight).backward()
    assert (logits.grad.abs().sum(1) > 0).sum() == 14  # only the mined pixels get gradients
    loss.eval()  # validation and test: every pixel
    plain = PixelWeightedCrossEntropy(weight=class_weight, ignore_index=255)
    torch.testing.assert_close(loss(logits, target, pixel_weight=pixel_weight),
                               plain(logits, target, pixel_weight=pixel_weight))


@pytest.mark.parametrize("min_fraction", [None, 0.7])
def test_ohem_threshold_keeps_the_pixels_predicted_below_it_as_mmseg_does(min_fraction):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 6, 5, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 5), generator=g)
    target[0, 0] = 255
    class_weight = torch.tensor([1.0, 2.0, 0.5])
    loss = PixelWeightedCrossEntropy(weight=class_weight, ignore_index=255, hard_threshold=0.3,
                                     hard_fraction=min_fraction)
    prob = torch.softmax(logits, 1).gather(1, target.clamp(0, 2)[:, None])[:, 0].detach()
    valid = target != 255
    keep = (prob < 0.3) & valid
    if min_fraction is not None:  # at least the 39 least probable of the 55 valid pixels
        least = prob.masked_fill(~valid, 2.0).flatten().argsort()[:39]
        keep.view(-1)[least] = True
        assert keep.sum() > ((prob < 0.3) & valid).sum()  # the minimum binds here
    assert 0 < keep.sum() < valid.sum()
    nll = -torch.log_softmax(logits, 1).gather(1, target.clamp(0, 2)[:, None])[:, 0]
    w = class_weight[target.clamp(0, 2)] * keep
    torch.testing.assert_close(loss(logits, target), (w * nll).sum() / w.sum())
    loss(logits, target).backward()
    assert torch.equal(logits.grad.abs().sum(1) > 0, keep)  # only the kept pixels get gradients
    loss.eval()  # validation and test: every pixel
    plain = PixelWeightedCrossEntropy(weight=class_weight, ignore_index=255)
    torch.testing.assert_close(loss(logits, target), plain(logits, target))


def test_fast_dev_run_ohem_and_its_refusals():
    task = SegmentationTask(PixelNet(), loss="ce+dice", ohem_fraction=0.3, ignore_index=255)
    _trainer(fast_dev_run=True).fit(task, DM(ignore=255))
    with pytest.raises(ValueError, match="model.ohem_fraction mines the cross-entropy of loss ce"):
        SegmentationTask(PixelNet(), loss="dice", ohem_fraction=0.3)
    with pytest.raises(ValueError, match=r"model.ohem_fraction is the fraction of pixels kept, in \(0, 1\)"):
        SegmentationTask(PixelNet(), loss="ce", ohem_fraction=1.5)
    task = SegmentationTask(PixelNet(), loss="ce", ohem_threshold=0.7, ignore_index=255)
    _trainer(fast_dev_run=True).fit(task, DM(ignore=255))
    with pytest.raises(ValueError, match="model.ohem_threshold mines the cross-entropy of loss ce"):
        SegmentationTask(PixelNet(), loss="focal", ohem_threshold=0.7)
    with pytest.raises(ValueError, match=r"model.ohem_threshold is a probability in \(0, 1\]"):
        SegmentationTask(PixelNet(), loss="ce", ohem_threshold=0.0)


@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_is_torchs_weighted_mean_over_the_pixels_kept(weighted):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, 5, generator=g)
    target = torch.randint(0, 3, (2, 6, 5), generator=g)
    target[0, 0] = 255
    class_weight = torch.tensor([1.0, 2.0, 0.5]) if weighted else None
    smoothed = PixelWeightedCrossEntropy(weight=class_weight, ignore_index=255, label_smoothing=0.1)
    expected = F.cross_entropy(logits, target, weight=class_weight, ignore_index=255,
                               label_smoothing=0.1)
    torch.testing.assert_close(smoothed(logits, target), expected)
    plain = PixelWeightedCrossEntropy(weight=class_weight, ignore_index=255)
    assert not torch.allclose(smoothed(logits, target), plain(logits, target))
    # a confident, right pixel still costs something: the target is not one-hot any more
    sure = torch.tensor([[[[20.0]], [[-20.0]], [[-20.0]]]])
    assert smoothed(sure, torch.zeros(1, 1, 1, dtype=torch.long)) > 0.5
    assert plain(sure, torch.zeros(1, 1, 1, dtype=torch.long)) < 1e-6


def test_task_label_smoothing_reaches_the_cross_entropy_and_its_refusals():
    task = SegmentationTask(PixelNet(), loss="ce+dice", label_smoothing=0.1, ignore_index=255)
    ce = next(t for t in task.criterion.losses if isinstance(t, PixelWeightedCrossEntropy))
    assert ce.label_smoothing == 0.1 and task.hparams.label_smoothing == 0.1
    _trainer(fast_dev_run=True).fit(task, DM(ignore=255))
    assert SegmentationTask(PixelNet(), loss="ce").criterion.label_smoothing == 0.0
    with pytest.raises(ValueError, match="model.label_smoothing smooths the cross-entropy of loss ce"):
        SegmentationTask(PixelNet(), loss="dice", label_smoothing=0.1)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"model.label_smoothing is the share .* in \[0, 1\)"):
            SegmentationTask(PixelNet(), loss="ce", label_smoothing=bad)
    SegmentationTask(PixelNet(), loss="dice", label_smoothing=0.0)  # 0 is off: any loss


class WeightedArgmaxData(ArgmaxData):
    def __getitem__(self, i):
        return {**super().__getitem__(i), "weight": torch.rand(self.masks[i].shape) + 1}


class WeightedDM(DM):
    pixel_weighting = True

    def __init__(self, ignore=None):
        super().__init__(ignore)
        self.ds = WeightedArgmaxData(ignore=ignore)


def test_fast_dev_run_with_pixel_weights_and_a_loss_that_cannot_use_them():
    task = SegmentationTask(PixelNet(), loss="ce+dice", class_weights=[1.0, 2.0, 2.0],
                            ignore_index=255)
    _trainer(fast_dev_run=True).fit(task, WeightedDM(ignore=255))
    with pytest.raises(ValueError, match="carry per-pixel loss weights .* model.loss is 'dice'"):
        _trainer(fast_dev_run=True).fit(SegmentationTask(PixelNet(), loss="dice"), WeightedDM())
    late = SegmentationTask(PixelNet(), loss="ce", late_loss="lovasz")  # weights lost late
    with pytest.raises(ValueError, match="carry per-pixel loss weights .* model.late_loss is 'lovasz'"):
        _trainer(fast_dev_run=True).fit(late, WeightedDM())


@pytest.mark.parametrize("kw", [{}, {"ignore_index": 255}, {"class_weights": [1.0, 3.0, 0.5]},
                                {"log_loss": True}])
def test_per_image_dice_is_smps_dice_of_each_image_averaged(kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, 8, 9, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (3, 8, 9), generator=g)
    target[1][target[1] == 2] = 0  # class 2 absent from image 1
    if "ignore_index" in kw:
        target[:, :2] = 255
    per_image = PerImageDiceLoss(mode="multiclass", **kw)
    pooled = smp.losses.DiceLoss(mode="multiclass", **kw)
    one_by_one = torch.stack([pooled(logits[i:i + 1], target[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(per_image(logits, target), one_by_one.mean())
    assert not torch.isclose(per_image(logits, target), pooled(logits, target))  # not the batch's
    per_image(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_per_image_dice_weighs_a_small_object_as_much_as_a_large_one():
    # Two images: one with a large object, one with a small one; the network finds the large one
    # and misses the small one. Pooled over the batch the miss hardly counts; per image it does.
    target = torch.zeros(2, 16, 16, dtype=torch.int64)
    target[0, :, :8] = 1  # 128 pixels
    target[1, :2, :2] = 1  # 4 pixels
    logits = torch.zeros(2, 2, 16, 16)
    logits[0, 1] = torch.where(target[0] == 1, 10.0, -10.0)  # the large object found
    logits[1, 1] = -10.0  # the small one missed
    per_image = PerImageDiceLoss(mode="multiclass", classes=[1])(logits, target)
    pooled = smp.losses.DiceLoss(mode="multiclass", classes=[1])(logits, target)
    assert pooled < 0.1 and per_image > 0.45


def test_learns_and_reports_named_metrics():
    torch.manual_seed(0)
    task = SegmentationTask(
        PixelNet(), ignore_index=255,
        optimizer=lambda p: torch.optim.Adam(p, lr=0.1),
    )
    dm = DM(ignore=255)
    trainer = _trainer(max_epochs=15, limit_val_batches=1)
    trainer.fit(task, dm)
    assert task.class_names == ["bg", "a", "b"]  # taken from the datamodule
    assert trainer.callback_metrics["val/mIoU"] > 0.9
    assert "val/IoU/a" in trainer.callback_metrics
    trainer.test(task, dm)
    rep = task.test_report
    assert rep["mIoU"] > 0.9 and set(rep["IoU_per_class"]) == {"bg", "a", "b"}
    assert len(rep["per_image"]) == 16 and rep["per_image"][0]["path"] == "img_0.png"
    # row 0 of every mask is ignored: 16 images x 12 labelled rows x 21 columns
    assert sum(map(sum, rep["confusion_matrix"])) == 16 * 12 * 21
    # One prediction path: segpipe.predict (tested in tests/predict), not the task's.
    assert not hasattr(task, "predict_probs")


@pytest.mark.parametrize("on", [False, True])
def test_train_metrics_are_opt_in_and_iou_only(on):
    task = SegmentationTask(PixelNet(), ignore_index=255, log_train_metrics=on)
    trainer = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(task, DM(ignore=255))
    train = sorted(k for k in trainer.callback_metrics if k.startswith("train/"))
    iou = ["train/IoU/a", "train/IoU/b", "train/IoU/bg", "train/mIoU", "train/micro_IoU"]
    assert train == sorted(["train/loss", "train/loss_epoch", "train/loss_step", *(iou if on else [])])
    assert "val/mDice" in trainer.callback_metrics  # val keeps the full collection


def test_bf16_channels_last_step():
    task = SegmentationTask(PixelNet(), ignore_index=255)
    _trainer(fast_dev_run=True, precision="bf16-mixed").fit(task, DM(ignore=255))


def test_pad_to_multiple_shapes():
    x = torch.randn(2, 3, 13, 21)
    y, size = pad_to_multiple(x, 8)
    assert y.shape == (2, 3, 16, 24) and size == (13, 21)
    assert torch.equal(y[..., :13, :21], x)
    tiny, _ = pad_to_multiple(torch.randn(1, 1, 3, 3), 32)  # too small to reflect
    assert tiny.shape == (1, 1, 32, 32)


def test_labels_are_padded_as_their_images() -> None:
    from segpipe.models.base import pad_labels_like

    for size, multiple in (((13, 21), 8), ((3, 3), 32)):  # reflected; too small: replicated
        x = torch.randn(2, 1, *size)
        padded, _ = pad_to_multiple(x, multiple)
        mask = (x[:, 0] * 100).round().long()  # integer labels, any dtype
        assert torch.equal(pad_labels_like(mask, tuple(padded.shape[-2:])),
                           (padded[:, 0] * 100).round().long())
    mask = torch.arange(6).reshape(1, 2, 3)
    assert pad_labels_like(mask, (2, 3)) is mask


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\(\)`")
def test_training_scores_every_logit_of_a_padded_crop() -> None:
    """13x21 crops run through the network padded to 16x24. Their loss once covered the
    13x21 corner only, so the strip along the network's bottom and right edges was never
    trained (a 144² crop for a 32-step encoder left its right edge marking tumour on every
    192² LGG slice); now the masks are padded as their images are, and the loss covers all."""
    from segpipe.models.base import pad_labels_like

    task = SegmentationTask(PixelNet())
    batch = next(iter(DM().train_dataloader()))
    image, mask = batch["image"], batch["mask"]
    logits = task.padded_logits(image)
    assert logits.shape[-2:] == (16, 24)
    whole = F.cross_entropy(logits, pad_labels_like(mask, (16, 24)))
    corner = F.cross_entropy(logits[..., :13, :21], mask)
    assert not torch.isclose(whole, corner)
    torch.testing.assert_close(task._shared_step(batch, "train"), whole)
    torch.testing.assert_close(task(image), logits[..., :13, :21])  # evaluation: cropped back


def test_to_mask_size_resizes_each_item_to_its_own_mask():
    x = torch.randn(2, 3, 4, 6)
    same = to_mask_size(x, (8, 12))  # no sizes: every mask is (8, 12)
    assert same.shape == (2, 3, 8, 12)
    torch.testing.assert_close(
        same, torch.nn.functional.interpolate(x, (8, 12), mode="bilinear", align_corners=False))
    out = to_mask_size(x, (10, 12), torch.tensor([[8, 12], [10, 9]]))
    assert out.shape == (2, 3, 10, 12)
    torch.testing.assert_close(out[0, :, :8], same[0])
    assert out[0, :, 8:].eq(0).all() and out[1, :, :, 9:].eq(0).all()  # mask padding
    torch.testing.assert_close(out[1, :, :, :9], torch.nn.functional.interpolate(
        x[1:], (10, 9), mode="bilinear", align_corners=False)[0])


class ResizedData(ArgmaxData):
    """Images at half the masks' size (as data.eval_resize gives): labels from the full size."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        small = torch.nn.functional.interpolate(item["image"][None], (7, 11), mode="bilinear",
                                                align_corners=False)[0]
        return {**item, "image": small, "size": torch.tensor(item["mask"].shape)}


def test_validation_scores_resized_images_at_the_masks_size():
    dm = DM()
    dm.ds = ResizedData()
    task = SegmentationTask(PixelNet(), ignore_index=255)
    (metrics,) = _trainer().validate(task, dm.val_dataloader(), verbose=False)
    cm = torch.zeros(3, 3, dtype=torch.int64)
    with torch.no_grad():
        for i in range(len(dm.ds)):
            item = dm.ds[i]
            probs = task(item["image"][None]).softmax(dim=1)
            pred = to_mask_size(probs, tuple(item["mask"].shape))[0].argmax(dim=0)
            assert pred.shape == (13, 21)
            cm += torch.bincount(item["mask"].flatten() * 3 + pred.flatten(),
                                 minlength=9).reshape(3, 3)
    iou = cm.diag() / (cm.sum(0) + cm.sum(1) - cm.diag())
    assert metrics["val/mIoU"] == pytest.approx(iou.mean().item(), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_classes": 5}, "disagrees"),
        ({"data_spec": {"num_classes": 3, "ignore_index": 255}, "ignore_index": 0},
         r"model\.ignore_index 0 .* disagrees with data\.ignore_index 255"),
        ({"class_weights": [1.0, 2.0]},
         r"model\.class_weights has 2 values but data\.num_classes is 3; give one weight"),
        ({"class_names": ["x"]}, "one name per class"),
    ],
)
def test_bad_arguments_say_what_to_fix(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SegmentationTask(PixelNet(), **kwargs)


def test_data_model_class_mismatch_is_caught():
    dm = DM()
    dm.num_classes = 4
    with pytest.raises(ValueError, match="data has 4 classes"):
        _trainer(fast_dev_run=True).fit(SegmentationTask(PixelNet()), dm)


def test_compile_is_opt_in_in_place_and_keeps_checkpoint_names():
    """model.compile compiles the network for fit only, in place: the state dict's names are
    those of the plain network, so checkpoints load anywhere (also uncompiled)."""
    torch.manual_seed(0)
    plain = SegmentationTask(PixelNet())
    assert plain.compile_options is None
    graphs = []

    def backend(graph_module, example_inputs):  # a torch.compile backend that counts graphs
        graphs.append(graph_module)
        return graph_module.forward

    task = SegmentationTask(PixelNet(), compile={"backend": backend})
    _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(task, DM())
    assert graphs, "the network ran compiled"
    assert set(task.state_dict()) == set(plain.state_dict())
    with pytest.raises(ValueError, match="model.compile must be"):
        SegmentationTask(PixelNet(), compile="yes")


def test_a_checkpoint_that_does_not_fit_is_one_sentence_before_loading():
    from segpipe.errors import ConfigError
    from segpipe.models import UNet

    def checkpoint(task):
        return {"state_dict": task.state_dict(), "hyper_parameters": {"data_spec": task.spec.to_dict()}}

    three = SegmentationTask(UNet(in_channels=3, num_classes=3, base_channels=4, depth=2))
    four = SegmentationTask(UNet(in_channels=3, num_classes=4, base_channels=4, depth=2))
    with pytest.raises(ConfigError, match=r"trained with num_classes=3 but this run has "
                                          r"data.num_classes=4; .*--model.init_from"):
        four.on_load_checkpoint(checkpoint(three))
    deeper = SegmentationTask(UNet(in_channels=3, num_classes=3, base_channels=4, depth=3))
    with pytest.raises(ConfigError, match=r"network is not this run's \(UNet\): .*weight\(s\) not "
                                          r"in the checkpoint \(e\.g\. net\..*config\.yaml"):
        deeper.on_load_checkpoint(checkpoint(three))
    wider = SegmentationTask(UNet(in_channels=3, num_classes=3, base_channels=8, depth=2))
    with pytest.raises(ConfigError, match=r"net\.\S+ is \(4, 3, 3, 3\) in the checkpoint, "
                                          r"\(8, 3, 3, 3\) here.* and \d+ more of another shape"):
        wider.on_load_checkpoint(checkpoint(three))
    other = SegmentationTask(UNet(in_channels=3, num_classes=3, base_channels=4, depth=2))
    other.on_load_checkpoint(checkpoint(three))  # fits: nothing raised
    other.load_state_dict(three.state_dict())


def test_an_ignore_index_among_the_classes_is_refused_for_training_and_scoring() -> None:
    """Macro IoU dropped such a class while Dice and the per-image scores counted it as 0;
    prediction from an older checkpoint that has one still works (no metrics there)."""
    task = SegmentationTask(PixelNet(), ignore_index=1)
    for stage in ("fit", "validate", "test"):
        with pytest.raises(ValueError, match="data.ignore_index 1 is one of the classes 0..2"):
            task.setup(stage)
    task.setup("predict")
    SegmentationTask(PixelNet(), ignore_index=3).setup("test")


class ContextNet(nn.Module):
    """Two 5x5 convolutions: each output pixel sees its neighbours (and so any padding)."""

    def __init__(self):
        super().__init__()
        self.in_channels, self.num_classes, self.pad_multiple = 3, 3, 8
        self.body = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(),
                                  nn.Conv2d(8, 3, 5, padding=2))

    def forward(self, x):
        return self.body(x)


class SizesData(Dataset):
    """Images of different sizes: batches of them are padded (PadCollate)."""

    SIZES = [(40, 40), (18, 22), (40, 40), (20, 30), (26, 17), (33, 9)]

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.images = [torch.randn(3, h, w, generator=g) for h, w in self.SIZES]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return {"image": image, "mask": image.argmax(0), "path": f"img_{i}.png"}


@pytest.mark.parametrize("tta", [False, True])
def test_scores_of_differently_sized_images_do_not_depend_on_the_batch_size(tta):
    """The padding of a mixed-size batch was run through the network as image content, so
    predictions near an image's edges (and the test metrics) changed with eval_batch_size and
    differed from segpipe predict's; each image now runs at its own size."""
    from segpipe.data import PadCollate

    torch.manual_seed(0)
    task = SegmentationTask(ContextNet(), ignore_index=255, test_tta=tta).eval()
    reports = []
    for batch_size in (1, 6, 4):
        loader = DataLoader(SizesData(), batch_size=batch_size, collate_fn=PadCollate(255))
        _trainer().test(task, loader, verbose=False)
        reports.append(task.test_report)
    one = reports[0]
    for other in reports[1:]:
        assert other["confusion_matrix"] == one["confusion_matrix"]
        assert other["per_image"] == one["per_image"]
    # ... and they are the masks of each image run alone, as segpipe predict runs it.
    with torch.no_grad():
        for i, image in enumerate(SizesData().images):
            probs = (task._tta_probabilities(image[None]) if tta
                     else task(image[None]).softmax(1))
            pred = probs.argmax(1)[0]
            truth = image.argmax(0)
            assert one["per_image"][i]["pixel_accuracy"] == pytest.approx(
                (pred == truth).double().mean().item())


def test_a_test_that_evaluates_otherwise_than_the_checkpoint_is_warned_about():
    """A test without the checkpoint's data.eval_resize scored at another size than predict
    predicts at, without a word."""
    task = SegmentationTask(PixelNet(), ignore_index=255)
    saved = {**task.spec.to_dict(), "eval_resize": [24, 24]}
    checkpoint = {"hyper_parameters": {"data_spec": saved}, "state_dict": task.state_dict()}
    with pytest.warns(UserWarning, match=r"trained with data.eval_resize='\[24, 24\]' but this "
                      r"run has data.eval_resize=null: its figures are not those of the masks "
                      r"segpipe predict writes.* pass --data.eval_resize '\[24, 24\]'"):
        task.on_load_checkpoint(checkpoint)
    unset = {"hyper_parameters": {"data_spec": {**task.spec.to_dict(), "ignore_index": None}},
             "state_dict": task.state_dict()}
    with pytest.warns(UserWarning, match=r"data.ignore_index=null but this run has "
                      r"data.ignore_index=255: it scores other pixels .* --data.ignore_index null"):
        task.on_load_checkpoint(unset)  # null, which the command line takes (not None)
    bands = {"hyper_parameters": {"data_spec": {**task.spec.to_dict(), "bands": [4, 8, 11]}},
             "state_dict": task.state_dict()}
    with pytest.warns(UserWarning, match=r"data.bands='\[4, 8, 11\]' but this run has "
                      r"data.bands=null: the model reads other bands .* --data.bands '\[4, 8, 11\]'"):
        task.on_load_checkpoint(bands)  # the bands forgotten: scored on the wrong ones, silently
    same = {"hyper_parameters": {"data_spec": task.spec.to_dict()}, "state_dict": task.state_dict()}
    old = {"hyper_parameters": {"data_spec": {"num_classes": 3}}, "state_dict": task.state_dict()}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.on_load_checkpoint(same)
        task.on_load_checkpoint(old)  # a checkpoint older than the key: nothing to compare


class ContextBNNet(ContextNet):
    """ContextNet with BatchNorm, for bn_adapt."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 3, 5, padding=2))


def test_bn_adapt_on_differently_sized_images_does_not_depend_on_the_batch_size():
    """The zero padding of mixed-size batches entered the re-estimated BatchNorm statistics."""
    from segpipe.data import PadCollate

    torch.manual_seed(0)
    net = ContextBNNet()
    reports = []
    for batch_size in (1, 6):
        task = SegmentationTask(net, ignore_index=255, bn_adapt=1.0).eval()
        loader = DataLoader(SizesData(), batch_size=batch_size, collate_fn=PadCollate(255))
        _trainer().test(task, loader, verbose=False)
        reports.append(task.test_report)
    # BatchNorm statistics are estimated per batch, then averaged over batches: with one
    # image per batch or all six, the means agree (the padding no longer counts), the
    # variances nearly; the predictions agree on all but a few pixels.
    a, b = (np.array(r["confusion_matrix"]) for r in reports)
    assert np.abs(a - b).sum() <= 0.01 * a.sum()


def test_nothing_labelled_is_logged_as_undefined_not_zero():
    """The JSON said undefined, but the logged and printed test/mDice etc. read 0.0."""
    import math

    task = SegmentationTask(PixelNet(), ignore_index=255)
    data = ArgmaxData(n=4, ignore=None)
    data.masks[:] = 255
    trainer = _trainer()
    trainer.test(task, DataLoader(data, batch_size=2), verbose=False)
    for key in ("test/mDice", "test/micro_IoU", "test/pixel_accuracy"):
        assert math.isnan(float(trainer.callback_metrics[key])), key
    assert task.test_report["warning"].startswith("no pixel of these images is labelled")


class _DictNet(PixelNet):
    def forward(self, x):
        return {"out": super().forward(x)}  # as torchvision's segmentation models


class _FiveNet(nn.Module):  # says nothing of its classes
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return self.conv(x)


class _HalfNet(PixelNet):
    def forward(self, x):
        return super().forward(x)[..., ::2, ::2]


@pytest.mark.parametrize("net, words", [
    (_DictNet(), r"returned a dict with keys \['out'\], not a tensor of \(N, 3, H, W\) logits"),
    (_FiveNet(), r"returned \(2, 5, \d+, \d+\) .*expected \(N, 3, H, W\) logits"),
    (_HalfNet(), r"returned 12x8 logits for a 24x16 input; the network must keep the input's"),
])
def test_a_net_that_breaks_the_output_contract_is_named(net, words) -> None:
    """They failed deep inside torch or torchmetrics ("unhashable type: 'slice'", "shape
    '[3, 3]' is invalid for input of size 11", a size mismatch in cross_entropy)."""
    from segpipe.errors import ConfigError

    task = SegmentationTask(net, num_classes=3)
    with pytest.raises(ConfigError, match=words):
        task(torch.zeros(2, 3, 16, 24))


class _BatchedDM(L.LightningDataModule):
    def __init__(self, ds, batch_size):
        super().__init__()
        self.num_classes, self.ds, self.batch_size = 3, ds, batch_size

    def test_dataloader(self):
        return DataLoader(self.ds, batch_size=self.batch_size)


@torch.no_grad()
def test_each_case_is_scored_on_its_own_images():
    """Cases mixed within batches: a case's row from another case's pixels (names misaligned
    with the batch) kept the mean over cases and every count, and passed."""

    class _Cases(ArgmaxData):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "case": "AB"[i % 2] if i < 6 else "C"}

    ds = _Cases(n=9)
    ds.masks[1::2] = (ds.masks[1::2] + 1) % 3  # case B's labels off: its score differs
    task = SegmentationTask(PixelNet(), loss="ce")
    _trainer().test(task, _BatchedDM(ds, 4))
    rows = {row["case"]: row for row in task.test_report["per_case"]["cases"]}
    preds = task(ds.images).argmax(1)
    for case, members in (("A", [0, 2, 4]), ("B", [1, 3, 5]), ("C", [6, 7, 8])):
        cm = torch.bincount((ds.masks[members] * 3 + preds[members]).flatten(),
                            minlength=9).reshape(3, 3).double()
        tp = cm.diag()
        dice = 2 * tp / (cm.sum(0) + cm.sum(1))
        assert rows[case]["num_images"] == 3
        assert list(rows[case]["Dice_per_class"].values()) == pytest.approx(dice.tolist()), case


@pytest.mark.parametrize("weights", [None, [0.2, 1.0, 5.0]])
def test_the_test_loss_does_not_depend_on_the_batch_size(weights):
    """The cross-entropy over every scored pixel: a batch's loss weighted by its image count
    moved with data.eval_batch_size (0.844, 0.804, 0.803, 0.819 for sizes 1, 3, 5, 8), and with
    class weights, weighted by its pixel count (1.3775, 1.3731, 1.3591 for 1, 3, 7)."""
    torch.manual_seed(0)
    task = SegmentationTask(PixelNet(), loss="ce", ignore_index=255, class_weights=weights)
    ds = ArgmaxData(n=7, ignore=255)
    ds.masks[2] = 255  # an image with nothing scored counts for nothing
    ds.masks[3, 5:] = 255  # and one with fewer scored pixels for fewer
    ds.masks[4][ds.masks[4] != 255] = 2  # one of the most weighted class only
    values = []
    for batch_size in (1, 3, 7):
        _trainer().test(task, _BatchedDM(ds, batch_size))
        values.append(float(task.trainer.callback_metrics["test/loss"]))
    assert values[0] == pytest.approx(values[1], rel=1e-5) == pytest.approx(values[2], rel=1e-5)
    with torch.no_grad():
        pooled = F.cross_entropy(task(ds.images), ds.masks, ignore_index=255,
                                 weight=None if weights is None else torch.tensor(weights))
    assert values[0] == pytest.approx(float(pooled), rel=1e-5)


def test_the_test_loss_of_nothing_scored_is_nan_not_zero():
    task = SegmentationTask(PixelNet(), ignore_index=255)
    ds = ArgmaxData(n=3, ignore=255)
    ds.masks[:] = 255
    _trainer().test(task, _BatchedDM(ds, 2))
    assert np.isnan(float(task.trainer.callback_metrics["test/loss"]))
    assert task.test_report["loss"] is None  # JSON's null, as the other undefined figures


def test_a_cosine_horizon_shorter_than_the_run_is_warned_about():
    """A T_max meant in epochs, stepped per optimiser step, cycles the learning rate."""
    task = SegmentationTask(
        PixelNet(), lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3),
        scheduler_interval="step")
    with pytest.warns(UserWarning, match=r"T_max=3, counted in optimiser steps .* but this run "
                                         r"takes 8: the learning rate rises again after 3"):
        _trainer(max_epochs=2, limit_val_batches=0).fit(task, DM())


def test_a_val_split_with_nothing_scored_is_no_divergence():
    """Its loss is NaN (nothing to average), not a sign of NaN weights."""

    class _VoidVal(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.num_classes, self.train_ds = 3, ArgmaxData(n=8, ignore=255)
            self.val_ds = ArgmaxData(n=4, ignore=255)
            self.val_ds.masks[:] = 255

        def train_dataloader(self):
            return DataLoader(self.train_ds, batch_size=4)

        def val_dataloader(self):
            return DataLoader(self.val_ds, batch_size=4)

    task = SegmentationTask(PixelNet(), ignore_index=255)
    trainer = _trainer(max_epochs=2)
    trainer.fit(task, _VoidVal())  # TrainingDivergedError before the weight was checked
    assert trainer.current_epoch == 2
    assert np.isnan(float(trainer.callback_metrics["val/loss"]))


def test_one_pass_gives_a_loader_its_own_iterator_whatever_its_batching():
    """bn_adapt's pass over a persistent-worker loader took the iterator Lightning held; the
    loader of its own must batch as the original does (a sampler, batch_size=None, or an
    iterable data set)."""
    from torch.utils.data import DataLoader, IterableDataset

    from segpipe.tasks.segmentation import _one_pass

    class Items(IterableDataset):
        def __iter__(self):
            return iter(torch.arange(6.0))

    data = torch.arange(6.0)
    loaders = [DataLoader(data, batch_size=4, num_workers=1, persistent_workers=True),
               DataLoader(data, batch_size=None, num_workers=1, persistent_workers=True),
               DataLoader(Items(), batch_size=4, num_workers=1, persistent_workers=True)]
    for loader in loaders:
        expected = [b.tolist() for b in loader]
        held = iter(loader)  # as Lightning's test loop holds it
        own = _one_pass(loader)
        assert own is not loader and not own.persistent_workers
        assert [b.tolist() for b in own] == expected
        assert [b.tolist() for b in held] == expected  # still whole for the test loop
    plain = DataLoader(data, batch_size=4)
    assert _one_pass(plain) is plain


def test_a_checkpoint_monitor_on_a_class_absent_from_val_finds_its_key(tmp_path) -> None:
    """``val/IoU/<class>`` was left out of the logs in an epoch where the class was in neither
    the val truth nor the predictions, and Lightning's checkpoint then stopped the fit
    ("could not find the monitored key"); it is logged as NaN, which ranks as the worst."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class _NoB(ArgmaxData):
        def __init__(self):
            super().__init__(n=8)
            self.masks = self.images[:, :2].argmax(1)  # class "b" in no mask

    class _DM(DM):
        def __init__(self):
            super().__init__()
            self.ds = _NoB()

    net = PixelNet()
    with torch.no_grad():
        net.conv.weight[2].zero_()
        net.conv.bias[2] = -1e4  # and never predicted
    task = SegmentationTask(net, loss="ce", optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val/IoU/b", mode="max")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=2, callbacks=[ckpt],
                        num_sanity_val_steps=0)
    trainer.fit(task, _DM())
    assert math.isnan(trainer.callback_metrics["val/IoU/b"]) and ckpt.best_model_path


# ------------------------------------------------------------------ fused optimiser
def _two_group_adamw(**kw) -> torch.optim.Optimizer:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    groups = [{"params": net[0].parameters(), "lr": 1e-4, "name": "encoder"},
              {"params": [*net[1].parameters(), *net[2].parameters()], "name": "decoder"}]
    return torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05, betas=(0.8, 0.99), **kw)


def test_adam_is_fused_where_the_config_left_the_choice_to_torch() -> None:
    """Torch's default AdamW loops over the parameters on a CPU (6.4 ms per step for the U-Net
    base 16 here, fused 1.0 ms): built again fused, over the same groups and options, and
    stepping to the same weights."""
    from segpipe.tasks.segmentation import fused_optimizer

    plain = _two_group_adamw()
    fused = fused_optimizer(_two_group_adamw(), "bf16-mixed")
    assert fused.defaults["fused"] is True and all(g["fused"] for g in fused.param_groups)
    assert [(g["name"], g["lr"], g["weight_decay"], g["betas"]) for g in fused.param_groups] == [
        (g["name"], g["lr"], g["weight_decay"], g["betas"]) for g in plain.param_groups]
    params = [[p for g in o.param_groups for p in g["params"]] for o in (plain, fused)]
    with torch.no_grad():
        for a, b in zip(*params):
            b.copy_(a)
    for _ in range(3):
        for opt, ps in zip((plain, fused), params):
            for i, p in enumerate(ps):
                p.grad = torch.full_like(p, 0.1 * (i + 1))
            opt.step()
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["fused false", "foreach", "sgd", "fp16 amp", "float64 ok"])
def test_an_optimizer_is_kept_where_fusing_is_not_ours_to_choose(case: str) -> None:
    from segpipe.tasks.segmentation import fused_optimizer

    precision = "16-mixed" if case == "fp16 amp" else "32-true"
    optimizer = {
        "fused false": lambda: _two_group_adamw(fused=False),
        "foreach": lambda: _two_group_adamw(foreach=True),
        "sgd": lambda: torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1),
        "fp16 amp": _two_group_adamw,
        "float64 ok": lambda: torch.optim.Adam(nn.Linear(2, 2).double().parameters()),
    }[case]()
    result = fused_optimizer(optimizer, precision)
    if case == "float64 ok":
        assert result.defaults["fused"] is True
    else:
        assert result is optimizer and not optimizer.defaults.get("fused")


def test_fit_steps_a_fused_adamw_unless_told_otherwise(tmp_path) -> None:
    from segpipe.lightning_cli import run_cli
    from tests.cli_args import TINY_UNET
    from tests.data.synthetic import make_folder_dataset

    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(32, 32))
    for given, fused in (([], True), (["--model.optimizer.init_args.fused=false"], False)):
        cli = run_cli(["fit", f"--data.root={root}", "--trainer.max_epochs=1",
                       f"--trainer.default_root_dir={tmp_path / str(fused)}",
                       "--data.num_workers=0", *TINY_UNET, *given])
        optimizer = cli.trainer.optimizers[0]
        assert isinstance(optimizer, torch.optim.AdamW)
        assert bool(optimizer.defaults["fused"]) is fused
        assert cli.trainer.global_step == 1  # it stepped
