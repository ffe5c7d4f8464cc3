"""Transfer learning: encoders of every model, discriminative learning rates, freeze-then-fine-tune
(also across a resume), ``init_from`` (other classes, other input channels, refusals), named
pretrained weights through ``segpipe fit`` offline, and the shipped ImageNet configs.

Nothing here downloads: huggingface_hub is offline and its cache lives under tmp_path.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segpipe.cli import main
from segpipe.lightning_cli import run_cli
from segpipe.models import FCN, SmpModel, UNet
from segpipe.tasks import SegmentationTask
from segpipe.tasks.finetune import (
    DECODER_GROUP,
    ENCODER_GROUP,
    InitFromError,
    TransferLearning,
    TransferLearningError,
    adapt_first_conv,
    encoder_parameters,
    first_conv_name,
    load_init_from,
)
from tests.cli_args import TINY_UNET, printed_config
from tests.data.synthetic import make_folder_dataset
from tests.models.test_smp import write_smp_cache

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers
class BlobData(Dataset):
    """Learnable 16x16 images: class = argmax over the first ``classes`` channels."""

    def __init__(self, n: int = 8, classes: int = 3, channels: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, channels, 16, 16, generator=g)
        self.masks = self.images[:, :classes].argmax(1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": self.masks[i], "path": f"img_{i}.png"}


class BlobDM(L.LightningDataModule):
    def __init__(self, classes: int = 3, channels: int = 3) -> None:
        super().__init__()
        self.num_classes = classes
        self.ds = BlobData(classes=classes, channels=channels)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=4, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=4)


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )


def _unet(classes: int = 3, channels: int = 3) -> UNet:
    return UNet(in_channels=channels, num_classes=classes, base_channels=4, depth=2)


def _adam(params):
    return torch.optim.Adam(params, lr=0.01)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, after: dict, keys) -> list[str]:
    return [k for k in keys if not torch.equal(before[k], after[k])]


class Recorder(L.Callback):
    """Per training epoch: encoder/decoder state at its end, and whether the encoder was frozen
    (no grad, eval mode) during its batches."""

    def __init__(self) -> None:
        self.frozen: dict[int, bool] = {}
        self.states: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        params = encoder_parameters(pl_module.net)
        bns = [b for m in pl_module.net.encoder_modules() for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
        frozen = not any(p.requires_grad for p in params) and not any(m.training for m in bns)
        assert frozen or all(p.requires_grad for p in params)
        self.frozen[trainer.current_epoch] = frozen
        assert pl_module.net.head.training  # the decoder and head always train

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.states[trainer.current_epoch] = _snapshot(pl_module.net)


# ------------------------------------------------------------------------------ encoders
def test_every_model_names_its_encoder() -> None:
    unet = _unet()
    assert unet.encoder_modules() == [unet.inc, unet.downs]
    names = {n for n, p in unet.named_parameters() if any(p is q for q in encoder_parameters(unet))}
    assert names == {n for n, _ in unet.named_parameters() if n.startswith(("inc.", "downs."))}
    for backbone in ("vgg", "resnet18"):
        fcn = FCN(num_classes=3, backbone=backbone, base_channels=4)
        assert fcn.encoder_modules() == [fcn.backbone]
        assert len(encoder_parameters(fcn)) == len(list(fcn.backbone.parameters()))
    smp_model = SmpModel("unet", "resnet18", num_classes=3)
    assert smp_model.encoder_modules() == [smp_model.model.encoder]


def test_options_need_an_encoder_and_no_permanent_freeze() -> None:
    class Plain(nn.Module):
        in_channels, num_classes, pad_multiple = 3, 3, 1

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match=r"freeze_encoder_epochs needs .* Plain has no encoder_modules\(\)"):
        SegmentationTask(Plain(), freeze_encoder_epochs=1)
    with pytest.raises(ValueError, match=r"model.encoder_lr_mult needs"):
        SegmentationTask(Plain(), encoder_lr_mult=0.1)
    SegmentationTask(Plain())  # without the options any network works, as before
    frozen = SmpModel("unet", "resnet18", num_classes=3, freeze_encoder=True)
    with pytest.raises(ValueError, match="freeze_encoder: true, which freezes it for the whole run"):
        SegmentationTask(frozen, freeze_encoder_epochs=2)
    with pytest.raises(ValueError, match="encoder_lr_mult=0.1 sets the encoder's learning rate, "
                                         "but the network was built with freeze_encoder: true"):
        SegmentationTask(frozen, encoder_lr_mult=0.1)
    with pytest.raises(ValueError, match=r"model.encoder_lr_mult must be a number > 0"):
        SegmentationTask(_unet(), encoder_lr_mult=0)
    with pytest.raises(ValueError, match=r"model.freeze_encoder_epochs must be an int >= 0"):
        SegmentationTask(_unet(), freeze_encoder_epochs=-1)


# ------------------------------------------------------------- discriminative learning rates
def _groups(optimizer) -> dict[str, float]:
    return {g.get("name"): g["lr"] for g in optimizer.param_groups}


def test_two_param_groups_encoder_at_lr_times_mult() -> None:
    task = SegmentationTask(_unet(), encoder_lr_mult=0.1,
                            optimizer=lambda p: torch.optim.AdamW(p, lr=0.002))
    optimizer = task.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == [DECODER_GROUP, ENCODER_GROUP]
    assert _groups(optimizer) == pytest.approx({DECODER_GROUP: 0.002, ENCODER_GROUP: 0.0002})
    enc = {id(p) for p in encoder_parameters(task.net)}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == enc
    assert len(optimizer.param_groups[0]["params"]) + len(enc) == len(list(task.parameters()))
    # Without the options: one group, as before.
    single = SegmentationTask(_unet()).configure_optimizers()
    assert len(single.param_groups) == 1 and "name" not in single.param_groups[0]


@pytest.mark.parametrize(
    "scheduler",
    [
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=4),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.01, 0.001], total_steps=10),
    ],
)
def test_schedulers_scale_both_groups(scheduler) -> None:
    task = SegmentationTask(_unet(), encoder_lr_mult=0.1, optimizer=_adam, lr_scheduler=scheduler)
    config = task.configure_optimizers()
    optimizer, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(5):
        optimizer.step()
        sched.step()
        lrs = _groups(optimizer)
        assert lrs[ENCODER_GROUP] == pytest.approx(0.1 * lrs[DECODER_GROUP], rel=1e-6)


def test_reduce_on_plateau_scales_both_groups() -> None:
    task = SegmentationTask(
        _unet(), encoder_lr_mult=0.5, optimizer=_adam,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.1),
    )
    config = task.configure_optimizers()
    optimizer, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(3):
        sched.step(1.0)
    assert _groups(optimizer) == pytest.approx({DECODER_GROUP: 1e-4, ENCODER_GROUP: 5e-5})


def test_scheduler_that_overrides_the_ratio_is_refused() -> None:
    task = SegmentationTask(
        _unet(), encoder_lr_mult=0.1, optimizer=_adam,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=10),
    )
    with pytest.raises(ValueError, match=r"encoder_lr_mult=0.1 but OneCycleLR .* \[decoder, encoder\]"):
        task.configure_optimizers()


# -------------------------------------------------------------------- freeze, then fine-tune
def _fit(task: SegmentationTask, max_epochs: int, ckpt_path: str | None = None, **kw) -> Recorder:
    recorder = Recorder()
    trainer = _trainer(max_epochs=max_epochs, callbacks=[recorder], **kw)
    trainer.fit(task, BlobDM(), ckpt_path=ckpt_path)
    return recorder


def _freeze_task() -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask(_unet(), freeze_encoder_epochs=2, encoder_lr_mult=0.1, optimizer=_adam)


def test_encoder_frozen_then_fine_tuned() -> None:
    task = _freeze_task()
    start = _snapshot(task.net)
    rec = _fit(task, max_epochs=4)
    assert rec.frozen == {0: True, 1: True, 2: False, 3: False}
    enc_keys = [k for k in start if k.startswith(("inc.", "downs."))]
    dec_keys = [k for k in start if k.startswith(("ups.", "head."))]
    # Frozen epochs: encoder weights and BatchNorm statistics untouched; decoder trains.
    assert _changed(start, rec.states[1], enc_keys) == []
    assert _changed(start, rec.states[1], dec_keys)
    # After unfreezing the encoder trains too (at 0.1 x the lr).
    changed = _changed(rec.states[1], rec.states[3], enc_keys)
    assert any(k.endswith("running_mean") for k in changed)
    assert any(k.endswith("weight") for k in changed)
    assert all(p.requires_grad for p in task.net.parameters())  # left trainable after fit


@pytest.mark.parametrize("stop", [1, 3])
def test_resumed_run_continues_frozen_or_unfrozen_as_uninterrupted(stop: int, tmp_path: Path) -> None:
    full = _freeze_task()
    rec_full = _fit(full, max_epochs=4)

    first = _freeze_task()
    trainer = _trainer(max_epochs=stop)
    trainer.fit(first, BlobDM())
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = _freeze_task()
    rec = _fit(resumed, max_epochs=4, ckpt_path=str(ckpt))
    assert rec.frozen == {e: e < 2 for e in range(stop, 4)}
    for key, value in full.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert rec.frozen == {e: rec_full.frozen[e] for e in range(stop, 4)}


def test_resume_with_other_param_groups_is_one_clear_error(tmp_path: Path) -> None:
    task = _freeze_task()
    trainer = _trainer(max_epochs=1)
    trainer.fit(task, BlobDM())
    ckpt = tmp_path / "two_groups.ckpt"
    trainer.save_checkpoint(ckpt)
    plain = SegmentationTask(_unet(), optimizer=_adam)
    with pytest.raises(TransferLearningError, match=r"resume with the options it was trained with: "
                       r"--model.freeze_encoder_epochs 2 --model.encoder_lr_mult 0.1"):
        _trainer(max_epochs=2).fit(plain, BlobDM(), ckpt_path=str(ckpt))
    # two groups both times, but another multiplier: the saved optimiser would keep 0.1
    other = SegmentationTask(_unet(), optimizer=_adam, freeze_encoder_epochs=2, encoder_lr_mult=0.5)
    with pytest.raises(TransferLearningError, match=r"other transfer options than this one "
                       r"\(model.encoder_lr_mult=0.5\).*resume with --model.encoder_lr_mult 0.1"):
        _trainer(max_epochs=2).fit(other, BlobDM(), ckpt_path=str(ckpt))


# ------------------------------------------------------------------------------ init_from
def _save_task_ckpt(tmp_path: Path, net: nn.Module, name: str = "src.ckpt", classes: int = 3) -> Path:
    task = SegmentationTask(net, optimizer=_adam)
    trainer = _trainer(max_epochs=1)
    trainer.fit(task, BlobDM(classes=classes, channels=net.in_channels))
    path = tmp_path / name
    trainer.save_checkpoint(path)
    return path


def test_init_from_other_classes_loads_all_but_the_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = _unet(classes=3)
    path = _save_task_ckpt(tmp_path, source)
    trained = _snapshot(source)

    torch.manual_seed(2)
    target = _unet(classes=2)
    fresh_head = _snapshot(target.head)
    report = load_init_from(target, path)
    n = len(target.state_dict())
    assert report.summary() == f"loaded {n - 2} tensors, re-initialised 2 (head.weight, head.bias)"
    assert report.foreign == [] and report.foreign_warning() is None  # only the head: expected
    assert report.source == "3 classes, 3 input channels"  # built in Python: no net class_path
    state = target.state_dict()
    for key in report.loaded:
        torch.testing.assert_close(state[key], trained[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(target.head.weight, fresh_head["weight"], rtol=0, atol=0)


def test_a_dry_run_reports_what_init_from_would_load_and_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(1)
    path = _save_task_ckpt(tmp_path, _unet(classes=3, channels=3))
    torch.manual_seed(2)
    target = _unet(classes=2, channels=1)
    before = _snapshot(target)
    dry = load_init_from(target, path, dry_run=True)
    after = _snapshot(target)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    real = load_init_from(target, path)
    assert (dry.loaded, dry.reinitialised, dry.adapted) == (real.loaded, real.reinitialised,
                                                            real.adapted)
    assert dry.adapted == ("inc.block.0.weight", 3, 1)


def test_init_from_a_shallower_network_warns_that_layers_start_random(tmp_path: Path) -> None:
    path = _save_task_ckpt(tmp_path, _unet())  # depth 2
    deeper = UNet(in_channels=3, num_classes=3, base_channels=4, depth=3)
    report = load_init_from(deeper, path)
    assert report.loaded and report.foreign
    assert all(name not in report.loaded for name in report.foreign)
    said = report.foreign_warning()
    assert said and f"{len(report.foreign)} layers of this network are not in the checkpoint" in said
    assert "another architecture, depth or width" in said and report.foreign[0] in said
    task = SegmentationTask(UNet(in_channels=3, num_classes=3, base_channels=4, depth=3),
                            init_from=str(path))
    with pytest.warns(UserWarning, match="start from random weights, not only the head"):
        _trainer(max_epochs=1).fit(task, BlobDM())


def test_init_from_names_layers_absent_from_the_checkpoint_and_a_whole_random_encoder(
        tmp_path: Path) -> None:
    """The README's own example (a ResNet-34 started from a ResNet-18 checkpoint) left 96 encoder
    tensors random without a warning: only layers of another shape counted, not absent ones;
    and the same ResNet-18 as timm's 'tu-resnet18' transferred the decoder alone, in silence."""
    torch.manual_seed(0)
    path = tmp_path / "r18.pt"
    torch.save(SmpModel(encoder_name="resnet18", num_classes=3).state_dict(), path)
    r34 = load_init_from(SmpModel(encoder_name="resnet34", num_classes=3), path)
    assert "model.encoder.layer1.2.conv1.weight" in r34.foreign and not r34.encoder_random
    said = r34.foreign_warning()
    assert said and "layers of this network are not in the checkpoint" in said

    twin = SmpModel(encoder_name="tu-resnet18", num_classes=3)
    report = load_init_from(twin, path)
    assert report.encoder_random and report.encoder_layers > 0
    said = report.foreign_warning()
    assert said and "so the whole encoder starts from random weights" in said
    assert "'tu-' twin" in said
    task = SegmentationTask(SmpModel(encoder_name="tu-resnet18", num_classes=3),
                            init_from=str(path), freeze_encoder_epochs=1)
    with pytest.warns(UserWarning, match="whole encoder starts from random weights.*"
                      "freeze_encoder_epochs=1 keeps those random features frozen"):
        _trainer(max_epochs=2).fit(task, BlobDM())

    # an encoder built with pretrained weights keeps them: not called random
    pretrained = SmpModel(encoder_name="resnet34", num_classes=3)
    pretrained.encoder_pretrained = True
    kept = load_init_from(pretrained, path)
    assert not kept.encoder_random and not any("encoder" in n for n in kept.foreign)


