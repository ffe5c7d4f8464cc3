"""Demos on real data: ``segpipe demo mri`` (offline, ICBM152 template) and ``segpipe demo driving``."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """``segpipe demo {mri,driving}``."""
    parser = argparse.ArgumentParser(prog="segpipe demo", description=__doc__)
    sub = parser.add_subparsers(dest="demo", required=True)
    mri = sub.add_parser("mri", help="brain tissue segmentation on the ICBM152 MRI template (offline)")
    mri.add_argument("--output", type=Path, default=Path("outputs/demo_mri"), help="folder for all outputs")
    mri.add_argument("--minutes", type=float, default=4.0, help="training time budget (default 4)")
    mri.add_argument("--smoke", action="store_true", help="a few steps on a few slices (tests)")
    args = parser.parse_args(argv)
    if args.demo == "mri":
        from segpipe.demos.mri import run_mri_demo

        run_mri_demo(args.output, smoke=args.smoke, max_minutes=args.minutes)
        return 0
    return 2  # pragma: no cover - argparse rejects unknown demos
