"""Checkpoint bookkeeping and option checks of segpipe's LightningCLI, tested without a
training run where the existing tests ran them without looking (found by mutation testing):
``--ckpt_path best`` in a moved run folder, setting earlier checkpoints aside, fit locks,
which of several values given for an option counts, process ranks and the data root."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint

from segpipe import lightning_cli
from segpipe.data import SegmentationDataModule
from segpipe.data.datasets import DataRootError
from segpipe.errors import ConfigError
from segpipe.fileio import TMP_PREFIX, OutputDirError
from segpipe.lightning_cli import (
    SegpipeCLI,
    _FitLock,
    _MonitorNames,
    _one_batch_limits,
    _overridden_by_a_later_config,
    _settings_given,
    _shown,
    is_rank_zero,
    resolve_checkpoint_alias,
    set_aside_earlier_checkpoints,
    set_aside_unrecorded_checkpoints,
)


class SubclassedData(SegmentationDataModule):
    """A user's data module built on segpipe's (importable by class_path)."""


def _ckpt(path: Path, age: float = 0.0, **content) -> Path:
    torch.save({"state_dict": {}, **content}, path)
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def _recording(best: str, **extra) -> dict:
    return {"callbacks": {"ModelCheckpoint{'monitor': 'val/mIoU', 'mode': 'max'}":
                          {"best_model_path": best, **extra}}}


def test_best_is_the_recorded_best_after_the_run_folder_was_moved(tmp_path: Path) -> None:
    """last.ckpt records the best model's path where the run was trained; in a moved (or
    copied) run folder, ``--ckpt_path best`` is that file in this folder, not merely the newest
    other checkpoint."""
    ckpts = tmp_path / "moved" / "checkpoints"
    ckpts.mkdir(parents=True)
    best = _ckpt(ckpts / "best-epoch002-mIoU0.7000.ckpt", 300)
    _ckpt(ckpts / "best-epoch005-mIoU0.6000.ckpt", 100)  # newer, but not the recorded best
    _ckpt(ckpts / "last.ckpt", 10, **_recording(f"/elsewhere/checkpoints/{best.name}"))
    assert resolve_checkpoint_alias("best", ckpts) == str(best)


def test_best_never_picks_a_checkpoint_that_is_still_being_written(tmp_path: Path) -> None:
    """Without a recorded best, ``--ckpt_path best`` is the newest finished checkpoint: a
    temporary file of a write in progress (or interrupted) is not a checkpoint."""
    done = _ckpt(tmp_path / "best-epoch001-mIoU0.5000.ckpt", 100)
    _ckpt(tmp_path / f"{TMP_PREFIX}node.1-abc.ckpt", 1)
    assert resolve_checkpoint_alias("best", tmp_path) == str(done)


def test_best_of_a_run_trained_without_validation_is_its_last_checkpoint(tmp_path: Path) -> None:
    """A run trained on its val split (``data.train_on_val``) has no best-* file: ``best`` is
    its last.ckpt; a run that validated but left no best is refused with what to run."""
    last = _ckpt(tmp_path / "last.ckpt", 0, datamodule_hyper_parameters={"trained_on_val": True})
    assert resolve_checkpoint_alias("best", tmp_path) == str(last)
    _ckpt(last, 0, datamodule_hyper_parameters={"trained_on_val": False})
    with pytest.raises(FileNotFoundError, match="no best checkpoint in"):
        resolve_checkpoint_alias("best", tmp_path)


def test_earlier_checkpoints_go_to_the_next_free_folder_when_the_planned_one_was_taken(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The folder chosen when the fit started may exist by the time training starts (another
    command made it): the checkpoints go to the next free ``earlier-K``, none is lost."""
    caplog.set_level(logging.INFO)
    _ckpt(tmp_path / "last.ckpt")
    planned = tmp_path / "earlier-1"
    planned.mkdir()
    (planned / "last.ckpt").write_bytes(b"another run's")
    dest = set_aside_earlier_checkpoints(tmp_path, dest=planned)
    assert dest == tmp_path / "earlier-2"
    assert (dest / "last.ckpt").is_file() and not (tmp_path / "last.ckpt").exists()
    assert (planned / "last.ckpt").read_bytes() == b"another run's"


def test_resuming_keeps_the_checkpoints_its_resume_point_records(tmp_path: Path) -> None:
    """Checkpoints newer than the resume point that its callback state names (here one of
    its top-k) are the resumed run's own and stay; only an unrecorded one is moved aside."""
    resume = _ckpt(tmp_path / "last.ckpt", 100, **_recording(
        str(tmp_path / "best-a.ckpt"),
        best_k_models={str(tmp_path / "best-a.ckpt"): 0.5, str(tmp_path / "best-b.ckpt"): 0.4}))
    for name in ("best-a.ckpt", "best-b.ckpt", "best-c.ckpt"):
        _ckpt(tmp_path / name, 10)
    dest = set_aside_unrecorded_checkpoints(tmp_path, resume)
    assert dest is not None and sorted(p.name for p in dest.iterdir()) == ["best-c.ckpt"]
    assert (tmp_path / "best-a.ckpt").is_file() and (tmp_path / "best-b.ckpt").is_file()