@pytest.mark.parametrize("new_in", [1, 2, 4, 6])
def test_adapt_first_conv_is_smps_rule(new_in: int) -> None:
    from segmentation_models_pytorch.encoders._utils import patch_first_conv

    weight = torch.randn(8, 3, 3, 3)
    conv = nn.Conv2d(3, 8, 3, bias=False)
    conv.weight.data.copy_(weight)
    patch_first_conv(conv, new_in, default_in_channels=3, pretrained=True)
    adapted = adapt_first_conv(weight, new_in)
    torch.testing.assert_close(adapted, conv.weight.detach(), rtol=0, atol=0)
    if new_in == 1:
        torch.testing.assert_close(adapted, weight.sum(1, keepdim=True))
    else:  # channel i <- channel i mod 3, scaled by 3/new_in (slice when fewer, repeat when more)
        expected = weight[:, [i % 3 for i in range(new_in)]] * (3 / new_in)
        torch.testing.assert_close(adapted, expected)


def test_init_from_other_input_channels_adapts_the_first_conv(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = _unet(classes=3, channels=3)
    path = _save_task_ckpt(tmp_path, source)
    target = _unet(classes=3, channels=1)
    report = load_init_from(target, path)
    assert report.adapted == ("inc.block.0.weight", 3, 1) == (first_conv_name(target), 3, 1)
    assert report.summary() == f"loaded {len(target.state_dict())} tensors, re-initialised 0"
    expected = source.inc.block[0].weight.sum(1, keepdim=True)
    torch.testing.assert_close(target.inc.block[0].weight, expected)
    lines = report.lines()
    assert any("adapted the first convolution inc.block.0.weight from 3 to 1" in line for line in lines)


def test_init_from_an_encoders_state_dict_points_to_encoder_weights(tmp_path: Path) -> None:
    """An encoder saved alone (what encoder_weights takes) given to init_from: 'no tensor fits',
    without the option to use."""
    path = tmp_path / "enc.pth"
    torch.save(SmpModel(encoder_name="resnet18", encoder_depth=3).encoder.state_dict(), path)
    with pytest.raises(InitFromError, match=r"holds the weights of this network's "
                       r"'model.encoder' alone .*give it as "
                       r"model.net.init_args.encoder_weights instead"):
        load_init_from(SmpModel(encoder_name="resnet18", encoder_depth=3), path)
    other = tmp_path / "unet.pth"
    torch.save(_unet().state_dict(), other)
    with pytest.raises(InitFromError) as err:
        load_init_from(SmpModel(encoder_name="resnet18", encoder_depth=3), other)
    assert "alone" not in str(err.value)


def test_init_from_refusals_name_the_reason(tmp_path: Path) -> None:
    class Grouped(nn.Module):
        num_classes, pad_multiple = 3, 1

        def __init__(self, in_channels: int) -> None:
            super().__init__()
            self.in_channels = in_channels
            self.conv = nn.Conv2d(in_channels, 6, 3, groups=in_channels)
            self.head = nn.Conv2d(6, 3, 1)

    ckpt = {
        "state_dict": {f"net.{k}": v for k, v in Grouped(3).state_dict().items()},
        "hyper_parameters": {"data_spec": {"num_classes": 3, "in_channels": 3}},
    }
    path = tmp_path / "grouped.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(InitFromError, match=r"trained on 3 input channels and the network takes 2, "
                       r"but its first convolution conv\.weight is grouped \(groups=2\), "
                       r"so it cannot be adapted"):
        load_init_from(Grouped(2), path)

    with pytest.raises(InitFromError, match=r"model.init_from: .*nothere.ckpt: no such file"):
        load_init_from(_unet(), tmp_path / "nothere.ckpt")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(InitFromError, match=r"a folder, not a checkpoint; give a checkpoint file "
                       r"in it, e.g. .*run/checkpoints/last.ckpt"):  # it said "no such file"
        load_init_from(_unet(), tmp_path / "run")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"net.something.weight": torch.zeros(2)}}, other)
    with pytest.raises(InitFromError, match="no tensor of the checkpoint fits the network"):
        load_init_from(_unet(), other)
    # another width: only BatchNorm step counters and the head's bias fit, which is no transfer
    wider = tmp_path / "wider.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in UNet(
        in_channels=3, num_classes=3, base_channels=8, depth=2).state_dict().items()}}, wider)
    with pytest.raises(InitFromError, match="no layer's weights have the same name and shape"):
        load_init_from(_unet(), wider)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "obj": Path("x")}, unsafe)
    with pytest.raises(InitFromError, match="pickled Python objects"):
        load_init_from(_unet(), unsafe)


