"""The benchmark scripts still run (tiny sizes; their figures are not checked: timing is noise here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--images", "8", "--batch-size", "2", "--crop", "32", "--base", "4", "--classes", "3",
        "--precision", "32-true"]


@pytest.mark.parametrize("mode", ["interleaved", "rounds"])
def test_bench_train_prints_paired_throughput(mode: str) -> None:
    extra = ["--epochs", "1"] if mode == "interleaved" else ["--steps", "3", "--rounds", "2"]
    res = subprocess.run(
        [sys.executable, "scripts/bench_train.py", "--mode", mode, *TINY, *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rounds = re.findall(r"round \d: segpipe fit +([\d.]+) images/s, bare loop +([\d.]+) images/s, "
                        r"ratio ([\d.]+)", res.stdout)
    assert len(rounds) == (1 if mode == "interleaved" else 2), res.stdout
    for seg, bare, ratio in rounds:
        assert float(seg) > 0 and float(bare) > 0
        assert float(ratio) == pytest.approx(float(seg) / float(bare), abs=2e-3)
    if mode == "interleaved":
        assert re.search(r"4 paired steps; ratio per fifth", res.stdout), res.stdout
    assert re.search(r"^ratio: [\d.]+ +\(goal >= 0.95\)$", res.stdout, re.M), res.stdout


def test_bench_malloc_compares_both_settings() -> None:
    res = subprocess.run(
        [sys.executable, "scripts/bench_malloc.py", "--pairs", "1", "--steps", "2", "--warmup", "1",
         "--crop", "32", "--base", "4", "--batch-size", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"pair 1: glibc default +[\d.]+ ms/step", res.stdout), res.stdout
    if sys.platform.startswith("linux"):
        assert re.search(r"pair 1: segpipe \(mallopt\) +[\d.]+ ms/step", res.stdout), res.stdout
    assert "median: glibc default" in res.stdout
