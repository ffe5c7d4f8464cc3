#!/usr/bin/env python
"""Training throughput of `segpipe fit` against a bare PyTorch loop (same model, batch, precision).

segpipe's side is the real command (LightningCLI, datamodule reading PNGs from disk with
albumentations augmentation in DataLoader workers, checkpoints, logging); the bare loop trains the
same network with the same optimiser and loss on one batch already in memory.

    python scripts/bench_train.py                       # synthetic 480x360 data, U-Net(16), batch 8, 224 crops
    python scripts/bench_train.py --data-root ../shared/data/camvid --layout camvid
    python scripts/bench_train.py --precision 32-true   # fp32 instead of the default bf16 (where supported)
    python scripts/bench_train.py --mode rounds         # whole runs one after the other instead

The default ``--mode interleaved`` pairs every step: after each `segpipe fit` training step a
callback runs one bare-loop step in the same process, timed on its own, with segpipe's DataLoader
workers paused (SIGSTOP) so that they neither slow the bare step down nor get ahead for free
during it. segpipe's time per step is everything else: waiting for data, the training step,
hooks, logging, checkpoints and epoch ends. Pairing step by step cancels the machine's drift,
which on a shared VM moves whole runs by ±30 %, so the ratio measures segpipe's overhead rather
than the neighbours. The first epoch is warm-up (it fills segpipe's decoded-image cache, as any
real run's first epoch does); the next ``--epochs`` are timed, epoch ends included.

``--mode rounds`` runs `segpipe fit` and the bare loop one after the other, ``--rounds`` times,
and prints each round's ratio: the same comparison, exposed to the drift.

Goal: ratio (segpipe images/s over bare images/s) >= 0.95.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpipe.callbacks import Throughput  # noqa: E402
from segpipe.cli import run_cli  # noqa: E402
from segpipe.runtime import default_precision  # noqa: E402
from segpipe.models import UNet  # noqa: E402


def make_data(root: Path, n: int, num_classes: int) -> Path:
    """A folder-layout data set of 480x360 RGB PNGs with learnable blobs."""
    from segpipe.data.io import write_image, write_mask

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 2)):
        for i in range(count):
            mask = np.zeros((360, 480), np.uint8)
            for _ in range(6):
                y, x = rng.integers(0, 300), rng.integers(0, 420)
                mask[y : y + 60, x : x + 60] = rng.integers(0, num_classes)
            colors = np.linspace(20, 235, num_classes).astype(np.uint8)
            img = np.stack([colors[mask], colors[::-1][mask], np.full_like(mask, 128)], -1)
            img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
            write_image(root / split / "images" / f"{i:04d}.png", img)
            write_mask(root / split / "masks" / f"{i:04d}.png", mask)
    return root


class BareLoop:
    """The reference: U-Net, AdamW, cross-entropy, autocast, one in-memory batch."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.net = UNet(3, args.classes, base_channels=args.base, depth=4)
        self.net.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3, weight_decay=1e-4)
        shape = (args.batch_size, 3, args.crop, args.crop)
        self.x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, args.classes, (args.batch_size, args.crop, args.crop))
        self.bf16 = args.precision.startswith("bf16")

    def step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.net(self.x)
        loss = torch.nn.functional.cross_entropy(logits.float(), self.y, ignore_index=255)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def _signal_workers(sig: int) -> None:
    # DataLoader workers are multiprocessing children of this process (and its only ones here).
    for child in multiprocessing.active_children():
        if child.pid is not None:
            os.kill(child.pid, sig)


class Interleave(L.Callback):
    """After each segpipe training step, one bare step timed on its own, loader workers paused.

    Args:
        bare: The bare loop.
        warmup_epochs: Epochs not timed.
    """

    def __init__(self, bare: BareLoop, warmup_epochs: int) -> None:
        self.bare = bare
        self.warmup_epochs = warmup_epochs
        self.segpipe_s: list[float] = []
        self.bare_s: list[float] = []
        self.images = 0
        self._mark = 0.0

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        t0 = time.perf_counter()
        segpipe_step = t0 - self._mark
        pausable = hasattr(signal, "SIGSTOP")
        if pausable:
            _signal_workers(signal.SIGSTOP)
        try:
            t1 = time.perf_counter()
            self.bare.step()
            bare_step = time.perf_counter() - t1
        finally:
            if pausable:
                _signal_workers(signal.SIGCONT)
        if trainer.current_epoch >= self.warmup_epochs:
            self.segpipe_s.append(segpipe_step)
            self.bare_s.append(bare_step)
            self.images += int(batch["image"].shape[0])
        self._mark = time.perf_counter()