def test_init_from_applies_at_fit_start_but_not_when_resuming(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = _unet(classes=3)
    init = _save_task_ckpt(tmp_path, source, "init.ckpt")

    torch.manual_seed(5)
    task = SegmentationTask(_unet(classes=2), init_from=str(init), optimizer=_adam)
    callbacks = task.configure_callbacks()
    assert isinstance(callbacks[0], TransferLearning)
    trainer = _trainer(max_epochs=1, limit_train_batches=0, limit_val_batches=0)
    trainer.fit(task, BlobDM(classes=2))
    cb = next(c for c in trainer.callbacks if isinstance(c, TransferLearning))
    assert cb.report is not None and cb.report.reinitialised == ["head.weight", "head.bias"]
    torch.testing.assert_close(task.net.inc.block[0].weight, source.inc.block[0].weight, rtol=0, atol=0)

    # A run of its own, then resumed with init_from still set: its own weights are kept.
    torch.manual_seed(6)
    own = SegmentationTask(_unet(classes=2), optimizer=_adam)
    t = _trainer(max_epochs=1)
    t.fit(own, BlobDM(classes=2))
    mid = tmp_path / "own.ckpt"
    t.save_checkpoint(mid)
    resumed = SegmentationTask(_unet(classes=2), init_from=str(init), optimizer=_adam)
    t2 = _trainer(max_epochs=1)
    t2.fit(resumed, BlobDM(classes=2), ckpt_path=str(mid))
    cb2 = next(c for c in t2.callbacks if isinstance(c, TransferLearning))
    assert cb2.report is None
    torch.testing.assert_close(resumed.net.inc.block[0].weight, own.net.inc.block[0].weight,
                               rtol=0, atol=0)


# --------------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def dataset3(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("d3") / "ds", num_classes=3, size=(48, 40))


@pytest.fixture(scope="module")
def dataset2(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("d2") / "ds", num_classes=2, channels=1,
                               size=(48, 40), seed=1)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture()
def lightning_log():
    handler = _Lines()
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


TINY = [*TINY_UNET, "--data.num_workers=0", "--trainer.logger=false"]


def test_cli_init_from_other_data_then_resume(dataset3, dataset2, tmp_path, lightning_log) -> None:
    src = tmp_path / "src"
    main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset3}",
          f"--trainer.default_root_dir={src}", "--trainer.max_epochs=1", *TINY])
    init = src / "checkpoints" / "last.ckpt"
    run = tmp_path / "run"
    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset2}", *TINY,
            "--data.num_classes=2", "--data.in_channels=1", f"--trainer.default_root_dir={run}",
            f"--model.init_from={init}", "--model.freeze_encoder_epochs=1",
            "--model.encoder_lr_mult=0.1"]
    assert main([*args, "--trainer.max_epochs=1"]) == 0
    assert any(line.startswith("epoch 0: encoder frozen (eval mode") for line in lightning_log)
    n = len(UNet(in_channels=1, num_classes=2, base_channels=8, depth=2).state_dict())
    assert f"loaded {n - 2} tensors, re-initialised 2 (head.weight, head.bias)" in lightning_log
    assert any("from 3 to 1 input channels" in line for line in lightning_log)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["init_from"] == str(init)
    assert [g["name"] for g in ckpt["optimizer_states"][0]["param_groups"]] == ["decoder", "encoder"]

    lightning_log.clear()
    assert main([*args, "--trainer.max_epochs=2", "--ckpt_path=last"]) == 0
    assert not any(line.startswith("loaded ") for line in lightning_log)
    assert any("not applied: resuming from" in line for line in lightning_log)
    assert any("epoch 1: encoder trains at 0.1 x the learning rate (frozen for epochs 0-0)" in line
               for line in lightning_log)  # resumed after the frozen epoch: trains from the start


