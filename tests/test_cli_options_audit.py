"""Option handling of segpipe's LightningCLI that needs no training run: ``~`` in path options,
``--ckpt_path best`` without a recorded best model, and a data root under the home folder."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace

from segpipe.lightning_cli import SegpipeCLI, _expand_home, resolve_checkpoint_alias


def test_every_path_option_expands_a_leading_tilde(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``~`` in trainer.default_root_dir, checkpoint.dirpath, ckpt_path and model.init_from
    (from a config file or ``--option=~/x``, which no shell expands) means the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = Namespace(trainer=Namespace(default_root_dir="~/run"),
                    checkpoint=Namespace(dirpath="~/run/ck"), ckpt_path="~/run/last.ckpt",
                    model=Namespace(init_from="~/other/best.ckpt"))
    _expand_home(cfg)
    assert cfg.trainer.default_root_dir == str(tmp_path / "run")
    assert cfg.checkpoint.dirpath == str(tmp_path / "run" / "ck")
    assert cfg.ckpt_path == str(tmp_path / "run" / "last.ckpt")
    assert cfg.model.init_from == str(tmp_path / "other" / "best.ckpt")


def _ckpt(path: Path, age: float, **extra) -> Path:
    torch.save({"state_dict": {}, **extra}, path)
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_best_without_a_recorded_best_is_the_newest_other_checkpoint(tmp_path: Path) -> None:
    """When last.ckpt records no best model, ``--ckpt_path best`` is the newest checkpoint other
    than last.ckpt: never last.ckpt itself (the newest file of any run), never an older best."""
    _ckpt(tmp_path / "best-epoch001.ckpt", 300)
    newer = _ckpt(tmp_path / "best-epoch004.ckpt", 200)
    last = _ckpt(tmp_path / "last.ckpt", 10)
    assert resolve_checkpoint_alias("best", tmp_path) == str(newer)
    assert resolve_checkpoint_alias("last", tmp_path) == str(last)


def test_a_data_root_under_the_home_folder_is_found(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``data.root: ~/data`` is the folder in the home folder, not a missing one."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    cfg = Namespace(data=Namespace(class_path="segpipe.data.SegmentationDataModule",
                                   init_args=Namespace(root="~/data", layout="folder")))
    SegpipeCLI._check_data_root(cfg)  # no DataRootError
