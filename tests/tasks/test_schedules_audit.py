"""DeadlineCosineLR and AnnealToDeadline: behaviours found untested by mutation testing (range
checks at their ends, accumulated steps, the last epoch that fits, resumes, step-based
validation, sanity-check timing, the progress LateCrop reads)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from segpipe.errors import ConfigError
from segpipe.tasks.schedules import AnnealToDeadline, training_progress
from tests.tasks.test_schedules import _fake_trainer, _scheduler


def _epochs(cb: AnnealToDeadline, trainer, timer, seconds: list[float], per_epoch: int = 10) -> None:
    """Runs epochs of the given durations through the callback's epoch hooks."""
    for seconds_ in seconds:
        trainer.global_step = trainer.current_epoch * per_epoch
        cb.on_train_epoch_start(trainer, None)
        timer.now += seconds_
        cb.on_train_epoch_end(trainer, None)
        trainer.current_epoch += 1


def test_the_range_checks_accept_their_ends_and_refuse_beyond() -> None:
    """eta_min_ratio 1 (a constant learning rate) and 0 are valid; values outside [0, 1] are
    refused, and a warm-up over the whole training (nothing left to anneal) is too."""
    constant = _scheduler(eta_min_ratio=1.0)
    assert [constant.factor(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 1.0, 1.0])
    assert _scheduler(eta_min_ratio=0.0).factor(1.0) == pytest.approx(0.0)
    for bad in (-0.1, 1.1):
        with pytest.raises(ConfigError, match="eta_min_ratio must be in"):
            _scheduler(eta_min_ratio=bad)
    with pytest.raises(ConfigError, match=r"warmup_fraction must be in \[0, 1\), got 1.0"):
        _scheduler(warmup_fraction=1.0)
    assert _scheduler(warmup_fraction=0.99).factor(0.5) == pytest.approx(0.5 / 0.99)


def test_an_epoch_of_accumulated_batches_counts_its_last_partial_step(monkeypatch) -> None:
    """10 batches accumulated 3 at a time are 4 optimiser steps an epoch (Lightning steps on
    the epoch's last batch too): the plan's steps are 4 an epoch, so the learning rate reaches
    its end at the plan's last step, not an epoch before it."""
    trainer, sched, timer = _fake_trainer(monkeypatch, budget=100.0)
    trainer.accumulate_grad_batches = 3
    cb = AnnealToDeadline()
    _epochs(cb, trainer, timer, [10.0], per_epoch=4)
    trainer.global_step = 4
    cb.on_train_epoch_start(trainer, None)  # 90 s left / 11 s: epochs 1..8
    assert cb.planned_epochs == 9
    for step, expected in ((20, 0.5), (35, 31 / 32), (36, 1.0)):
        trainer.global_step = step
        cb.on_train_batch_start(trainer, None, None, 0)
        assert sched.progress == pytest.approx(expected), step


def test_the_epoch_that_starts_with_less_than_an_epoch_left_is_the_last_and_anneals(
        monkeypatch) -> None:
    """With less than one epoch's time left, the epoch that starts is planned as the last one:
    validated (so checkpointed), annealing from where the schedule was to its end, and the
    run stops after it."""
    trainer, sched, timer = _fake_trainer(monkeypatch, budget=20.0)
    cb = AnnealToDeadline()
    _epochs(cb, trainer, timer, [10.0])  # 10 s left, an epoch takes 11 s with the margin
    trainer.global_step = 10
    cb.on_train_epoch_start(trainer, None)
    assert cb.planned_epochs == 2 and trainer.check_val_every_n_epoch == 1
    seen = []
    for step in range(10, 20):
        trainer.global_step = step
        cb.on_train_batch_start(trainer, None, None, step - 10)
        seen.append(sched.progress)
    assert seen[0] == 0.0 and seen[-1] == pytest.approx(0.9)  # annealed over this epoch
    cb.on_train_epoch_end(trainer, None)
    assert trainer.should_stop


def test_a_plan_capped_by_max_epochs_is_extended_by_a_larger_max_epochs_on_resume(
        monkeypatch) -> None:
    """A run whose max_epochs ended it before its time budget did, resumed with a larger
    max_epochs, trains on; one that the time budget ended does not."""
    trainer, _, timer = _fake_trainer(monkeypatch, budget=1000.0)
    trainer.max_epochs = 3
    cb = AnnealToDeadline()
    _epochs(cb, trainer, timer, [10.0, 10.0, 10.0])
    assert trainer.should_stop and cb.planned_epochs == 3
    restored = AnnealToDeadline()
    restored.load_state_dict(cb.state_dict())
    resumed = SimpleNamespace(
        current_epoch=3, should_stop=False, max_epochs=6, num_training_batches=10,
        accumulate_grad_batches=1, lr_scheduler_configs=trainer.lr_scheduler_configs)
    restored.on_train_start(resumed, None)
    assert not resumed.should_stop


def test_step_based_validation_is_left_alone_in_the_last_epoch() -> None:
    """check_val_every_n_epoch None (validation every N steps across epochs) is not turned
    into a per-epoch schedule in the last epoch by max_epochs; an epoch-based one is set to
    validate that last epoch."""
    cb = AnnealToDeadline()
    steps = SimpleNamespace(callbacks=[], lr_scheduler_configs=[], max_epochs=3, current_epoch=2,
                            check_val_every_n_epoch=None)
    cb.on_train_epoch_start(steps, None)
    assert steps.check_val_every_n_epoch is None
    epochs = SimpleNamespace(callbacks=[], lr_scheduler_configs=[], max_epochs=3,
                             current_epoch=2, check_val_every_n_epoch=4)
    cb.on_train_epoch_start(epochs, None)
    assert epochs.check_val_every_n_epoch == 1


