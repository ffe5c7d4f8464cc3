"""``segpipe crossval``: pooling the per-case scores of k-fold test runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from segpipe.cli import main
from segpipe.crossval import CrossvalError, crossval, format_table
from tests.cli_args import TINY_UNET
from tests.data.synthetic import make_lgg_like


def _row(case: str, tumour: float | None, background: float = 0.99) -> dict:
    dice = {"background": background, "tumour": tumour}
    present = [v for v in dice.values() if v is not None]
    return {"case": case, "num_images": 1, "mDice": sum(present) / len(present),
            "mIoU": sum(present) / len(present) / 2,
            "Dice_per_class": dice, "IoU_per_class": {k: (v and v / 2) for k, v in dice.items()}}


def _metrics(path: Path, rows: list[dict], classes=("background", "tumour"),
             split: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    per_case = {"num_cases": len(rows), "cases": rows,
                "Dice_per_class_mean_over_cases": {c: None for c in classes}}
    extra = {"data_split": {"scored": "val", "val_cases": None, "val_case_fraction": 0.34,
                            "fold": 0, "seed": 0, **split}} if split is not None else {}
    path.write_text(json.dumps({"mIoU": 0.5, "per_case": per_case, **extra}))
    return path


def _tested(run: Path, ckpt: Path) -> Path:
    """A ``test_metrics.json`` in ``run`` that scored ``ckpt`` as it is now (one case)."""
    from segpipe.fileio import file_fingerprint

    metrics = _metrics(run / "lightning_logs/version_0/test_metrics.json", [_row("p1", 0.5)])
    record = json.loads(metrics.read_text())
    record["checkpoint_file"] = {"path": str(ckpt), "fingerprint": file_fingerprint(ckpt)}
    metrics.write_text(json.dumps(record))
    return metrics


def test_cases_without_a_score_are_not_counted_in_the_means(tmp_path: Path, capsys) -> None:
    """A case whose pixels are all ignored has no score: it was counted in 'cases' beside
    means taken over the others."""
    unscored = {"case": "p9", "num_images": 1, "mDice": None, "mIoU": None,
                "Dice_per_class": {"background": None, "tumour": None},
                "IoU_per_class": {"background": None, "tumour": None}}
    run = _metrics(tmp_path / "r0" / "test_metrics.json", [_row("p1", 0.5), unscored])
    assert main(["crossval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "1 case(s) without a labelled pixel have no score" in out
    table = next(line for line in out.splitlines() if line.startswith("all cases"))
    assert table.split()[2] == "1"  # "all cases" then the count
    # one run is no cross-validation: no fold wording, no spread of one value
    assert "Mean over cases, %:" in out and "did not train on it" not in out
    assert "sd of" not in out


def test_recorded_split_settings_must_make_folds_of_one_split(tmp_path: Path, capsys) -> None:
    """Runs that share no case can still be other splits' folds: the recorded settings tell."""
    fold = lambda k, case, **kw: _metrics(tmp_path / f"f{k}{kw.get('seed', '')}/test_metrics.json",  # noqa: E731
                                          [_row(case, 0.5)], split={"fold": k, **kw})
    f0, f1, f2 = fold(0, "p1"), fold(1, "p2"), fold(2, "p3")
    assert crossval([str(f0), str(f1), str(f2)])["warnings"] == []  # 1/0.34: three folds
    # a run tested without --data.fold is fold 0
    plain = _metrics(tmp_path / "plain.json", [_row("p0", 0.5)], split={"fold": None})
    assert crossval([str(plain), str(f1), str(f2)])["warnings"] == []
    # a run tested twice with MLflow: <root>/mlflow/<run id>/test_metrics.json, one run
    for run_id in ("a1", "b2"):
        _metrics(tmp_path / "mlrun" / "mlflow" / run_id / "test_metrics.json", [_row("p9", 0.5)],
                 split={"fold": 2})
    said = crossval([str(f0), str(f1), str(tmp_path / "mlrun")])["warnings"]
    assert len(said) == 1 and "mlrun holds 2 tests; its newest" in said[0]
    with pytest.raises(CrossvalError, match=r"different data.seed: .*\(seed=0\), .*\(seed=1\)"):
        crossval([str(f0), str(fold(1, "p4", seed=1))])
    with pytest.raises(CrossvalError, match="different data.val_case_fraction"):
        crossval([str(f0), str(fold(1, "p5", val_case_fraction=0.2, seed=2))])
    with pytest.raises(CrossvalError, match="fold 1 is given twice"):
        crossval([str(f1), str(_metrics(tmp_path / "again.json", [_row("p6", 0.5)],
                                         split={"fold": 1}))])
    # a fold left out, or one run alone: pooled, with a warning that says what it covers
    assert main(["crossval", str(f0), str(f2)]) == 0
    err = capsys.readouterr().err
    assert "warning: data.val_case_fraction=0.34 makes 3 folds, and fold(s) [1] are not given" in err
    # the folds' parent folder is several runs, not one (its newest file would stand for all)
    assert main(["crossval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} holds the test results of" in err and str(f0.parent) in err
    # --json at a folder: one line, before any work
    assert main(["crossval", str(f0), str(f1), str(f2), "--json", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


def test_hand_edited_rows_are_an_error_or_missing_values(tmp_path: Path) -> None:
    broken = _metrics(tmp_path / "a.json", [{"case": "p1", "mDice": 0.5}])
    with pytest.raises(CrossvalError, match="a.json: its per_case section lacks the case rows"):
        crossval([str(broken)])
    nan = _metrics(tmp_path / "b.json", [_row("p1", float("nan")), _row("p2", 0.5)])
    out = crossval([str(nan)])
    assert out["all_cases"]["Dice_per_class_mean_over_cases"]["tumour"] == pytest.approx(0.5)
    assert any("one run" in w for w in out["warnings"])
    json.dumps(out, allow_nan=False)  # strict JSON: NaN became None


def test_pools_every_case_once_and_reports_each_fold(tmp_path: Path) -> None:
    a = _metrics(tmp_path / "a/test_metrics.json", [_row("p1", 0.9), _row("p2", 0.6),
                                                    _row("p3", 0.3)])
    b = _metrics(tmp_path / "b/test_metrics.json", [_row("p4", 0.8), _row("p5", None)])
    out = crossval([str(a), str(b)])
    assert [f["num_cases"] for f in out["folds"]] == [3, 2]
    assert out["folds"][0]["Dice_per_class_mean_over_cases"]["tumour"] == pytest.approx(0.6)
    assert out["folds"][1]["Dice_per_class_mean_over_cases"]["tumour"] == pytest.approx(0.8)
    pooled = out["all_cases"]
    # the mean over the 4 cases with a tumour score, not the mean of the two fold means (0.7)
    assert pooled["num_cases"] == 5
    assert pooled["Dice_per_class_mean_over_cases"]["tumour"] == pytest.approx(2.6 / 4)
    assert pooled["IoU_per_class_mean_over_cases"]["tumour"] == pytest.approx(1.3 / 4)
    # the headline means too: over the 5 cases' mDice, not the folds' means (0.86875)
    mdice = [0.945, 0.795, 0.645, 0.895, 0.99]
    assert pooled["mDice_mean_over_cases"] == pytest.approx(sum(mdice) / 5)
    assert pooled["mIoU_mean_over_cases"] == pytest.approx(sum(mdice) / 10)
    assert out["fold_sd"]["Dice_per_class_mean_over_cases"]["tumour"] == pytest.approx(0.02 ** 0.5)  # 0.6, 0.8
    assert [f["data_fold"] for f in out["folds"]] == [None, None]  # not recorded
    assert {r["case"]: r["run"] for r in out["cases"]} == {"p1": 1, "p2": 1, "p3": 1, "p4": 2,
                                                          "p5": 2}
    # a class's mean over fewer cases than the row counts says so (it said "cases 5" only)
    assert pooled["num_cases_per_class"] == {"background": 5, "tumour": 4}
    rows = {line.split()[0] + line.split()[1]: line.split()
            for line in format_table(out).splitlines()}
    assert rows["run1"][2:] == ["3", "79.5", "39.8", "99.0", "60.0"]  # every case has a tumour
    assert rows["run2"][-2:] == ["80.0", "(1)"] and rows["allcases"][-2:] == ["65.0", "(4)"]
    assert "(n): that class's mean is over n cases" in format_table(out)


def test_a_folder_means_its_newest_test_metrics(tmp_path: Path) -> None:
    old = _metrics(tmp_path / "run/lightning_logs/version_0/test_metrics.json", [_row("p1", 0.1)])
    new = _metrics(tmp_path / "run/lightning_logs/version_1/test_metrics.json", [_row("p1", 0.7)])
    os.utime(old, (1_000_000, 1_000_000))
    out = crossval([str(tmp_path / "run")])
    assert out["folds"][0]["path"] == str(new)
    assert out["all_cases"]["Dice_per_class_mean_over_cases"]["tumour"] == pytest.approx(0.7)
    assert out["fold_sd"]["Dice_per_class_mean_over_cases"]["tumour"] is None  # one fold


def test_a_test_of_a_checkpoint_replaced_since_is_not_pooled(tmp_path: Path, capsys) -> None:
    """A fold trained again after its test: its newest test was pooled in silence, beside the
    path of the checkpoint that now holds another model."""
    ckpt_dir = tmp_path / "f0" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    ckpt = ckpt_dir / "last.ckpt"
    ckpt.write_bytes(b"model one" * 1000)
    metrics = _tested(tmp_path / "f0", ckpt)
    assert crossval([str(tmp_path / "f0")])["folds"][0]["path"] == str(metrics)
    ckpt.write_bytes(b"model two" * 1000)  # same size, other weights
    with pytest.raises(CrossvalError, match="but it was written again since, by a later fit: "
                       "that test is an earlier model's.*run `segpipe test` on that fold again"):
        crossval([str(tmp_path / "f0")])
    # given as a file, it was chosen: pooled, with the same words as a warning
    said = crossval([str(metrics)])["warnings"]
    assert any("written again since" in w and "pooled, as its file was given" in w for w in said)
    # set aside by the later fit
    (ckpt_dir / "earlier-1").mkdir()
    ckpt.rename(ckpt_dir / "earlier-1" / "last.ckpt")
    (ckpt_dir / "earlier-1" / "last.ckpt").write_bytes(b"model one" * 1000)
    with pytest.raises(CrossvalError, match="a later fit set it aside to .*earlier-1"):
        crossval([str(tmp_path / "f0")])
    # deleted (to save space): nothing says it changed
    (ckpt_dir / "earlier-1" / "last.ckpt").unlink()
    assert crossval([str(tmp_path / "f0")])["folds"][0]["path"] == str(metrics)
    # gone, and the run holds a checkpoint written after the test (a resumed fit's new best,
    # where Lightning deleted the former one)
    later = ckpt_dir / "best-epoch009.ckpt"
    later.write_bytes(b"model three")
    os.utime(later, (metrics.stat().st_mtime + 60,) * 2)
    with pytest.raises(CrossvalError, match=r"a later fit replaced it \(with best-epoch009.ckpt\)"):
        crossval([str(tmp_path / "f0")])


def test_folds_scored_otherwise_or_on_the_shared_test_split_are_refused(tmp_path: Path) -> None:
    fold = lambda k, case, **extra: _metrics(  # noqa: E731
        tmp_path / f"f{k}/test_metrics.json", [_row(case, 0.5)], split={"fold": k})
    f0, f1 = fold(0, "p1"), fold(1, "p2")
    with pytest.raises(CrossvalError, match="is given twice"):
        crossval([str(f0), str(f0)])  # said "case 'p1' is scored in both ..."
    tta = json.loads(f1.read_text())
    tta["test_time_augmentation"] = "mean of 2 view(s) over the training symmetries (hflip)"
    f1.write_text(json.dumps(tta))
    with pytest.raises(CrossvalError, match="scored with different test_time_augmentation"):
        crossval([str(f0), str(f1)])  # pooled silently
    other = json.loads(f1.read_text())  # scored other pixels: pooled silently too
    other["test_time_augmentation"], other["ignore_index"] = None, 255
    f1.write_text(json.dumps(other))
    with pytest.raises(CrossvalError, match="scored with different ignore_index"):
        crossval([str(f0), str(f1)])
    other["ignore_index"] = None
    other["partial_split"] = {"scored_images": 2, "split_images": 6, "limits": {}}
    f1.write_text(json.dumps(other))
    said = crossval([str(f0), str(f1)])["warnings"]
    assert any("scored 2 of its split's 6 images" in w for w in said), said
    shared = json.loads(f0.read_text())
    shared["data_split"]["scored"] = "test"
    f0.write_text(json.dumps(shared))
    with pytest.raises(CrossvalError, match="scored the data's test split, which every fold shares"):
        crossval([str(f0)])  # each fold then "scored" the same cases: "not folds of one split"
    # a run tested twice: the newest is pooled, and the output says so
    later = _metrics(tmp_path / "f1/lightning_logs/version_1/test_metrics.json", [_row("p2", 0.6)],
                     split={"fold": 1})
    f1.rename(tmp_path / "f1/lightning_logs/version_0.json")
    (tmp_path / "f1/lightning_logs/version_0").mkdir()
    (tmp_path / "f1/lightning_logs/version_0.json").rename(
        tmp_path / "f1/lightning_logs/version_0/test_metrics.json")
    os.utime(tmp_path / "f1/lightning_logs/version_0/test_metrics.json", (1_000_000, 1_000_000))
    out = crossval([str(fold(0, "p1")), str(tmp_path / "f1")])
    assert out["folds"][1]["path"] == str(later)
    assert any("holds 2 tests; its newest" in w for w in out["warnings"]), out["warnings"]


def test_runs_that_are_not_folds_of_one_split_are_rejected(tmp_path: Path, capsys) -> None:
    a = _metrics(tmp_path / "a.json", [_row("p1", 0.9), _row("p2", 0.5)])
    b = _metrics(tmp_path / "b.json", [_row("p2", 0.4)])
    with pytest.raises(CrossvalError, match="'p2' is scored in both .*a.json and .*b.json"):
        crossval([str(a), str(b)])
    c = _metrics(tmp_path / "c.json", [_row("p3", 0.4)], classes=("bg", "tumour"))
    with pytest.raises(CrossvalError, match="classes"):
        crossval([str(a), str(c)])
    pooled_only = tmp_path / "d.json"
    pooled_only.write_text(json.dumps({"mIoU": 0.5}))
    with pytest.raises(CrossvalError, match="d.json: no per-case scores"):
        crossval([str(pooled_only)])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CrossvalError, match="bad.json: not a readable"):
        crossval([str(tmp_path / "bad.json")])
    (tmp_path / "empty").mkdir()
    assert main(["crossval", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segpipe crossval: error:") and "run `segpipe test`" in err


def test_two_folds_end_to_end(tmp_path: Path, capsys) -> None:
    """fit + test each fold of four patients, then pool: every patient scored once; a test
    that forgets the fold is refused."""
    root = make_lgg_like(tmp_path / "lgg", n_patients=4, slices_per_patient=2, val_patients=1)
    runs = []
    for fold in (0, 1):
        run = tmp_path / f"fold{fold}"
        args = ["--config", "configs/lgg_unet.yaml", f"--data.root={root}",
                f"--trainer.default_root_dir={run}", *TINY_UNET, "--data.num_classes=2",
                "--data.crop_size=32", "--data.num_workers=0", "--trainer.logger=false",
                "--data.val_case_fraction=0.5", f"--data.fold={fold}"]
        assert main(["fit", *args, "--trainer.max_epochs=1"]) == 0
        assert main(["test", *args, "--ckpt_path", "last"]) == 0
        runs.append(run)
        # Without a logger both commands write into the run folder: the test's config went
        # over the fit's config.yaml.
        assert "ckpt_path: null" in (run / "config.yaml").read_text()
        assert "last.ckpt" in (run / "test_config.yaml").read_text()
    # resuming a fold with the same split is fine; its test is then an earlier model's, which
    # crossval refuses to pool beside the checkpoint path that now names the resumed model
    assert main(["fit", *args, "--trainer.max_epochs=2", "--ckpt_path", "last"]) == 0
    capsys.readouterr()
    assert main(["crossval", *map(str, runs)]) == 2
    err = capsys.readouterr().err
    assert f"scored {runs[1].resolve() / 'checkpoints' / 'last.ckpt'}, but it was written again" \
           in err and "run `segpipe test` on that fold again" in err
    assert main(["test", *args, "--ckpt_path", "last"]) == 0
    # fold 1's checkpoint scored on fold 0's val patients, on which it trained: refused
    capsys.readouterr()
    mixed = ["--config", "configs/lgg_unet.yaml", f"--data.root={root}",
             f"--trainer.default_root_dir={runs[1]}", *TINY_UNET, "--data.num_classes=2",
             "--data.num_workers=0", "--trainer.logger=false", "--data.val_case_fraction=0.5"]
    assert main(["test", *mixed, "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint trained on 2 of the 2 cases this val split scores" in err
    assert "It was trained with data.fold=1; now data.fold=None" in err and "Traceback" not in err
    assert main(["crossval", *map(str, runs), "--json", str(tmp_path / "cv.json")]) == 0
    printed = capsys.readouterr().out
    assert "all cases" in printed and "Dice abnormality" in printed
    out = json.loads((tmp_path / "cv.json").read_text())
    cases = [r["case"] for r in out["cases"]]
    assert len(cases) == len(set(cases)) == 4
    assert sorted(r["data_fold"] for r in out["cases"]) == [0, 0, 1, 1]
    assert [f["num_cases"] for f in out["folds"]] == [2, 2]
    # test_metrics.json names the weights it scored; crossval passes that on
    assert all(f["checkpoint"].endswith("last.ckpt") for f in out["folds"]), out["folds"]
    # rows are named by the data.fold that test_metrics.json records
    assert [f["data_fold"] for f in out["folds"]] == [0, 1]
    metrics = json.loads(Path(out["folds"][1]["path"]).read_text())
    # what a later fit's rewrite of the checkpoint is told by, and the batch size of the loss
    assert metrics["checkpoint_file"]["path"] == str(runs[1].resolve() / "checkpoints/last.ckpt")
    assert metrics["eval_batch_size"] == 4 and ":" in metrics["checkpoint_file"]["fingerprint"]
    assert metrics["data_split"] == {"scored": "val", "val_cases": None,
                                     "val_case_fraction": 0.5, "fold": 1, "seed": 0}
    report = (Path(out["folds"][1]["path"]).parent / "report.md").read_text()
    assert f"checkpoint `{metrics['checkpoint']}`" in report
    assert "\nfold 1 " in printed and "\nfold 0 " in printed
    assert "(checkpoint " in printed


def test_a_threshold_is_chosen_for_each_fold_on_the_others(tmp_path: Path) -> None:
    """Two-class folds with segpipe test's threshold sweep: each fold is scored at the threshold
    best on the other folds' cases (fold means weighed by their cases), which the best single
    threshold over all folds would flatter."""
    sweeps = [  # thresholds 0.3, 0.5, 0.7: mean Dice over cases, and the cases scored
        ([0.80, 0.70, 0.60], [2, 2, 2]),
        ([0.60, 0.70, 0.90], [2, 2, 2]),
        ([0.70, 0.80, 0.75], [4, 4, 4]),
    ]
    runs = []
    for k, (means, counts) in enumerate(sweeps):
        path = _metrics(tmp_path / f"f{k}/test_metrics.json", [_row(f"p{k}", 0.5)],
                        split={"fold": k, "val_case_fraction": 0.34})
        metrics = json.loads(path.read_text())
        metrics["threshold_sweep"] = {"class": "tumour", "thresholds": [0.3, 0.5, 0.7],
                                      "Dice_mean_over_cases": means, "num_cases": counts}
        path.write_text(json.dumps(metrics))
        runs.append(str(path))
    out = crossval(runs)["threshold"]
    # fold 0, on folds 1 and 2: 0.3 -> (1.2 + 2.8) / 6, 0.5 -> (1.4 + 3.2) / 6, 0.7 ->
    # (1.8 + 3.0) / 6, so 0.7; fold 1, on folds 0 and 2: 0.5 ((1.4 + 3.2) / 6); fold 2, on
    # folds 0 and 1: 0.3 -> 2.8 / 4, 0.5 -> 2.8 / 4, 0.7 -> 3.0 / 4, so 0.7
    assert [c["threshold"] for c in out["chosen_leaving_each_fold_out"]] == [0.7, 0.5, 0.7]
    assert out["Dice_mean_over_cases_chosen_leaving_each_fold_out"] == pytest.approx(
        (0.60 * 2 + 0.70 * 2 + 0.75 * 4) / 8)
    assert out["Dice_mean_over_cases"] == pytest.approx([5.6 / 8, 6.0 / 8, 6.0 / 8])
    text = format_table(crossval(runs))
    picks = "on the other folds' cases (fold 0 0.7, fold 1 0.5, fold 2 0.7)"
    assert picks in text
    assert "Dice tumour 70.0 mean over cases" in text
    assert "at 0.5 (the arg-max) 75.0" in text
    # a fold without the sweep (a multi-class model, an older test): no choice
    del metrics["threshold_sweep"]
    Path(runs[-1]).write_text(json.dumps(metrics))
    assert crossval(runs)["threshold"] is None
