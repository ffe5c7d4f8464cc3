"""Distributed training and testing through Lightning: DDP with 2 CPU processes (gloo).

``segpipe fit`` and ``segpipe test`` run with ``--trainer.strategy ddp --trainer.devices 2`` in
subprocesses (Lightning re-launches the command for rank 1). The 5 test images split unevenly
(3 + 2): the DDP test metrics must equal a single-process test of the same checkpoint, with
every image counted exactly once.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.data.synthetic import make_folder_dataset

REPO = Path(__file__).resolve().parents[1]
SIZE = (48, 40)
N_TEST = 5  # odd: rank 0 gets 3 images, rank 1 gets 2

pytestmark = pytest.mark.slow  # ~2 minutes on 2 CPU cores: three runs, two of them 2-process

TINY = [
    "--config", "configs/folder_unet.yaml",
    "--model.net.init_args.base_channels=8",
    "--model.net.init_args.depth=2",
    "--model.loss=ce",
    "--model.optimizer.init_args.lr=0.02",
    "--data.num_classes=3",
    "--data.batch_size=2",
    "--data.eval_batch_size=2",  # rank 0: batches of 2 + 1 images, rank 1: one batch of 2
    "--data.crop_size=32",
    "--data.augment=none",
    "--data.num_workers=0",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.precision=32-true",
]
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2"]


def _segpipe(*args: str, log: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with log.open("w") as fh:
        res = subprocess.run([sys.executable, "-m", "segpipe.cli", *args], cwd=REPO, env=env,
                             stdout=fh, stderr=subprocess.STDOUT, timeout=480)
    out = log.read_text()
    assert res.returncode == 0, out[-5000:]
    return out


def _metrics(out: str) -> tuple[dict, list[dict]]:
    path = Path(out.split("Test metrics written to ")[1].split()[0])
    metrics = json.loads(path.read_text())
    with open(metrics["per_image_csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    return metrics, rows


def _logged(out: str, name: str) -> float:
    """A value of the metrics table Lightning prints after test/validate."""
    line = next(line for line in out.splitlines() if line.split()[:1] == [name]
                or f" {name} " in f" {line.strip()} ")
    return float(line.replace("│", " ").split()[-1])


def _max_abs_diff(a: object, b: object) -> float:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        return max((_max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (int, float)) and not isinstance(a, bool) and isinstance(b, (int, float)):
        return abs(float(a) - float(b))
    assert a == b, (a, b)
    return 0.0


def test_ddp_fit_and_test_match_single_process(tmp_path: Path) -> None:
    data = make_folder_dataset(tmp_path / "ds", n_train=8, n_val=3, n_test=N_TEST, num_classes=3,
                               size=SIZE)
    root = tmp_path / "ddp"
    # Images 0-2 of each split are one case, spread over both ranks; 3 and 4 are in none.
    common = [*TINY, f"--data.root={data}", "--data.case_pattern=(?P<case>img_00)[0-2]"]
    t0 = time.monotonic()
    # Selecting on a mean over cases: every rank must find it (a missing key raised on rank 1)
    _segpipe("fit", *common, *DDP, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=4",
             "--checkpoint.monitor=val/mDice_mean_over_cases", log=tmp_path / "fit.log")
    t_fit = time.monotonic() - t0
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # 8 images over 2 ranks, batch 2: 2 optimiser steps per epoch (each on 2 x 2 images).
    assert state["global_step"] == 4 * 2 and state["epoch"] == 3
    (ckpt,) = (root / "checkpoints").glob("best-*.ckpt")

    t0 = time.monotonic()
    ddp_out = _segpipe("test", *common, *DDP, f"--trainer.default_root_dir={root}",
                       f"--ckpt_path={ckpt}", log=tmp_path / "test_ddp.log")
    ddp, ddp_rows = _metrics(ddp_out)
    t_ddp = time.monotonic() - t0
    t0 = time.monotonic()
    one_out = _segpipe("test", *common, f"--trainer.default_root_dir={tmp_path / 'one'}",
                       f"--ckpt_path={ckpt}", log=tmp_path / "test_one.log")
    one, one_rows = _metrics(one_out)
    t_one = time.monotonic() - t0
    # The loss over the unevenly sharded images (3 + 2) is the single process's: Lightning's
    # own mean had divided by a truncated integer count (1.5 times too large here).
    assert abs(_logged(ddp_out, "test/loss") - _logged(one_out, "test/loss")) < 1e-5
    # The case's images were tested on both ranks: its figures are the single process's.
    assert ddp["per_case"]["cases"][0]["num_images"] == 3
    assert ddp["per_case"]["images_without_case"] == 2
    for name in ("test/mDice_mean_over_cases", "test/mIoU_mean_over_cases"):
        assert abs(_logged(ddp_out, name) - _logged(one_out, name)) < 1e-6

    # Every test image exactly once: no padding duplicates, none dropped.
    pixels = N_TEST * SIZE[0] * SIZE[1]
    for metrics, rows in ((ddp, ddp_rows), (one, one_rows)):
        assert metrics["num_images"] == N_TEST
        assert sum(map(sum, metrics["confusion_matrix"])) == pixels
        assert len(rows) == N_TEST and len({r["path"] for r in rows}) == N_TEST
    assert ddp_rows == one_rows  # same per-image scores, in the data set's order
    assert ddp["confusion_matrix"] == one["confusion_matrix"]
    for key in ("per_image_csv", "per_case_csv"):  # paths of each run
        ddp.pop(key), one.pop(key)
    diff = _max_abs_diff(ddp, one)
    print(f"\nDDP x2 vs single process: mIoU {ddp['mIoU']:.6f} vs {one['mIoU']:.6f}, max |diff| "
          f"over all metrics {diff:.3g}; fit {t_fit:.0f} s, test ddp {t_ddp:.0f} s, "
          f"test single {t_one:.0f} s")
    assert diff <= 1e-6
    # A trained model, so the comparison is not between constant maps.
    predicted = [sum(col) for col in zip(*one["confusion_matrix"])]
    assert sum(n > 0 for n in predicted) >= 2 and one["mIoU"] > 0.3


def test_ddp_test_with_bn_adapt_estimates_on_every_image(tmp_path: Path) -> None:
    """``--model.bn_adapt`` under DDP: each process estimates on its share of the test images
    and the estimates are pooled, weighted by batches, so the statistics cover all 5 images and
    the scores are those of one process (up to the different batching of the images)."""
    data = make_folder_dataset(tmp_path / "ds", n_train=8, n_val=3, n_test=N_TEST, num_classes=3,
                               size=SIZE)
    root = tmp_path / "run"
    common = [*TINY, f"--data.root={data}"]
    _segpipe("fit", *common, f"--trainer.default_root_dir={root}", "--trainer.max_epochs=4",
             log=tmp_path / "fit.log")
    ckpt = root / "checkpoints" / "last.ckpt"
    adapt = ["--model.bn_adapt=0.5", f"--ckpt_path={ckpt}"]
    ddp, _ = _metrics(_segpipe("test", *common, *DDP, *adapt,
                               f"--trainer.default_root_dir={tmp_path / 'ddp'}",
                               log=tmp_path / "test_ddp.log"))
    one, _ = _metrics(_segpipe("test", *common, *adapt,
                               f"--trainer.default_root_dir={tmp_path / 'one'}",
                               log=tmp_path / "test_one.log"))
    plain, _ = _metrics(_segpipe("test", *common, f"--ckpt_path={ckpt}",
                                 f"--trainer.default_root_dir={tmp_path / 'plain'}",
                                 log=tmp_path / "test_plain.log"))
    for metrics in (ddp, one):
        assert metrics["num_images"] == N_TEST
        assert metrics["batchnorm_statistics"].startswith("0.5 x the test images'")
        assert f"estimated on {N_TEST} image(s) or tile(s)" in metrics["batchnorm_statistics"]
    assert plain["batchnorm_statistics"] == "training's (plain)"
    print(f"\nbn_adapt 0.5: DDP x2 mIoU {ddp['mIoU']:.4f}, single process {one['mIoU']:.4f}, "
          f"plain {plain['mIoU']:.4f}")
    assert abs(ddp["mIoU"] - one["mIoU"]) < 0.02


def test_ddp_fit_with_ema(tmp_path: Path) -> None:
    """EMA copies the task's weights; under DDP the task's optimiser factory (jsonargparse's,
    holding a lock) made the copy fail on rank 0."""
    data = make_folder_dataset(tmp_path / "ds", n_train=8, n_val=3, n_test=0, num_classes=3,
                               size=SIZE)
    root = tmp_path / "ema"
    config = tmp_path / "ema.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: segpipe.callbacks.EMA\n"
                      "      init_args: {decay: 0.9}\n")
    _segpipe("fit", *TINY, "--config", str(config), f"--data.root={data}", *DDP,
             f"--trainer.default_root_dir={root}", "--trainer.max_epochs=2",
             log=tmp_path / "fit.log")
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert "current_model_state" in state and state["epoch"] == 1


def _csv_column(root: Path, name: str) -> list[float]:
    rows = list(csv.DictReader((root / "lightning_logs" / "version_0" / "metrics.csv").open()))
    return [float(r[name]) for r in rows if r.get(name)]


def test_ddp_train_loss_of_the_epoch_is_every_processs_mean(tmp_path: Path) -> None:
    """train/loss_epoch was process 0's mean alone. With the learning rate 0, whole images
    and one image per batch, each image's loss is the same however the images are shared
    out: the DDP epoch mean must equal the single-process one."""
    data = make_folder_dataset(tmp_path / "ds", n_train=8, n_val=2, n_test=0, num_classes=3,
                               size=SIZE, seed=3)
    fixed = [*TINY, f"--data.root={data}", "--data.crop_size=null", "--data.batch_size=1",
             "--model.optimizer.init_args.lr=0", "--trainer.max_epochs=1",
             "--trainer.log_every_n_steps=1", "--seed_everything=7"]
    _segpipe("fit", *fixed, *DDP, f"--trainer.default_root_dir={tmp_path / 'ddp'}",
             log=tmp_path / "ddp.log")
    _segpipe("fit", *fixed, f"--trainer.default_root_dir={tmp_path / 'one'}",
             log=tmp_path / "one.log")
    ddp, one = (_csv_column(tmp_path / k, "train/loss_epoch") for k in ("ddp", "one"))
    steps = _csv_column(tmp_path / "ddp", "train/loss_step")
    assert len(ddp) == len(one) == 1 and len(steps) == 4  # 4 images per process
    assert abs(ddp[0] - one[0]) < 1e-5, (ddp, one)
    assert abs(ddp[0] - sum(steps) / 4) > 1e-4  # process 0's own mean differs


def test_ddp_fit_stops_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM to a DDP fit (a scheduler's time limit or pre-emption) hung it until SIGKILL:
    Lightning broadcast inside the signal handler, in the middle of whatever collective the
    process was in. It must stop every process at the same step, exit with 143 and say once
    that last.ckpt is intact."""
    import signal

    data = make_folder_dataset(tmp_path / "ds", n_train=8, n_val=2, n_test=0, num_classes=3,
                               size=SIZE)
    root = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "fit.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "segpipe.cli", "fit", *TINY, f"--data.root={data}", *DDP,
             f"--trainer.default_root_dir={root}", "--trainer.max_epochs=1000"],
            cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not (root / "checkpoints" / "last.ckpt").is_file():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no epoch finished in 300 s"
                time.sleep(0.5)
            time.sleep(2.0)  # in the middle of later epochs' steps and collectives
            os.killpg(proc.pid, signal.SIGTERM)  # as SLURM and Kubernetes signal a job
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail("the DDP fit hung after SIGTERM:\n" + log.read_text()[-3000:])
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out = log.read_text()
    assert code == 143, out[-3000:]
    assert out.count("stopped by SIGTERM before it finished") == 1, out[-3000:]
    assert "last.ckpt is intact: resume with --ckpt_path last" in out
    state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] >= 0
