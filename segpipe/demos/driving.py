"""Driving-scene segmentation demo on CamVid (SegNet's 11-class version).

``segpipe demo driving --data_dir DIR`` trains a U-Net from scratch with the settings of
``configs/camvid_unet.yaml`` on ``DIR/{train,trainannot}``, picks the best epoch on
``DIR/{val,valannot}``, evaluates it at the frames' full size (480×360 for CamVid) on
``DIR/{test,testannot}`` (on val, said loudly, when the copy has no test split) with
``segpipe test`` (metrics + report.md; over the config's test views, ``model.test_tta`` and
``model.test_tta_scales``), predicts masks and overlays for the evaluation frames with
``segpipe predict`` over the same views (:func:`view_options`) and prints a short summary.
``--download`` fetches and verifies CamVid first (:func:`segpipe.demos.download.fetch_camvid`).

CamVid: Brostow et al. 2008/2009; the 11-class version and its class weights: Badrinarayanan
et al., SegNet, 2017. Licence CC BY-NC 4.0 (research / personal use).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segpipe.configs import FOLDER as CONFIGS_FOLDER
from segpipe.data.datasets import scan_camvid
from segpipe.demos.common import check_own, clear_own, max_time_string
from segpipe.fileio import OutputDirError, atomic_write_text, check_output_dir

__all__ = [
    "DrivingDemoResult",
    "demo_config",
    "load_camvid_config",
    "max_time_string",
    "run_driving_demo",
    "summary_lines",
    "view_options",
]

_SHIPPED_CONFIG = CONFIGS_FOLDER / "camvid_unet.yaml"
_SMOKE_PREDICT_FRAMES = 4


def load_camvid_config(path: Path | None = None) -> tuple[dict[str, Any], str]:
    """The CamVid U-Net settings: ``configs/camvid_unet.yaml`` as shipped with segpipe.

    Args:
        path: YAML file to read instead.

    Returns:
        ``(config, source)``: a fresh dict and the file it came from.
    """
    path = _SHIPPED_CONFIG if path is None else Path(path)
    return yaml.safe_load(path.read_text(encoding="utf-8")), str(path)


def demo_config(
    data_root: Path,
    run_dir: Path,
    smoke: bool = False,
    max_minutes: float = 30.0,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``segpipe fit``/``test`` config of the demo (also written next to its outputs).

    Args:
        data_root: The CamVid folder.
        run_dir: ``trainer.default_root_dir`` (checkpoints, logs, metrics, report).
        smoke: One epoch of two small batches, a smaller net, no worker processes (tests).
        max_minutes: Training time budget (``trainer.max_time``); ignored in smoke mode.
        base: Settings to start from (default :func:`load_camvid_config`).

    Returns:
        The config dict.
    """
    cfg = copy.deepcopy(base) if base is not None else load_camvid_config()[0]
    trainer, data = cfg.setdefault("trainer", {}), cfg.setdefault("data", {})
    trainer["default_root_dir"] = str(run_dir)
    trainer["max_time"] = max_time_string(max_minutes)
    data["root"] = str(data_root)
    data["layout"] = "camvid"
    held = data.get("val_cases") or []
    if held and not any(any((Path(data_root) / split).glob(f"{case}_*"))
                        for case in held for split in ("train", "val")):
        data.pop("val_cases")  # another CamVid copy without that sequence: its own val split
    if smoke:
        trainer.update({
            "max_epochs": 1, "max_time": None, "check_val_every_n_epoch": 1, "log_every_n_steps": 1,
            "limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 2,
            "enable_progress_bar": False,
        })
        init = cfg["model"]["net"]["init_args"]
        init.update({"base_channels": 8, "depth": 3})
        data.update({"batch_size": 2, "eval_batch_size": 2, "crop_size": 32, "num_workers": 0})
    return cfg