def segpipe_args(args: argparse.Namespace, root: Path, run_dir: Path, **trainer: object) -> list[str]:
    """`segpipe fit` arguments: the folder config with the bench's model, data and precision."""
    return [
        "fit", "--config", "configs/folder_unet.yaml",
        f"--data.root={root}", f"--data.layout={args.layout}",
        f"--data.num_classes={args.classes}", f"--data.batch_size={args.batch_size}",
        f"--data.crop_size={args.crop}", "--data.ignore_index=255",
        "--model.loss=ce",  # as the bare loop
        f"--model.net.init_args.base_channels={args.base}",
        f"--trainer.precision={args.precision}",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={run_dir}",
        *(f"--trainer.{k}={v}" for k, v in trainer.items()),
        *(["--data.num_workers", str(args.workers)] if args.workers is not None else []),
        *args.override,
    ]


def run_interleaved(args: argparse.Namespace, root: Path, run_dir: Path) -> tuple[float, float]:
    """One `segpipe fit` with a paired bare step after each step; (segpipe, bare) images/s."""
    meter = Interleave(BareLoop(args), warmup_epochs=1)
    run_cli(
        segpipe_args(args, root, run_dir, max_epochs=1 + args.epochs),
        callbacks=[meter],
    )
    seg_s, bare_s = sum(meter.segpipe_s), sum(meter.bare_s)
    steps = len(meter.segpipe_s)
    # Spread of the pairing: the ratio over each fifth of the timed steps.
    parts = [slice(i * steps // 5, (i + 1) * steps // 5) for i in range(5)]
    spread = [sum(meter.bare_s[p]) / sum(meter.segpipe_s[p]) for p in parts if meter.segpipe_s[p]]
    print(f"  {steps} paired steps; ratio per fifth of them: "
          + ", ".join(f"{r:.3f}" for r in spread)
          + f"; median step segpipe {1000 * statistics.median(meter.segpipe_s):.0f} ms, "
          f"bare {1000 * statistics.median(meter.bare_s):.0f} ms", flush=True)
    return meter.images / seg_s, meter.images / bare_s


def run_segpipe_alone(args: argparse.Namespace, root: Path, run_dir: Path, warmup: int) -> float:
    cli = run_cli(
        [*segpipe_args(args, root, run_dir, max_steps=warmup + args.steps),
         "--trainer.callbacks+=segpipe.callbacks.Throughput",
         f"--trainer.callbacks.warmup_steps={warmup}"]
    )
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, Throughput)).images_per_second


def run_bare_alone(args: argparse.Namespace, warmup: int) -> float:
    bare = BareLoop(args)
    for _ in range(warmup):
        bare.step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        bare.step()
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, help="real data instead of synthetic (e.g. CamVid)")
    p.add_argument("--layout", default="folder")
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--images", type=int, default=368,
                   help="synthetic training images (default: as many as CamVid's train split, so "
                        "epoch ends weigh what they weigh in a real run)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--base", type=int, default=16, help="U-Net base channels")
    p.add_argument("--mode", choices=["interleaved", "rounds"], default="interleaved")
    p.add_argument("--epochs", type=int, default=2, help="interleaved: timed epochs after the first")
    p.add_argument("--steps", type=int, default=30, help="rounds: timed steps per run")
    p.add_argument("--rounds", type=int, default=1,
                   help="how many times to repeat the measurement (interleaved: whole fits)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: segpipe's)")
    p.add_argument("--precision", default=default_precision())
    p.add_argument("override", nargs="*", help="extra segpipe fit overrides, e.g. --model.log_train_metrics=true")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, precision {args.precision}, "
          f"U-Net(base={args.base}), batch {args.batch_size}, crops {args.crop}x{args.crop}, "
          f"mode {args.mode}, {args.rounds} round(s)", flush=True)
    segs, bares = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root or make_data(Path(tmp) / "data", args.images, args.classes)
        steps_per_epoch = None if args.data_root else args.images // args.batch_size
        for r in range(args.rounds):
            run_dir = Path(tmp) / f"run{r}"
            if args.mode == "interleaved":
                seg, bare = run_interleaved(args, root, run_dir)
            else:
                warmup = steps_per_epoch or 12
                seg = run_segpipe_alone(args, root, run_dir, warmup)
                bare = run_bare_alone(args, warmup)
            segs.append(seg)
            bares.append(bare)
            print(f"round {r + 1}: segpipe fit {seg:6.2f} images/s, bare loop {bare:6.2f} "
                  f"images/s, ratio {seg / bare:.3f}", flush=True)
    ratios = [s / b for s, b in zip(segs, bares)]
    if len(ratios) > 1:
        print(f"median ratio over {len(ratios)} rounds: {statistics.median(ratios):.3f}")
    print(f"ratio: {statistics.median(ratios):.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
