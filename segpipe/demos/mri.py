"""Brain MRI tissue segmentation demo on the ICBM152 2009a template that ships inside nilearn.

Runs offline on a fresh install (``pip install segpipe[demo]``): it cuts axial slices from the
real T1 template, derives four labels from the template's grey- and white-matter probability maps
(background, CSF/other tissue inside the brain mask, grey matter, white matter), writes them in
segpipe's folder layout, trains a U-Net on one set of slices with ``segpipe fit``, evaluates on
held-apart slices with ``segpipe test`` (metrics + report), and predicts masks and overlays for the
test slices with ``segpipe predict``.

Template: Fonov et al., NeuroImage 2011 and 2009 (ICBM 2009a nonlinear symmetric).
"""

from __future__ import annotations

import importlib.resources
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from segpipe.data.io import write_image, write_mask
from segpipe.demos.common import check_own, clear_own, max_time_string
from segpipe.errors import MissingExtraError
from segpipe.fileio import atomic_write_text, check_output_dir

__all__ = ["CLASS_COLORS", "CLASS_NAMES", "DemoError", "DemoStopped", "MriDemoResult",
           "make_mri_dataset", "run_mri_demo"]

CLASS_NAMES = ["background", "csf_other", "grey_matter", "white_matter"]
CLASS_COLORS = [[0, 0, 0], [0, 90, 255], [255, 160, 0], [240, 240, 240]]
_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def check_demo_extra() -> None:
    """Raise :class:`~segpipe.errors.MissingExtraError` naming the pip command when nibabel or
    nilearn is missing (the demo extra)."""
    import importlib.util

    missing = [name for name in ("nibabel", "nilearn") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError("the MRI demo needs the demo extra: pip install 'segpipe[demo]' "
                                f"(missing: {', '.join(missing)})")


def _template_volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1, GM and WM volumes (x, y, z) as uint8 arrays from nilearn's wheel (no network)."""
    check_demo_extra()
    import nibabel as nib

    data_dir = importlib.resources.files("nilearn") / "datasets" / "data"
    volumes = []
    for kind in ("t1", "gm", "wm"):
        path = Path(str(data_dir / _TEMPLATE.format(kind)))
        if not path.exists():
            raise DemoError(
                f"{path} is missing from the installed nilearn; reinstall it with "
                "pip install --force-reinstall nilearn"
            )
        volumes.append(np.asarray(nib.load(str(path)).dataobj, dtype=np.uint8))
    return volumes[0], volumes[1], volumes[2]


def slice_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Four-class label map of one slice.

    Args:
        t1, gm, wm: (H, W) uint8 T1 intensity and grey/white-matter probabilities (0..255).

    Returns:
        (H, W) uint8: 0 background, 1 CSF/other (inside the head, neither tissue is likely),
        2 grey matter, 3 white matter (the more probable tissue where one reaches 50 %).
    """
    label = np.zeros(t1.shape, dtype=np.uint8)
    label[t1 > 20] = 1
    tissue = np.maximum(gm, wm) >= 128
    label[tissue & (gm >= wm)] = 2
    label[tissue & (wm > gm)] = 3
    return label


def split_of(z: int) -> str | None:
    """Held-apart slices: in each block of 10 axial slices, 0-5 train, 7 val, 9 test.

    Slices 6 and 8 are left out so every val/test slice has an unused neighbour on each side.
    """
    r = z % 10
    return {7: "val", 9: "test"}.get(r, "train" if r <= 5 else None)


def make_mri_dataset(root: Path, step: int = 1, max_per_split: int | None = None) -> dict[str, int]:
    """Write the template's axial slices in segpipe's folder layout.

    Args:
        root: Output folder; ``root/{train,val,test}/{images,masks}/slice_<z>.png`` are written.
        step: Use every ``step``-th slice (the smoke mode uses fewer).
        max_per_split: Cap on slices per split (smoke mode).

    Returns:
        Number of slices written per split.
    """
    t1, gm, wm = _template_volumes()
    counts = {"train": 0, "val": 0, "test": 0}
    brain = (gm >= 128) | (wm >= 128)
    for z in range(0, t1.shape[2], step):
        split = split_of(z)
        if split is None or brain[:, :, z].sum() < 2000:  # skip slices with little brain
            continue
        if max_per_split is not None and counts[split] >= max_per_split:
            continue
        # rot90: anterior up, as radiologists look at axial slices
        img, g, w = (np.ascontiguousarray(np.rot90(v[:, :, z])) for v in (t1, gm, wm))
        name = f"slice_{z:03d}.png"
        write_image(root / split / "images" / name, img)
        write_mask(root / split / "masks" / name, slice_labels(img, g, w))
        counts[split] += 1
    return counts


def demo_config(data_root: Path, run_dir: Path, smoke: bool, max_minutes: float) -> dict[str, Any]:
    """The segpipe fit/test config of the demo (also written next to its outputs)."""
    epochs = 1 if smoke else 40
    return {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": epochs,
            "max_time": None if smoke else max_time_string(max_minutes),
            "default_root_dir": str(run_dir),
            "log_every_n_steps": 5,
            **({"limit_train_batches": 2, "limit_val_batches": 1} if smoke else {}),
        },
        "model": {
            "net": {
                "class_path": "segpipe.models.UNet",
                "init_args": {
                    "base_channels": 8 if smoke else 16,
                    "depth": 4,
                    "norm": "batch",
                },
            },
            "loss": "ce+dice",
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003, "weight_decay": 0.0001}},
            # annealed to whichever ends the run first, the 40 epochs or the time budget, so a
            # slow machine ends with an annealed model too (a cosine over the 40 epochs stopped
            # by the budget after 6 of them with the learning rate at 95 % of its start)
            "scheduler_interval": "step",
            "lr_scheduler": {"class_path": "segpipe.tasks.schedules.DeadlineCosineLR"},
        },
        "data": {
            "root": str(data_root),
            "layout": "folder",
            "num_classes": 4,
            "class_names": CLASS_NAMES,
            "class_colors": CLASS_COLORS,
            "in_channels": 1,
            "mean": [0.2],
            "std": [0.3],
            "batch_size": 8,
            "crop_size": 160,
            "scale": [0.8, 1.25],
            "augment": "default",
        },
    }


class DemoError(RuntimeError):
    """A demo step that failed; the message says which (one line on the command line)."""


class DemoStopped(DemoError):
    """The demo's training was stopped by Ctrl-C or SIGTERM: not a failure; ``code`` is the
    exit code (130 or 143)."""

    def __init__(self, code: int) -> None:
        how = "Ctrl-C (SIGINT)" if code == 128 + signal.SIGINT else "SIGTERM"
        super().__init__(
            f"stopped by {how} before it finished; the demo does not resume (the line above "
            "is fit's): run the same command again to run it anew")
        self.code = code


@dataclass
class MriDemoResult:
    """Where the demo put things, and its scores."""

    output: Path
    config: Path
    checkpoint: Path
    metrics: dict[str, Any]
    metrics_path: Path | None
    report_path: Path | None
    masks_dir: Path | None
    seconds: float


def run_mri_demo(output: Path, smoke: bool = False, max_minutes: float = 4.0) -> MriDemoResult:
    """Build the data, train, evaluate and predict; print a short summary.

    Args:
        output: Folder for everything the demo writes.
        smoke: A few steps on a few slices (for the test suite).
        max_minutes: Training time budget (``trainer.max_time``).
    """
    from segpipe.cli import main as segpipe_main

    start = time.perf_counter()
    check_demo_extra()  # before any folder is made
    output = check_output_dir(Path(output).expanduser().resolve(), "the demo's outputs", "output")
    data_root, run_dir = output / "data", output / "run"
    masks_dir = output / "predictions"
    for folder, what in ((data_root, "slices"), (masks_dir, "predictions")):
        check_own(folder, what, DemoError)  # before the training, not after it
    print(f"[1/4] Cutting axial slices from the ICBM152 template into {data_root}")
    clear_own(data_root, "slices", DemoError)  # a rerun's slices alone (a smoke run writes fewer)
    counts = make_mri_dataset(data_root, step=1, max_per_split=4 if smoke else None)
    print(f"      {counts['train']} train, {counts['val']} val, {counts['test']} test slices")
    config = output / "config.yaml"
    atomic_write_text(config, yaml.safe_dump(demo_config(data_root, run_dir, smoke, max_minutes), sort_keys=False))

    print(f"[2/4] Training a U-Net (segpipe fit --config {config})")
    started = time.time()
    code = segpipe_main(["fit", "--config", str(config), "--trainer.enable_model_summary=false"])
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        raise DemoStopped(code)
    if code:
        raise DemoError("training failed (see the message above)")
    ckpt_dir = run_dir / "checkpoints"
    best = sorted(ckpt_dir.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    checkpoint = best[-1] if best else ckpt_dir / "last.ckpt"
    if not checkpoint.is_file() or checkpoint.stat().st_mtime < started - 1:
        raise DemoError(f"training wrote no checkpoint under {ckpt_dir}; give it more time "
                        "(--minutes) or see the messages above")

    print(f"[3/4] Evaluating on held-apart slices (segpipe test --ckpt_path {checkpoint})")
    if segpipe_main(["test", "--config", str(config), f"--ckpt_path={checkpoint}",
                     "--trainer.enable_model_summary=false"]):
        raise DemoError("evaluation failed (see the message above)")
    metrics_files = sorted(run_dir.rglob("test_metrics.json"), key=lambda p: p.stat().st_mtime)
    metrics_path = metrics_files[-1] if metrics_files else None
    metrics = json.loads(metrics_path.read_text()) if metrics_path else {}
    report_path = metrics_path.with_name("report.md") if metrics_path else None

    print(f"[4/4] Predicting masks and overlays for the test slices into {masks_dir}")
    clear_own(masks_dir, "predictions", DemoError)
    rc = segpipe_main(["predict", "--ckpt_path", str(checkpoint), "--input", str(data_root / "test" / "images"),
                       "--output", str(masks_dir), "--format", "mask", "palette", "overlay", "--overwrite"])
    if rc:
        print(f"      prediction reported failures (exit code {rc})")

    seconds = time.perf_counter() - start
    result = MriDemoResult(output, config, checkpoint, metrics, metrics_path,
                           report_path if report_path and report_path.exists() else None, masks_dir, seconds)
    _print_summary(result, counts)
    return result


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.1f}"


def _print_summary(r: MriDemoResult, counts: dict[str, int]) -> None:
    m = r.metrics
    print("\n=== segpipe MRI demo ===")
    print("Trained a U-Net to label brain tissue (background, CSF/other, grey matter, white matter)")
    print(f"on {counts['train']} axial slices of the ICBM152 T1 template; evaluated on {counts['test']} held-apart slices.")
    if m:
        per_class = ", ".join(f"{k} {_fmt(v)}" for k, v in m.get("IoU_per_class", {}).items())
        print(f"Scores on held-apart slices: mIoU (macro) {_fmt(m.get('mIoU'))}%, "
              f"pixel accuracy (micro) {_fmt(m.get('pixel_accuracy'))}%, mean Dice (macro) {_fmt(m.get('mDice'))}%")
        print(f"IoU per class (%): {per_class}")
    print(f"Checkpoint:  {r.checkpoint}")
    if r.metrics_path:
        print(f"Metrics:     {r.metrics_path}")
    if r.report_path:
        print(f"Report:      {r.report_path}")
    print(f"Masks and overlays: {r.masks_dir}")
    print(f"Done in {r.seconds / 60:.1f} min. Predict on your own slices with:")
    print(f"  {_segpipe_command()} predict --ckpt_path {r.checkpoint} --input DIR --output OUT")


def _segpipe_command() -> str:
    """``segpipe`` when it is on PATH, else the path of the one beside this Python (a venv that
    ``bash scripts/demo.sh`` made and did not activate)."""
    import shutil
    import sys

    if shutil.which("segpipe"):
        return "segpipe"
    beside = Path(sys.executable).parent / "segpipe"
    return str(beside) if beside.is_file() else f"{sys.executable} -m segpipe"