def test_resuming_from_another_folder_moves_nothing_here(tmp_path: Path) -> None:
    """A resume point outside the checkpoint folder says nothing about this folder's files:
    none of them is moved."""
    other = tmp_path / "other"
    other.mkdir()
    resume = _ckpt(other / "last.ckpt", 100)
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _ckpt(ckpts / "best-x.ckpt", 10)
    assert set_aside_unrecorded_checkpoints(ckpts, resume) is None
    assert (ckpts / "best-x.ckpt").is_file()


def test_a_lock_left_by_a_killed_fit_on_another_machine_expires(tmp_path: Path) -> None:
    """Another machine's lock stops a fit while it is fresh (naming its process), and is
    removed once unchanged for longer than a live fit leaves it (a killed fit's), so the
    folder is not locked forever."""
    lock = tmp_path / f"{TMP_PREFIX}00000000.4242-abc{_FitLock.SUFFIX}"
    lock.write_text("nodeB 4242\n")
    said = _FitLock(tmp_path)._other_fit()
    assert said is not None and "process 4242 on nodeB" in said
    old = time.time() - _FitLock.STALE_S - 60
    os.utime(lock, (old, old))
    assert _FitLock(tmp_path)._other_fit() is None
    assert not lock.exists()


def test_the_value_given_last_counts_when_an_option_is_given_twice(tmp_path: Path) -> None:
    """``--trainer.limit_train_batches 1 --config c.yaml`` where the file gives 1.0 trains on
    every batch (the file's value, given later, is used), and the reverse order on one."""
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  limit_train_batches: 1.0\n")
    cfg = Namespace(trainer=Namespace(limit_train_batches=1.0, limit_val_batches=None,
                                      limit_test_batches=None, limit_predict_batches=None))
    assert _one_batch_limits(cfg, ["--trainer.limit_train_batches", "1",
                                   "--config", str(config)]) == []
    assert _one_batch_limits(cfg, ["--config", str(config),
                                   "--trainer.limit_train_batches", "1"]) == ["limit_train_batches"]


@pytest.mark.parametrize("env, zero", [({}, True), ({"RANK": "1"}, False),
                                       ({"LOCAL_RANK": "2"}, False), ({"NODE_RANK": "1"}, False),
                                       ({"RANK": "0", "LOCAL_RANK": "0"}, True)])
def test_only_the_process_of_rank_zero_is_rank_zero(env, zero, monkeypatch) -> None:
    """Before Lightning sets up, a launcher's RANK, LOCAL_RANK or NODE_RANK other than 0 makes
    a process not rank 0 (which must not move checkpoints or reserve log folders)."""
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_rank_zero() is zero


def test_a_data_root_that_is_a_file_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    """``data.root`` naming a file (an archive not unpacked, a list file) is one line, as a
    missing root is."""
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK")
    cfg = Namespace(data=Namespace(class_path="segpipe.data.SegmentationDataModule",
                                   init_args=Namespace(root=str(archive), layout="folder")))
    with pytest.raises(DataRootError, match="does not exist or is not a folder"):
        SegpipeCLI._check_data_root(cfg)


def test_a_subclass_of_segpipes_data_module_gets_the_data_root_check(tmp_path: Path) -> None:
    """A user's subclass of SegmentationDataModule (by class_path) has its missing root named
    in one line too."""
    cfg = Namespace(data=Namespace(class_path=f"{__name__}.SubclassedData",
                                   init_args=Namespace(root=str(tmp_path / "nope"),
                                                       layout="folder")))
    with pytest.raises(DataRootError, match="does not exist or is not a folder"):
        SegpipeCLI._check_data_root(cfg)


def test_the_data_spec_is_never_a_model_setting_the_command_gave() -> None:
    """A resumed fit or a test names the model settings it gave that the checkpoint's replace;
    the data spec (set from the data section, and checked against the checkpoint separately)
    is never among them, only the settings that differ from the defaults are."""
    model = Namespace(data_spec=Namespace(num_classes=3, mean=[0.5, 0.5, 0.5]), lr=0.1,
                      freeze_encoder=False)
    defaults = Namespace(data_spec=None, lr=0.01, freeze_encoder=False)
    assert _settings_given(model, defaults) == {"lr": 0.1}


def test_settings_are_shown_as_they_would_be_typed() -> None:
    """The warning that names replaced settings shows values as an option takes them:
    ``true``/``false`` and ``null``, lists for tuples."""
    assert [_shown(True), _shown(False), _shown(None), _shown((1, 2)), _shown(0.5)] == \
        ["true", "false", "null", "[1, 2]", "0.5"]


