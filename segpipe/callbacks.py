"""Callbacks: the test-metrics writer the CLI always adds, and a throughput meter."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_only

from segpipe.fileio import atomic_write_json, atomic_write_text

__all__ = ["TestMetricsWriter", "Throughput"]


class TestMetricsWriter(L.Callback):
    """Write ``test_metrics.json`` (and a per-image CSV) into the run's log directory after ``test``.

    Args:
        filename: Name of the JSON file.
        per_image_csv: Also write ``test_per_image.csv`` (path, IoU, Dice, pixel accuracy per image).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, filename: str = "test_metrics.json", per_image_csv: bool = True) -> None:
        self.filename = filename
        self.per_image_csv = per_image_csv
        self.last_path: Path | None = None

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = getattr(pl_module, "test_report", None)
        if not report:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        report = dict(report)
        per_image = report.pop("per_image", [])
        report.pop("worst_images", None)
        if self.per_image_csv and per_image:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=["path", "IoU", "Dice", "pixel_accuracy"])
            writer.writeheader()
            writer.writerows(per_image)
            csv_path = atomic_write_text(out_dir / "test_per_image.csv", buf.getvalue())
            report["per_image_csv"] = str(csv_path)
        self.last_path = atomic_write_json(out_dir / self.filename, report)
        print(f"Test metrics written to {self.last_path}")


class Throughput(L.Callback):
    """Measure training throughput (images/s) after a warm-up, and print it when fit ends.

    Args:
        warmup_steps: Training steps excluded from the measurement (allocator, oneDNN and loader
            warm-up).
    """

    def __init__(self, warmup_steps: int = 5) -> None:
        self.warmup_steps = warmup_steps
        self.images = 0
        self.seconds = 0.0
        self._batches = 0
        self._t0: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        # Wall time between batch ends: includes data loading, forward, backward and the step.
        now = time.perf_counter()
        self._batches += 1
        if self._batches == self.warmup_steps:
            self._t0 = now
        elif self._t0 is not None:
            self.images += int(batch["image"].shape[0])
            self.seconds = now - self._t0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.images:
            print(f"Training throughput: {self.images_per_second:.2f} images/s "
                  f"({self.images} images after {self.warmup_steps} warm-up steps)")
