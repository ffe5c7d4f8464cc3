"""What the benchmark scripts share, light enough to import before Lightning.

Each ``bench_*.py`` script calls :func:`refuse_missing_cuda` before it imports Lightning (about
5 s on a 2-core CPU), so that ``--device cuda`` on a machine without CUDA fails at once, in one
line, instead of after the imports. :func:`pick_device`, :func:`precision_for` and
:func:`synchronize` are the scripts' one copy of the device logic, and :class:`BareLoop` the
bare training loop that ``bench_train.py``, ``bench_nets.py`` and ``profile_train_step.py``
compare with (it needs torch and segpipe's networks, not Lightning).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segpipe.argparsing import command_line_value  # noqa: E402

__all__ = ["BareLoop", "pick_device", "precision_for", "refuse_missing_cuda", "synchronize"]


def refuse_missing_cuda(argv: Sequence[str] | None = None) -> None:
    """Exit with :func:`pick_device`'s one-line message when ``argv`` (default: the command
    line) asks for ``--device cuda`` and CUDA is not available."""
    argv = sys.argv[1:] if argv is None else argv
    if command_line_value(argv, "--device") == "cuda":
        pick_device("cuda")


def pick_device(name: str | None) -> torch.device:
    """``name``, or what segpipe would use (cuda when available); exits with a one-line message
    naming the script run when CUDA is asked for and not available."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible")
        sys.exit(f"{Path(sys.argv[0]).name}: error: --device cuda: CUDA is not available ({why}); "
                 "use --device cpu")
    return torch.device(name)


def precision_for(device: torch.device | str) -> str:
    """segpipe's default precision (:func:`segpipe.runtime.default_precision`) on ``device``."""
    from segpipe.runtime import default_precision

    if torch.device(device).type == "cuda":
        return default_precision()
    try:  # as default_precision() on a machine without CUDA
        return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"
    except (AttributeError, RuntimeError):
        return "32-true"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA), so that the clock reads finished work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareLoop:
    """The reference: the same network (or ``net``, given), AdamW, cross-entropy, autocast, one
    batch in the device's memory (``net``'s ``in_channels`` channels, else 3)."""

    def __init__(self, args: argparse.Namespace, device: torch.device | str = "cpu",
                 net: torch.nn.Module | None = None) -> None:
        from segpipe.models import SmpModel, UNet

        torch.manual_seed(0)
        self.device = device = torch.device(device)
        if net is None and args.net == "unet":
            net = UNet(3, args.classes, base_channels=args.base, depth=4)
        elif net is None:  # smp-r34: smp's U-Net with a ResNet-34 encoder, random weights
            net = SmpModel("unet", "resnet34", in_channels=3, num_classes=args.classes)
        self.net = net.to(device)
        self.net.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3, weight_decay=1e-4)
        shape = (args.batch_size, getattr(net, "in_channels", 3), args.crop, args.crop)
        self.x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, args.classes, (args.batch_size, args.crop, args.crop),
                               device=device)
        mode = args.precision.split("-")[0]
        self.autocast = torch.autocast(
            device.type, dtype=torch.float16 if mode == "16" else torch.bfloat16,
            enabled=mode in ("bf16", "16"),
        )
        # fp16 needs loss scaling, as Lightning's 16-mixed does
        self.scaler = torch.amp.GradScaler(device.type) if mode == "16" else None

    def step(self) -> None:
        with self.autocast:
            logits = self.net(self.x)
        loss = torch.nn.functional.cross_entropy(logits.float(), self.y, ignore_index=255)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()

    def epochs(self, epochs: int, steps: int) -> float:
        """Seconds for ``epochs`` epochs of ``steps`` steps (the queued work finished)."""
        synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(epochs * steps):
            self.step()
        synchronize(self.device)
        return time.perf_counter() - t0
