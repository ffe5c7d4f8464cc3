#!/usr/bin/env python
"""Accuracy parity and speed of bf16-mixed vs fp32 evaluation of one checkpoint.

Runs `segpipe validate` twice on the same checkpoint and data (fp32, then bf16 autocast +
channels-last) and prints val mIoU, pixel accuracy, per-class IoU differences and wall time.

    python scripts/bench_precision.py --config configs/camvid_unet.yaml \
        --data-root ../shared/data/camvid --ckpt runs/camvid_unet/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpipe.lightning_cli import run_cli  # noqa: E402


def validate(args: argparse.Namespace, precision: str) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    cli = run_cli(
        [
            "validate", "--config", str(args.config), f"--data.root={args.data_root}",
            f"--ckpt_path={args.ckpt}", f"--trainer.precision={precision}",
            "--trainer.enable_progress_bar=false", "--trainer.logger=false",
            f"--trainer.default_root_dir={args.scratch}",  # not the config's runs/ folder
            *(["--data.limit_samples", str(args.limit)] if args.limit else []),
        ]
    )
    seconds = time.perf_counter() - start
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="use at most this many val images")
    args = p.parse_args()
    if not args.ckpt.is_file():
        p.error(f"--ckpt {args.ckpt}: no such checkpoint file")
    with tempfile.TemporaryDirectory() as scratch:
        args.scratch = scratch
        fp32, t32 = validate(args, "32-true")
        bf16, t16 = validate(args, "bf16-mixed")
    print(f"{'metric':28s} {'fp32':>8s} {'bf16':>8s} {'diff':>8s}")
    for key in sorted(fp32):
        if key.startswith("val/") and key in bf16 and "loss" not in key:
            print(f"{key:28s} {fp32[key]:8.4f} {bf16[key]:8.4f} {bf16[key] - fp32[key]:+8.4f}")
    print(f"wall time: fp32 {t32:.1f} s, bf16 {t16:.1f} s, speed-up {t32 / t16:.2f}x")


if __name__ == "__main__":
    main()
