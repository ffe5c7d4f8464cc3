"""Rebuilding a predictor from a checkpoint alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segpipe.models import UNet
from segpipe.predict.checkpoint import (
    CheckpointError,
    load_predictor,
    read_checkpoint,
    save_predict_checkpoint,
)
from segpipe.tasks import SegmentationTask
from tests.predict.conftest import make_ckpt


def test_config_comes_from_the_saved_hyperparameters(tmp_path: Path) -> None:
    ckpt = make_ckpt(
        tmp_path / "m.ckpt", "segpipe.models.UNet",
        {"in_channels": 4, "num_classes": 5, "base_channels": 4, "depth": 2},
        bands=[4, 3, 2, 8], mean=[0.1, 0.2, 0.3, 0.4], std=[1.0, 2.0, 3.0, 4.0],
        class_names=list("abcde"), ignore_index=255, eval_resize=[64, 96],
    )
    task, cfg = load_predictor(ckpt)
    assert isinstance(task.net, UNet) and not task.training
    assert (cfg.num_classes, cfg.in_channels, cfg.bands) == (5, 4, [4, 3, 2, 8])
    assert cfg.mean == [0.1, 0.2, 0.3, 0.4] and cfg.std == [1.0, 2.0, 3.0, 4.0]
    assert cfg.class_names == list("abcde") and len(cfg.class_colors) == 5
    assert cfg.eval_resize == (64, 96) and cfg.ignore_index == 255 and cfg.pad_multiple == 4
    assert cfg.palette().shape == (256, 3)


def test_weights_are_restored(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "m.ckpt", "tests.predict.nets.PointwiseNet",
                     {"in_channels": 3, "num_classes": 3, "seed": 5})
    saved = read_checkpoint(ckpt)["state_dict"]["net.conv.weight"]
    task, _ = load_predictor(ckpt)
    assert torch.equal(task.net.conv.weight, saved)


def test_weights_that_do_not_fit_the_network_are_named(tmp_path: Path) -> None:
    """The network is rebuilt from the config and the weights loaded into it: a checkpoint
    whose weights are another network's says which, in one line, with the file."""
    args = {"in_channels": 3, "num_classes": 3, "base_channels": 4, "depth": 2}
    wide = UNet(**{**args, "base_channels": 8})
    path = make_ckpt(tmp_path / "m.ckpt", "segpipe.models.UNet", args)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {f"net.{k}": v for k, v in wide.state_dict().items()}
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"do not fit the network its config builds: "
                                              r"net\..* is \(8, 3, 3, 3\) in the checkpoint, "
                                              r"\(4, 3, 3, 3\)") as exc:
        load_predictor(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    ckpt["state_dict"] = {f"net.{k}": v for k, v in UNet(**args).state_dict().items()
                          if "head" not in k}
    ckpt["state_dict"]["criterion.weight"] = torch.ones(3)  # a loss's buffer: not needed
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"2 weight\(s\) not in the checkpoint \(e.g. net.head"):
        load_predictor(path)
    ckpt["state_dict"] = {f"model.net.{k}": v for k, v in UNet(**args).state_dict().items()}
    torch.save(ckpt, path)  # the network saved under other names
    with pytest.raises(CheckpointError, match=r"not in the checkpoint \(e.g. net\..*\); \d+ other "
                                              r"entr\(ies\) in the checkpoint, not the network's "
                                              r"\(e.g. model\.net\."):
        load_predictor(path)


def test_nets_load_as_training_built_them(tmp_path: Path) -> None:
    """Untyped constructor arguments (LightningCLI accepts them) and a non-tensor extra state
    load; a device that is not there is a CheckpointError."""
    path = make_ckpt(tmp_path / "u.ckpt", "tests.predict.nets.UntypedNet",
                     {"in_channels": 3, "num_classes": 3, "note": "kept"})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["state_dict"]["net._extra_state"] == {"note": "kept"}
    ckpt["state_dict"]["net._extra_state"] = {"note": "from the checkpoint"}
    torch.save(ckpt, path)
    task, _ = load_predictor(path)
    assert type(task.net).__name__ == "UntypedNet" and task.net.note == "from the checkpoint"
    assert torch.equal(task.net.conv.weight, ckpt["state_dict"]["net.conv.weight"])
    with pytest.raises(CheckpointError, match=r"cannot put the network on 'nosuchdevice'"):
        load_predictor(path, map_location="nosuchdevice")


def test_task_built_in_python_is_refused_with_the_fix(tmp_path: Path) -> None:
    task = SegmentationTask(UNet(in_channels=3, num_classes=2, base_channels=4, depth=2))
    path = tmp_path / "python.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    with pytest.raises(CheckpointError, match="no 'net' entry") as exc:
        load_predictor(path)
    assert str(path) in str(exc.value) and "save_predict_checkpoint" in str(exc.value)