def test_cli_init_from_missing_file_is_one_line(dataset3, tmp_path, capsys) -> None:
    code = main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset3}", *TINY,
                 f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
                 f"--model.init_from={tmp_path / 'nope.ckpt'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"segpipe: error: model.init_from: {tmp_path / 'nope.ckpt'}: no such file" in err


def test_cli_named_weights_from_the_cache_offline(dataset3, tmp_path, hub_offline) -> None:
    import segmentation_models_pytorch as smp

    torch.manual_seed(7)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v
             for k, v in smp.encoders.get_encoder("mobilenet_v2").state_dict().items()}
    for key in state:  # a variance is positive (a negative one makes the val loss NaN)
        if key.endswith("running_var"):
            state[key] = state[key].abs() + 0.5
    write_smp_cache(hub_offline, "mobilenet_v2", "imagenet", state)
    cli = run_cli(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset3}", *TINY,
                   "--model.net.class_path=segpipe.models.SmpModel",
                   "--model.net.init_args.encoder_name=mobilenet_v2",
                   "--model.net.init_args.encoder_weights=imagenet",
                   "--model.freeze_encoder_epochs=1", "--model.encoder_lr_mult=0.1",
                   f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1"])
    encoder = cli.model.net.model.encoder.state_dict()
    # one frozen epoch: the encoder still holds the cached weights, BatchNorm statistics included
    for key, value in state.items():
        torch.testing.assert_close(encoder[key].float(), value.float(), rtol=0, atol=0, msg=key)


