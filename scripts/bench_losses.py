#!/usr/bin/env python
"""What the Lovász-softmax costs per training step: segpipe's batched loss against smp's.

``model.loss`` or ``model.late_loss`` ``ce+lovasz`` adds a Lovász-softmax term to every training
step. smp's ``LovaszLoss`` sorts each class's pixel errors in its own 1-D sort, synchronises with
the host once per class, and indexes the non-ignored pixels (one more synchronisation);
segpipe's :class:`~segpipe.tasks.losses.LovaszSoftmaxLoss` sorts all classes in one batched
sort, without synchronising. This script times the forward and backward of each on random
logits the size of a training batch (default: ``configs/camvid_lite0.yaml``'s, 8 crops of 256²,
11 classes, a twentieth of the pixels void), on one device, synchronising CUDA where it reads
the clock; it checks that both give the same loss, and prints the fastest of ``--rounds``
rounds of ``--repeats`` calls each, the two losses timed in turn in each round.

    python scripts/bench_losses.py
    python scripts/bench_losses.py --device cuda --batch-size 16 --crop 512

Run it alone: other work on the machine slows the figures unevenly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import pick_device, refuse_missing_cuda, synchronize  # noqa: E402

from segpipe.argparsing import positive_int  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    refuse_missing_cuda(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: what segpipe would use (cuda when available)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--crop", type=positive_int, default=256)
    parser.add_argument("--classes", type=positive_int, default=11)
    parser.add_argument("--repeats", type=positive_int, default=3, help="calls per round")
    parser.add_argument("--rounds", type=positive_int, default=3)
    args = parser.parse_args(argv)

    import segmentation_models_pytorch as smp

    from segpipe.tasks.losses import LovaszSoftmaxLoss

    device = pick_device(args.device)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.classes, args.crop, args.crop)
    logits = (torch.randn(shape, generator=g) * 2).to(device)
    void = args.classes  # the label past the classes, ignored
    target = torch.randint(0, args.classes, shape[:1] + shape[2:], generator=g)
    target[torch.rand(target.shape, generator=g) < 0.05] = void
    target = target.to(device)
    losses = {"smp LovaszLoss": smp.losses.LovaszLoss(mode="multiclass", ignore_index=void),
              "segpipe LovaszSoftmaxLoss": LovaszSoftmaxLoss(ignore_index=void)}

    def step(loss_fn: torch.nn.Module) -> float:
        x = logits.clone().requires_grad_()
        value = loss_fn(x, target)
        value.backward()
        return float(value.detach())

    values = {name: step(fn) for name, fn in losses.items()}  # also warms both up
    a, b = values.values()
    print(f"device {device}, {torch.get_num_threads()} threads; logits {tuple(shape)} float32; "
          f"losses {a:.6f} and {b:.6f} (difference {abs(a - b):.1e})")
    best = dict.fromkeys(losses, float("inf"))
    for _ in range(args.rounds):
        for name, fn in losses.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(args.repeats):
                step(fn)
            synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / args.repeats)
    reference = best["smp LovaszLoss"]
    for name, seconds in best.items():
        print(f"{name:28s} forward + backward {seconds * 1000:8.1f} ms  "
              f"({reference / seconds:.2f}x smp's speed)")


if __name__ == "__main__":
    main()
