"""Pool the per-case scores of k-fold ``segpipe test`` runs into one cross-validated figure.

Train and test one run per fold (``--data.val_case_fraction 0.2 --data.fold k`` for k in 0..4:
five folds by case), then::

    segpipe crossval runs/fold0 runs/fold1 runs/fold2 runs/fold3 runs/fold4 [--json cv.json]

Each argument is a ``test_metrics.json`` or a folder holding one (the newest under it is read).
It prints, per fold (named by the ``data.fold`` each ``test_metrics.json`` records, else "run N"
in the order given) and over all folds, the number of cases, the mean over cases of mDice and
mIoU and each class's Dice. Over all folds every case was scored once, by the model that did not
train on it, so the mean over all cases is the k-fold figure (what nnU-Net's cross-validation
reports); the spread of the fold means (sample standard deviation) says how much one fold alone
could have misled. Runs that are not folds of one split are an error: a case scored in two runs,
the same ``data.fold`` twice, or other ``data.seed``/``val_case_fraction`` than the others (as
each ``test_metrics.json`` records them). Folds missing from the ``1 / val_case_fraction`` the runs
record, or a single run, are warned about: the pooled figure then covers part of the data.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segpipe.argparsing import CommandParser
from segpipe.fileio import atomic_write_json, file_fingerprint

__all__ = ["crossval", "main"]

_METRICS_FILE = "test_metrics.json"


class CrossvalError(ValueError):
    """Runs that cannot be pooled; the message names the file and the fix."""


#: The folders of a run's tests: ``lightning_logs/version_N`` (TensorBoard, CSV), and
#: ``<logger>/<run id>`` for the loggers whose store is shared (segpipe.tracking.run_output_dir).
_TEST_FOLDERS = ("lightning_logs", "mlflow", "wandb", "comet", "neptune")


def _run_root(metrics_file: Path) -> Path:
    """The run folder a ``test_metrics.json`` belongs to: the folder above its
    ``lightning_logs/version_*`` or ``mlflow/<run id>`` (or its own folder elsewhere)."""
    parent = metrics_file.parent
    if parent.parent.name in _TEST_FOLDERS:
        return parent.parent.parent
    return parent


def _metrics_path(arg: str) -> tuple[Path, int]:
    """``arg`` itself, or the newest ``test_metrics.json`` under the run folder ``arg``; and
    how many there were to choose from (1 for a file).

    Raises:
        CrossvalError: Nothing there, or a folder holding the results of several runs (the
            folds' parent folder), whose newest alone would stand for all of them.
    """
    path = Path(arg).expanduser()
    if path.is_file():
        return path, 1
    if not path.is_dir():
        raise CrossvalError(f"{path}: no such file or folder; give a run's folder or its "
                            f"{_METRICS_FILE}")
    found = sorted(path.rglob(_METRICS_FILE), key=lambda p: p.stat().st_mtime)
    if not found:
        raise CrossvalError(f"{path}: no {_METRICS_FILE} under it; run `segpipe test` on that "
                            f"run first (same config and --data.fold, --ckpt_path best)")
    runs = sorted({_run_root(p) for p in found})
    if len(runs) > 1:
        shown = " ".join(str(r) for r in runs[:6]) + (" ..." if len(runs) > 6 else "")
        raise CrossvalError(
            f"{path} holds the test results of {len(runs)} runs; give each fold's run folder: "
            f"segpipe crossval {shown}")
    return found[-1], len(found)


def _scored_checkpoint(path: Path, metrics: dict[str, Any], explicit: bool) -> str | None:
    """Check that the checkpoint a test scored is still the one its run holds.

    A fold trained again after its test (a rerun, another recipe) rewrites ``last.ckpt`` and
    sets the former checkpoints aside in ``earlier-K``: its newest test is then an earlier
    model's, and would be pooled beside a checkpoint path that now names another model.

    Args:
        path: The ``test_metrics.json``.
        metrics: Its contents (``checkpoint_file``: the path and fingerprint the test recorded;
            tests of older versions recorded none and are not checked).
        explicit: Whether ``path`` was given as a file (its test chosen on purpose): a warning
            then, an error when it was picked as its run folder's newest.

    Returns:
        A warning, or None.

    Raises:
        CrossvalError: The run's checkpoint was replaced or set aside since the test, and the
            test was picked from the run folder.
    """
    record = metrics.get("checkpoint_file")
    if not isinstance(record, dict) or not record.get("path") or not record.get("fingerprint"):
        return None
    ckpt = Path(str(record["path"]))
    now = _fingerprint_or_none(ckpt)
    if now == record["fingerprint"]:
        return None
    aside = [p for p in sorted(ckpt.parent.glob(f"earlier-*/{ckpt.name}"))
             if _fingerprint_or_none(p) == record["fingerprint"]]
    newer = []
    if now is None and not aside:
        # gone: deleted to save space (nothing says it changed), or replaced by a later fit's
        # better checkpoint (Lightning deletes the former best), whose files are then newer
        tested = path.stat().st_mtime
        newer = [p for p in sorted(ckpt.parent.glob("*.ckpt")) if p.stat().st_mtime > tested]
        if not newer:
            return None
    what = (f"a later fit set it aside to {aside[-1].parent}" if aside
            else f"a later fit replaced it (with {newer[-1].name})" if newer
            else "it was written again since, by a later fit")
    message = (f"{path} scored {ckpt}, but {what}: that test is an earlier model's, not the "
               "model the run holds now")
    if explicit:
        return message + " (pooled, as its file was given)"
    raise CrossvalError(message + "; run `segpipe test` on that fold again (--ckpt_path best), "
                        "or give this test_metrics.json file to pool the earlier model's test")


def _fingerprint_or_none(path: Path) -> str | None:
    try:
        return file_fingerprint(path)
    except OSError:
        return None


def _split_of(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The case split ``segpipe test`` recorded (``val_case_fraction``, ``fold``, ``seed``,
    ``val_cases``, the split ``scored``), or None."""
    split = metrics.get("data_split")
    return split if isinstance(split, dict) else None


def _check_folds(runs: list[tuple[Path, dict[str, Any] | None]]) -> list[str]:
    """Refuse runs that are not folds of one split; warn of missing folds or a single run.

    Args:
        runs: Each run's ``test_metrics.json`` and recorded split.

    Returns:
        Warnings (folds missing, one run).

    Raises:
        CrossvalError: Runs drawn with other split settings, or the same fold twice.
    """
    recorded = [(p, s) for p, s in runs if s is not None and s.get("val_case_fraction")]
    for key in ("val_case_fraction", "seed", "val_cases", "scored"):
        values = {json.dumps(s.get(key)) for _, s in recorded}
        if len(values) > 1:
            which = ", ".join(f"{p} ({key}={s.get(key)})" for p, s in recorded)
            raise CrossvalError(
                f"the runs were split with different data.{key}: {which}; the folds of one "
                "split share data.seed and data.val_case_fraction and differ in data.fold only")
    folds: dict[int, Path] = {}
    for p, s in recorded:
        fold = s.get("fold")
        fold = 0 if fold is None else fold  # without data.fold, val_case_fraction is fold 0
        if isinstance(fold, int) and not isinstance(fold, bool):
            if fold in folds:
                raise CrossvalError(f"fold {fold} is given twice ({folds[fold]} and {p}); give "
                                    "one run per fold")
            folds[fold] = p
    warnings: list[str] = []
    if recorded and len(recorded) == len(runs):
        k = max(1, round(1 / float(recorded[0][1]["val_case_fraction"])))
        missing = [f for f in range(k) if f not in folds]
        if missing and folds:
            warnings.append(
                f"data.val_case_fraction={recorded[0][1]['val_case_fraction']} makes {k} folds, "
                f"and fold(s) {missing} are not given: the pooled figure covers only the cases "
                "of the folds given, not all of the data")
    if len(runs) == 1 and not warnings:
        warnings.append("one run: its mean over cases, not a cross-validation; give one run "
                        "per fold")
    return warnings


#: How ``segpipe test`` scored (recorded in ``test_metrics.json``): folds pooled together must
#: agree on these, or the pooled figure mixes protocols.
_PROTOCOL = ("test_time_augmentation", "decision", "batchnorm_statistics", "eval_resize",
             "ignore_index")


def _check_protocols(protocols: list[tuple[Path, dict[str, Any]]]) -> None:
    """Refuse folds scored otherwise than each other (one with TTA or re-estimated BatchNorm
    statistics, the others plain): their pooled mean would mix two evaluations."""
    for key in _PROTOCOL:
        values = {json.dumps(p.get(key), sort_keys=True) for _, p in protocols}
        if len(values) > 1:
            which = "; ".join(f"{path}: {p.get(key)}" for path, p in protocols)
            raise CrossvalError(
                f"the folds were scored with different {key} ({which}); score every fold the "
                "same way (the same segpipe test options), or give each fold's "
                "test_metrics.json file to choose among a run's tests")


def _data_fold(metrics: dict[str, Any]) -> int | None:
    """The ``data.fold`` that ``segpipe test`` recorded in ``test_metrics.json``, if any."""
    fold = (metrics.get("data_split") or {}).get("fold")
    return fold if isinstance(fold, int) and not isinstance(fold, bool) else None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _sd(values: Sequence[float | None]) -> float | None:
    """Sample standard deviation of the values given, None under two."""
    vals = [v for v in values if v is not None]
    return statistics.stdev(vals) if len(vals) >= 2 else None


def _summary(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """Means over the case rows of ``case_scores`` (cases without a class's score left out)."""
    unscored = sum(r.get("mDice") is None for r in rows)
    return {
        # the cases behind the means: one without a labelled pixel has no score
        "num_cases": len(rows) - unscored,
        "num_cases_without_score": unscored,
        "mDice_mean_over_cases": _mean([r.get("mDice") for r in rows]),
        "mIoU_mean_over_cases": _mean([r.get("mIoU") for r in rows]),
        "Dice_per_class_mean_over_cases": {
            c: _mean([r["Dice_per_class"].get(c) for r in rows]) for c in classes},
        "IoU_per_class_mean_over_cases": {
            c: _mean([r["IoU_per_class"].get(c) for r in rows]) for c in classes},
        # a case where a class is absent from both truth and prediction has no score for it
        "num_cases_per_class": {
            c: sum(r["Dice_per_class"].get(c) is not None for r in rows) for c in classes},
    }


def crossval(paths: Sequence[str]) -> dict[str, Any]:
    """Pool the per-case rows of several ``test_metrics.json`` (one per fold).

    Args:
        paths: Files or run folders (the newest ``test_metrics.json`` under each).

    Returns:
        ``{"folds": [per-fold summary with its "path", "checkpoint" and "data_fold" (as
        ``segpipe test`` recorded them; None when unknown)], "all_cases": summary over every case,
        "fold_sd": sample standard deviation of the fold means, "cases": every case row with
        its "run" (1-based, the order of ``paths``) and "data_fold"}``; a summary holds
        ``num_cases``, ``mDice_mean_over_cases``, ``mIoU_mean_over_cases``,
        ``Dice_per_class_mean_over_cases``, ``IoU_per_class_mean_over_cases`` and
        ``num_cases_per_class`` (the cases behind each class's means).

    Raises:
        CrossvalError: A path without per-case scores, runs with different classes, or a case
            in two runs.
    """
    if not paths:
        raise CrossvalError("give the runs of the folds (folders or test_metrics.json files)")
    folds: list[dict[str, Any]] = []
    all_rows: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    classes: list[str] | None = None
    splits: list[tuple[Path, dict[str, Any] | None]] = []
    protocols: list[tuple[Path, dict[str, Any]]] = []
    given: dict[Path, str] = {}
    chosen: list[str] = []
    sweeps: list[Any] = []
    for run, arg in enumerate(paths, 1):
        path, tests = _metrics_path(arg)
        if tests > 1:
            chosen.append(f"{arg} holds {tests} tests; its newest, {path}, is pooled (give a "
                          "test_metrics.json file to pool another)")
        if path.resolve() in given:
            raise CrossvalError(f"{arg} is given twice (as {given[path.resolve()]} too); give "
                                "each fold's run once")
        given[path.resolve()] = arg
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CrossvalError(f"{path}: not a readable test_metrics.json ({exc})") from None
        if isinstance(metrics, dict):
            stale = _scored_checkpoint(path, metrics, explicit=Path(arg).expanduser().is_file())
            if stale:
                chosen.append(stale)
        split = _split_of(metrics) if isinstance(metrics, dict) else None
        if split is not None and split.get("scored") == "test" and split.get("val_case_fraction"):
            raise CrossvalError(
                f"{path} scored the data's test split, which every fold shares, not its fold's "
                "val cases: `segpipe test` scores val only when the data has no test split, so "
                "cross-validate on a data root without one (hold the test cases elsewhere)")
        if isinstance(metrics, dict):
            protocols.append((path, {k: metrics.get(k) for k in _PROTOCOL}))
        per_case = metrics.get("per_case") if isinstance(metrics, dict) else None
        if not isinstance(per_case, dict) or not per_case.get("cases"):
            raise CrossvalError(
                f"{path}: no per-case scores; `segpipe test` reports per case when images "
                "belong to cases (LGG patients, CamVid sequences; set data.case_pattern for "
                "folders)")
        names = per_case.get("Dice_per_class_mean_over_cases")
        rows_in = per_case["cases"]
        if not isinstance(names, dict) or not isinstance(rows_in, list) or not all(
                isinstance(r, dict) and "case" in r and isinstance(r.get("Dice_per_class"), dict)
                and isinstance(r.get("IoU_per_class"), dict) for r in rows_in):
            raise CrossvalError(
                f"{path}: its per_case section lacks the case rows segpipe test writes "
                "(case, Dice_per_class, IoU_per_class); run `segpipe test` again")
        names = list(names)
        if classes is None:
            classes = names
        elif names != classes:
            raise CrossvalError(f"{path}: classes {names} differ from the first run's {classes}")
        data_fold = _data_fold(metrics)
        splits.append((path, split))
        rows = [dict(_finite(r), run=run, data_fold=data_fold) for r in rows_in]
        for row in rows:
            case = str(row["case"])
            if case in seen:
                raise CrossvalError(
                    f"case {case!r} is scored in both {seen[case]} and {path}: those runs are "
                    "not folds of one split (same data.seed and val_case_fraction, a different "
                    "data.fold each)")
            seen[case] = path
        partial = metrics.get("partial_split")
        if isinstance(partial, dict):  # data.limit_samples or limit_test_batches in its test
            chosen.append(
                f"{path} scored {partial.get('scored_images')} of its split's "
                f"{partial.get('split_images')} images (a test of part of the split): the pooled "
                "mean leaves the others out; test that fold again without the limits")
        sweeps.append(metrics.get("threshold_sweep"))
        folds.append({"path": str(path), "data_fold": data_fold,
                      "checkpoint": metrics.get("checkpoint"), **_summary(rows, classes)})
        all_rows += rows
    assert classes is not None
    _check_protocols(protocols)
    warnings = chosen + _check_folds(splits)
    fold_sd = {
        "mDice_mean_over_cases": _sd([f["mDice_mean_over_cases"] for f in folds]),
        "mIoU_mean_over_cases": _sd([f["mIoU_mean_over_cases"] for f in folds]),
        "Dice_per_class_mean_over_cases": {
            c: _sd([f["Dice_per_class_mean_over_cases"][c] for f in folds]) for c in classes},
    }
    return {"folds": folds, "all_cases": _summary(all_rows, classes), "fold_sd": fold_sd,
            "cases": all_rows, "warnings": warnings, "threshold": _threshold_choice(sweeps)}


def _threshold_choice(sweeps: list[Any]) -> dict[str, Any] | None:
    """A two-class model's threshold of p(class 1) chosen for each fold on the other folds'
    cases (``segpipe test``'s ``threshold_sweep``), and the mean Dice over every case that this
    gives: a figure the choice does not flatter. None unless every fold (two or more) has a
    per-case sweep over the same thresholds."""
    if len(sweeps) < 2 or not all(isinstance(s, dict) and s.get("Dice_mean_over_cases")
                                  for s in sweeps):
        return None
    thresholds = sweeps[0].get("thresholds")
    if any(s.get("thresholds") != thresholds for s in sweeps):
        return None

    def pooled(parts: list[dict[str, Any]], i: int) -> float | None:
        """Mean over the cases of ``parts`` at threshold ``i``."""
        return _over_cases([(p["Dice_mean_over_cases"][i], p["num_cases"][i]) for p in parts])

    def best(parts: list[dict[str, Any]]) -> int:
        """The threshold scoring most on ``parts``; of equals, the nearest 0.5 (the arg-max)."""
        scored = [(pooled(parts, i), -abs(t - 0.5), i) for i, t in enumerate(thresholds)]
        return max((x for x in scored if x[0] is not None), default=(None, 0, 0))[2]

    chosen = []
    for k, sweep in enumerate(sweeps):
        i = best([s for j, s in enumerate(sweeps) if j != k])
        chosen.append({"threshold": thresholds[i],
                       "Dice_mean_over_cases": sweep["Dice_mean_over_cases"][i],
                       "num_cases": sweep["num_cases"][i]})
    return {
        "class": sweeps[0].get("class"), "thresholds": thresholds,
        "Dice_mean_over_cases": [pooled(sweeps, i) for i in range(len(thresholds))],
        # chosen on the cases it scores: a figure it flatters
        "best_single_threshold": thresholds[best(sweeps)],
        "chosen_leaving_each_fold_out": chosen,
        "Dice_mean_over_cases_chosen_leaving_each_fold_out": _over_cases(
            [(c["Dice_mean_over_cases"], c["num_cases"]) for c in chosen]),
    }


def _over_cases(fold_means: list[tuple[float | None, int]]) -> float | None:
    """The mean over every case of folds given as ``(mean over its cases, cases)``."""
    n = sum(k for m, k in fold_means if m is not None)
    return sum(m * k for m, k in fold_means if m is not None) / n if n else None


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """A case row with non-finite scores (a hand-edited NaN) as None, i.e. missing."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return {k: clean(v) for k, v in row.items()}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def format_table(result: dict[str, Any]) -> str:
    """The per-fold and pooled table ``segpipe crossval`` prints (percentages)."""
    classes = list(result["all_cases"]["Dice_per_class_mean_over_cases"])
    head = ["", "cases", "mDice", "mIoU", *(f"Dice {c}" for c in classes)]

    fewer = False  # a class's mean over fewer cases than the row's count

    def dice(s: dict[str, Any], c: str) -> str:
        nonlocal fewer
        n = s.get("num_cases_per_class", {}).get(c)
        if n is None or n >= s["num_cases"] or s["Dice_per_class_mean_over_cases"][c] is None:
            return _pct(s["Dice_per_class_mean_over_cases"][c])
        fewer = True
        return f"{_pct(s['Dice_per_class_mean_over_cases'][c])} ({n})"

    def line(label: str, s: dict[str, Any]) -> list[str]:
        return [label, str(s["num_cases"]), _pct(s["mDice_mean_over_cases"]),
                _pct(s["mIoU_mean_over_cases"]), *(dice(s, c) for c in classes)]

    labels = [f"run {i}" if f.get("data_fold") is None else f"fold {f['data_fold']}"
              for i, f in enumerate(result["folds"], 1)]
    table = [head] + [line(label, f) for label, f in zip(labels, result["folds"])]
    table.append(line("all cases", result["all_cases"]))
    folds = [f for f in result["folds"] if f.get("data_fold") is not None]
    if len(result["folds"]) > 1:
        sd = result["fold_sd"]
        table.append(["sd of folds" if folds else "sd of runs", "",
                      _pct(sd["mDice_mean_over_cases"]), _pct(sd["mIoU_mean_over_cases"]),
                      *(_pct(sd["Dice_per_class_mean_over_cases"][c]) for c in classes)])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    text = ["Mean over cases, % (each case scored by the fold model that did not train on it):"
            if len(folds) > 1 else "Mean over cases, %:"]
    text += ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in table]
    text += [f"{label}: {f['path']}" + (f" (checkpoint {f['checkpoint']})"
                                        if f.get("checkpoint") else "")
             for label, f in zip(labels, result["folds"])]
    if fewer:
        text.append("(n): that class's mean is over n cases; a case where the class is absent "
                    "from both the truth and the prediction has no score for it")
    choice = result.get("threshold")
    if choice:
        ts, each = choice["thresholds"], choice["Dice_mean_over_cases"]
        picks = ", ".join(f"{label} {c['threshold']:g}"
                          for label, c in zip(labels, choice["chosen_leaving_each_fold_out"]))
        top = choice["best_single_threshold"]
        half = each[ts.index(0.5)] if 0.5 in ts else None
        unflattered = choice["Dice_mean_over_cases_chosen_leaving_each_fold_out"]
        text.append(
            f"Threshold of p({choice['class']}), chosen for each fold on the other folds' cases "
            f"({picks}): Dice {choice['class']} {_pct(unflattered)} "
            f"mean over cases; at 0.5 (the arg-max) {_pct(half)}; the best single threshold "
            f"on all folds, {top:g}, {_pct(each[ts.index(top)])} (chosen on the cases it "
            "scores: it flatters). Set model.positive_threshold to use one.")
    unscored = result["all_cases"].get("num_cases_without_score")
    if unscored:
        text.append(f"{unscored} case(s) without a labelled pixel have no score and are left "
                    "out of the 'cases' counts and every mean")
    return "\n".join(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``segpipe crossval``; 0 on success, 2 on a usage or input error."""
    parser = CommandParser(
        prog="segpipe crossval", config=False,
        description="Pool the per-case test scores of k-fold runs into one cross-validated "
                    "figure: the mean over every case, each scored by the fold model that did "
                    "not train on it, beside each fold's mean and their spread.",
        epilog="Folds: train and test one run per fold with --data.val_case_fraction 0.2 "
               "--data.fold k (k = 0..4 for five folds by case), then `segpipe crossval "
               "RUN0 ... RUN4`. Each RUN is a run folder (its newest test_metrics.json is "
               "read) or a test_metrics.json.")
    parser.add_argument("runs", nargs="+", help="one run folder or test_metrics.json per fold")
    parser.add_argument("--json", default=None,
                        help="also write everything (every case with its fold) to this JSON file")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    target = Path(args.json).expanduser() if args.json else None
    if target is not None and target.is_dir():
        print(f"segpipe crossval: error: --json {target} is a folder; give a file name, e.g. "
              f"{target / 'crossval.json'}", file=sys.stderr)
        return 2
    try:
        result = crossval(args.runs)
    except CrossvalError as exc:
        print(f"segpipe crossval: error: {exc}", file=sys.stderr)
        return 2
    for warning in result["warnings"]:
        print(f"segpipe crossval: warning: {warning}", file=sys.stderr)
    print(format_table(result))
    if target is not None:
        try:
            print(f"Written to {atomic_write_json(target, result)}")
        except OSError as exc:
            print(f"segpipe crossval: error: cannot write {target}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