def test_the_sanity_checks_validation_time_is_scaled_to_the_whole_val_set(monkeypatch) -> None:
    """The time reserved for the final validation, measured on the sanity check's 2 batches of
    10, is five times what they took; a full validation's time is taken as it is."""
    clock = [100.0]
    monkeypatch.setattr("segpipe.tasks.schedules.time", SimpleNamespace(monotonic=lambda: clock[0]))
    cb = AnnealToDeadline()
    trainer = SimpleNamespace(sanity_checking=True, num_sanity_val_steps=2, num_val_batches=[10])
    cb.on_validation_start(trainer, None)
    clock[0] += 1.0
    cb.on_validation_end(trainer, None)
    assert cb.val_seconds == pytest.approx(5.0)
    trainer.sanity_checking = False
    cb.on_validation_start(trainer, None)
    clock[0] += 3.0
    cb.on_validation_end(trainer, None)
    assert cb.val_seconds == pytest.approx(3.0)


def test_training_progress_follows_the_time_budgets_plan(monkeypatch) -> None:
    """With a plan (a time budget and a DeadlineCosineLR), the progress LateCrop reads is the
    schedule's (the steps of the planned epochs), not the fraction of the time spent."""
    trainer, sched, timer = _fake_trainer(monkeypatch, budget=100.0)
    cb = AnnealToDeadline()
    trainer.callbacks.append(cb)
    _epochs(cb, trainer, timer, [10.0])
    trainer.global_step = 10
    cb.on_train_epoch_start(trainer, None)  # epochs 1..8, from step 10 to step 90
    trainer.global_step, timer.now = 50, 30.0
    cb.on_train_batch_start(trainer, None, None, 0)
    assert sched.progress == pytest.approx(0.5)
    assert training_progress(trainer) == pytest.approx(0.5)  # the time spent is 0.3


def test_a_time_budget_run_resumed_with_other_steps_per_epoch_goes_on_from_where_it_was(
        monkeypatch) -> None:
    """A time-budget run of 10 steps an epoch resumed with 4 (another number of processes):
    the learning rate goes on from the progress it had, and ends annealed at the plan's last
    epoch in the new steps."""
    trainer, sched, timer = _fake_trainer(monkeypatch, budget=100.0)
    cb = AnnealToDeadline()
    _epochs(cb, trainer, timer, [10.0])
    trainer.global_step = 10
    cb.on_train_epoch_start(trainer, None)  # planned epochs 0..8, from step 10
    trainer.current_epoch, trainer.global_step = 5, 50
    cb.on_train_batch_start(trainer, None, None, 0)
    assert sched.progress == pytest.approx(0.5)
    restored = AnnealToDeadline()
    restored.load_state_dict(cb.state_dict())
    trainer.num_training_batches = 4  # global_step restored as the checkpoint's: 50
    restored.on_train_start(trainer, None)
    restored.on_train_batch_start(trainer, None, None, 0)
    assert sched.progress == pytest.approx(0.5)
    trainer.global_step = 50 + 4 * 4 - 1  # the new steps' last of epoch 8
    restored.on_train_batch_start(trainer, None, None, 3)
    assert sched.progress == pytest.approx(31 / 32)


def test_resuming_with_a_time_budget_exactly_spent_is_refused(monkeypatch) -> None:
    """A resume whose new trainer.max_time has no time left (the timer would stop it at once,
    as it stops at 0 s left) is an error; one with time left, or a fresh run, is not."""
    trainer, _, timer = _fake_trainer(monkeypatch, budget=100.0)
    cb = AnnealToDeadline()
    trainer.ckpt_path = "last.ckpt"
    timer.now = 100.0
    with pytest.raises(ConfigError, match="nothing would be trained"):
        cb.on_fit_start(trainer, None)
    timer.now = 99.0
    cb.on_fit_start(trainer, None)
    trainer.ckpt_path, timer.now = None, 100.0
    cb.on_fit_start(trainer, None)


def test_a_run_bound_by_max_steps_resumed_with_other_steps_per_epoch_keeps_its_progress() -> None:
    """max_steps counts optimiser steps however many an epoch has: a run bound by it (no
    max_epochs) resumed with another number of steps per epoch goes on from the fraction of
    max_steps done, not from its steps rescaled as if epochs bounded it."""
    sched = _scheduler()

    def trainer(per_epoch: int) -> SimpleNamespace:
        return SimpleNamespace(
            lr_scheduler_configs=[SimpleNamespace(scheduler=sched, interval="step")], callbacks=[],
            num_training_batches=per_epoch, accumulate_grad_batches=1, max_epochs=-1,
            max_steps=100, estimated_stepping_batches=100, current_epoch=40 // per_epoch,
            global_step=40, should_stop=False)

    before = AnnealToDeadline()
    before.on_train_batch_start(trainer(4), None, None, 0)
    assert sched.progress == pytest.approx(0.4)
    after = AnnealToDeadline()
    after.load_state_dict(before.state_dict())
    resumed = trainer(10)
    after.on_train_start(resumed, None)
    after.on_train_batch_start(resumed, None, None, 0)
    assert sched.progress == pytest.approx(0.4)
    resumed.global_step = 70
    after.on_train_batch_start(resumed, None, None, 0)
    assert sched.progress == pytest.approx(0.7)
