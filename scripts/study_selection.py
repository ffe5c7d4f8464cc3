"""Which val figure should choose the best checkpoint? An honest answer from split halves.

A checkpoint chosen on a val figure and scored on the same val flatters itself, so comparing
``--checkpoint.monitor`` settings by their own val figures says little. This script trains once
(any ``segpipe fit`` arguments after ``--``) and records each validation's per-case confusion
matrices as it goes (JSON lines: a killed run keeps what it recorded). Then it splits the val
cases into two random halves many times: each criterion chooses an epoch on half A, and the
chosen epoch is scored on the unseen half B by the mean over cases of one class's Dice (the
figure medical readers report). Criteria:

* ``mIoU pooled``: segpipe's default monitor (``val/mIoU``, every pixel pooled);
* ``Dice pooled``: the class's Dice over every pixel pooled;
* ``Dice mean over cases``: ``val/Dice_mean_over_cases/<class>``, the reported figure itself;
* ``last``: the last validation (no choice), and ``oracle``: the best epoch on B (a ceiling).

    python scripts/study_selection.py --record runs/selection.jsonl -- \\
        --config configs/lgg_unet.yaml --data.root DIR/lgg_mri
    python scripts/study_selection.py --record runs/selection.jsonl   # analyse a record again

Run it alone on the machine when the fit has a time budget (other load costs it epochs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import lightning.pytorch as L
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpipe.argparsing import at_least, positive_int  # noqa: E402

from segpipe.lightning_cli import run_cli  # noqa: E402


class CaseRecorder(L.Callback):
    """Appends ``{"epoch", "step", "cases": {case: (K, K) confusion}}`` to ``path`` after every
    validation (callbacks run before the task's own epoch end, which resets the confusions)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        confusions, _ = pl_module.case_confusions["val"].merged(trainer.world_size)
        if trainer.is_global_zero and confusions:
            row = {"epoch": trainer.current_epoch, "step": trainer.global_step,
                   "cases": {case: cm.tolist() for case, cm in sorted(confusions.items())}}
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")


def read_record(path: Path) -> tuple[list[int], list[str], np.ndarray]:
    """(epochs, cases, confusions (E, N, K, K)) of a record; cases every validation scored."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not rows:
        raise SystemExit(f"{path}: no validation recorded (does val have cases?)")
    cases = sorted(set.intersection(*(set(r["cases"]) for r in rows)))
    cms = np.array([[r["cases"][c] for c in cases] for r in rows], dtype=np.float64)
    return [r["epoch"] for r in rows], cases, cms


def pooled_miou(cms: np.ndarray) -> np.ndarray:
    """(E,) macro mIoU of each epoch over the pooled (E, n, K, K) confusions; classes absent
    from truth and prediction left out, as segpipe's val/mIoU."""
    cm = cms.sum(axis=1)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    union = cm.sum(axis=1) + cm.sum(axis=2) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return np.nanmean(iou, axis=1)


def dice(cms: np.ndarray, k: int) -> np.ndarray:
    """Class k's Dice of each confusion matrix (..., K, K); NaN where it is in neither truth
    nor prediction."""
    tp = cms[..., k, k]
    denom = cms[..., k, :].sum(-1) + cms[..., :, k].sum(-1)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def case_mean_dice(cms: np.ndarray, k: int) -> np.ndarray:
    """(E,) mean over the cases of class k's Dice (cases without it left out)."""
    per_case = dice(cms, k)
    return np.nanmean(np.where(np.isnan(per_case).all(axis=1, keepdims=True), 0.0, per_case),
                       axis=1)


def first_best(values: np.ndarray) -> int:
    """Index of the highest value, the first of ties; NaN (nothing to score) never wins."""
    filled = np.where(np.isnan(values), -np.inf, values)
    return int(np.argmax(filled))


CRITERIA = {
    "mIoU pooled": lambda cms, k: pooled_miou(cms),
    "Dice pooled": lambda cms, k: dice(cms.sum(axis=1), k),
    "Dice mean over cases": case_mean_dice,
}


def analyse(path: Path, k: int, splits: int, seed: int) -> dict:
    """The comparison by split halves (see the module docstring), printed and returned."""
    epochs, cases, cms = read_record(path)
    if not 0 <= k < cms.shape[-1]:
        raise SystemExit(f"--class-index {k}: the record has classes 0..{cms.shape[-1] - 1}")
    n = len(cases)
    if n < 4:
        raise SystemExit(f"{path}: {n} val cases; halves need at least 4")
    print(f"{path}: {len(epochs)} validations (epochs {epochs[0]}..{epochs[-1]}), {n} val cases, "
          f"class {k}")
    target = case_mean_dice(cms, k)
    print("On the whole val (each criterion scores its own choice, so these flatter):")
    for name, criterion in CRITERIA.items():
        e = first_best(criterion(cms, k))
        print(f"  {name:22s} chooses epoch {epochs[e]:4d}: Dice mean over cases {target[e]:.4f}")
    print(f"  {'last':22s} epoch {epochs[-1]:4d}: Dice mean over cases {target[-1]:.4f}")

    rng = np.random.default_rng(seed)
    scores: dict[str, list[float]] = {name: [] for name in [*CRITERIA, "last", "oracle"]}
    for _ in range(splits):
        order = rng.permutation(n)
        a, b = order[: n // 2], order[n // 2:]
        on_b = case_mean_dice(cms[:, b], k)
        for name, criterion in CRITERIA.items():
            scores[name].append(float(on_b[first_best(criterion(cms[:, a], k))]))
        scores["last"].append(float(on_b[-1]))
        scores["oracle"].append(float(on_b.max()))
    print(f"Chosen on half A, scored on the unseen half B ({splits} random halvings; "
          "Dice mean over B's cases, mean and sd over halvings):")
    base = np.array(scores["mIoU pooled"])
    result = {"validations": len(epochs), "cases": n, "class": k, "splits": splits,
              "criteria": {}}
    for name, values in scores.items():
        arr = np.array(values)
        diff = arr - base
        result["criteria"][name] = {"mean": float(arr.mean()), "sd": float(arr.std()),
                                    "minus_mIoU_pooled": float(diff.mean()),
                                    "better_share": float((diff > 0).mean()),
                                    "worse_share": float((diff < 0).mean())}
        vs = "" if name == "mIoU pooled" else (
            f"  vs mIoU pooled {100 * diff.mean():+.2f} points (better in "
            f"{100 * (diff > 0).mean():.0f} %, worse in {100 * (diff < 0).mean():.0f} % of halvings)")
        print(f"  {name:22s} {100 * arr.mean():6.2f} % (sd {100 * statistics.pstdev(values):.2f})"
              f"{vs}")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fit_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", type=Path, required=True,
                        help="JSON lines of the per-case val confusions (written when fit "
                             "arguments follow --, else read)")
    parser.add_argument("--class-index", type=at_least(0), default=1, help="the class whose Dice is "
                        "reported (default 1: LGG's tumour)")
    parser.add_argument("--splits", type=positive_int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(own)
    if fit_args:
        if args.record.exists():
            raise SystemExit(f"{args.record} exists; give a new --record for a new run")
        args.record.parent.mkdir(parents=True, exist_ok=True)
        run_cli(["fit", *fit_args], callbacks=[CaseRecorder(args.record)])
    analyse(args.record, args.class_index, args.splits, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
