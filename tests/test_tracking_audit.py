"""Loggers and what is logged to them, without a training run: images to TensorBoard, W&B and
MLflow, the validation picture, the progress bar's loss, the default loggers' run folder, and
a full disk met in a logger's writer thread."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from segpipe import tracking
from segpipe.data.spec import DataSpec
from tests.predict.nets import ThresholdNet


# --- loggers recognised by their class names, as log_image recognises Lightning's -------------
class _Experiment:
    def __init__(self) -> None:
        self.images: list[tuple[Any, ...]] = []

    def add_image(self, tag: str, image: np.ndarray, global_step: int, dataformats: str) -> None:
        self.images.append((tag, image, global_step, dataformats))

    def log_image(self, run_id: str, image: np.ndarray, artifact_file: str) -> None:
        self.images.append((run_id, image, artifact_file))


class TensorBoardLogger:
    def __init__(self) -> None:
        self.experiment = _Experiment()


class WandbLogger:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def log_image(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)


class MLFlowLogger:
    run_id = "r1"

    def __init__(self) -> None:
        self.experiment = _Experiment()


class CSVLogger:
    experiment = None


def _trainer(*loggers: Any, step: int = 7) -> SimpleNamespace:
    return SimpleNamespace(loggers=list(loggers), sanity_checking=False, is_global_zero=True,
                           global_step=step)


def test_float_images_are_rounded_and_clipped_to_uint8() -> None:
    """[0, 1] floats become the nearest uint8 (0.5 -> 128, not 127); values outside [0, 1] are
    clipped, not wrapped around."""
    tb = TensorBoardLogger()
    image = np.array([[[0.5, 1.0, 0.0], [1.7, -0.3, 0.999]]], dtype=np.float32)
    assert tracking.log_image(_trainer(tb), "val/images", image, 3) == 1
    (tag, logged, step, fmt), = tb.experiment.images
    assert (tag, step, fmt, logged.dtype) == ("val/images", 3, "HWC", np.uint8)
    assert logged.tolist() == [[[128, 255, 0], [255, 0, 255]]]


def test_each_image_logger_gets_the_image_at_its_step_and_others_are_not_counted() -> None:
    """W&B gets the step (not its own counter), MLflow a file per tag and step; loggers that take
    no images (CSV) are skipped and not counted."""
    wandb, mlflow, csv = WandbLogger(), MLFlowLogger(), CSVLogger()
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    assert tracking.log_image(_trainer(csv, wandb, mlflow), "val/images", image, 12) == 2
    (call,) = wandb.calls
    assert call["key"] == "val/images" and call["step"] == 12 and len(call["images"]) == 1
    (run_id, _, name), = mlflow.experiment.images
    assert (run_id, name) == ("r1", "val_images_000012.png")


def test_a_logger_that_fails_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    """A picture never stops training: a failing logger is a warning, the next one still logs."""
    class Broken(TensorBoardLogger):
        pass

    broken = Broken()
    broken.experiment = None  # add_image on None raises
    Broken.__name__ = "TensorBoardLogger"
    tb = TensorBoardLogger()
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    assert tracking.log_image(_trainer(broken, tb), "t", image, 0) == 1
    assert len(tb.experiment.images) == 1 and "could not log t" in caplog.text


# --- the validation picture -------------------------------------------------------------------
class _Net(nn.Module):
    """ThresholdNet behind a BatchNorm, with the spec the task carries."""

    def __init__(self, spec: DataSpec) -> None:
        super().__init__()
        self.spec = spec
        self.bn = nn.BatchNorm2d(spec.in_channels)
        self.net = ThresholdNet(spec.in_channels, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bn(x)  # updates the running statistics in train mode
        return self.net(x)


def _picture(net: nn.Module, batch: dict[str, torch.Tensor], num_images: int = 2) -> np.ndarray:
    tb = TensorBoardLogger()
    trainer = _trainer(tb)
    cb = tracking.ValidationImages(num_images=num_images, min_interval=0.0)
    cb.on_validation_batch_end(trainer, net, None, batch, 0)
    cb.on_validation_epoch_end(trainer, net)
    (tag, image, step, _), = tb.experiment.images
    assert (tag, step) == ("val/images", 7)
    return image


def _spec() -> DataSpec:
    return DataSpec.create(num_classes=3, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0],
                           class_colors=[[255, 0, 0], [0, 255, 0], [0, 0, 255]])


def test_the_picture_at_the_end_of_training_leaves_batchnorm_statistics_alone() -> None:
    """The last validation's picture, drawn when training ends (the module back in train mode),
    predicts in eval mode: the BatchNorm running statistics the checkpoint saves are not moved
    by it, and the module's mode is as it was."""
    net = _Net(_spec())
    tb = TensorBoardLogger()
    trainer = _trainer(tb)
    cb = tracking.ValidationImages(num_images=2, min_interval=3600.0)
    batch = {"image": torch.rand(2, 3, 8, 8) * 5, "mask": torch.zeros(2, 8, 8, dtype=torch.long)}
    for _ in range(2):  # the first validation is drawn, the second one waits for the end
        net.eval()
        cb.on_validation_batch_end(trainer, net, None, batch, 0)
        cb.on_validation_epoch_end(trainer, net)
        net.train()
    assert len(tb.experiment.images) == 1
    before = net.bn.running_mean.clone()
    cb.on_train_end(trainer, net)
    assert len(tb.experiment.images) == 2
    assert torch.equal(net.bn.running_mean, before) and net.bn.num_batches_tracked == 0
    assert net.training


