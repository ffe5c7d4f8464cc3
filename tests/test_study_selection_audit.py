"""scripts/study_selection.py: its criteria's arithmetic, the honest halves and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.scripts import load_script


def _script():
    return load_script("study_selection")


def _cm(tp: int, fn: int, fp: int, tn: int) -> list[list[int]]:
    return [[tn, fp], [fn, tp]]


def _record(path: Path, epochs: list[dict[str, list[list[int]]]]) -> Path:
    path.write_text("".join(json.dumps({"epoch": e, "step": e, "cases": cases}) + "\n"
                            for e, cases in enumerate(epochs)))
    return path


def test_pooled_miou_pools_the_counts_and_leaves_absent_classes_out() -> None:
    """val/mIoU pools every case's pixels, and a class in neither truth nor prediction does not
    count as an IoU of 0."""
    study = _script()
    cms = np.zeros((1, 2, 3, 3))
    cms[0, 0, 0, 0] = 3  # case a: 3 pixels of class 0, right
    cms[0, 0, 1, 1] = 1  # and 1 of class 1, right
    cms[0, 1, 0, 0] = 4  # case b: class 0 only; class 2 nowhere
    assert study.pooled_miou(cms) == pytest.approx([1.0])


def test_an_epoch_without_a_score_loses_to_a_score_of_zero() -> None:
    study = _script()
    assert study.first_best(np.array([np.nan, 0.0])) == 1


def test_halvings_of_identical_cases_score_each_choice_as_it_is(tmp_path: Path) -> None:
    """With every case alike, each criterion's choice (the best epoch), the last epoch and the
    oracle are scored at their own epoch's Dice; a criterion no better than mIoU pooled counts
    as neither better nor worse."""
    epochs = [{c: cm for c in "abcd"} for cm in (_cm(5, 5, 0, 90), _cm(8, 2, 2, 88),
                                                 _cm(6, 4, 1, 89))]
    record = _record(tmp_path / "rec.jsonl", epochs)
    study = _script()
    dice = [10 / 15, 16 / 20, 12 / 17]  # 2 tp / (2 tp + fn + fp) of each epoch
    crit = study.analyse(record, k=1, splits=5, seed=0)["criteria"]
    for name in ("mIoU pooled", "Dice pooled", "Dice mean over cases", "oracle"):
        assert crit[name]["mean"] == pytest.approx(dice[1]), name
    assert crit["last"]["mean"] == pytest.approx(dice[2])
    assert crit["Dice pooled"]["better_share"] == crit["Dice pooled"]["worse_share"] == 0.0
    assert crit["last"]["worse_share"] == 1.0


def test_the_choice_is_scored_on_the_unseen_half(tmp_path: Path) -> None:
    """Cases a and b peak at epoch 0, c and d at epoch 1: a half A with one of each ties and
    chooses epoch 0, which half B may not share, so the choice scores below the oracle."""
    good, poor = _cm(9, 1, 0, 90), _cm(1, 9, 0, 90)
    record = _record(tmp_path / "rec.jsonl", [{"a": good, "b": good, "c": poor, "d": poor},
                                              {"a": poor, "b": poor, "c": good, "d": good}])
    crit = _script().analyse(record, k=1, splits=50, seed=0)["criteria"]
    assert crit["Dice mean over cases"]["mean"] < crit["oracle"]["mean"] - 0.05


def test_a_half_without_the_class_scores_zero_not_nan(tmp_path: Path) -> None:
    """A half B whose cases all lack the class (in truth and prediction) scores 0, so that
    the means over halvings stay numbers."""
    empty = _cm(0, 0, 0, 100)
    record = _record(tmp_path / "rec.jsonl",
                     [{"a": _cm(5, 5, 0, 90), "b": _cm(5, 5, 0, 90), "c": empty, "d": empty},
                      {"a": _cm(8, 2, 0, 90), "b": _cm(8, 2, 0, 90), "c": empty, "d": empty}])
    crit = _script().analyse(record, k=1, splits=40, seed=0)["criteria"]
    assert all(np.isfinite(c["mean"]) for c in crit.values()), crit
    assert crit["oracle"]["mean"] < 0.8  # some halves B held c and d only


def test_cases_missing_from_a_validation_are_left_out(tmp_path: Path) -> None:
    """Only the cases every validation scored are compared (a case seen once is dropped)."""
    cm = _cm(5, 5, 0, 90)
    record = _record(tmp_path / "rec.jsonl", [{"a": cm, "b": cm, "c": cm, "d": cm, "e": cm},
                                              {"a": cm, "b": cm, "c": cm, "d": cm}])
    epochs, cases, cms = _script().read_record(record)
    assert cases == list("abcd") and cms.shape == (2, 4, 2, 2)


def test_too_few_cases_or_a_class_beyond_the_record_are_refused(tmp_path: Path) -> None:
    """Halves need four cases; a class index the record has not is named with the range."""
    study = _script()
    cm = _cm(5, 5, 0, 90)
    three = _record(tmp_path / "three.jsonl", [{"a": cm, "b": cm, "c": cm}])
    with pytest.raises(SystemExit, match="3 val cases; halves need at least 4"):
        study.analyse(three, k=1, splits=5, seed=0)
    four = _record(tmp_path / "four.jsonl", [{"a": cm, "b": cm, "c": cm, "d": cm}])
    with pytest.raises(SystemExit, match=r"--class-index 2: the record has classes 0\.\.1"):
        study.analyse(four, k=2, splits=5, seed=0)