@dataclass
class DrivingDemoResult:
    """Where the demo put things, and its scores.

    Attributes:
        output: The demo's output folder.
        data_dir: The CamVid folder used.
        config: The fit/test config written for the run.
        checkpoint: Checkpoint evaluated (best val mIoU, else the last one).
        eval_split: ``"test"``, or ``"val"`` when the data has no test split.
        counts: Frames per split found in ``data_dir``.
        held_out: The sequences validated on, held out of training (``data.val_cases``; their
            frames come from ``train``/``val``, which otherwise both train), or empty when the
            copy's own val split validates.
        num_train: Frames trained on.
        num_val: Frames validated on.
        val_mIoU: Best val mIoU seen during training (picks the checkpoint), if validated.
        metrics: Contents of ``test_metrics.json`` (scores on ``eval_split``).
        metrics_path: ``test_metrics.json``.
        report_path: ``report.md``.
        predictions_dir: Folder with masks, colour masks and overlays (None if not predicted).
        summary_path: The printed summary, saved.
        seconds: Wall time of the whole demo.
        lines: The printed summary.
    """

    output: Path
    data_dir: Path
    config: Path
    checkpoint: Path
    eval_split: str
    counts: dict[str, int]
    held_out: list[str]
    num_train: int
    num_val: int
    val_mIoU: float | None
    metrics: dict[str, Any]
    metrics_path: Path | None
    report_path: Path | None
    predictions_dir: Path | None
    summary_path: Path | None = None
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)


def _tested_views(cfg: dict[str, Any]) -> tuple[bool, list[float] | None]:
    """``(model.test_tta, model.test_tta_scales)`` of ``cfg``, the scales checked (None: the
    evaluation size alone)."""
    from segpipe.tta import check_scales

    model = cfg.get("model") or {}
    return bool(model.get("test_tta")), check_scales(model.get("test_tta_scales"),
                                                     "model.test_tta_scales")


def view_options(cfg: dict[str, Any]) -> list[str]:
    """The ``segpipe predict`` options that make the masks ``segpipe test`` scores under ``cfg``
    (its ``model.test_tta`` and ``model.test_tta_scales``): ``[]`` for plain predictions."""
    from segpipe.tta import predict_view_options

    return predict_view_options(*_tested_views(cfg))


def _check_data(data_dir: Path) -> dict[str, int]:
    """Frames per split; clear errors for a missing folder or missing train/val splits."""
    hint = ("Point --data_dir at the CamVid folder holding train/, trainannot/, val/, valannot/ "
            "(test/, testannot/ optional), or pass --download to fetch it.")
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} does not exist or is not a folder. {hint}")
    scan = scan_camvid(data_dir)
    counts = {split: len(samples) for split, samples in scan.items()}
    for split in ("train", "val"):
        if not counts.get(split):
            raise FileNotFoundError(f"{data_dir / split} is missing or holds no frames. {hint}")
        unlabelled = [s.image for s in scan[split] if s.mask is None]
        if unlabelled:
            raise FileNotFoundError(
                f"{unlabelled[0]} has no label in {data_dir / (split + 'annot')} "
                f"({len(unlabelled)} frame(s) without a label). {hint}"
            )
    return counts


def _frame_size(folder: Path) -> str:
    from PIL import Image

    from segpipe.data.datasets import find_images

    frames = find_images(folder, recursive=False)
    if not frames:
        return "their full"
    with Image.open(frames[0]) as im:
        return f"full {im.width}×{im.height}"


