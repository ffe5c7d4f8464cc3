"""Crash safety: SIGKILL in mid-epoch, resume with ``--ckpt_path last``, compare with a run that was
never interrupted; atomic checkpoint writes; unwritable or full output folders fail up front.

The runs are real ``segpipe fit`` processes. :class:`SlowSteps` (given on their command line with
``--trainer.callbacks+=tests.test_faults.SlowSteps``) logs every training batch to a JSON-lines
file, which the test polls to kill at a known point, and can slow the batches down so the kill
lands mid-epoch.
"""

from __future__ import annotations

import csv
import errno
import re
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch

from segpipe.callbacks import PARTIAL_SUFFIX, CheckpointWriteError, SafeCheckpointIO
from segpipe.cli import main
from segpipe.fileio import TMP_PREFIX
from tests.cli_args import TINY_UNET
from tests.data.synthetic import make_folder_dataset

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 6  # 24 training images, batch size 4, drop_last
EPOCHS = 4
SAVE_EVERY = 5  # checkpoint.every_n_train_steps: last.ckpt at steps 5, 6, 10, 12, 15, 18, 20, 24

TINY = [
    "--config", "configs/folder_unet.yaml",
    *TINY_UNET,
    "--trainer.precision=32-true",
]


class SlowSteps(L.Callback):
    """Test-only callback: append each training batch to a JSON-lines file, then sleep.

    Args:
        progress_file: File to append ``{"epoch", "batch", "step", "paths"}`` rows to.
        sleep: Seconds to sleep after each batch (to make epochs long enough to kill in).
    """

    def __init__(self, progress_file: str, sleep: float = 0.0) -> None:
        self.progress_file = progress_file
        self.sleep = sleep

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        row = {"epoch": trainer.current_epoch, "batch": batch_idx, "step": trainer.global_step,
               "paths": [Path(p).name for p in batch["path"]]}
        with open(self.progress_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        time.sleep(self.sleep)


def _rows(progress: Path) -> list[dict[str, Any]]:
    if not progress.exists():
        return []
    return [json.loads(line) for line in progress.read_text().splitlines() if line.endswith("}")]


def _fit_cmd(data: Path, root: Path, progress: Path, sleep: float, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "segpipe.cli", "fit", *TINY,
        f"--data.root={data}", f"--trainer.default_root_dir={root}",
        # an epoch schedule: a time-budget one depends on measured times, not only on the seed
        f"--trainer.max_epochs={EPOCHS}", "--trainer.max_time=null",
        "--model.scheduler_interval=epoch",
        "--model.lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR",
        f"--model.lr_scheduler.init_args.T_max={EPOCHS}",
        "--model.net.init_args.dropout=0.2",  # draws from torch's global RNG: must be restored too
        "--data.num_workers=1",  # augmentation runs in a (persistent) worker process
        "--trainer.log_every_n_steps=1", "--trainer.num_sanity_val_steps=0",
        f"--checkpoint.every_n_train_steps={SAVE_EVERY}",
        "--trainer.callbacks+=tests.test_faults.SlowSteps",
        f"--trainer.callbacks.init_args.progress_file={progress}",
        f"--trainer.callbacks.init_args.sleep={sleep}",
        *extra,
    ]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    # Own process group: the kill takes the DataLoader worker down too, like a machine crash.
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_when(proc: subprocess.Popen, progress: Path, when: Callable[[dict[str, Any]], bool],
               log: Path, timeout: float = 300.0) -> dict[str, Any]:
    """SIGKILL ``proc`` (and its workers) as soon as a progress row satisfies ``when``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = next((r for r in _rows(progress) if when(r)), None)
        if hit is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return hit
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point:\n"
                        + log.read_text()[-3000:])
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the run never reached the kill point:\n" + log.read_text()[-3000:])


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 400.0) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert rc == 0, log.read_text()[-4000:]


def _assert_checkpoints_complete(ckpt_dir: Path) -> dict[str, int]:
    """Every ``*.ckpt`` loads with weights_only=True; returns their global steps."""
    steps = {}
    for path in sorted(ckpt_dir.glob("*.ckpt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # truncated -> raises
        steps[path.name] = int(ckpt["global_step"])
    assert "last.ckpt" in steps
    return steps


def _last_val_row(root: Path) -> dict[str, float]:
    """The last row with val metrics in any of the run's metrics.csv files (latest version)."""
    rows = []
    for path in sorted(root.glob("lightning_logs/version_*/metrics.csv"),
                       key=lambda p: int(p.parent.name.split("_")[1])):
        with path.open() as fh:
            rows += [r for r in csv.DictReader(fh) if r.get("val/mIoU")]
    assert rows, f"no val metrics under {root}"
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v != ""}


