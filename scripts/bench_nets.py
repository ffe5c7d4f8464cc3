#!/usr/bin/env python
"""What each network costs per training step and per evaluation batch, in fp32 and bf16.

A time budget (``trainer.max_time``) buys epochs, so a network's step time decides how much
training it gets. This script times the bare training step (the network, AdamW,
cross-entropy, channels-last, one batch in the device's memory: ``bench_train.py``'s bare loop)
and a forward pass in eval mode, for each network given, in fp32 and under bf16 autocast, on
one device. Nets are given as ``CLASS_PATH`` or ``"CLASS_PATH {init args as YAML}"``;
``in_channels`` and ``num_classes`` are filled in unless given.

    python scripts/bench_nets.py        # CamVid's U-Net 16 and smp U-Nets on EfficientNet-Lite0
    python scripts/bench_nets.py --net 'segpipe.models.UNet {base_channels: 24}' \\
        --net 'segpipe.models.SmpModel {encoder_name: resnet18}' --crop 160 --batch-size 8

Run it alone: other work on the machine slows the figures unevenly. Even alone, one pass of a
few steps per net varies from run to run (on the 2-core machine one network took 744 and
1060 ms per step in two runs); ``--rounds 3`` times the nets in turn three times and keeps each
one's fastest round, so that a slow spell of the machine does not fall on one net alone.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import BareLoop, pick_device, synchronize  # noqa: E402

from segpipe.argparsing import positive_int  # noqa: E402

_LITE0 = "segpipe.models.SmpModel {arch: unet, encoder_name: tu-tf_efficientnet_lite0"
#: The CamVid config's U-Net and smp U-Nets on EfficientNet-Lite0 with smp's default decoder
#: (256 channels at 1/16 scale) and one of half its width.
DEFAULT_NETS = (
    "segpipe.models.UNet {base_channels: 16, depth: 4}",
    _LITE0 + "}",
    _LITE0 + ", smp_kwargs: {decoder_channels: [128, 64, 32, 16, 8]}}",
)


def parse_net(spec: str, in_channels: int, num_classes: int) -> tuple[type, dict[str, Any]]:
    """The class and init args that ``"CLASS_PATH {init args}"`` names.

    Raises:
        SystemExit: With a one-line message naming the spec, when its class cannot be found or
            its init args are not a YAML mapping.
    """
    path, _, init = spec.strip().partition(" ")
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        sys.exit(f"bench_nets.py: error: --net {spec!r}: no class {path!r} ({exc}); "
                 "give a class path such as segpipe.models.UNet")
    kwargs: Any = yaml.safe_load(init) if init.strip() else {}
    if not isinstance(kwargs, dict):
        sys.exit(f"bench_nets.py: error: --net {spec!r}: the init args {init.strip()!r} are not a "
                 "YAML mapping; write them as {name: value, ...}")
    return cls, {"in_channels": in_channels, "num_classes": num_classes, **kwargs}


def eval_ms(bare: BareLoop, batch: torch.Tensor, reps: int, warmup: int) -> float:
    """Milliseconds per forward pass of ``batch`` in eval mode, without gradients."""
    bare.net.eval()
    with torch.no_grad(), bare.autocast:
        for _ in range(warmup):
            bare.net(batch)
        synchronize(bare.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            bare.net(batch)
        synchronize(bare.device)
    bare.net.train()
    return (time.perf_counter() - t0) / reps * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", action="append", metavar="SPEC",
                        help="CLASS_PATH or 'CLASS_PATH {init args}' (repeatable; default: "
                             "U-Net 16 and two smp U-Nets on EfficientNet-Lite0)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"],
                        choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--in-channels", type=positive_int, default=3)
    parser.add_argument("--classes", type=positive_int, default=11)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--crop", type=positive_int, default=160, help="training crop (160)")
    parser.add_argument("--eval-size", type=positive_int, nargs=2, default=[192, 256],
                        metavar=("H", "W"), help="evaluation size (192 256: CamVid's 180x240 "
                        "padded to a multiple of 32)")
    parser.add_argument("--eval-batch-size", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=15)
    parser.add_argument("--warmup", type=positive_int, default=3)
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="timed rounds, each timing every net and precision in turn, the "
                             "fastest kept: with 2 or more a slow spell of the machine does not "
                             "fall on one net alone (the networks stay in memory together)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    specs = args.net or list(DEFAULT_NETS)
    nets = {spec: parse_net(spec, args.in_channels, args.classes) for spec in specs}  # fail early
    threads = torch.get_num_threads()
    print(f"device {device}, {threads} threads; training batch {args.batch_size}x"
          f"{args.in_channels}x{args.crop}x{args.crop}, evaluation batch "
          f"{args.eval_batch_size}x{args.in_channels}x{args.eval_size[0]}x{args.eval_size[1]}, "
          f"{args.classes} classes; means over {args.steps} timed steps after "
          f"{args.warmup} warm-up steps"
          + (f", the fastest of {args.rounds} rounds taken in turn" if args.rounds > 1 else ""))
    print(f"{'precision':11s} {'params':>7s} {'train ms/step':>13s} {'images/s':>9s} "
          f"{'eval ms/batch':>13s}  net")
    loops: dict[tuple[str, str], tuple[BareLoop, torch.Tensor, float]] = {}
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for round_ in range(args.rounds):
        for spec, (cls, kwargs) in nets.items():
            for precision in args.precision:
                key = (spec, precision)
                if key not in loops:
                    loops[key] = warmed_loop(cls, kwargs, precision, args, device)
                bare, batch, params = loops[key]
                train = bare.epochs(1, args.steps) / args.steps * 1e3
                evaluation = eval_ms(bare, batch, args.steps, args.warmup)
                if key in best:  # the fastest round of each
                    train, evaluation = min(best[key][0], train), min(best[key][1], evaluation)
                best[key] = train, evaluation
                if args.rounds == 1:
                    del loops[key]  # one round: one network in memory at a time
                if round_ == args.rounds - 1:
                    print(f"{precision:11s} {params:6.1f}M {train:13.1f} "
                          f"{args.batch_size / train * 1e3:9.1f} {evaluation:13.1f}  {spec}",
                          flush=True)


def warmed_loop(cls: type, kwargs: dict[str, Any], precision: str, args: argparse.Namespace,
                device: torch.device) -> tuple[BareLoop, torch.Tensor, float]:
    """A network's bare training loop after its warm-up steps, its evaluation batch, and its
    parameter count in millions."""
    net = cls(**kwargs)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    loop = argparse.Namespace(classes=args.classes, batch_size=args.batch_size,
                              crop=args.crop, precision=precision)
    bare = BareLoop(loop, device, net=net)
    for _ in range(args.warmup):
        bare.step()
    # the training batch's channels: a spec's own in_channels wins over --in-channels
    batch = torch.randn(args.eval_batch_size, bare.x.shape[1], *args.eval_size,
                        device=device).contiguous(memory_format=torch.channels_last)
    return bare, batch, params


if __name__ == "__main__":
    main()