def _copy_frames(frames: list[Path], dest: Path) -> Path:
    """Copy ``frames`` to a fresh ``dest`` (the frames the demo predicts, when they are not a
    whole folder of the data set)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in frames:
        shutil.copy2(f, dest / f.name)
    return dest


def _held_out_frames(data_dir: Path, held: list[str]) -> list[Path]:
    """The frames of the sequences ``held`` (``data.val_cases``) in ``train``/``val``."""
    from segpipe.data.datasets import find_images

    return [f for split in ("train", "val") if (data_dir / split).is_dir()
            for f in find_images(data_dir / split, recursive=False)
            if f.name.split("_", 1)[0] in held]


def run_driving_demo(
    data_dir: Path | None,
    output: Path = Path("outputs/demo_driving"),
    smoke: bool = False,
    max_minutes: float = 30.0,
    download: bool = False,
    cache: Path | None = None,
    url: str | None = None,
    sha256: str | None = None,
) -> DrivingDemoResult:
    """Train, evaluate and predict on CamVid; print and save a short summary.

    Args:
        data_dir: CamVid folder (``train``, ``trainannot``, ``val``, ``valannot`` and optionally
            ``test``, ``testannot``; frames .png or .webp). None with ``download``.
        output: Folder for everything the demo writes.
        smoke: A few steps on a few frames (tests).
        max_minutes: Training time budget (``trainer.max_time``).
        download: Fetch and verify CamVid into ``cache`` first and use it.
        cache: Download cache (default ``$SEGPIPE_CACHE/camvid`` or ``~/.cache/segpipe/camvid``).
        url: Archive URL for ``download`` (default the SegNet tutorial's archive).
        sha256: Expected SHA-256 of the archive (default: none pinned).

    Returns:
        A :class:`DrivingDemoResult`.

    Raises:
        FileNotFoundError: ``data_dir`` is missing or lacks train/val frames or labels.
        ValueError: Neither or both of ``data_dir`` and ``download``; a budget <= 0.
        segpipe.demos.download.DownloadError: The download failed verification.
    """
    from segpipe.cli import main as segpipe_main
    from segpipe.lightning_cli import run_cli

    start = time.perf_counter()
    started_at = time.time()
    if max_minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {max_minutes}")
    if download == (data_dir is not None):
        raise ValueError("give either --data_dir DIR or --download (which puts CamVid in --cache)")
    output = check_output_dir(Path(output).expanduser().resolve(), "the demo's outputs", "output")
    run_dir = output / "run"
    check_own(output / "predictions", "predictions", OutputDirError)  # before the training
    steps = 5 if download else 4
    step = 0

    def say(text: str) -> None:
        nonlocal step
        step += 1
        print(f"[{step}/{steps}] {text}", flush=True)

    if download:
        from segpipe.demos import download as dl

        say(f"CamVid in {cache or dl.default_cache_dir()}: a verified copy there is used, "
            f"else it is fetched from {url or dl.CAMVID_URL}")
        data_dir = dl.fetch_camvid(cache, url=url or dl.CAMVID_URL,
                                   sha256=sha256 if sha256 is not None else dl.CAMVID_SHA256)
    assert data_dir is not None
    data_dir = Path(data_dir).expanduser().resolve()
    counts = _check_data(data_dir)
    eval_split = "test" if counts.get("test") else "val"

    base, source = load_camvid_config()
    cfg = demo_config(data_dir, run_dir, smoke=smoke, max_minutes=max_minutes, base=base)
    held = list(cfg["data"].get("val_cases") or [])
    held_frames = _held_out_frames(data_dir, held) if held else []
    num_val = len(held_frames) if held else counts["val"]
    num_train = counts["train"] + counts["val"] - num_val if held else counts["train"]
    n_eval_split = counts["test"] if eval_split == "test" else num_val
    config = output / "config.yaml"
    atomic_write_text(config, f"# segpipe demo driving; settings from {source}\n"
                      + yaml.safe_dump(cfg, sort_keys=False))
    common = ["--config", str(config), "--trainer.enable_model_summary=false"]

    say(f"Training a U-Net on {num_train} CamVid frames from {data_dir} "
        f"(segpipe fit --config {config}; budget "
        f"{'a few steps' if smoke else f'{max_minutes:g} min'})")
    fit = run_cli(["fit", *common])
    ckpt_cb = fit.trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", "") or ""
    last = getattr(ckpt_cb, "last_model_path", "") or ""
    score = getattr(ckpt_cb, "best_model_score", None)
    val_miou = float(score) if score is not None and best else None
    checkpoint = Path(best or last or run_dir / "checkpoints" / "last.ckpt")
    if not checkpoint.is_file() or checkpoint.stat().st_mtime < started_at - 1:
        raise RuntimeError(f"training wrote no checkpoint under {run_dir / 'checkpoints'}; "
                           "see the messages above")

    split_name = (f"val frames (sequence {', '.join(held)}, held out of training)"
                  if eval_split == "val" and held else f"{eval_split} frames")
    which = (f"the first few of the {n_eval_split} {split_name} (smoke mode)" if smoke
             else f"the {n_eval_split} {split_name}")
    size_dir = data_dir / ("train" if eval_split == "val" and held else eval_split)
    say(f"Evaluating on {which} at {_frame_size(size_dir)} size "
        f"(segpipe test --ckpt_path {checkpoint})")
    if eval_split == "val":
        print(f"      {data_dir} has no test/ split: the scores below are on val", flush=True)
    tested = run_cli(["test", *common, f"--ckpt_path={checkpoint}"])
    from segpipe.callbacks import TestMetricsWriter

    writer = next((c for c in tested.trainer.callbacks if isinstance(c, TestMetricsWriter)), None)
    metrics_path = writer.last_path if writer else None
    report_path = writer.last_report_path if writer else None
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path else {}

    predictions: Path | None = output / "predictions"
    from segpipe.data.datasets import find_images

    # the frames just scored: the test split, or the held-out sequence (not val/, trained on)
    scored = (held_frames if eval_split == "val" and held
              else find_images(data_dir / eval_split, recursive=False))
    if smoke:
        scored = scored[:_SMOKE_PREDICT_FRAMES]
    frames = (_copy_frames(scored, output / "predict_inputs")
              if smoke or (eval_split == "val" and held) else data_dir / eval_split)
    which = (f"the first {len(scored)} {split_name} (smoke mode)" if smoke
             else f"the {len(scored)} {split_name}")
    say(f"Predicting masks and overlays for {which} into {predictions}")
    clear_own(predictions, "predictions", OutputDirError)  # an earlier run's frames: not ours
    try:
        rc = segpipe_main(["predict", "--ckpt_path", str(checkpoint), "--input", str(frames),
                           "--output", str(predictions), "--format", "mask", "palette", "overlay",
                           "--overwrite", *view_options(cfg)])
    except ImportError as exc:  # segpipe.predict not installed / not available
        print(f"      prediction skipped: segpipe predict is not available ({exc})", flush=True)
        predictions, rc = None, 0
    if rc:
        print(f"      prediction reported failures (exit code {rc})", flush=True)

    result = DrivingDemoResult(
        output=output, data_dir=data_dir, config=config, checkpoint=checkpoint,
        eval_split=eval_split, counts=counts, held_out=held, num_train=num_train,
        num_val=num_val, val_mIoU=val_miou, metrics=metrics,
        metrics_path=metrics_path, report_path=report_path, predictions_dir=predictions,
    )
    say("Summary")
    result.seconds = time.perf_counter() - start
    result.lines = summary_lines(result, cfg, smoke=smoke, max_minutes=max_minutes)
    print("\n".join(result.lines), flush=True)
    result.summary_path = atomic_write_text(output / "summary.txt", "\n".join(result.lines) + "\n")
    return result


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.1f}%"


def summary_lines(r: DrivingDemoResult, cfg: dict[str, Any], smoke: bool, max_minutes: float) -> list[str]:
    """The newcomer-friendly summary of a finished demo.

    Args:
        r: The result.
        cfg: The config the demo ran with.
        smoke: Smoke mode (says so: the scores mean nothing).
        max_minutes: Training budget.

    Returns:
        The lines (printed and saved to ``summary.txt``).
    """
    m, net = r.metrics, cfg["model"]["net"]["init_args"]
    names = cfg["data"]["class_names"]
    ev = r.eval_split
    n_eval = m.get("num_images", r.counts.get(ev, 0))
    lines = ["", "=== segpipe driving demo (CamVid) ==="]
    budget = "smoke mode: a few steps, scores mean nothing" if smoke else f"{max_minutes:g}-minute budget"
    lines.append(f"Trained a U-Net ({net['base_channels']} base channels, depth {net['depth']}, "
                 f"from scratch, {budget})")
    lines.append(f"to label {len(names)} classes of street scenes ({', '.join(names)}; void pixels ignored)")
    val = (f"the {r.num_val} frames of sequence {', '.join(r.held_out)}, held out of training"
           if r.held_out else f"{r.num_val} val frames")
    picked = (f"the best epoch was picked on {val}." if r.val_mIoU is not None
              else f"no validation ran within the budget, so the last checkpoint is scored (val: {val}).")
    lines.append(f"on {r.num_train} CamVid training frames from {r.data_dir}; {picked}")
    if ev == "test":
        lines.append(f"Scores below are on {n_eval} held-out test frames, at full resolution.")
    elif r.held_out:
        lines.append(f"This copy of CamVid has no test split, so the scores below are on the {n_eval} val "
                     f"frames of sequence {', '.join(r.held_out)}, which no training frame shares"
                     + (": they also picked the checkpoint, so they flatter it a little."
                        if r.val_mIoU is not None else "."))
    else:
        lines.append(f"This copy of CamVid has no test split, so the scores below are on {n_eval} val frames:"
                     " val also picked the checkpoint and shares a video sequence with train, so they are"
                     " optimistic.")
    from segpipe.tta import predict_view_options

    tta, scales = _tested_views(cfg)
    views = predict_view_options(tta, scales)
    if views:
        sizes = (f"{len(scales)} sizes ({min(scales):g}-{max(scales):g} x the evaluation size)"
                 if scales else "the evaluation size")
        flips = ", each with the training's flips" if tta else ""
        lines.append(f"Each frame is scored, and its masks made, on the mean prediction over {sizes}"
                     f"{flips}: the config's model.test_tta and model.test_tta_scales.")
    lines.append("Scores (100% = perfect; IoU = overlap of predicted and true pixels of a class):")
    rows: list[tuple[str, str]] = []
    if r.val_mIoU is not None and ev == "test":  # on val, the evaluation below says it all
        rows.append(("val  mIoU, macro (mean over the classes present), best epoch",
                     _pct(r.val_mIoU)))
    if m:
        scored = sum(v is not None for v in (m.get("IoU_per_class") or {}).values())
        rows.append((f"{ev:<4} mIoU, macro (mean over the {scored} classes with a score)",
                     _pct(m.get("mIoU"))))
        rows.append((f"{ev:<4} pixel accuracy, micro (share of labelled pixels right)",
                     _pct(m.get("pixel_accuracy"))))
        rows.append((f"{ev:<4} mean Dice, macro", _pct(m.get("mDice"))))
    width = max((len(k) for k, _ in rows), default=0)
    lines += [f"  {k + ':':<{width + 1}} {v:>6}" for k, v in rows]
    per_class = m.get("IoU_per_class", {}) if m else {}
    if per_class:
        lines.append(f"  {ev} IoU per class (— = class absent from these frames and never predicted):")
        lines.append("    " + ", ".join(f"{k} {_pct(v)}" for k, v in per_class.items()))
    if not m:
        lines.append("  (no test metrics were written; see the messages above)")
    lines.append("Outputs:")
    if r.predictions_dir is not None:
        p = r.predictions_dir
        n = sum(1 for f in p.rglob("*.png") if not f.stem.endswith("_palette")) if p.is_dir() else 0
        lines.append(f"  masks (class index 0..{len(names) - 1} per pixel): {p}/<frame>.png  ({n} files)")
        lines.append(f"  colour masks:                       {p}/<frame>_palette.png")
        lines.append(f"  overlays (frame + colours):         {p}/<frame>_overlay.jpg")
    if r.report_path:
        lines.append(f"  report (per-class table, confusion matrix, worst frames): {r.report_path}")
    if r.metrics_path:
        lines.append(f"  all metrics (JSON):                 {r.metrics_path}")
    lines.append(f"  checkpoint:                         {r.checkpoint}")
    lines.append(f"  config:                             {r.config}")
    lines.append(f"Done in {r.seconds / 60:.1f} min. Segment your own street photos with:")
    lines.append(f"  segpipe predict --ckpt_path {r.checkpoint} --input PHOTOS --output OUT "
                 "--format mask overlay" + "".join(f" {o}" for o in views))
    return lines
