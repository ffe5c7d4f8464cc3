"""`data.train_on_val`: the final model trained on train + val, without validation."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from segpipe.cli import main
from segpipe.data import SegmentationDataModule
from segpipe.data.datasets import DataSplitError
from tests.cli_args import TINY_UNET
from tests.data.synthetic import make_folder_dataset, make_lgg_like

TINY = [*TINY_UNET, "--data.num_workers=0"]


def test_val_is_pooled_into_train_and_cannot_be_scored(tmp_path: Path, caplog) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=6, n_val=3, n_test=2, size=(16, 16))
    held_out = SegmentationDataModule(str(root), num_classes=3)
    held_out.setup("fit")
    with caplog.at_level(logging.INFO):
        dm = SegmentationDataModule(str(root), num_classes=3, train_on_val=True)
        dm.setup("fit")
    assert "data.train_on_val: training on train + val (9 images), without validation" in caplog.text
    assert not dm.validates and held_out.validates
    train = {s.image for s in dm.splits["train"]}
    assert train == {s.image for s in [*held_out.splits["train"], *held_out.splits["val"]]}
    assert dm.splits["val"] == [] and "val" not in dm.datasets  # fit builds train only
    assert len(dm.datasets["train"]) == 9
    assert dm.state_dict()["trained_on_val"] is True
    assert held_out.state_dict()["trained_on_val"] is False
    with pytest.raises(DataSplitError, match="data.train_on_val trains on the val split"):
        dm.setup("validate")
    dm.setup("test")  # the data set's own test split is still there to score
    assert len(dm.datasets["test"]) == 2


def _val_columns(run: Path) -> list[str]:
    """Columns of the run's metrics.csv (CSV logger) that are validation metrics."""
    (metrics_csv,) = run.rglob("metrics.csv")
    with metrics_csv.open(newline="") as f:
        header = next(csv.reader(f))
    return [c for c in header if c.startswith("val/")]


def test_fit_without_validation_then_test_on_the_test_split(tmp_path: Path, capsys) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=6, n_val=3, n_test=2, size=(40, 40))
    run = tmp_path / "run"
    args = ["--config", "configs/folder_unet.yaml", f"--data.root={root}",
            f"--trainer.default_root_dir={run}", *TINY]
    assert main(["fit", *args, "--data.train_on_val=true", "--trainer.max_epochs=2"]) == 0
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt"]  # nothing to rank a best-* by
    assert _val_columns(run) == []  # no validation ran, not even the sanity check
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 1 and state["SegmentationDataModule"]["trained_on_val"] is True
    capsys.readouterr()

    # `--ckpt_path best` names the last checkpoint; the test split is scored.
    assert main(["test", *args, "--data.train_on_val=true", "--ckpt_path=best"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(Path(out.split("Test metrics written to ")[1].split()[0]).read_text())
    assert metrics["num_images"] == 2

    # Its val split was trained on: validating it, with or without the option, is refused.
    assert main(["validate", *args, "--data.train_on_val=true", "--ckpt_path=last"]) == 2
    assert "data.train_on_val trains on the val split" in capsys.readouterr().err
    assert main(["validate", *args, "--ckpt_path=last"]) == 2
    assert "trained with data.train_on_val" in capsys.readouterr().err


def test_a_case_split_trains_on_every_case(tmp_path: Path, capsys) -> None:
    root = make_lgg_like(tmp_path / "lgg", n_patients=4, slices_per_patient=2, val_patients=2)
    run = tmp_path / "run"
    args = ["--config", "configs/lgg_unet.yaml", f"--data.root={root}",
            f"--trainer.default_root_dir={run}", *TINY, "--data.num_classes=2",
            "--trainer.logger=false", "--data.val_case_fraction=0.5"]
    assert main(["fit", *args, "--data.train_on_val=true", "--trainer.max_epochs=1"]) == 0
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert len(state["SegmentationDataModule"]["train_cases"]) == 4  # all patients
    capsys.readouterr()
    # LGG has no test split, so `test` scores val, which this model trained on.
    assert main(["test", *args, "--ckpt_path=best"]) == 2
    assert "trained with data.train_on_val: its training data held this val split" in capsys.readouterr().err