def test_the_picture_shows_colour_images_as_they_are_and_stretches_flat_ones() -> None:
    """A row is image | truth | prediction; an RGB image keeps its colours, and one of little
    contrast (values in a narrow band) is stretched to be visible."""
    spec = _spec()
    image = torch.zeros(2, 3, 4, 4)
    image[0, 0] = 1.0  # a red image, full contrast
    image[1] = 0.45 + 0.1 * torch.linspace(0, 1, 16).reshape(1, 4, 4)  # grey, in [0.45, 0.55]
    batch = {"image": image, "mask": torch.full((2, 4, 4), 255, dtype=torch.long)}  # ignored
    picture = _picture(_Net(spec).eval(), batch)
    assert picture.shape == (8, 12, 3)
    red = picture[:4, :4]
    assert (red[..., 0] == 255).all() and (red[..., 1:] == 0).all()
    flat = picture[4:, :4, 0].astype(int)
    assert flat.min() == 0 and flat.max() == 255
    # the ignored label shows the image in the truth panel
    assert np.array_equal(picture[:, 4:8], picture[:, :4])


def test_the_picture_of_resized_evaluation_is_at_the_masks_size() -> None:
    """With data.eval_resize the model sees resized images; the picture shows image, truth and
    prediction at the masks' size, row by row."""
    net = _Net(_spec()).eval()
    batch = {"image": torch.rand(3, 3, 16, 16), "mask": torch.zeros(3, 8, 12, dtype=torch.long)}
    picture = _picture(net, batch, num_images=2)
    assert picture.shape == (2 * 8, 3 * 12, 3)


def test_the_picture_of_a_two_class_model_labels_with_its_threshold() -> None:
    """model.positive_threshold: the picture's prediction is the labels validation scores."""
    spec = DataSpec.create(num_classes=2, mean=[0.0] * 3, std=[1.0] * 3,
                           class_colors=[[255, 0, 0], [0, 255, 0]])
    # ThresholdNet: p(class 1) = sigmoid(50 (v - 0.5)), 0.38 at v = 0.49 (the arg-max: class 0)
    batch = {"image": torch.full((1, 3, 4, 4), 0.49), "mask": torch.ones(1, 4, 4, dtype=torch.long)}
    panels = {}
    for threshold in (None, 0.25):
        net = _Net(spec).eval()
        net.positive_threshold = threshold
        picture = _picture(net, batch, num_images=1)
        panels[threshold] = (picture[:, 4:8], picture[:, 8:12])  # truth, prediction
    truth, pred = panels[0.25]
    assert np.array_equal(pred, truth)  # class 1, as the truth
    assert not np.array_equal(panels[None][1], truth)


# --- the progress bar, the run folder and the writer thread's full disk ----------------------
def test_the_progress_bar_shows_the_training_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar reads the step and epoch training loss itself (the task logs it off the bar)."""
    monkeypatch.setattr(tracking.TQDMProgressBar, "get_metrics", lambda self, t, m: {"v_num": 0})
    trainer = SimpleNamespace(callback_metrics={"train/loss_step": torch.tensor(0.25),
                                                "train/loss_epoch": torch.tensor(0.5),
                                                "val/mIoU": torch.tensor(0.1)})
    items = tracking.ThrottledProgressBar().get_metrics(trainer, None)
    assert items == {"v_num": 0, "train/loss_step": 0.25, "train/loss_epoch": 0.5}


def test_a_version_taken_meanwhile_is_skipped_when_reserving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another command that created version_N between the look and the reservation: this one
    takes the next N, never a folder another run has."""
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)
    monkeypatch.setattr(tracking, "_next_version", lambda folder: 0)  # looked before it existed
    assert tracking.next_version(tmp_path, reserve=True) == 1
    assert (tmp_path / "lightning_logs" / "version_1").is_dir()


def test_default_tensorboard_logs_no_placeholder_hp_metric(tmp_path: Path) -> None:
    """TensorBoard's placeholder ``hp_metric`` (-1) is not logged beside the real metrics."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = tracking.default_loggers(tmp_path, 0)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger", "TensorBoardLogger"]
    tb = loggers[1]
    tb.log_hyperparams({"lr": 0.1})
    tb.log_metrics({"val/mIoU": 0.5}, step=0)
    tb.finalize("success")
    acc = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["val/mIoU"]


@pytest.fixture
def thread_hook(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """threading.excepthook replaced by a recorder, then by segpipe's hook on top of it."""
    passed: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", passed.append)
    tracking.quiet_disk_full_in_threads()
    return passed


def _writer_thread(filename: Any) -> SimpleNamespace:
    return SimpleNamespace(_record_writer=SimpleNamespace(_writer=SimpleNamespace(filename=filename)))


def _raise_in_thread(exc: BaseException, thread: Any) -> None:
    threading.excepthook(threading.ExceptHookArgs((type(exc), exc, None, thread)))


def test_a_full_disk_in_a_writer_thread_names_its_event_file(thread_hook: list[Any]) -> None:
    """The thread's error gets the event file's name (given as bytes too) and no traceback; an
    error that already names its file keeps that name."""
    exc = OSError(errno.ENOSPC, "No space left on device")
    _raise_in_thread(exc, _writer_thread(b"/run/version_0/events.out.tfevents.1"))
    assert exc.filename == "/run/version_0/events.out.tfevents.1" and thread_hook == []
    named = OSError(errno.ENOSPC, "No space left on device", "/run/metrics.csv")
    _raise_in_thread(named, _writer_thread("/run/version_0/events.out.tfevents.1"))
    assert named.filename == "/run/metrics.csv" and thread_hook == []


def test_other_errors_in_threads_are_reported_as_before(thread_hook: list[Any]) -> None:
    """Only a full disk is silenced: any other error in a thread reaches the previous hook."""
    exc = ValueError("a bug")
    _raise_in_thread(exc, _writer_thread("/x"))
    (args,) = thread_hook
    assert args.exc_value is exc
