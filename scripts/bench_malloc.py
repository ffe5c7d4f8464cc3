#!/usr/bin/env python
"""U-Net training steps with glibc's default allocator settings against segpipe's (``mallopt``).

Each measurement is a fresh process (the settings are per process) running the bare training
loop of ``bench_train.py``; the two settings alternate, so drift of the machine hits both alike.

    python scripts/bench_malloc.py                 # 4 pairs, U-Net(16), batch 8, 224² crops
    python scripts/bench_malloc.py --pairs 6 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segpipe.argparsing import at_least, positive_int  # noqa: E402

_CHILD = """
import argparse, json, resource, sys, time
sys.path.insert(0, {repo!r}); sys.path.insert(0, {scripts!r})
from segpipe.runtime import tune_allocator
tuned = tune_allocator()
from bench_train import BareLoop
from segpipe.runtime import default_precision
args = argparse.Namespace(classes=11, base={base}, net="unet", batch_size={batch}, crop={crop},
                          precision=default_precision())
bare = BareLoop(args)
for _ in range({warmup}):
    bare.step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t0 = time.perf_counter()
for _ in range({steps}):
    bare.step()
seconds = time.perf_counter() - t0
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({{"tuned": tuned, "ms": 1000 * seconds / {steps}, "faults": faults / {steps}}}))
"""


def measure(args: argparse.Namespace, tuned: bool) -> dict:
    code = _CHILD.format(repo=str(REPO), scripts=str(REPO / "scripts"), base=args.base,
                         batch=args.batch_size, crop=args.crop, warmup=args.warmup,
                         steps=args.steps)
    env = {k: v for k, v in os.environ.items() if k != "SEGPIPE_MALLOC"}
    if not tuned:
        env["SEGPIPE_MALLOC"] = "default"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=positive_int, default=4)
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--warmup", type=at_least(0), default=5)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--crop", type=positive_int, default=224)
    p.add_argument("--base", type=positive_int, default=16)
    args = p.parse_args()
    results: dict[bool, list[dict]] = {False: [], True: []}
    for i in range(args.pairs):
        for tuned in (False, True):
            r = measure(args, tuned)
            results[tuned].append(r)
            name = "segpipe (mallopt)" if r["tuned"] else "glibc default    "
            print(f"pair {i + 1}: {name} {r['ms']:6.1f} ms/step, {r['faults']:8.0f} page faults/step",
                  flush=True)
    default_ms = statistics.median(r["ms"] for r in results[False])
    tuned_ms = statistics.median(r["ms"] for r in results[True])
    print(f"median: glibc default {default_ms:.1f} ms/step, segpipe {tuned_ms:.1f} ms/step "
          f"({default_ms / tuned_ms:.2f}x); page faults/step "
          f"{statistics.median(r['faults'] for r in results[False]):.0f} vs "
          f"{statistics.median(r['faults'] for r in results[True]):.0f}")


if __name__ == "__main__":
    main()
