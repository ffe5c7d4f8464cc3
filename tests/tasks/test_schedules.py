"""Schedules that end with the budget: DeadlineCosineLR and its planner AnnealToDeadline."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer

from segpipe.cli import main
from segpipe.tasks.schedules import AnnealToDeadline, DeadlineCosineLR, training_progress
from tests.cli_args import TINY_UNET
from tests.data.synthetic import make_folder_dataset


def _scheduler(**kw) -> DeadlineCosineLR:
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params, "lr": 0.1},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01}])
    return DeadlineCosineLR(opt, **kw)


def test_cosine_over_progress_keeps_group_ratios() -> None:
    s = _scheduler(eta_min_ratio=0.1, warmup_fraction=0.2)
    assert s.factor(0.0) == 0.0 and s.factor(0.1) == pytest.approx(0.5)
    assert s.factor(0.2) == pytest.approx(1.0) and s.factor(1.0) == pytest.approx(0.1)
    assert s.factor(2.0) == pytest.approx(0.1)  # past the end: stays at the minimum
    s.progress = 0.6
    s.step()
    lrs = [g["lr"] for g in s.optimizer.param_groups]
    assert lrs[0] == pytest.approx(0.1 * s.factor(0.6)) and lrs[0] / lrs[1] == pytest.approx(10)


class _Timer:
    """Stands in for Lightning's Timer with a clock the test moves."""

    def __init__(self, budget: float) -> None:
        self.budget, self.now = budget, 0.0

    def time_elapsed(self, stage: str = "train") -> float:
        return self.now

    def time_remaining(self, stage: str = "train") -> float:
        return self.budget - self.now


def _fake_trainer(monkeypatch, budget: float) -> tuple[SimpleNamespace, DeadlineCosineLR, _Timer]:
    """A trainer with a time budget of ``budget`` s (a clock the test moves), 10 steps per
    epoch and no max_epochs, for :class:`AnnealToDeadline`'s hooks."""
    monkeypatch.setattr("segpipe.tasks.schedules.Timer", _Timer)
    sched = _scheduler()
    timer = _Timer(budget=budget)
    trainer = SimpleNamespace(
        callbacks=[timer], lr_scheduler_configs=[SimpleNamespace(scheduler=sched, interval="step")],
        current_epoch=0, max_epochs=-1, num_training_batches=10, accumulate_grad_batches=1,
        global_step=0, estimated_stepping_batches=float("inf"), check_val_every_n_epoch=4,
        should_stop=False,
    )
    return trainer, sched, timer


