#!/usr/bin/env python
"""Training throughput of `segpipe fit` against a bare PyTorch loop (same model, batch, precision,
device).

segpipe's side is the real command (LightningCLI, datamodule reading PNGs from disk with
albumentations augmentation in DataLoader workers, checkpoints, logging); the bare loop trains the
same network with the same optimiser and loss on one batch already in the device's memory.

    python scripts/bench_train.py                       # synthetic 480x360 data, U-Net(16), batch 8, 224 crops
    python scripts/bench_train.py --data-root ../shared/data/camvid --layout camvid
    python scripts/bench_train.py --precision 32-true   # fp32 instead of the default bf16 (where supported)
    python scripts/bench_train.py --mode rounds         # whole runs one after the other instead
    python scripts/bench_train.py --device cuda         # both sides on the GPU (rounds of whole epochs)
    python scripts/bench_train.py --device cuda --net smp-r34 --batch-size 16 --crop 512

``--device`` (cpu or cuda; default cuda when available, as `segpipe fit` picks it) sets the device
of both sides. Only whole epochs are timed, epoch ends included; the first epoch of each side is
warm-up (it fills segpipe's decoded-image cache, as any real run's first epoch does, and lets
oneDNN/cuDNN pick their kernels).

``--mode interleaved`` (the default on CPU) pairs every step: after each `segpipe fit` training
step a callback runs one bare-loop step in the same process, timed on its own, with segpipe's
DataLoader workers paused (SIGSTOP) so that they neither slow the bare step down nor get ahead for
free during it. segpipe's time is everything else from the start of the first timed epoch to the
end of the last one: waiting for data, the training steps, hooks, logging, checkpoints and epoch
ends. Pairing step by step cancels the machine's drift, which on a shared VM moves whole runs by
±30 %, so the ratio measures segpipe's overhead rather than the neighbours. It is refused on CUDA:
kernels run asynchronously, so segpipe's queued work would run on while the bare step is timed.

``--mode rounds`` (the default on CUDA) alternates whole runs, ``--rounds`` times: a `segpipe fit`
of one warm-up epoch and ``--epochs`` timed ones, then the bare loop for as many epochs of as many
steps; on CUDA the clock is read after ``torch.cuda.synchronize()``. Each round's ratio is
printed: the same comparison, exposed to the drift.

Goal: ratio (segpipe images/s over bare images/s) >= 0.95 on CPU, >= 0.9 on CUDA.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import BareLoop, pick_device, precision_for, refuse_missing_cuda, synchronize  # noqa: E402

if __name__ == "__main__":
    refuse_missing_cuda()  # --device cuda without CUDA: at once, before Lightning's import

import lightning.pytorch as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpipe.argparsing import at_least, positive_int  # noqa: E402
from segpipe.configs import FOLDER as CONFIGS  # noqa: E402
from segpipe.lightning_cli import run_cli  # noqa: E402


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


def _signal_workers(sig: int) -> None:
    # DataLoader workers are multiprocessing children of this process (and its only ones here).
    for child in multiprocessing.active_children():
        if child.pid is not None:
            os.kill(child.pid, sig)


class Interleave(L.Callback):
    """After each segpipe training step, one bare step timed on its own, loader workers paused
    (CPU only).

    segpipe's time runs from the start of the first timed epoch to the end of training (the last
    epoch's end included), less the bare steps.

    Args:
        bare: The bare loop.
        warmup_epochs: Epochs not timed.
    """

    def __init__(self, bare: BareLoop, warmup_epochs: int) -> None:
        self.bare = bare
        self.warmup_epochs = warmup_epochs
        self.segpipe_s: list[float] = []
        self.bare_s: list[float] = []
        self.tail_s = 0.0  # after the last step: the last epoch's end
        self.images = 0
        self._mark = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.current_epoch == self.warmup_epochs:
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

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.segpipe_s:
            self.tail_s = time.perf_counter() - self._mark


class EpochTimer(L.Callback):
    """Wall time of segpipe's epochs after the warm-up ones, epoch ends included.

    Args:
        warmup_epochs: Epochs not timed.
        device: The training device (synchronised before the clock is read).
    """

    def __init__(self, warmup_epochs: int, device: torch.device) -> None:
        self.warmup_epochs = warmup_epochs
        self.device = device
        self.images = 0
        self.steps = 0
        self.epochs = 0
        self._t0: float | None = None
        self.seconds = float("nan")
        # Where the host's time went over the timed epochs (host clock, no extra synchronisation,
        # so on CUDA a step's share is the time the host spent queueing it or blocked in it):
        # waiting for a batch (the loader, its copy to the device and on_after_batch_transfer:
        # from one step's end to the next one's start, or from the epoch's start), the steps, and
        # epoch ends (from the last step's end to the next epoch's start or the end of training).
        self.wait_s = self.step_s = self.end_s = 0.0
        self.first_wait_s = 0.0  # of wait_s: for each epoch's first batch
        # of end_s: the run's last epoch end, with its final checkpoint, which a run pays once
        self.last_end_s = 0.0
        self._mark: float | None = None
        self._in_epoch_end = False

    def _timed(self, trainer) -> bool:  # noqa: ANN001
        return trainer.current_epoch >= self.warmup_epochs

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        now = time.perf_counter()
        if trainer.current_epoch == self.warmup_epochs:
            synchronize(self.device)
            self._t0 = now = time.perf_counter()
        elif self._in_epoch_end and self._mark is not None:
            self.end_s += now - self._mark
        if self._timed(trainer):
            self.epochs += 1
        self._mark, self._in_epoch_end = now, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        now = time.perf_counter()
        if self._timed(trainer) and self._mark is not None:
            self.wait_s += now - self._mark
            if batch_idx == 0:
                self.first_wait_s += now - self._mark
        self._mark = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        now = time.perf_counter()
        if self._timed(trainer):
            self.images += int(batch["image"].shape[0])
            self.steps += 1
            if self._mark is not None:
                self.step_s += now - self._mark
        self._mark = now

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._in_epoch_end = self._timed(trainer)  # the gap since the last step is the epoch end

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        # after every callback's on_train_epoch_end (checkpoints) of the last epoch
        if self._t0 is not None:
            synchronize(self.device)
            now = time.perf_counter()
            self.seconds = now - self._t0
            if self._in_epoch_end and self._mark is not None:
                self.last_end_s = now - self._mark
                self.end_s += self.last_end_s


#: `segpipe fit` overrides selecting the bench's network (as the bare loop builds it).
NETS = {
    "unet": lambda args: [f"--model.net.init_args.base_channels={args.base}"],
    "smp-r34": lambda args: [
        "--model.net.class_path=segpipe.models.SmpModel", "--model.net.init_args.arch=unet",
        "--model.net.init_args.encoder_name=resnet34", "--model.net.init_args.encoder_weights=null",
    ],
}


def segpipe_args(args: argparse.Namespace, root: Path, run_dir: Path, **trainer: object) -> list[str]:
    """`segpipe fit` arguments: the folder config with the bench's model, data and precision."""
    return [
        "fit", "--config", str(CONFIGS / "folder_unet.yaml"),
        f"--data.root={root}", f"--data.layout={args.layout}",
        f"--data.num_classes={args.classes}", f"--data.batch_size={args.batch_size}",
        f"--data.crop_size={args.crop}", "--data.ignore_index=255",
        "--model.loss=ce",  # as the bare loop
        *NETS[args.net](args),
        f"--trainer.precision={args.precision}",
        f"--trainer.accelerator={'gpu' if args.device.type == 'cuda' else 'cpu'}",
        "--trainer.devices=1",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={run_dir}",
        *(f"--trainer.{k}={v}" for k, v in trainer.items()),
        *(["--data.num_workers", str(args.workers)] if args.workers is not None else []),
        *args.override,
    ]


