"""Per-epoch overhead of `segpipe fit` with short epochs, and what `data.samples_per_epoch` saves.

A small training set (ISBI's 20 training slices are 5 steps of 4) makes epochs of a few steps,
and each epoch has fixed work: the loader's iterator is restarted (with workers, their prefetch
pipeline drains and refills), epoch-end metrics are logged, callbacks run. This bench trains
the same number of steps on ISBI-sized synthetic data (26 grayscale 512² slices, batch 4,
256² crops, U-Net base 16, validation off so only epochs differ) twice: with one pass over the
data per epoch and with ``--data.samples_per_epoch`` (default 200 = 50 steps, as
``configs/isbi_unet.yaml``). It prints the median gap between two steps inside an epoch, the
median gap across an epoch boundary, and their difference: the per-epoch overhead in ms, and
its share of the run.

    python scripts/bench_epochs.py                    # this machine's default device
    python scripts/bench_epochs.py --device cuda --num-workers 4
    python scripts/bench_epochs.py --num-workers 2 --validations 6 --samples-per-epoch 16 \
        --config camvid_unet.yaml --data-root ../shared/data/camvid

With ``--validations N`` it measures instead how long each validation waits for its first batch,
with the val loader's workers starting the next validation when one ends, and without.

Run it alone on the machine: other load inflates both gaps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import pick_device, refuse_missing_cuda, synchronize  # noqa: E402

if __name__ == "__main__":
    refuse_missing_cuda()  # --device cuda without CUDA: at once, before Lightning's import

import lightning.pytorch as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpipe.argparsing import at_least, positive_int  # noqa: E402
from segpipe.data.io import write_image, write_mask  # noqa: E402
from segpipe.configs import FOLDER as CONFIGS  # noqa: E402
from segpipe.lightning_cli import run_cli  # noqa: E402


class Gaps(L.Callback):
    """Times from one training step's end to the next step's start, inside and across epochs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.inside: list[float] = []
        self.across: list[float] = []
        self._end: float | None = None
        self._epoch_start = False
        self.t0 = self.t1 = 0.0

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = self._now()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self._now()
        if self._end is not None:  # not the run's first step
            (self.across if self._epoch_start else self.inside).append(now - self._end)
        self._epoch_start = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end = self._now()

    def on_train_end(self, trainer, pl_module) -> None:
        self.t1 = self._now()