def test_ckpt_path_before_a_config_is_not_called_overridden(tmp_path: Path) -> None:
    """``--ckpt_path`` holds wherever it is typed (a run's config.yaml says ``ckpt_path:
    null``): no warning that the file's value is used; other options before it are named."""
    config = tmp_path / "config.yaml"
    config.write_text("ckpt_path: null\ntrainer:\n  max_epochs: 3\n")
    assert _overridden_by_a_later_config(
        ["--ckpt_path", "last", "--config", str(config)]) == []
    assert _overridden_by_a_later_config(
        ["--ckpt_path=last", "--trainer.max_epochs=1", "--config", str(config)]) == [
            ("--trainer.max_epochs", str(config))]


def test_a_data_option_before_a_config_that_gives_the_data_class_is_named(tmp_path: Path) -> None:
    """``--data.batch_size 2 --config c.yaml`` where the file writes the data module with its
    ``class_path`` and ``init_args`` is named as overridden, as the short form is."""
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  class_path: segpipe.data.SegmentationDataModule\n"
                      "  init_args:\n    batch_size: 4\n")
    assert _overridden_by_a_later_config(["--data.batch_size", "2", "--config", str(config)]) \
        == [("--data.batch_size", str(config))]


def test_a_training_metric_may_be_monitored_before_training_logs_it() -> None:
    """After the sanity check only ``val/`` monitors are checked against what validation
    logs: ``checkpoint.monitor train/loss`` (logged once training runs) passes, a misspelt
    ``val/`` metric is refused with the close name."""
    def trainer(monitor: str) -> SimpleNamespace:
        return SimpleNamespace(callback_metrics={"val/mIoU": 0.5, "val/loss": 1.0},
                               checkpoint_callbacks=[ModelCheckpoint(monitor=monitor)],
                               lr_scheduler_configs=[])

    module = SimpleNamespace(class_names=["background", "road"])
    _MonitorNames().on_sanity_check_end(trainer("train/loss"), module)
    with pytest.raises(ConfigError, match="checkpoint.monitor val/miou is not a metric "
                                          "validation logs; did you mean val/mIoU?"):
        _MonitorNames().on_sanity_check_end(trainer("val/miou"), module)


def test_limit_batches_1_in_a_config_file_is_one_batch(tmp_path: Path) -> None:
    """``limit_val_batches: 1`` in a config file (YAML's integer 1, which jsonargparse reads
    as 1.0, every batch) is one batch as Lightning means it; ``1.0`` there stays every batch."""
    cfg = Namespace(trainer=Namespace(limit_train_batches=1.0, limit_val_batches=1.0,
                                      limit_test_batches=None, limit_predict_batches=None))
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  limit_train_batches: 1.0\n  limit_val_batches: 1\n")
    assert _one_batch_limits(cfg, ["--config", str(config)]) == ["limit_val_batches"]


def test_a_fit_on_the_val_split_switches_off_validation_and_best_ranking(tmp_path: Path) -> None:
    """With a data module that trains on its val split (``data.train_on_val``) there is no
    validation to run or to rank checkpoints by: no val batches, no sanity check, and the
    val-monitoring checkpoint keeps no best-* (last.ckpt is the model)."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/mIoU", save_top_k=1)
    trainer = SimpleNamespace(checkpoint_callbacks=[checkpoint], limit_val_batches=1.0,
                              num_sanity_val_steps=2)
    cli = SimpleNamespace(trainer=trainer, subcommand="fit",
                          config=Namespace(fit=Namespace(ckpt_path=None)),
                          datamodule=SimpleNamespace(validates=False),
                          model=torch.nn.Linear(2, 2))
    SegpipeCLI.before_fit(cli)
    assert (trainer.limit_val_batches, trainer.num_sanity_val_steps) == (0, 0)
    assert checkpoint.save_top_k == 0


def test_resuming_a_run_kept_elsewhere_into_an_empty_folder_is_allowed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fit --ckpt_path OLD/last.ckpt`` writing into a new folder resumes (the old run's
    checkpoints are safe); only a folder holding another run's last.ckpt, which the fit would
    overwrite, is refused."""
    monkeypatch.setattr(lightning_cli, "_MADE_DIRS", [])
    old = tmp_path / "old" / "checkpoints"
    old.mkdir(parents=True)
    resume = _ckpt(old / "last.ckpt")
    new = tmp_path / "new"

    def cfg() -> Namespace:
        return Namespace(trainer=Namespace(default_root_dir=str(new), logger=False,
                                           fast_dev_run=False),
                         checkpoint=Namespace(dirpath=str(new / "checkpoints")),
                         ckpt_path=str(resume), weights_only=True, model=Namespace(init_from=None),
                         data=Namespace(class_path="segpipe.data.SegmentationDataModule",
                                        init_args=Namespace(class_names=None)))

    cli = SimpleNamespace()
    SegpipeCLI._check_outputs(cli, cfg(), "fit")
    assert cli._set_aside.resume == resume
    _ckpt(new / "checkpoints" / "last.ckpt")
    with pytest.raises(OutputDirError, match="whose last.ckpt is another run's"):
        SegpipeCLI._check_outputs(SimpleNamespace(), cfg(), "fit")