def test_plan_fits_the_epochs_left_and_validates_the_last(monkeypatch) -> None:
    trainer, sched, timer = _fake_trainer(monkeypatch, budget=100.0)
    cb = AnnealToDeadline()
    durations = [12.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    for epoch, seconds in enumerate(durations):
        trainer.current_epoch, trainer.global_step = epoch, 10 * epoch
        cb.on_train_epoch_start(trainer, None)
        cb.on_train_batch_start(trainer, None, None, 0)
        if epoch == 0:
            assert sched.progress == 0.0  # nothing measured yet: full learning rate
        timer.now += seconds
        cb.on_train_epoch_end(trainer, None)
        if trainer.should_stop:
            break
    # 12 s, then 10 s epochs in 100 s, planned with the slowest recent epoch + 10 %: after
    # epoch 0, 88 s left / 13.2 s -> epochs 1..6; the plan tightens as 12 s leaves the window
    assert trainer.current_epoch == cb.planned_epochs - 1 and 7 <= cb.planned_epochs <= 9
    assert trainer.check_val_every_n_epoch == 1 and timer.now <= 100.0
    planned = cb.planned_epochs
    trainer.global_step = planned * 10 - 1
    cb.on_train_batch_start(trainer, None, None, 9)
    assert 0.95 < sched.progress < 1.0  # the last step: annealed
    trainer.global_step = planned * 10
    cb.on_train_batch_start(trainer, None, None, 0)
    assert sched.progress == 1.0
    restored = AnnealToDeadline()
    restored.load_state_dict(cb.state_dict())
    assert restored.epoch_seconds == cb.epoch_seconds and restored.planned_epochs == planned
    assert restored.progress(trainer) == cb.progress(trainer)  # the same plan, the same anchor


def test_the_plan_keeps_time_for_the_last_validation_and_plans_with_the_slowest_epoch(
        monkeypatch) -> None:
    """Neither rule was held by a test: a plan without the validation's time (the timer then
    stops the run before its annealed last epoch is validated), or with the last epoch's time
    instead of the slowest recent one's, passed."""
    trainer, _, timer = _fake_trainer(monkeypatch, budget=200.0)
    cb = AnnealToDeadline()
    cb.val_seconds = 15.0  # as on_validation_start/end measured it
    plans = []
    for epoch, seconds in enumerate([10.0, 30.0, 10.0, 10.0]):
        trainer.current_epoch, trainer.global_step = epoch, 10 * epoch
        cb.on_train_epoch_start(trainer, None)
        plans.append(cb.planned_epochs)
        timer.now += seconds
        cb.on_train_epoch_end(trainer, None)
    # epoch 1: (190 s - 15 s) // (1.1 x 10 s) = 15 epochs from 1 on; epoch 2: (160 - 15) //
    # 33 = 4 from 2 on; epoch 3: the 30 s epoch still the slowest recent: (150 - 15) // 33 = 4
    assert plans == [None, 16, 6, 7]


def test_a_resumed_processs_first_epoch_does_not_plan(monkeypatch) -> None:
    """A resumed process's first epoch carries its start-up (10 s here) or is a part epoch:
    planned with, it stopped a resumed run with a fifth of its budget unused."""
    trainer, sched, timer = _fake_trainer(monkeypatch, budget=90.0)
    saved = AnnealToDeadline()
    saved.epoch_seconds, saved.planned_epochs = [2.5, 2.5, 2.5], 36
    cb = AnnealToDeadline()
    cb.load_state_dict(saved.state_dict())
    timer.now, trainer.current_epoch, trainer.global_step = 60.0, 10, 100
    cb.on_train_epoch_start(trainer, None)  # planned with the saved epochs: 30 s / 2.75 s
    assert cb.planned_epochs == 20
    timer.now += 12.5  # the first epoch here: 10 s of start-up, 2.5 s of training
    trainer.current_epoch, trainer.global_step = 11, 110
    cb.on_train_epoch_start(trainer, None)
    assert cb.epoch_seconds == [2.5, 2.5, 2.5]  # not 12.5
    assert cb.planned_epochs == 11 + int(17.5 // 2.75)  # was 12: one more epoch, then stop
    timer.now += 2.5
    trainer.current_epoch, trainer.global_step = 12, 120
    cb.on_train_epoch_start(trainer, None)
    assert cb.epoch_seconds == [2.5, 2.5, 2.5, 2.5][-cb.recent:]  # measured again from here


def _run_plan(monkeypatch, durations: list[float], budget: float) -> tuple[list[float], AnnealToDeadline]:
    """Progress at every step of epochs of the given durations (10 steps each)."""
    trainer, sched, timer = _fake_trainer(monkeypatch, budget)
    cb = AnnealToDeadline()
    seen = []
    for epoch, seconds in enumerate(durations):
        trainer.current_epoch = epoch
        cb.on_train_epoch_start(trainer, None)
        for batch in range(10):
            trainer.global_step = 10 * epoch + batch
            cb.on_train_batch_start(trainer, None, None, batch)
            seen.append(sched.progress)
            timer.now += seconds / 10
        cb.on_train_epoch_end(trainer, None)
        if trainer.should_stop:
            break
    return seen, cb


def test_one_stalled_epoch_does_not_make_the_learning_rate_jump(monkeypatch) -> None:
    # 1 s epochs in a 100 s budget; epoch 30 stalls for 10 s (a suspend, a load spike).
    durations = [1.0] * 30 + [10.0] + [1.0] * 200
    seen, cb = _run_plan(monkeypatch, durations, budget=100.0)
    steps = [b - a for a, b in zip(seen, seen[1:])]
    assert min(steps) >= 0.0 and max(steps) < 0.02  # monotone, and no jump
    assert seen[-1] > 0.97 and cb.planned_epochs >= 75  # annealed at the end of the budget
    # Before, the 3 epochs that planned with the stall pushed progress to about 0.9, and the
    # learning rate stayed near 0 for the rest of the budget: now half of it is still to go.
    at = seen[10 * 34]
    assert 0.35 < at < 0.7, at


def test_a_run_resumed_after_its_planned_last_epoch_trains_no_more(monkeypatch) -> None:
    seen, cb = _run_plan(monkeypatch, [1.0] * 50, budget=20.0)
    restored = AnnealToDeadline()
    restored.load_state_dict(cb.state_dict())
    sched = _scheduler()
    same = {"num_training_batches": 10, "accumulate_grad_batches": 1}  # as _run_plan's
    trainer = SimpleNamespace(current_epoch=cb.planned_epochs, should_stop=False,
                              lr_scheduler_configs=[SimpleNamespace(scheduler=sched, interval="step")], **same)
    restored.on_train_start(trainer, None)
    assert trainer.should_stop
    restored.load_state_dict(cb.state_dict())
    trainer = SimpleNamespace(current_epoch=cb.planned_epochs - 1, should_stop=False,
                              lr_scheduler_configs=[SimpleNamespace(scheduler=sched, interval="step")], **same)
    restored.on_train_start(trainer, None)  # a checkpoint inside the last epoch: finish it
    assert not trainer.should_stop


def test_every_process_plans_with_process_zeros_clock(monkeypatch) -> None:
    """Each DDP process planned on its own clock: their last epochs and learning rates
    differed, and one that stopped an epoch early left the other waiting in a collective."""
    plans = []
    for own_clock in (0.0, 3.0):  # process 1's clock runs 3 s late
        trainer, sched, timer = _fake_trainer(monkeypatch, budget=100.0)
        zero = _Timer(budget=100.0)  # process 0's

        def broadcast(values, src=0, zero=zero, timer=timer):
            assert src == 0 and values[0] == timer.time_elapsed()
            return (zero.time_elapsed(), zero.time_remaining(), values[2] if own_clock == 0
                    else 0.0)  # process 0's val time

        trainer.world_size, trainer.strategy = 2, SimpleNamespace(broadcast=broadcast)
        cb = AnnealToDeadline()
        seen = []
        for epoch in range(40):
            trainer.current_epoch, trainer.global_step = epoch, 10 * epoch
            cb.on_train_epoch_start(trainer, None)
            cb.on_train_batch_start(trainer, None, None, 0)
            seen.append((cb.planned_epochs, sched.progress))
            zero.now += 9.0
            timer.now = zero.now + own_clock * (epoch % 2)  # its epochs measure unevenly
            cb.on_train_epoch_end(trainer, None)
            if trainer.should_stop:
                break
        plans.append(seen)
    assert plans[0] == plans[1] and plans[0][-1][0] == len(plans[0])


def test_a_resume_with_other_steps_per_epoch_goes_on_from_where_it_was() -> None:
    """A DDP x2 run (4 steps per epoch) resumed on one process (10 per epoch): counted as
    they were, its 20 steps made 20 % of the new 100, the learning rate went back up and
    ended at a fifth of its peak instead of annealed."""
    sched = _scheduler()

    def trainer(per_epoch: int, epoch: int) -> SimpleNamespace:
        return SimpleNamespace(
            lr_scheduler_configs=[SimpleNamespace(scheduler=sched, interval="step")], callbacks=[],
            num_training_batches=per_epoch, accumulate_grad_batches=1, max_epochs=10,
            max_steps=-1, estimated_stepping_batches=10 * per_epoch, current_epoch=epoch,
            global_step=epoch * per_epoch, should_stop=False)

    before = AnnealToDeadline()
    two = trainer(4, 5)
    before.on_train_batch_start(two, None, None, 0)
    assert sched.progress == 0.5
    after = AnnealToDeadline()
    after.load_state_dict(json.loads(json.dumps(before.state_dict())))  # as a checkpoint keeps it
    one = trainer(10, 5)
    one.global_step = two.global_step
    after.on_train_start(one, None)
    seen = []
    for step in range(50):  # epochs 5..9 at 10 steps each
        one.global_step = 20 + step
        after.on_train_batch_start(one, None, None, step % 10)
        seen.append(sched.progress)
    assert seen[0] == pytest.approx(0.5) and seen[-1] == pytest.approx(0.99)
    assert all(b > a for a, b in zip(seen, seen[1:]))
    one.callbacks = [after]  # LateCrop's progress too
    assert training_progress(one) == pytest.approx(0.99)
    resumed_again = AnnealToDeadline()  # and once more, from a checkpoint of the resumed run
    resumed_again.load_state_dict(after.state_dict())
    resumed_again.on_train_start(one, None)
    assert resumed_again.progress(one) == pytest.approx(0.99)


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_without_a_time_budget_it_is_a_plain_cosine_over_max_epochs(tmp_path: Path,
                                                                     interval: str) -> None:
    data = make_folder_dataset(tmp_path / "ds", num_classes=3, size=(48, 40))
    run = tmp_path / "run"
    assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={data}",
                 f"--trainer.default_root_dir={run}", "--trainer.max_epochs=3", *TINY_UNET,
                 "--data.num_workers=0", f"--model.scheduler_interval={interval}",
                 "--model.lr_scheduler=segpipe.tasks.schedules.DeadlineCosineLR",
                 "--model.lr_scheduler.init_args.eta_min_ratio=0.01",
                 "--trainer.log_every_n_steps=1"]) == 0
    rows = list(csv.DictReader((run / "lightning_logs" / "version_0" / "metrics.csv").open()))
    lrs = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < 0.3e-3  # from the config's lr, down
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone
    # step k trains at the schedule's rate for k of the steps done: it had trained at step k-1's
    # (per epoch: epoch e at e of the epochs, where it had been at the epoch's last step's)
    steps = len(lrs)
    done = range(steps) if interval == "step" else [k // (steps // 3) * (steps // 3)
                                                    for k in range(steps)]
    assert lrs == pytest.approx([1e-3 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * k / steps)))
                                 for k in done]), lrs


