"""The ``segpipe`` command line.

``segpipe fit|validate|test`` are LightningCLI subcommands (``--config``, ``--print_config``, any
``--trainer.*``/``--model.*``/``--data.*`` override). The other subcommands are segpipe's own and
register themselves in :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from segpipe.callbacks import TestMetricsWriter
from segpipe.data import SegmentationDataModule
from segpipe.tasks import SegmentationTask

__all__ = ["COMMANDS", "SegpipeCLI", "default_precision", "main", "run_cli"]


def _lazy(module: str, function: str = "main") -> Callable[[list[str]], int]:
    """A subcommand whose module is imported only when it runs (keeps start-up fast)."""

    def run(argv: list[str]) -> int:
        return getattr(importlib.import_module(module), function)(argv)

    run.__qualname__ = f"{module}.{function}"
    return run


#: segpipe's own subcommands: name -> function taking the remaining argv, returning an exit code.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "predict": _lazy("segpipe.predict.command"),
    "export": _lazy("segpipe.predict.export"),
    "check-data": _lazy("segpipe.doctor"),
    "demo": _lazy("segpipe.demos"),
}


def default_precision() -> str:
    """Fastest precision that keeps accuracy on the machine at hand.

    bf16 autocast on CUDA GPUs that support it and on CPUs with native bf16 (AVX512-BF16/AMX),
    where it runs U-Net about 3x faster than fp32; fp32 elsewhere.
    """
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "bf16-mixed"
    except (AttributeError, RuntimeError):
        pass
    return "32-true"


class SegpipeCLI(LightningCLI):
    """LightningCLI with segpipe's checkpointing, metric writer and data→model links."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict is segpipe's own command (it works from a checkpoint alone).
        return {k: v for k, v in LightningCLI.subcommands().items() if k in {"fit", "validate", "test"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/mIoU",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-epoch{epoch:03d}-mIoU{val/mIoU:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(TestMetricsWriter, "metrics_writer")
        # The data is the one source of truth for classes and the ignore label.
        parser.link_arguments("data.num_classes", "model.num_classes")
        parser.link_arguments("data.ignore_index", "model.ignore_index")
        parser.link_arguments("data.class_names", "model.class_names")

    def before_instantiate_classes(self) -> None:
        # Checkpoints live in one unversioned folder per run root so `--ckpt_path last` finds them.
        cfg = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        if cfg.checkpoint.dirpath is None:
            root = cfg.trainer.default_root_dir or "."
            cfg.checkpoint.dirpath = str(Path(root) / "checkpoints")


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``segpipe`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        return COMMANDS[args[0]](args[1:])
    if not args or args[0] in {"-h", "--help"}:
        print(
            "usage: segpipe {fit,validate,test," + ",".join(sorted(COMMANDS)) + "} [options]\n"
            "  fit/validate/test: LightningCLI; see `segpipe fit --help`.\n"
            + "".join(f"  {name}: see `segpipe {name} --help`.\n" for name in sorted(COMMANDS)),
            file=sys.stderr,
        )
        if not args:
            return 2
    run_cli(args)
    return 0


def run_cli(args: Sequence[str]) -> SegpipeCLI:
    """Run ``segpipe fit|validate|test`` with ``args`` and return the CLI (trainer, model, data)."""
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "segpipe", *args]  # LightningCLI reads sys.argv
    try:
        return SegpipeCLI(
            SegmentationTask,
            SegmentationDataModule,
            seed_everything_default=0,
            trainer_defaults={"precision": default_precision()},
            save_config_kwargs={"overwrite": True},
        )
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":
    sys.exit(main())
