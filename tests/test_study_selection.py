"""scripts/study_selection.py: its record of a real fit, and its comparison by split halves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.data.synthetic import make_lgg_like
from tests.scripts import load_script


def _script():
    return load_script("study_selection")


def _cm(tp: int, fn: int, fp: int, tn: int) -> list[list[int]]:
    return [[tn, fp], [fn, tp]]


def test_criteria_choose_on_one_half_and_score_on_the_other(tmp_path: Path, capsys) -> None:
    study = _script()
    # Epoch 0: one huge case perfect, three small ones poor (pooled figures high, the mean over
    # cases low); epoch 1: every case fair (the mean over cases high).
    big0, small0 = _cm(900, 0, 0, 9000), _cm(1, 9, 0, 90)
    big1, small1 = _cm(700, 200, 0, 9000), _cm(8, 2, 0, 90)
    record = tmp_path / "rec.jsonl"
    rows = [{"epoch": 0, "step": 5, "cases": {"a": big0, "b": small0, "c": small0, "d": small0,
                                              "e": big0, "f": small0}},
            {"epoch": 1, "step": 10, "cases": {"a": big1, "b": small1, "c": small1, "d": small1,
                                               "e": big1, "f": small1}}]
    record.write_text("".join(json.dumps(r) + "\n" for r in rows))
    epochs, cases, cms = study.read_record(record)
    assert epochs == [0, 1] and cases == list("abcdef") and cms.shape == (2, 6, 2, 2)
    dice_small0, dice_small1, dice_big1 = 2 / 11, 16 / 18, 1400 / 1600
    assert study.case_mean_dice(cms, 1) == pytest.approx(
        [(2 + 4 * dice_small0) / 6, (2 * dice_big1 + 4 * dice_small1) / 6])
    assert study.dice(cms.sum(axis=1), 1)[0] > study.dice(cms.sum(axis=1), 1)[1]
    result = study.analyse(record, k=1, splits=200, seed=0)
    crit = result["criteria"]
    # Whenever half A holds a big case, the pooled criteria pick epoch 0, which half B's
    # small cases score worse: the mean over cases chooses better on unseen cases here.
    assert crit["Dice mean over cases"]["mean"] > crit["mIoU pooled"]["mean"]
    assert crit["Dice mean over cases"]["worse_share"] == 0.0
    assert crit["oracle"]["mean"] >= crit["Dice mean over cases"]["mean"]
    out = capsys.readouterr().out
    assert "6 val cases, class 1" in out and "chooses epoch    0" in out


def test_the_record_of_a_fit(tmp_path: Path, capsys) -> None:
    study = _script()
    root = make_lgg_like(tmp_path / "lgg", n_patients=8, slices_per_patient=1, val_patients=2)
    record = tmp_path / "rec.jsonl"
    assert study.main([
        "--record", str(record), "--splits", "10", "--",
        "--config", "configs/lgg_unet.yaml", f"--data.root={root}",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--model.net.init_args.base_channels=4",
        "--model.net.init_args.depth=2", "--data.crop_size=32", "--data.num_workers=0",
        "--data.val_case_fraction=0.5", "--trainer.max_time=null", "--trainer.max_epochs=2",
        "--trainer.check_val_every_n_epoch=1", "--trainer.enable_progress_bar=false",
        "--trainer.logger=false", "--trainer.accelerator=cpu"]) == 0
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]  # no sanity-check row
    assert len(rows[0]["cases"]) == 4 and all(
        np.array(cm).shape == (2, 2) for cm in rows[0]["cases"].values())
    # every val pixel of a case counted once: 1 slice of 32 x 32 (make_lgg_like's size)
    assert {int(np.sum(cm)) for cm in rows[1]["cases"].values()} == {32 * 32}
    assert "Chosen on half A, scored on the unseen half B (10 random halvings" in \
        capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists"):
        study.main(["--record", str(record), "--", "--config", "configs/lgg_unet.yaml"])


def test_an_epoch_without_a_score_is_never_chosen() -> None:
    study = _script()
    assert study.first_best(np.array([np.nan, 0.5, 0.7, 0.7])) == 2  # first of ties, NaN loses
    assert study.first_best(np.array([np.nan, np.nan])) == 0
