#!/usr/bin/env python
"""U-Net training steps under a container's CPU quota: PyTorch's thread count against segpipe's.

Docker's ``--cpus`` and Kubernetes CPU limits are cgroup CPU *quotas*: every host CPU stays
visible (``os.cpu_count()``, the affinity mask), so PyTorch starts a compute thread per visible
core, and the kernel throttles the whole group once the threads together exceed the quota.
segpipe's CLI caps the threads to the quota (``segpipe.runtime.fit_threads_to_cpus``).

This script makes such a cgroup (root and a cgroup CPU controller needed: v1 ``cpu`` or v2
``cpu.max``), runs the bare training loop of ``bench_train.py`` in fresh processes inside it,
alternately with PyTorch's own thread count and with segpipe's, and removes the cgroup:

    sudo python scripts/bench_threads.py                  # quota: half the visible CPUs
    sudo python scripts/bench_threads.py --quota 1.5 --pairs 4 --steps 20

``--quota 0`` runs the same pairs without a cgroup (both sides should then be equal).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segpipe.argparsing import at_least, positive_int  # noqa: E402
PERIOD_US = 100_000

_CHILD = """
import argparse, json, sys, time
sys.path.insert(0, {repo!r}); sys.path.insert(0, {scripts!r})
import torch
from segpipe.runtime import available_cpus, default_precision, fit_threads_to_cpus
default_threads = torch.get_num_threads()
if {fit}:
    fit_threads_to_cpus()
from bench_train import BareLoop
args = argparse.Namespace(classes=11, base={base}, net="unet", batch_size={batch}, crop={crop},
                          precision=default_precision())
bare = BareLoop(args)
for _ in range({warmup}):
    bare.step()
t0 = time.perf_counter()
for _ in range({steps}):
    bare.step()
seconds = time.perf_counter() - t0
print(json.dumps({{"ms": 1000 * seconds / {steps}, "threads": torch.get_num_threads(),
                  "default_threads": default_threads, "available_cpus": available_cpus()}}))
"""


class CpuQuota:
    """A cgroup with a CPU quota, made under the first writable CPU controller; removed on exit."""

    def __init__(self, cpus: float) -> None:
        self.cpus = cpus
        self.folder: Path | None = None
        self.procs_file = ""

    def __enter__(self) -> CpuQuota:
        name = f"segpipe-bench-threads-{os.getpid()}"
        errors = []
        v1 = Path("/sys/fs/cgroup/cpu")
        v2_roots = [p for p in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
                    if (p / "cgroup.controllers").exists()]
        if (v1 / "cpu.cfs_quota_us").exists():
            try:
                folder = v1 / name
                folder.mkdir()
                self.folder, self.procs_file = folder, "tasks"
                (folder / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (folder / "cpu.cfs_quota_us").write_text(str(int(self.cpus * PERIOD_US)))
                return self
            except OSError as exc:
                errors.append(f"{v1}: {exc}")
                self.__exit__()
        for root in v2_roots:
            try:
                if "cpu" not in (root / "cgroup.controllers").read_text().split():
                    errors.append(f"{root}: no cpu controller")
                    continue
                (root / "cgroup.subtree_control").write_text("+cpu")
                folder = root / name
                folder.mkdir()
                self.folder, self.procs_file = folder, "cgroup.procs"
                (folder / "cpu.max").write_text(f"{int(self.cpus * PERIOD_US)} {PERIOD_US}")
                return self
            except OSError as exc:
                errors.append(f"{root}: {exc}")
                self.__exit__()
        raise SystemExit("bench_threads.py: cannot make a cgroup with a CPU quota ("
                         + "; ".join(errors or ["no cgroup CPU controller mounted"])
                         + "); run it as root on Linux, or with --quota 0 for no quota")

    def enter_child(self) -> None:
        """``preexec_fn``: move the starting child process into the cgroup."""
        assert self.folder is not None
        (self.folder / self.procs_file).write_text(str(os.getpid()))

    def __exit__(self, *exc: object) -> None:
        if self.folder is not None:
            for _ in range(50):  # the last child may take a moment to leave
                try:
                    self.folder.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
            self.folder = None


def measure(args: argparse.Namespace, fit: bool, quota: CpuQuota | None) -> dict:
    code = _CHILD.format(repo=str(REPO), scripts=str(REPO / "scripts"), fit=fit, base=args.base,
                         batch=args.batch_size, crop=args.crop, warmup=args.warmup,
                         steps=args.steps)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         preexec_fn=quota.enter_child if quota else None)
    if res.returncode != 0:
        raise SystemExit(f"bench_threads.py: the measuring process failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p.add_argument("--quota", type=float, default=max(1, (visible or 2) // 2),
                   help="CPUs' worth of time the cgroup may use (default: half the visible CPUs; "
                        "0: no cgroup)")
    p.add_argument("--pairs", type=positive_int, default=3)
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--warmup", type=at_least(0), default=3)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--crop", type=positive_int, default=224)
    p.add_argument("--base", type=positive_int, default=16)
    args = p.parse_args()
    results: dict[bool, list[dict]] = {False: [], True: []}
    quota = CpuQuota(args.quota) if args.quota > 0 else None
    where = f"a cgroup with a quota of {args.quota:g} CPU(s)" if quota else "no cgroup"
    print(f"{visible} CPUs visible; U-Net base {args.base}, batch {args.batch_size}, "
          f"{args.crop}² crops; {where}", flush=True)
    with quota or contextlib.nullcontext():
        for i in range(args.pairs):
            for fit in (False, True):
                r = measure(args, fit, quota)
                results[fit].append(r)
                name = "segpipe threads" if fit else "PyTorch default"
                print(f"pair {i + 1}: {name}: {r['threads']:3d} threads, {r['ms']:7.1f} ms/step "
                      f"(available_cpus {r['available_cpus']})", flush=True)
    default_ms = statistics.median(r["ms"] for r in results[False])
    fitted_ms = statistics.median(r["ms"] for r in results[True])
    print(f"median: PyTorch default {default_ms:.1f} ms/step, segpipe {fitted_ms:.1f} ms/step "
          f"({default_ms / fitted_ms:.2f}x)")


if __name__ == "__main__":
    main()
