"""``segpipe export --ckpt_path CKPT --output model.onnx``: ONNX graph plus preprocessing sidecar."""

from __future__ import annotations

import sys

from segpipe.argparsing import CommandParser, home_path

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Export a checkpoint to ONNX (dynamic batch, height and width) and write ``model.json``."""
    parser = CommandParser(prog="segpipe export", description=(__doc__ or "").strip())
    parser.add_argument("--ckpt_path", required=True, type=home_path,
                        help="checkpoint written by segpipe fit")
    parser.add_argument("--output", required=True, type=home_path, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--tile", type=int, default=None,
                        help="tile size that predict --onnx and Segmenter.from_onnx use when "
                             "given none (default: none recorded, whole images)")
    parser.add_argument("--overlap", type=float, default=None,
                        help="their tile overlap when given none (default: predict's 0.25)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing .onnx and its .json sidecar")
    parser.add_argument("--no_check", action="store_true", help="skip the onnxruntime-vs-torch check")
    args = parser.parse_args(argv)
    from segpipe.errors import MissingExtraError
    from segpipe.predict.checkpoint import CheckpointError
    from segpipe.predict.onnx import export_onnx

    try:
        onnx_path, side = export_onnx(args.ckpt_path, args.output, opset=args.opset, tile=args.tile,
                                      overlap=args.overlap, check=not args.no_check,
                                      overwrite=args.overwrite)
    except (OSError, CheckpointError, ValueError, RuntimeError, MissingExtraError) as exc:
        # (a full disk included)
        print(f"segpipe export: error: {exc}", file=sys.stderr)
        return 2
    print(f"Wrote {onnx_path} and {side}")
    print(f"Predict with it: segpipe predict --onnx {onnx_path} --input DIR --output OUT")
    return 0