def test_unreadable_and_missing_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_predictor(tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk.ckpt is not a PyTorch checkpoint \(it starts "
                                              r"with b'not '; .* zip archive"):
        load_predictor(junk)
    broken = tmp_path / "broken.ckpt"  # a zip header, then nothing torch can read
    broken.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_predictor(broken)
    from segpipe.callbacks import load_checkpoint_file

    with pytest.raises(ValueError, match="is not a PyTorch checkpoint") as exc:
        load_checkpoint_file(junk)  # fit/test/validate --ckpt_path: a one-line ConfigError
    assert "weights_only" not in str(exc.value)


def test_inconsistent_data_and_model_are_refused(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "m.ckpt", "tests.predict.nets.PointwiseNet",
                     {"in_channels": 3, "num_classes": 3}, num_classes=4,
                     class_names=None)
    with pytest.raises(CheckpointError, match="data.num_classes=4"):
        load_predictor(ckpt)


def test_checkpoints_from_before_the_data_spec_still_load(tmp_path: Path) -> None:
    """segpipe 0.1 kept classes in the task's hparams and the input in the data module's."""
    ckpt = read_checkpoint(make_ckpt(tmp_path / "new.ckpt", "tests.predict.nets.PointwiseNet",
                                     {"in_channels": 3, "num_classes": 3}))
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if k != "data_spec"}
    old = {
        "pytorch-lightning_version": ckpt["pytorch-lightning_version"],
        "state_dict": ckpt["state_dict"],
        "hyper_parameters": {**hp, "num_classes": 3, "ignore_index": 255,
                             "class_names": ["bg", "red", "green"]},
        "datamodule_hyper_parameters": {"root": "x", "layout": "folder", "num_classes": 3,
                                        "in_channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3,
                                        "class_colors": [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
                                        "eval_resize": [8, 8], "batch_size": 4},
    }
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    task, cfg = load_predictor(path)
    assert cfg.class_names == ["bg", "red", "green"] and cfg.ignore_index == 255
    assert cfg.mean == [0.0] * 3 and cfg.class_colors[1] == [4, 5, 6]
    assert cfg.eval_resize == (8, 8) and task.spec.class_names == cfg.class_names


def test_symmetries_missing_from_an_older_spec_come_from_the_data_modules_flips(
        tmp_path: Path) -> None:
    """A spec saved before it recorded the symmetries: `test --model.test_tta` averaged this
    run's flips, `predict --tta` horizontal flips only, though the checkpoint's data module
    hyperparameters say which flips trained it."""
    from segpipe.data.spec import recorded_spec

    ckpt = read_checkpoint(make_ckpt(tmp_path / "m.ckpt", "tests.predict.nets.PointwiseNet",
                                     {"in_channels": 3, "num_classes": 3}))
    ckpt["hyper_parameters"]["data_spec"].pop("symmetries", None)
    ckpt["datamodule_hyper_parameters"] = {"augment": "default", "hflip": True, "vflip": True}
    torch.save(ckpt, tmp_path / "flips.ckpt")
    assert load_predictor(tmp_path / "flips.ckpt")[1].symmetries == ["hflip", "vflip"]
    assert recorded_spec(ckpt["hyper_parameters"], ckpt["datamodule_hyper_parameters"])[
        "symmetries"] == ["hflip", "vflip"]  # what test adopts too
    ckpt["datamodule_hyper_parameters"] = {"augment": "none", "hflip": True}
    torch.save(ckpt, tmp_path / "none.ckpt")
    assert load_predictor(tmp_path / "none.ckpt")[1].symmetries == []
    del ckpt["datamodule_hyper_parameters"]  # recorded nowhere: TTA's own fallback decides
    torch.save(ckpt, tmp_path / "unknown.ckpt")
    assert load_predictor(tmp_path / "unknown.ckpt")[1].symmetries is None


def test_pretrained_encoder_weights_are_not_needed_to_predict(tmp_path: Path) -> None:
    """The checkpoint holds every weight: its encoder_weights file or cache may be gone."""
    from segpipe.models import SmpModel

    args = {"arch": "fpn", "encoder_name": "mobilenet_v2", "num_classes": 2}
    net = SmpModel(**args)
    ckpt = save_predict_checkpoint(
        tmp_path / "smp.ckpt",
        net={"class_path": "segpipe.models.SmpModel",
             "init_args": {**args, "encoder_weights": str(tmp_path / "gone.pth")}},
        data={"num_classes": 2, "in_channels": 3},
        state_dict={f"net.{k}": v for k, v in net.state_dict().items()},
    )
    task, _ = load_predictor(ckpt)
    assert torch.equal(task.net.state_dict()["model.segmentation_head.0.weight"],
                       net.state_dict()["model.segmentation_head.0.weight"])
