#!/usr/bin/env python
"""Where a `segpipe fit` training step spends the host's time, beside a bare loop's step.

On a GPU a small network's step is bound by the host: the device finishes each kernel before the
Python that launches the next one has run. This script trains `segpipe fit` (the folder config,
synthetic data, validation off, as `scripts/bench_train.py`) and, in its second epoch, profiles
``--steps`` steps with ``torch.profiler`` (host-side operator times, device synchronisations
and device-to-host copies per step) and with ``cProfile`` (the Python functions: Lightning's
loop, segpipe's task, torchmetrics, the data module's hooks); then the bare loop's steps (the same
network, AdamW, cross-entropy, autocast, one batch in the device's memory) with torch.profiler.

    python scripts/profile_train_step.py                       # this machine's default device
    python scripts/profile_train_step.py --device cpu --base 4 --crop 32   # host overhead on a CPU

On a CPU, a tiny network (``--base 4 --crop 32``) makes the step's compute negligible, so the
step times are the host overhead a GPU run pays per step.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import BareLoop, pick_device, precision_for, synchronize  # noqa: E402
from bench_train import NETS, make_data, segpipe_args  # noqa: E402

from segpipe.argparsing import positive_int  # noqa: E402
from segpipe.lightning_cli import run_cli  # noqa: E402

#: Host-side events that wait for the device or copy from it.
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
               "aten::_local_scalar_dense", "aten::item", "cudaMemcpy", "Memcpy DtoH")


def _activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def _print_stats(cprof: cProfile.Profile, title: str, sort: str, lines: int,
                 *restrictions: str | int) -> None:
    out = io.StringIO()
    pstats.Stats(cprof, stream=out).sort_stats(sort).print_stats(*restrictions)
    print(f"\n== segpipe fit: cProfile, {title}\n" + "\n".join(out.getvalue().splitlines()[:lines]))


def _summary(prof: profile, steps: int, title: str) -> None:
    events = prof.key_averages()
    print(f"\n== {title}: torch.profiler, {steps} steps; host (self CPU) time per step by operator")
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))
    counts = {name: 0 for name in SYNC_EVENTS}
    for e in events:
        for name in SYNC_EVENTS:
            if name in e.key:
                counts[name] += e.count
    print("  per step: " + ", ".join(f"{k} {v / steps:.2f}" for k, v in counts.items()))


class Profiled(L.Callback):
    """Profile ``steps`` training steps of the second epoch (from its 3rd step on)."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps, self.device = steps, device
        self.seen = 0
        self.prof: profile | None = None
        self.cprof: cProfile.Profile | None = None
        self.t0 = self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.current_epoch == 1 and batch_idx == 2 and self.prof is None:
            synchronize(self.device)
            self.prof = profile(activities=_activities(self.device))
            self.prof.__enter__()
            self.cprof = cProfile.Profile()
            self.t0 = time.perf_counter()
            self.cprof.enable()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self.prof is None or self.cprof is None or self.seen >= self.steps:
            return
        self.seen += 1
        if self.seen == self.steps:
            self.cprof.disable()
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--net", choices=sorted(NETS), default="unet")
    p.add_argument("--base", type=positive_int, default=16)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--crop", type=positive_int, default=224)
    p.add_argument("--classes", type=positive_int, default=11)
    p.add_argument("--steps", type=positive_int, default=10, help="profiled steps (10)")
    p.add_argument("--precision", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--pstats", type=Path, default=None,
                   help="also save segpipe's cProfile statistics there (for pstats or snakeviz)")
    p.add_argument("override", nargs="*", help="extra segpipe fit overrides")
    args = p.parse_args()
    args.device = pick_device(args.device)
    args.precision = args.precision or precision_for(args.device)
    args.layout = "folder"
    images = args.batch_size * (args.steps + 4)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_data(Path(tmp) / "data", images, args.classes)
        cb = Profiled(args.steps, args.device)
        run_cli(segpipe_args(args, root, Path(tmp) / "run", max_epochs=2), callbacks=[cb])
    if cb.prof is None or cb.cprof is None or cb.seen < args.steps:
        sys.exit("profile_train_step: the second epoch had too few steps")
    print(f"segpipe fit: {1000 * cb.seconds / args.steps:.1f} ms per step (profiled, so slower)")
    if args.pstats is not None:
        cb.cprof.dump_stats(args.pstats)
    _summary(cb.prof, args.steps, "segpipe fit")
    _print_stats(cb.cprof, "by own time", "tottime", 45, 30)
    _print_stats(cb.cprof, "by cumulative time", "cumulative", 55, 40)
    _print_stats(cb.cprof, "segpipe's code, callbacks and logging, by cumulative time",
                 "cumulative", 45, r"segpipe/|callbacks|torchmetrics|logger_connector|result\.py", 30)

    bare = BareLoop(args, args.device)
    for _ in range(5):
        bare.step()
    synchronize(args.device)
    t0 = time.perf_counter()
    with profile(activities=_activities(args.device)) as prof:
        for _ in range(args.steps):
            bare.step()
        synchronize(args.device)
    print(f"\nbare loop: {1000 * (time.perf_counter() - t0) / args.steps:.1f} ms per step (profiled)")
    _summary(prof, args.steps, "bare loop")


if __name__ == "__main__":
    main()
