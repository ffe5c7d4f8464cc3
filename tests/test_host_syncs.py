"""No host synchronisation per training step: a CPU-measurable proxy for GPU throughput.

On a GPU, reading a value back (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``...) makes the
host wait until the device has finished everything queued, so it cannot queue the next step
while this one runs; so does making a device tensor from host data (``torch.as_tensor(8,
device=...)``: PyTorch copies it with ``cudaMemcpyAsync`` and then synchronises the stream).
These tests count both in ``segpipe fit``'s training steps (on the CPU, where they cost nothing
but are made all the same) with a ``TorchFunctionMode``; data loading, which reads CPU tensors,
and the optimisers' host-side step counters are excluded by the innermost known caller (the
training step itself runs inside the optimiser's ``step``, as Lightning's closure).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
from torch.overrides import TorchFunctionMode

from segpipe.callbacks import EMA
from segpipe.lightning_cli import run_cli
from segpipe.tracking import ThrottledProgressBar
from tests.cli_args import TINY_UNET
from tests.data.synthetic import make_folder_dataset

#: Tensor methods that read a device tensor's value on the host.
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}
#: Functions that make a tensor from host data: a blocking copy when it goes to a device.
FROM_HOST = {"tensor", "as_tensor", "new_tensor"}
#: Code that reads only host tensors: data loading, and the optimisers' step counters (kept on
#: the host by torch unless ``capturable``).
HOST_ONLY = ("torch/utils/data", "segpipe/data/", "torch/optim/")
#: ...except torch's weight averaging (in torch/optim/), whose counter lives on the device, and
#: the data module's hooks on the device's batch (uint8 normalisation).
DEVICE_READS = ("torch/optim/swa_utils.py", "segpipe/data/datamodule.py")
#: Where the innermost caller that decides is looked for.
KNOWN = (*HOST_ONLY, *DEVICE_READS, "segpipe/", "lightning/", "torchmetrics/", "tests/")


def _to_device_from_host(name: str, args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a FROM_HOST call copies host data to a device tensor (on a GPU, a sync)."""
    import torch

    data = args[1] if name == "new_tensor" and len(args) > 1 else (args[0] if args else None)
    if isinstance(data, torch.Tensor):
        return False  # a tensor already where it is (as_tensor returns it)
    return name == "new_tensor" or kwargs.get("device") is not None


def _counted(files: list[str]) -> bool:
    """Whether the innermost known caller is device code (not loading, not an optimiser's
    host counter)."""
    for f in files:
        if any(part in f for part in DEVICE_READS):
            return True
        if any(part in f for part in HOST_ONLY):
            return False
        if any(part in f for part in KNOWN):
            return True
    return True


class HostReads(TorchFunctionMode):
    """Counts host reads made while ``step`` is set, with the segpipe/Lightning line making them."""

    def __init__(self) -> None:
        super().__init__()
        self.step: tuple[int, int] | None = None
        self.reads: list[tuple[tuple[int, int], str, str]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        if self.step is not None and (
                name in HOST_READS
                or (name in FROM_HOST and _to_device_from_host(name, args, kwargs))):
            frames, frame = [], sys._getframe(1)
            while frame is not None:
                frames.append(frame)
                frame = frame.f_back
            files = [f.f_code.co_filename for f in frames]
            if _counted(files):
                caller = " < ".join(f"{Path(f.f_code.co_filename).name}:{f.f_lineno}"
                                    for f in frames[:8])
                self.reads.append((self.step, name, caller))
        return func(*args, **kwargs)


class MarkSteps(L.Callback):
    """Sets ``mode.step`` from a training batch's start until the next one or the epoch end."""

    def __init__(self, mode: HostReads) -> None:
        self.mode = mode

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mode.step = (trainer.current_epoch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.mode.step = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self.mode.step = None


def _fit_counting_reads(tmp_path: Path, *callbacks: L.Callback, args: tuple[str, ...] = ()) -> HostReads:
    root = make_folder_dataset(tmp_path / "ds", n_train=12, n_val=2, n_test=0, size=(40, 40),
                               num_classes=3)
    mode = HostReads()
    with mode:
        run_cli(["fit", f"--data.root={root}", f"--trainer.default_root_dir={tmp_path / 'run'}",
                 "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1000",
                 "--data.num_workers=0", "--model.loss=ce+dice", *TINY_UNET, *args],
                callbacks=[MarkSteps(mode), *callbacks])
    return mode


@pytest.mark.parametrize(("ema", "args"), [
    (False, ()), (True, ()), (False, ("--model.ohem_threshold=0.7", "--model.ohem_fraction=0.1")),
    (False, ("--model.loss=ce+lovasz",)),
], ids=["plain", "with segpipe's EMA", "with OHEM by threshold", "with the Lovász-softmax"])
def test_training_steps_read_nothing_back_from_the_device(
    tmp_path: Path, ema: bool, args: tuple[str, ...]
) -> None:
    mode = _fit_counting_reads(tmp_path, *([EMA(decay=0.99)] if ema else []), args=args)
    steps = {step for step, _, _ in mode.reads}
    where = Counter(f"{name} at {caller}" for _, name, caller in mode.reads)
    assert not mode.reads, f"host reads in {len(steps)} training steps: {dict(where)}"


def test_the_count_sees_lightnings_ema_reading_its_counter(tmp_path: Path) -> None:
    # What segpipe's EMA avoids, and proof that the count above can fail: torch's AveragedModel
    # compares its device counter with 0 at every update.
    from lightning.pytorch.callbacks import EMAWeightAveraging

    mode = _fit_counting_reads(tmp_path, EMAWeightAveraging(decay=0.99))
    steps = {step for step, _, _ in mode.reads}
    assert len(steps) >= 6 and any("swa_utils" in caller for _, _, caller in mode.reads)


def test_throttled_progress_bar_refreshes_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """One refresh (one read of the loss) per interval, and always at the epoch's last batch."""
    import segpipe.tracking as tracking

    clock = [0.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: clock[0])
    refreshed: list[int] = []
    monkeypatch.setattr(tracking.TQDMProgressBar, "on_train_batch_end",
                        lambda self, t, m, o, b, i: refreshed.append(i))
    monkeypatch.setattr(ThrottledProgressBar, "total_train_batches", 10)
    bar = ThrottledProgressBar(interval=0.5)
    for i in range(10):
        bar.on_train_batch_end(None, None, None, None, i)
        clock[0] += 0.2  # a 0.2 s step
    assert refreshed == [0, 3, 6, 9]  # 0.0 s, 0.6 s, 1.2 s and the last batch