class ValWait(L.Callback):
    """The wait for each validation's first batch: from the end of the training epoch's last
    step (the evaluation loop's start and its loader's iterator included) to the first val
    batch's start; the sanity check and the first validation left out."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.waits: list[float] = []
        self._start: float | None = None
        self._seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,
                                  dataloader_idx=0) -> None:
        if self._start is not None and batch_idx == 0:
            self._seen += 1
            if self._seen > 1:
                self.waits.append(time.perf_counter() - self._start)
            self._start = None


def run_validations(root: Path, out: Path, args: argparse.Namespace, early: bool) -> list[float]:
    """Epochs of ``--samples-per-epoch`` with a validation after each; the first-batch waits."""
    from segpipe.data.loading import SlotDataLoader

    device = torch.device(args.device)
    probe = ValWait(device)
    plain = SlotDataLoader._pass_done
    if not early:
        SlotDataLoader._pass_done = lambda self: None
    try:
        run_cli(["fit", "--config", str(CONFIGS / args.config), f"--data.root={root}",
                 f"--trainer.default_root_dir={out}", f"--trainer.max_epochs={args.validations + 1}",
                 "--trainer.max_time=null", "--trainer.check_val_every_n_epoch=1",
                 f"--data.samples_per_epoch={args.samples_per_epoch}",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                 "--trainer.logger=false", "--checkpoint.save_last=false",
                 "--checkpoint.save_top_k=0", "--trainer.num_sanity_val_steps=0",
                 f"--trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
                 f"--data.num_workers={args.num_workers}"], callbacks=[probe])
    finally:
        SlotDataLoader._pass_done = plain
    return probe.waits


def make_data(root: Path, slices: int = 30, size: int = 512) -> Path:
    rng = np.random.default_rng(0)
    for split, idx in (("train", range(slices - 4)), ("val", range(slices - 4, slices))):
        for i in idx:
            labels = (rng.random((size // 16, size // 16)) > 0.2).astype(np.uint8)
            labels = np.kron(labels, np.ones((16, 16), np.uint8))
            image = (labels * 120 + rng.integers(0, 100, (size, size))).astype(np.uint8)
            write_image(root / split / "image" / f"{i:02d}.png", image)
            write_mask(root / split / "label" / f"{i:02d}.png", labels * 255)
    return root


def run(root: Path, out: Path, steps: int, extra: list[str], args: argparse.Namespace) -> Gaps:
    device = torch.device(args.device)
    gaps = Gaps(device)
    run_cli(["fit", "--config", str(CONFIGS / "isbi_unet.yaml"), f"--data.root={root}",
             f"--trainer.default_root_dir={out}", f"--trainer.max_steps={steps}",
             "--trainer.max_time=null", "--trainer.limit_val_batches=0",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             "--trainer.logger=false", "--checkpoint.save_last=false", "--checkpoint.save_top_k=0",
             f"--trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
             f"--data.num_workers={args.num_workers}", *extra], callbacks=[gaps])
    return gaps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--steps", type=positive_int, default=120, help="training steps per run (120)")
    p.add_argument("--samples-per-epoch", type=positive_int, default=200)
    p.add_argument("--num-workers", type=at_least(0), default=0)
    p.add_argument("--validations", type=at_least(0), default=0,
                   help="instead: the wait for each validation's first batch over this many "
                        "validations (one per epoch of --samples-per-epoch), with and without "
                        "the val workers starting the next one when one ends")
    p.add_argument("--config", default="isbi_unet.yaml",
                   help="--validations: the shipped config to fit (default isbi_unet.yaml)")
    p.add_argument("--data-root", type=Path,
                   help="--validations: its data (default: synthetic ISBI-sized slices)")
    args = p.parse_args()
    args.device = pick_device(args.device).type
    if args.validations:
        with tempfile.TemporaryDirectory() as tmp:
            root = args.data_root or make_data(Path(tmp) / "isbi")
            print(f"device {args.device}, {args.num_workers} loader workers, {args.config} on "
                  f"{args.data_root or 'synthetic ISBI-sized data (4 val slices)'}: a validation "
                  f"after each epoch of {args.samples_per_epoch} samples")
            for early in (False, True):
                waits = run_validations(root, Path(tmp) / str(early), args, early)
                label = "next validation started when one ends" if early else "loaded when it begins"
                print(f"  {label}: first val batch after {1e3 * statistics.median(waits):.1f} ms "
                      f"(median of {len(waits)} validations; min {1e3 * min(waits):.1f}, "
                      f"max {1e3 * max(waits):.1f})", flush=True)
        return
    for name in ("steps", "samples_per_epoch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_data(Path(tmp) / "isbi")
        rows = []
        for label, extra in (("one pass per epoch (6 steps)", ["--data.samples_per_epoch=null"]),
                             (f"samples_per_epoch={args.samples_per_epoch}",
                              [f"--data.samples_per_epoch={args.samples_per_epoch}"])):
            g = run(root, Path(tmp) / label.split()[0], args.steps, extra, args)
            if not g.inside or not g.across:
                sys.exit(f"{Path(__file__).name}: error: --steps {args.steps} gives no step gap "
                         "inside or across epochs for one of the runs; train more steps")
            inside, across = statistics.median(g.inside), statistics.median(g.across)
            epochs = len(g.across) + 1
            overhead = max(0.0, across - inside) * len(g.across)
            wall = g.t1 - g.t0
            rows.append((label, epochs, inside * 1e3, across * 1e3, (across - inside) * 1e3,
                         100 * overhead / wall, wall))
    print(f"device {args.device}, {args.steps} steps of batch 4 (256² crops, U-Net base 16), "
          f"{args.num_workers} loader workers")
    print(f"{'epochs':<32} {'n':>4} {'gap in epoch':>13} {'gap at epoch start':>19} "
          f"{'per-epoch overhead':>19} {'share':>6} {'wall':>7}")
    for label, epochs, inside, across, extra_ms, share, wall in rows:
        print(f"{label:<32} {epochs:>4} {inside:>10.1f} ms {across:>16.1f} ms {extra_ms:>16.1f} ms "
              f"{share:>5.1f}% {wall:>6.1f}s")


if __name__ == "__main__":
    main()