def _max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two nested structures of tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape
        if a.numel() == 0:
            return 0.0
        return float((a.double() - b.double()).abs().max())
    if isinstance(a, dict):
        assert set(a) == set(b), (sorted(a), sorted(b))
        return max((_max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b))
    assert a == b
    return 0.0


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("faults") / "ds", n_train=24, n_val=4,
                               n_test=0, num_classes=3, size=(48, 40))


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(data: Path, tmp_path: Path) -> None:
    """Kill twice (last.ckpt at an epoch end, then mid-epoch), resume each time, compare."""
    ref_root, run_root = tmp_path / "uninterrupted", tmp_path / "killed"
    ref_progress, progress = tmp_path / "uninterrupted.jsonl", tmp_path / "killed.jsonl"
    ckpt_dir = run_root / "checkpoints"
    t0 = time.monotonic()
    ref = _start(_fit_cmd(data, ref_root, ref_progress, 0.0), tmp_path / "ref.log")

    # 1) Killed in epoch 1 after 3 batches; last.ckpt is the end of epoch 0 (step 6).
    run = _start(_fit_cmd(data, run_root, progress, 0.25), tmp_path / "run1.log")
    _kill_when(run, progress, lambda r: r["epoch"] == 1 and r["batch"] == 2, tmp_path / "run1.log")
    steps = _assert_checkpoints_complete(ckpt_dir)
    assert steps["last.ckpt"] == STEPS_PER_EPOCH

    # 2) Resumed, killed again in epoch 2 after 5 batches; last.ckpt is mid-epoch 2 (step 15).
    run = _start(_fit_cmd(data, run_root, progress, 0.25, "--ckpt_path=last"),
                 tmp_path / "run2.log")
    _kill_when(run, progress, lambda r: r["epoch"] == 2 and r["batch"] == 4, tmp_path / "run2.log")
    steps = _assert_checkpoints_complete(ckpt_dir)
    assert steps["last.ckpt"] == 15 and 15 % STEPS_PER_EPOCH != 0  # a mid-epoch checkpoint
    from segpipe.fileio import _host_tag

    # what a kill during a write leaves behind (its name names the killed writer)
    stale = ckpt_dir / f"{TMP_PREFIX}{_host_tag()}.{run.pid}-killed{PARTIAL_SUFFIX}"
    stale.write_bytes(b"half a checkpoint")

    # 3) Resumed from the mid-epoch checkpoint to the end.
    run = _start(_fit_cmd(data, run_root, progress, 0.0, "--ckpt_path=last"),
                 tmp_path / "run3.log")
    _finish(run, tmp_path / "run3.log")
    _finish(ref, tmp_path / "ref.log")
    elapsed = time.monotonic() - t0
    assert not stale.exists(), "fit removes unfinished checkpoint writes of killed runs"
    assert "not resumable" not in (tmp_path / "run3.log").read_text()

    # Same batches in the same order: the resumed run's last pass over each step equals the
    # uninterrupted run's (order and crops are functions of seed, epoch and index).
    ref_rows, run_rows = _rows(ref_progress), _rows(progress)
    assert [r["step"] for r in ref_rows] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    final = {r["step"]: r["paths"] for r in run_rows}
    assert final == {r["step"]: r["paths"] for r in ref_rows}
    assert len(run_rows) > len(ref_rows)  # steps 7-9 and 16-17 really were trained twice

    a = torch.load(ref_root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == EPOCHS * STEPS_PER_EPOCH
    weights = _max_abs_diff(a["state_dict"], b["state_dict"])
    optim = _max_abs_diff(a["optimizer_states"], b["optimizer_states"])
    sched = _max_abs_diff(a["lr_schedulers"], b["lr_schedulers"])
    va, vb = _last_val_row(ref_root), _last_val_row(run_root)
    metrics = _max_abs_diff(va, vb)
    print(f"\nresumed vs uninterrupted after {a['global_step']} steps: max |dw| = {weights:.3g}, "
          f"optimizer state {optim:.3g}, scheduler {sched:.3g}, val metrics {metrics:.3g} "
          f"(val/mIoU {va['val/mIoU']:.6f} vs {vb['val/mIoU']:.6f}); {elapsed:.0f} s")
    # CPU kernels with a fixed thread count are deterministic here, so the runs agree exactly;
    # the tolerances leave room for nondeterministic kernels elsewhere.
    assert weights <= 1e-5 and optim <= 1e-5 and sched <= 1e-9
    assert metrics <= 1e-4


class KeepCheckpointAt(L.Callback):
    """Test-only: copy ``last.ckpt`` aside when training reaches ``step`` (a mid-epoch
    checkpoint, as a kill right after it would leave)."""

    def __init__(self, step: int, dest: str) -> None:
        self.step, self.dest = step, dest

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            import shutil

            shutil.copyfile(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt", self.dest)


def test_mid_epoch_resume_with_a_per_step_schedule_trains_the_rest_of_the_epoch(
        data: Path, tmp_path: Path) -> None:
    """Every shipped CPU config steps its schedule per step: with max_epochs set, a resumed run
    trained its epoch's first batches again and never saw its last ones (the step count of the
    schedule's horizon had made Lightning build the loader before the checkpoint was read)."""
    kept = tmp_path / "step8.ckpt"
    common = [*TINY, f"--data.root={data}", "--trainer.max_epochs=2", "--trainer.max_time=null",
              "--model.scheduler_interval=step", "--data.num_workers=0",
              "--trainer.num_sanity_val_steps=0", "--checkpoint.every_n_train_steps=1",
              "--trainer.logger=false"]

    def fit(root: Path, progress: Path, *extra: str) -> list[dict[str, Any]]:
        assert main(["fit", *common, f"--trainer.default_root_dir={root}",
                     "--trainer.callbacks+=tests.test_faults.SlowSteps",
                     f"--trainer.callbacks.init_args.progress_file={progress}", *extra]) == 0
        return _rows(progress)

    ref = fit(tmp_path / "ref", tmp_path / "ref.jsonl",
              "--trainer.callbacks+=tests.test_faults.KeepCheckpointAt",
              "--trainer.callbacks.init_args.step=8", f"--trainer.callbacks.init_args.dest={kept}")
    assert torch.load(kept, map_location="cpu", weights_only=True)["global_step"] == 8
    resumed = fit(tmp_path / "resumed", tmp_path / "resumed.jsonl", f"--ckpt_path={kept}")
    # epoch 1's batches 2..5 (steps 9..12), the same images as the uninterrupted run's
    assert [(r["epoch"], r["batch"], r["step"]) for r in resumed] == [
        (1, b, 7 + b) for b in range(2, STEPS_PER_EPOCH)]
    assert [r["paths"] for r in resumed] == [r["paths"] for r in ref if r["step"] > 8]


def test_kill_during_checkpoint_write_leaves_a_complete_file(tmp_path: Path) -> None:
    """SIGKILL while SafeCheckpointIO writes: the target is the old or the new file, never torn."""
    target = tmp_path / "ckpt" / "last.ckpt"
    script = (
        "import sys, torch\n"
        "from segpipe.callbacks import SafeCheckpointIO\n"
        "io = SafeCheckpointIO()\n"
        "for i in range(10_000):\n"
        "    io.save_checkpoint({'step': i, 'w': torch.full((6_000_000,), float(i))}, sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not target.exists():  # first save complete
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.01)
        while not list(target.parent.glob(f"*{PARTIAL_SUFFIX}")):  # a later save under way
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    ckpt = torch.load(target, weights_only=True)  # a torn file would raise here
    assert ckpt["w"].numel() == 6_000_000 and bool((ckpt["w"] == ckpt["step"]).all())
    partial = list(target.parent.glob(f"*{PARTIAL_SUFFIX}"))
    print(f"\nkilled after save {ckpt['step']}; unfinished write left as {[p.name for p in partial]}")
    assert [p.name for p in target.parent.glob("*.ckpt")] == ["last.ckpt"]


def test_disk_full_during_checkpoint_write_keeps_previous(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    io = SafeCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)

    def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as exc:
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    message = str(exc.value)
    assert str(target) in message and "No space left" in message
    assert "checkpoint.dirpath" in message and "previous checkpoint there is intact" in message
    assert torch.load(target, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left


def _blocked_dir(tmp_path: Path) -> Path:
    """A folder segpipe cannot write into: read-only, or (as root) one below a regular file."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):
        return ro / "run"
    ro.chmod(0o700)  # root writes anyway: make mkdir fail instead
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return blocker / "run"


@pytest.mark.parametrize("option", ["trainer.default_root_dir", "checkpoint.dirpath"])
def test_unwritable_output_fails_before_training(option: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, num_classes=3,
                               size=(32, 32))
    blocked = _blocked_dir(tmp_path)
    root = blocked if option == "trainer.default_root_dir" else tmp_path / "root"
    extra = [f"--checkpoint.dirpath={blocked}"] if option == "checkpoint.dirpath" else []
    t0 = time.monotonic()
    try:
        rc = main(["fit", *TINY, f"--data.root={data}", f"--trainer.default_root_dir={root}",
                   "--trainer.max_epochs=1", "--data.num_workers=0", *extra])
    finally:
        (tmp_path / "readonly").chmod(0o700)
    err = capsys.readouterr().err
    assert rc == 2
    assert str(blocked) in err and f"--{option}" in err, err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))
    print(f"\n{err.strip()}  [{time.monotonic() - t0:.1f} s]")


def test_an_unwritable_lightning_logs_folder_fails_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """One made by another user: the probe wrote into default_root_dir only, and fit ended in
    a 43-line PermissionError traceback with exit 1 when the logger made version_0."""
    import tempfile

    data = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, num_classes=3,
                               size=(32, 32))
    logs = tmp_path / "root" / "lightning_logs"
    logs.mkdir(parents=True)
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):  # as chmod 555 would do for a user who is not root
        if Path(kwargs.get("dir", "")) == logs:
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    rc = main(["fit", *TINY, f"--data.root={data}", f"--trainer.default_root_dir={logs.parent}",
               "--trainer.max_epochs=1", "--data.num_workers=0"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{logs}: cannot write logs there: Permission denied" in err, err
    assert "--trainer.default_root_dir" in err and "Traceback" not in err
    # Without a logger nothing goes there: not refused.
    assert main(["fit", *TINY, f"--data.root={data}", f"--trainer.default_root_dir={logs.parent}",
                 "--trainer.max_epochs=1", "--data.num_workers=0", "--trainer.logger=false"]) == 0


def test_no_room_for_checkpoints_fails_before_training(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    data = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, num_classes=3,
                               size=(32, 32))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=100_000))  # 0.1 MiB left
    rc = main(["fit", *TINY, f"--data.root={data}", f"--trainer.default_root_dir={tmp_path / 'r'}",
               "--trainer.max_epochs=1", "--data.num_workers=0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(tmp_path / "r" / "checkpoints") in err and "MiB free" in err
    assert "--checkpoint.dirpath" in err
    assert not list(tmp_path.rglob("*.ckpt"))


class _FillsUp:
    """A file object that accepts ``budget`` bytes and then fails like a full disk."""

    def __init__(self, f: Any, budget: int) -> None:
        self.f, self.left = f, budget

    def write(self, data: Any) -> int:
        if len(data) > self.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def test_disk_full_during_fit_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """torch's zip writer turns ENOSPC into RuntimeError("... unexpected pos ..."); fit must still
    end with one ``segpipe: error:`` line naming the checkpoint, exit code 2, last.ckpt intact."""
    data = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, num_classes=3,
                               size=(32, 32))
    root = tmp_path / "run"
    real_save = torch.save
    saves: list[int] = []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        saves.append(int(obj.get("global_step", -1)))
        if len(saves) == 1:  # the first last.ckpt fits on the disk
            return real_save(obj, f, *args, **kwargs)
        return real_save(obj, _FillsUp(f, 4096), *args, **kwargs)  # torch's own failure

    monkeypatch.setattr(torch, "save", save)
    rc = main(["fit", *TINY, f"--data.root={data}", f"--trainer.default_root_dir={root}",
               "--trainer.max_epochs=3", "--data.num_workers=0", "--checkpoint.save_top_k=0",
               "--trainer.num_sanity_val_steps=0"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    last = root / "checkpoints" / "last.ckpt"
    lines = [ln for ln in err.splitlines() if "segpipe: error:" in ln]
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err and "unexpected pos" not in err, err[-3000:]
    assert lines[0].startswith(f"segpipe: error: could not write checkpoint {last}: No space left")
    assert "The previous checkpoint there is intact." in lines[0]
    print(f"\n{lines[0]}")
    assert len(saves) == 2  # stopped at the first failed save
    assert torch.load(last, weights_only=True)["global_step"] == saves[0]  # the previous one
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary file


def test_a_moved_run_resumes_with_its_best_checkpoint_record(tmp_path: Path) -> None:
    """Resuming a run whose folder was moved (or copied) restarted best tracking: Lightning's
    ModelCheckpoint restores only the best path when its folder differs from the recorded one,
    so a worse model became best-*.ckpt beside the real one and `--ckpt_path best` scored it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from segpipe.callbacks import LastCheckpoint

    old, new = tmp_path / "run" / "checkpoints", tmp_path / "moved" / "checkpoints"
    new.mkdir(parents=True)
    (new / "best-epoch008-mIoU0.4938.ckpt").write_bytes(b"x")
    best = ModelCheckpoint(dirpath=new, monitor="val/mIoU", mode="max", save_top_k=1)
    last = LastCheckpoint(new)
    trainer = L.Trainer(callbacks=[best, last], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    recorded = str(old / "best-epoch008-mIoU0.4938.ckpt")
    state = {"dirpath": str(old), "monitor": "val/mIoU", "best_model_score": torch.tensor(0.4938),
             "best_model_path": recorded, "kth_best_model_path": recorded,
             "kth_value": torch.tensor(0.4938), "best_k_models": {recorded: torch.tensor(0.4938)},
             "last_model_path": "", "current_score": torch.tensor(0.4531)}
    checkpoint = {"callbacks": {best.state_key: state}}
    last.on_load_checkpoint(trainer, None, checkpoint)
    best.load_state_dict(checkpoint["callbacks"][best.state_key])
    moved = str(new / "best-epoch008-mIoU0.4938.ckpt")
    assert best.best_model_score == pytest.approx(0.4938)  # a worse score will not replace it
    assert best.best_model_path == moved and best.kth_best_model_path == moved
    assert list(best.best_k_models) == [moved]


def test_a_logger_that_meets_a_full_disk_is_one_error_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The loggers write far more often than checkpoints, so on a filling disk they fail first:
    that was a 130-line traceback ending in a TensorBoard ValueError."""
    from lightning.fabric.loggers import csv_logs

    data = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, num_classes=3,
                               size=(32, 32))
    root = tmp_path / "run"

    def full(self: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "metrics.csv"))

    monkeypatch.setattr(csv_logs._ExperimentWriter, "save", full)
    rc = main(["fit", *TINY_UNET, f"--data.root={data}", f"--trainer.default_root_dir={root}",
               "--trainer.max_epochs=2", "--data.num_workers=0",
               "--trainer.num_sanity_val_steps=0"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "segpipe: error:" in ln]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"segpipe: error: the disk is full (writing {root / 'metrics.csv'})")


def test_a_full_disk_in_tensorboards_writer_thread_is_one_line_naming_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """TensorBoard writes its event file in a thread: a full disk printed that thread's
    15-line traceback, then a line that named no file ("free space there")."""
    pytest.importorskip("tensorboard")
    from tensorboard.compat.tensorflow_stub.io import gfile

    data = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, num_classes=3,
                               size=(32, 32))
    root = tmp_path / "run"

    def full(self: Any, filename: Any, content: Any, mode: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # as f.write raises it: no name

    monkeypatch.setattr(gfile.LocalFileSystem, "_write", full)
    rc = main(["fit", *TINY_UNET, f"--data.root={data}", f"--trainer.default_root_dir={root}",
               "--trainer.max_epochs=2", "--data.num_workers=0",
               "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "segpipe: error:" in ln]
    assert rc == 2 and len(lines) == 1, err[-3000:]
    assert "Traceback" not in err and "Exception in thread" not in err, err[-3000:]
    assert re.match(rf"segpipe: error: the disk is full \(writing "
                    rf"{re.escape(str(root / 'lightning_logs' / 'version_0'))}/events\.out\.tfevents\.",
                    lines[0]), lines[0]


def test_resuming_with_a_spent_time_budget_says_so(data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A resumed run whose new trainer.max_time is already spent trained nothing and exited 0,
    its model stopped mid-schedule: `fit && test` went on to test it."""
    root = tmp_path / "run"
    common = [*TINY, f"--data.root={data}", f"--trainer.default_root_dir={root}",
              "--data.num_workers=0", "--trainer.logger=false"]
    assert main(["fit", *common, "--trainer.max_epochs=1", "--trainer.max_time=00:00:10:00",
                 "--trainer.callbacks+=tests.test_faults.SlowSteps",  # 6 steps of 0.3 s
                 f"--trainer.callbacks.init_args.progress_file={tmp_path / 'steps.jsonl'}",
                 "--trainer.callbacks.init_args.sleep=0.3"]) == 0
    spent = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    capsys.readouterr()
    assert main(["fit", *common, "--trainer.max_epochs=3", "--trainer.max_time=00:00:00:01",
                 "--ckpt_path=last"]) == 2
    err = capsys.readouterr().err
    assert "its run has already trained 0:00:0" in err
    assert "as long as this run's trainer.max_time (0:00:01) or longer" in err
    assert "nothing would be trained" in err and "Give a longer --trainer.max_time" in err
    again = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert again["global_step"] == spent["global_step"]  # nothing trained, nothing lost


class _Clock:
    """A fake monotonic clock: every reading is ``step`` seconds after the previous one."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def _fake_trainer(**state: Any) -> Any:
    from types import SimpleNamespace

    base = {"should_stop": False, "max_epochs": 100, "max_steps": -1, "current_epoch": 3,
            "global_step": 40}
    return SimpleNamespace(**{**base, **state})


@pytest.mark.parametrize(("cost", "share", "saves"), [
    (1.0, 0.05, [True, False, False, True]),  # slow: 19 s of training between saves
    (0.05, 0.05, [True, True, True, True]),  # faster than SLOW_SAVE_S: every epoch
    (1.0, None, [True, True, True, True]),  # spacing switched off
    (1.0, 0.5, [True, True, True, True]),  # half the time may go to saving: 1 s between
])
def test_slow_last_checkpoints_are_spaced_to_a_share_of_training(
        cost: float, share: float | None, saves: list[bool]) -> None:
    """On a GPU, fsyncing a U-Net 64's weights and optimiser state (0.6 s) took longer than
    its epochs of 368 images: last.ckpt at every epoch end halved training's speed."""
    from segpipe.callbacks import LastCheckpoint

    cb = LastCheckpoint("unused", max_time_share=share)
    clock = _Clock(0.0)
    cb._clock = clock
    done: list[bool] = []

    def save(trainer: Any) -> None:  # as _save times it: the save takes `cost`
        cb._last_save_end, cb._last_save_cost = clock.now + cost, cost
        clock.now += cost

    cb._save = save  # type: ignore[method-assign]
    for epoch_seconds in (0.0, 9.0, 9.0, 9.0):  # epochs of 9 s after a first save
        clock.now += epoch_seconds
        before = cb._last_save_end
        cb._routine_save(_fake_trainer())
        done.append(cb._last_save_end != before)
    assert done == saves
    assert cb.skipped == saves.count(False)


@pytest.mark.parametrize("state", [{"should_stop": True}, {"current_epoch": 99},
                                   {"max_steps": 40}])
def test_a_spaced_last_checkpoint_is_never_the_runs_last(state: dict[str, Any]) -> None:
    """A stop (time budget, early stopping), the last epoch and max_steps always save."""
    from segpipe.callbacks import LastCheckpoint

    cb = LastCheckpoint("unused")
    cb._clock = _Clock(0.0)
    cb._last_save_end, cb._last_save_cost = 0.0, 5.0  # just saved, slowly
    saved: list[int] = []
    cb._save = lambda trainer: saved.append(trainer.global_step)  # type: ignore[method-assign]
    cb._routine_save(_fake_trainer())
    assert saved == [] and cb.skipped == 1
    cb._routine_save(_fake_trainer(**state))
    assert saved == [40]


def test_spaced_last_checkpoints_end_with_the_trained_model_and_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every save slow (a clock that moves 1 s a reading), a 5-epoch fit writes last.ckpt
    after the first epoch and the last only, and that last one is the finished run's state."""
    from segpipe.callbacks import LastCheckpoint

    made: list[LastCheckpoint] = []
    init = LastCheckpoint.__init__

    def spy(self: LastCheckpoint, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._clock = _Clock(1.0)
        made.append(self)

    monkeypatch.setattr(LastCheckpoint, "__init__", spy)
    data = make_folder_dataset(tmp_path / "ds", n_train=8, n_val=2, n_test=0, num_classes=3,
                               size=(32, 32))
    root = tmp_path / "run"
    common = [*TINY_UNET, f"--data.root={data}", f"--trainer.default_root_dir={root}",
              "--data.num_workers=0", "--trainer.num_sanity_val_steps=0",
              "--trainer.max_time=null"]
    assert main(["fit", *common, "--trainer.max_epochs=5"]) == 0
    (cb,) = made
    assert cb.skipped == 3  # epochs 2-4; epoch 1 (the first save) and 5 (the last) saved
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 10 and ckpt["epoch"] == 4  # 5 epochs of 2 steps
    # resuming with more epochs continues from there (the loop state is an epoch end's)
    assert main(["fit", *common, "--trainer.max_epochs=6", "--ckpt_path=last"]) == 0
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 12 and ckpt["epoch"] == 5