def test_cli_named_weights_not_cached_offline_exit_2_without_traceback(dataset3, tmp_path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch")}
    exe = Path(sys.executable).with_name("segpipe")
    res = subprocess.run(
        [str(exe), "fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset3}", *TINY,
         "--model.net.class_path=segpipe.models.SmpModel", "--model.net.init_args.encoder_name=resnet34",
         "--model.net.init_args.encoder_weights=imagenet",
         f"--trainer.default_root_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("segpipe: error:")]
    assert len(errors) == 1
    line = errors[0]
    assert "encoder_weights='imagenet'" in line and "smp-hub/resnet34.imagenet" in line
    assert str(tmp_path / "hf" / "hub" / "models--smp-hub--resnet34.imagenet") in line
    assert "python -c" in line and "hf download" in line


@pytest.mark.parametrize("config", ["camvid_smp_r34_imagenet", "lgg_smp_r34_imagenet"])
def test_imagenet_configs_parse_without_downloading(config, tmp_path, hub_offline, capsys) -> None:
    cfg = printed_config(config, tmp_path, capsys)
    net = cfg["model"]["net"]
    assert net["class_path"] == "segpipe.models.SmpModel"
    assert net["init_args"]["encoder_name"] == "resnet34"
    assert net["init_args"]["encoder_weights"] == "imagenet"
    assert cfg["model"]["freeze_encoder_epochs"] > 0 and 0 < cfg["model"]["encoder_lr_mult"] < 1
    assert not any(hub_offline.iterdir())  # nothing fetched


def test_ddp_needs_find_unused_parameters_while_frozen() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from segpipe.tasks.finetune import _check_ddp

    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        _check_ddp(SimpleNamespace(strategy=DDPStrategy()))
    _check_ddp(SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True)))


def test_a_freeze_that_never_ends_or_freezes_random_weights_is_warned_about() -> None:
    net = SmpModel("unet", "resnet18", num_classes=3, encoder_weights=None, encoder_depth=3)
    task = SegmentationTask(net, freeze_encoder_epochs=2)
    with pytest.warns(UserWarning) as said:
        _trainer(max_epochs=2).fit(task, BlobDM())
    texts = [str(w.message) for w in said]
    assert any("the encoder stays frozen for the whole run" in t for t in texts), texts
    assert any("freezes a randomly initialised encoder" in t for t in texts), texts


def test_an_smp_encoder_frozen_for_the_whole_run_without_weights_is_warned_about() -> None:
    """freeze_encoder: true with encoder_weights: null (the offline error's own suggestion)
    trained a decoder on random features for the whole run, without a word."""
    net = SmpModel("unet", "resnet18", num_classes=3, encoder_weights=None, encoder_depth=3,
                   freeze_encoder=True)
    with pytest.warns(UserWarning, match=r"freeze_encoder: true keeps the randomly initialised "
                      r"encoder of SmpModel .* frozen for the whole run") as said:
        _trainer(max_epochs=1).fit(SegmentationTask(net), BlobDM())
    assert not [w for w in said if "in eval mode at the start of training" in str(w.message)]
    free = SmpModel("unet", "resnet18", num_classes=3, encoder_weights=None, encoder_depth=3)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _trainer(max_epochs=1).fit(SegmentationTask(free), BlobDM())
    assert not [w for w in said if "randomly initialised" in str(w.message)]


def test_stages_frozen_for_the_whole_run_stay_frozen_when_the_encoder_is_unfrozen() -> None:
    """freeze_encoder_stages beside freeze_encoder_epochs: unfreezing the encoder after its
    epochs gives back only what the callback froze; the frozen first stages stay as they were."""
    torch.manual_seed(0)
    net = SmpModel("unet", "resnet18", num_classes=3, encoder_weights=None,
                   freeze_encoder_stages=3, decoder_channels=(16, 8, 8, 4, 4))
    stage_keys = [k for k in net.state_dict() if k.startswith(("model.encoder.conv1.",
                  "model.encoder.bn1.", "model.encoder.layer1.", "model.encoder.layer2."))]
    later_keys = [k for k in net.state_dict() if k.startswith("model.encoder.layer3.")]
    start = _snapshot(net)
    task = SegmentationTask(net, freeze_encoder_epochs=1, encoder_lr_mult=0.1, optimizer=_adam)
    with pytest.warns(UserWarning, match=r"freeze_encoder_stages: 3 keeps the first 3 stages of "
                      r"SmpModel's randomly initialised encoder .* frozen for the whole run") as said:
        _trainer(max_epochs=3).fit(task, BlobDM())
    # Lightning's count of eval-mode modules at the start of training is not repeated for these
    assert not [w for w in said if "in eval mode at the start of training" in str(w.message)]
    end = _snapshot(net)
    assert stage_keys and _changed(start, end, stage_keys) == []  # incl. BatchNorm statistics
    assert any(k.endswith("weight") for k in _changed(start, end, later_keys))
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == [
        n for n, _ in net.named_parameters() if n in stage_keys]
    net.train()
    assert not any(m.training for m in net.frozen_stage_modules)
    assert net.model.encoder.layer3.training
    # a module in eval mode that was not frozen on purpose is still reported
    net.model.segmentation_head.eval()
    count = len(net.frozen_stage_modules) + len(list(net.model.segmentation_head.modules()))
    with pytest.warns(UserWarning, match=rf"Found {count} module\(s\) in eval mode at the start"):
        _trainer(max_epochs=1).fit(SegmentationTask(net, optimizer=_adam), BlobDM())


def test_the_quieted_eval_mode_count_is_quiet_only_for_its_own_fit() -> None:
    """Lightning's count of eval-mode modules is silenced for the stages frozen on purpose, by a
    process-wide filter (Lightning warns after the callbacks' setup); the end of the fit removes
    it (teardown, or on_exception when the fit raises), so a later fit in the same process that
    has that many modules in eval mode by accident is still told."""
    net = SmpModel("unet", "resnet18", num_classes=3, encoder_weights=None,
                   freeze_encoder_stages=3, decoder_channels=(16, 8, 8, 4, 4))
    count = len(net.frozen_stage_modules)

    def eval_mode_filters() -> list:
        return [f for f in warnings.filters
                if f[1] is not None and "in eval mode at the start" in f[1].pattern]

    with warnings.catch_warnings():  # not pytest.warns: its exit would restore the filters itself
        warnings.simplefilter("ignore", UserWarning)  # the random-encoder warning
        assert eval_mode_filters() == []
        _trainer(max_epochs=1).fit(SegmentationTask(net, optimizer=_adam), BlobDM())
        assert eval_mode_filters() == []

        def boom(*args, **kwargs):
            raise RuntimeError("boom")

        failing = SegmentationTask(net, optimizer=_adam)  # a fit that dies skips teardown
        failing.training_step = boom
        with pytest.raises(RuntimeError, match="boom"):
            _trainer(max_epochs=1).fit(failing, BlobDM())
        assert eval_mode_filters() == []
    other = _unet()
    leaves = [m for m in other.modules() if not list(m.children())][:count]
    assert len(leaves) == count
    for module in leaves:  # Lightning keeps the modes it finds at the start of training
        module.eval()
    with pytest.warns(UserWarning, match=rf"Found {count} module\(s\) in eval mode at the start"):
        _trainer(max_epochs=1).fit(SegmentationTask(other, optimizer=_adam), BlobDM())


@pytest.mark.parametrize("build", [lambda: _unet(), lambda: FCN(3, 3, base_channels=4)])
def test_freezing_segpipes_own_random_encoders_is_warned_about(build, tmp_path: Path) -> None:
    net = build()
    task = SegmentationTask(net, freeze_encoder_epochs=1)
    with pytest.warns(UserWarning, match=f"randomly initialised encoder \\({type(net).__name__} "):
        _trainer(max_epochs=2).fit(task, BlobDM())
    ckpt = _save_task_ckpt(tmp_path, _unet())  # from trained weights: nothing to warn about
    started = SegmentationTask(_unet(), freeze_encoder_epochs=1, init_from=str(ckpt))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _trainer(max_epochs=2).fit(started, BlobDM())
    assert not [w for w in said if "randomly initialised" in str(w.message)]