def run_interleaved(args: argparse.Namespace, root: Path, run_dir: Path) -> tuple[float, float]:
    """One `segpipe fit` with a paired bare step after each step; (segpipe, bare) images/s."""
    meter = Interleave(BareLoop(args, args.device), warmup_epochs=1)
    run_cli(
        segpipe_args(args, root, run_dir, max_epochs=1 + args.epochs),
        callbacks=[meter],
    )
    seg_s, bare_s = sum(meter.segpipe_s) + meter.tail_s, sum(meter.bare_s)
    steps = len(meter.segpipe_s)
    # Spread of the pairing: the ratio over each fifth of the timed steps.
    parts = [slice(i * steps // 5, (i + 1) * steps // 5) for i in range(5)]
    spread = [sum(meter.bare_s[p]) / sum(meter.segpipe_s[p]) for p in parts if meter.segpipe_s[p]]
    print(f"  {steps} paired steps; ratio per fifth of them: "
          + ", ".join(f"{r:.3f}" for r in spread)
          + f"; median step segpipe {1000 * statistics.median(meter.segpipe_s):.0f} ms, "
          f"bare {1000 * statistics.median(meter.bare_s):.0f} ms; last epoch end "
          f"{1000 * meter.tail_s:.0f} ms", flush=True)
    return meter.images / seg_s, meter.images / bare_s


def run_rounds(args: argparse.Namespace, root: Path, run_dir: Path) -> tuple[float, float]:
    """A `segpipe fit` of 1 + ``--epochs`` epochs, then the bare loop for as many epochs of as
    many steps (after one warm-up epoch); (segpipe, bare) images/s over the timed epochs."""
    timer = EpochTimer(warmup_epochs=1, device=args.device)
    run_cli(segpipe_args(args, root, run_dir, max_epochs=1 + args.epochs), callbacks=[timer])
    if not timer.steps:
        raise RuntimeError("segpipe fit ran no timed epoch (a time limit in the config?)")
    steps = round(timer.steps / timer.epochs)
    bare = BareLoop(args, args.device)
    bare.epochs(1, steps)  # warm-up epoch
    bare_s = bare.epochs(timer.epochs, steps)
    print(f"  {timer.epochs} timed epoch(s) of {steps} steps each side; segpipe "
          f"{timer.seconds:.2f} s, bare {bare_s:.2f} s", flush=True)
    e = timer.epochs
    print(f"  segpipe per epoch (host clock): waiting for batches {1000 * timer.wait_s / e:.0f} ms "
          f"(for the first one {1000 * timer.first_wait_s / e:.0f} ms), "
          f"steps {1000 * timer.step_s / e:.0f} ms, epoch end {1000 * timer.end_s / e:.0f} ms; "
          f"bare {1000 * bare_s / e:.0f} ms", flush=True)
    print(f"  of the epoch ends: the run's last one {1000 * timer.last_end_s:.0f} ms (its final "
          f"last.ckpt included, paid once per run); the others "
          f"{1000 * (timer.end_s - timer.last_end_s) / max(1, e - 1):.0f} ms each", flush=True)
    return timer.images / timer.seconds, timer.epochs * steps * args.batch_size / bare_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, help="real data instead of synthetic (e.g. CamVid)")
    p.add_argument("--layout", default="folder")
    p.add_argument("--classes", type=at_least(2), default=11)
    p.add_argument("--images", type=positive_int, default=368,
                   help="synthetic training images (default: as many as CamVid's train split, so "
                        "epoch ends weigh what they weigh in a real run)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--crop", type=positive_int, default=224)
    p.add_argument("--base", type=positive_int, default=16, help="U-Net base channels")
    p.add_argument("--net", choices=sorted(NETS), default="unet",
                   help="unet (segpipe's, depth 4, --base) or smp-r34 (smp's U-Net, ResNet-34 "
                        "encoder, random weights); e.g. --net smp-r34 --batch-size 16 --crop 512")
    p.add_argument("--mode", choices=["interleaved", "rounds"], default=None,
                   help="default: interleaved on CPU, rounds on CUDA (where interleaving is invalid)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="device of both sides (default: cuda when available, as segpipe fit)")
    p.add_argument("--epochs", type=positive_int, default=2, help="timed epochs after the warm-up one")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="how many times to repeat the measurement (interleaved: whole fits)")
    p.add_argument("--workers", type=at_least(0), default=None, help="DataLoader workers (default: segpipe's)")
    p.add_argument("--precision", default=None,
                   help="default: segpipe's default precision on the chosen device")
    p.add_argument("override", nargs="*", help="extra segpipe fit overrides, e.g. --model.log_train_metrics=true")
    args = p.parse_args()
    args.device = pick_device(args.device)
    cuda = args.device.type == "cuda"
    args.precision = args.precision or precision_for(args.device)
    if args.mode is None:
        args.mode = "rounds" if cuda else "interleaved"
    elif args.mode == "interleaved" and cuda:
        sys.exit(f"{Path(__file__).name}: error: --mode interleaved is not valid on CUDA (kernels "
                 "run asynchronously: segpipe's queued work would run on while the bare step is "
                 "timed); use --mode rounds")
    where = (f"cuda ({torch.cuda.get_device_name(args.device)})" if cuda
             else f"cpu, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}, precision {args.precision}, "
          + (f"U-Net(base={args.base})" if args.net == "unet" else "smp U-Net(resnet34)")
          + f", batch {args.batch_size}, crops {args.crop}x{args.crop}, "
          f"mode {args.mode}, {args.rounds} round(s), {args.epochs} timed epoch(s) after 1 "
          "warm-up epoch", flush=True)
    if args.mode == "rounds":
        print("  rounds: whole epochs of segpipe fit, then of the bare loop"
              + ("; on CUDA interleaving steps is not valid (asynchronous kernels), the clock "
                 "is read after torch.cuda.synchronize()" if cuda else ""), flush=True)
    segs, bares = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root or make_data(Path(tmp) / "data", args.images, args.classes)
        for r in range(args.rounds):
            run_dir = Path(tmp) / f"run{r}"
            if args.mode == "interleaved":
                seg, bare = run_interleaved(args, root, run_dir)
            else:
                seg, bare = run_rounds(args, root, run_dir)
            segs.append(seg)
            bares.append(bare)
            print(f"round {r + 1}: segpipe fit {seg:6.2f} images/s, bare loop {bare:6.2f} "
                  f"images/s, ratio {seg / bare:.3f}", flush=True)
    ratios = [s / b for s, b in zip(segs, bares)]
    if len(ratios) > 1:
        print(f"median ratio over {len(ratios)} rounds: {statistics.median(ratios):.3f}")
    goal = 0.9 if cuda else 0.95
    print(f"ratio: {statistics.median(ratios):.3f}  (goal >= {goal})")


if __name__ == "__main__":
    main()