def test_resumed_with_more_epochs_it_anneals_on_from_where_it_was(tmp_path: Path) -> None:
    """A cosine over max_epochs recomputed over a larger one on resume sent the learning rate
    from 1e-6 back up to 9.5e-5."""
    data = make_folder_dataset(tmp_path / "ds", num_classes=3, size=(48, 40))
    run = tmp_path / "run"
    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={data}",
            f"--trainer.default_root_dir={run}", *TINY_UNET, "--data.num_workers=0",
            "--trainer.max_time=null", "--trainer.log_every_n_steps=1"]
    assert main([*args, "--trainer.max_epochs=4", "--trainer.limit_train_batches=1"]) == 0
    assert main([*args, "--trainer.max_epochs=6", "--trainer.limit_train_batches=1",
                 "--ckpt_path=last"]) == 0
    lrs = []
    for version in (0, 1):
        rows = csv.DictReader((run / "lightning_logs" / f"version_{version}" / "metrics.csv").open())
        lrs += [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), lrs  # no jump
    assert main([*args, "--trainer.max_epochs=8", "--trainer.limit_train_batches=1",
                 "--ckpt_path=last"]) == 0
    rows = csv.DictReader((run / "lightning_logs" / "version_2" / "metrics.csv").open())
    more = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    assert more and max(more) <= lrs[-1] + 1e-12, (lrs, more)


