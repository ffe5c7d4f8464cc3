"""Callbacks the CLI always adds: the test-metrics writer."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_only

from segpipe.fileio import atomic_write_json, atomic_write_text

__all__ = ["TestMetricsWriter"]


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
        if self.per_image_csv and per_image:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=["path", "IoU", "Dice", "pixel_accuracy"])
            writer.writeheader()
            writer.writerows(per_image)
            csv_path = atomic_write_text(out_dir / "test_per_image.csv", buf.getvalue())
            report["per_image_csv"] = str(csv_path)
        self.last_path = atomic_write_json(out_dir / self.filename, report)
        print(f"Test metrics written to {self.last_path}")
