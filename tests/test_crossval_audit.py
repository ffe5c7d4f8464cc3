"""``segpipe crossval``: refusals, warnings and labels found untested by mutation testing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segpipe.cli import main
from segpipe.crossval import CrossvalError, crossval, format_table
from tests.test_crossval import _metrics, _row, _tested


def _fold(tmp_path: Path, k: int, case: str, **split) -> Path:
    return _metrics(tmp_path / f"f{k}" / "test_metrics.json", [_row(case, 0.5)],
                    split={"fold": k, **split})


def test_one_fold_alone_is_warned_about_once_naming_the_folds_missing(tmp_path: Path) -> None:
    out = crossval([str(_fold(tmp_path, 1, "p2"))])
    assert len(out["warnings"]) == 1, out["warnings"]
    assert "makes 3 folds, and fold(s) [0, 2] are not given" in out["warnings"][0]


def test_no_missing_fold_warning_when_a_run_records_no_split(tmp_path: Path) -> None:
    """A run whose test_metrics.json records no split (an older version's) could be any fold:
    the others' folds are not called missing."""
    unrecorded = _metrics(tmp_path / "old" / "test_metrics.json", [_row("p3", 0.5)])
    out = crossval([str(_fold(tmp_path, 0, "p1")), str(unrecorded)])
    assert out["warnings"] == []


@pytest.mark.parametrize("key, value", [("batchnorm_statistics", "re-estimated on 8 images"),
                                        ("eval_resize", [64, 64]),
                                        ("decision", "t (class 1) where its probability > 0.35")])
def test_folds_scored_with_other_batchnorm_statistics_resize_or_threshold_are_refused(
        tmp_path: Path, key: str, value) -> None:
    f0, f1 = _fold(tmp_path, 0, "p1"), _fold(tmp_path, 1, "p2")
    other = json.loads(f1.read_text())
    other[key] = value
    f1.write_text(json.dumps(other))
    with pytest.raises(CrossvalError, match=f"scored with different {key}"):
        crossval([str(f0), str(f1)])


def test_a_single_run_scored_on_its_test_split_is_summarised(tmp_path: Path) -> None:
    """Only folds of a case split are refused for scoring the shared test split; a run without
    val_case_fraction tested on its test split gets its mean over cases (one-run warning)."""
    run = _metrics(tmp_path / "r" / "test_metrics.json", [_row("p1", 0.5), _row("p2", 0.7)],
                   split={"scored": "test", "val_case_fraction": None, "fold": None})
    out = crossval([str(run)])
    assert out["all_cases"]["Dice_per_class_mean_over_cases"]["tumour"] == pytest.approx(0.6)
    assert len(out["warnings"]) == 1 and "one run" in out["warnings"][0]


def test_infinite_scores_are_missing_values(tmp_path: Path) -> None:
    """A hand-edited Infinity is left out of the means as NaN is, and the JSON stays strict."""
    run = _metrics(tmp_path / "r" / "test_metrics.json",
                   [_row("p1", float("inf")), _row("p2", 0.5)])
    out = crossval([str(run)])
    assert out["all_cases"]["Dice_per_class_mean_over_cases"]["tumour"] == pytest.approx(0.5)
    assert out["all_cases"]["num_cases_per_class"]["tumour"] == 1
    json.dumps(out, allow_nan=False)


def test_a_json_file_that_cannot_be_written_is_an_error(tmp_path: Path, capsys) -> None:
    run = _fold(tmp_path, 0, "p1")
    (tmp_path / "file").write_text("")
    assert main(["crossval", str(run), "--json", str(tmp_path / "file" / "cv.json")]) == 2
    err = capsys.readouterr().err
    assert "segpipe crossval: error: cannot write" in err and "Traceback" not in err


def test_a_folder_of_two_runs_is_refused(tmp_path: Path) -> None:
    """The folds' parent folder with two runs in it: one's newest test would stand for both."""
    _fold(tmp_path / "cv", 0, "p1")
    _fold(tmp_path / "cv", 1, "p2")
    with pytest.raises(CrossvalError, match="holds the test results of 2 runs"):
        crossval([str(tmp_path / "cv")])


def test_rows_are_named_by_the_recorded_fold(tmp_path: Path) -> None:
    """Each fold's row says the data.fold its test recorded (not the seed, not its place)."""
    out = crossval([str(_fold(tmp_path, 2, "p3", seed=7)), str(_fold(tmp_path, 0, "p1", seed=7))])
    assert [f["data_fold"] for f in out["folds"]] == [2, 0]
    assert {r["case"]: r["data_fold"] for r in out["cases"]} == {"p3": 2, "p1": 0}
    labels = [line.split()[:2] for line in format_table(out).splitlines()]
    assert ["fold", "2"] in labels and ["fold", "0"] in labels


def test_a_deleted_checkpoint_with_an_older_model_set_aside_is_pooled(tmp_path: Path) -> None:
    """The checkpoint a test scored was deleted (to save space); the run's earlier-1 holds an
    older fit's model, not the one tested: nothing says the test is stale, so it is pooled."""
    ckpt_dir = tmp_path / "f0" / "checkpoints"
    (ckpt_dir / "earlier-1").mkdir(parents=True)
    (ckpt_dir / "earlier-1" / "last.ckpt").write_bytes(b"model one" * 1000)
    ckpt = ckpt_dir / "last.ckpt"
    ckpt.write_bytes(b"model two" * 1000)
    metrics = _tested(tmp_path / "f0", ckpt)
    ckpt.unlink()
    out = crossval([str(tmp_path / "f0")])
    assert out["folds"][0]["path"] == str(metrics)