class CropRecorder(L.Callback):
    """Writes each training batch's (epoch, height) to a JSON file when fit ends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.seen.append([trainer.current_epoch, int(batch["image"].shape[-2])])

    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        Path(self.path).write_text(json.dumps(self.seen))


@pytest.mark.parametrize("workers", [0, 2])
def test_segpipe_fit_moves_to_the_late_crop_at_its_point_of_the_training(tmp_path: Path,
                                                                          caplog, workers) -> None:
    """With workers the loader starts each next epoch early: the late epochs still get the
    late crops (the loader built again for them, not what the former one loaded ahead)."""
    data = make_folder_dataset(tmp_path / "ds", num_classes=3, size=(48, 40))
    seen = tmp_path / "seen.json"
    recorder = {"class_path": "tests.tasks.test_schedules.CropRecorder",
                "init_args": {"path": str(seen)}}
    assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={data}",
                 f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_epochs=4",
                 *TINY_UNET, f"--data.num_workers={workers}", "--data.late_crop_size=40",
                 "--data.late_crop_start=0.5", f"--trainer.callbacks+={json.dumps(recorder)}"]) == 0
    heights = {}
    for epoch, height in json.loads(seen.read_text()):
        heights.setdefault(epoch, set()).add(height)
    # Two of four epochs done (progress 0.5) at the end of epoch 1: epochs 2 and 3 are late.
    assert heights == {0: {32}, 1: {32}, 2: {40}, 3: {40}}
    assert "Epoch 2 on: training crops of 40 px (data.late_crop_size), 50 % into" in caplog.text


def test_segpipe_fit_moves_to_the_late_loss_and_its_checkpoint_tests(tmp_path: Path,
                                                                     caplog) -> None:
    data = make_folder_dataset(tmp_path / "ds", num_classes=3, size=(48, 40))
    run = tmp_path / "run"
    common = ["--config", "configs/folder_unet.yaml", f"--data.root={data}", *TINY_UNET,
              "--model.late_loss=ce+lovasz", "--model.late_loss_start=0.5"]
    assert main(["fit", *common, f"--trainer.default_root_dir={run}",
                 "--trainer.max_epochs=4"]) == 0
    assert "Epoch 3 on: training loss ce+lovasz (model.late_loss), 50 % into" in caplog.text
    (ckpt,) = run.glob("**/checkpoints/last.ckpt")
    hparams = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hparams["late_loss"] == "ce+lovasz" and hparams["late_loss_start"] == 0.5
    assert main(["test", *common, f"--ckpt_path={ckpt}",
                 f"--trainer.default_root_dir={tmp_path / 'test'}"]) == 0


def test_training_progress_without_a_plan_is_the_time_spent(monkeypatch) -> None:
    timer = Timer(duration={"seconds": 100})
    monkeypatch.setattr(timer, "time_elapsed", lambda stage="train": 25.0)
    monkeypatch.setattr(timer, "time_remaining", lambda stage="train": 75.0)
    trainer = SimpleNamespace(callbacks=[AnnealToDeadline(), timer], global_step=7,
                              estimated_stepping_batches=float("inf"))
    assert training_progress(trainer) == pytest.approx(0.25)
    trainer.estimated_stepping_batches = 14  # max_epochs/max_steps bound it: steps done
    assert training_progress(trainer) == pytest.approx(0.5)


def test_the_last_epoch_by_max_epochs_is_validated(tmp_path) -> None:
    """check_val_every_n_epoch 4 and max_epochs 1: the final epoch is still validated, so a
    short run has a best checkpoint."""
    from segpipe.cli import main
    from tests.cli_args import TINY_UNET
    from tests.data.synthetic import make_folder_dataset

    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(32, 32))
    run = tmp_path / "run"
    assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={root}",
                 f"--trainer.default_root_dir={run}", *TINY_UNET, "--data.num_workers=0", "--trainer.max_epochs=1",
                 "--trainer.check_val_every_n_epoch=4"]) == 0
    best = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and "epoch000" in best[0].name
