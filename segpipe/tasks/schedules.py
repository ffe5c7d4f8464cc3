"""Learning-rate schedules that end with the training budget, however fast the machine is.

A cosine schedule set in epochs is cut short, learning rate still high, when ``trainer.max_time``
binds on a slower machine, and leaves the budget unused on a faster one. Here the budget is what
the schedule runs over:

* :class:`DeadlineCosineLR` anneals from the optimiser's learning rate to ``eta_min_ratio`` of it
  over the *planned* training, given as a progress fraction in [0, 1].
* :class:`AnnealToDeadline` (a callback the CLI adds to every run) plans that training: with a
  time budget (``trainer.max_time``) it measures each epoch (validation included) and
  re-estimates, at every epoch start, how many epochs fit in the time left; the last one that
  fits is validated (whatever ``check_val_every_n_epoch`` says) and training stops after it, so
  the run ends annealed, validated and checkpointed just inside its budget. Without a time
  budget, progress is the fraction of ``max_epochs``/``max_steps`` done (a plain cosine), and
  the epoch ``max_epochs`` ends with is validated too.
* :class:`LateCrop` (also added to every run) switches the data module's training crops to
  ``data.late_crop_size`` once that progress reaches ``data.late_crop_start``.

In a config::

    trainer:
      max_epochs: null
      max_time: "00:00:30:00"
    model:
      scheduler_interval: step
      lr_scheduler:
        class_path: segpipe.tasks.schedules.DeadlineCosineLR
        init_args: {eta_min_ratio: 0.01, warmup_fraction: 0.02}
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from segpipe.errors import ConfigError

__all__ = ["AnnealToDeadline", "DeadlineCosineLR", "LateCrop", "training_progress"]


class DeadlineCosineLR(LRScheduler):
    """Cosine annealing over a progress fraction set from outside (see the module docstring).

    Each parameter group goes from its own initial learning rate (so per-group multipliers are
    kept) to ``eta_min_ratio`` times it, after an optional linear warm-up.

    Args:
        optimizer: The optimiser.
        eta_min_ratio: Final learning rate as a fraction of the initial one.
        warmup_fraction: Fraction of the training spent warming up linearly from 0.
        last_epoch: As for every torch scheduler.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        eta_min_ratio: float = 0.0,
        warmup_fraction: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if not 0.0 <= eta_min_ratio <= 1.0:
            raise ConfigError(f"eta_min_ratio must be in [0, 1], got {eta_min_ratio}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.eta_min_ratio = float(eta_min_ratio)
        self.warmup_fraction = float(warmup_fraction)
        #: Fraction of the planned training done, in [0, 1]; set by :class:`AnnealToDeadline`.
        self.progress = 0.0
        super().__init__(optimizer, last_epoch)

    def factor(self, progress: float | None = None) -> float:
        """Learning-rate multiplier at ``progress`` (default: the current one)."""
        p = min(1.0, max(0.0, self.progress if progress is None else progress))
        if self.warmup_fraction > 0 and p < self.warmup_fraction:
            return p / self.warmup_fraction
        if self.warmup_fraction > 0:
            p = (p - self.warmup_fraction) / (1.0 - self.warmup_fraction)
        return self.eta_min_ratio + (1.0 - self.eta_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))

    def get_lr(self) -> list[float]:
        f = self.factor()
        return [base * f for base in self.base_lrs]

    def start_step(self, progress: float) -> None:
        """Set the learning rate of the step about to run from its ``progress``.

        ``step()`` after an optimiser step sets the next step's rate from the progress it
        knows, that of the step just run: each step trained at the previous step's rate (the
        first two at the initial one, the last above the schedule's end).
        """
        self.progress = progress
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def _timer(trainer: L.Trainer) -> Timer | None:
    """Lightning's timer (``trainer.max_time``), or None."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)


def _same_in_every_process(trainer: L.Trainer, values: Any) -> Any:
    """``values`` as process 0 measured them, in every process of a multi-process run.

    Each process has its own clock: planned from its own, DDP processes planned different
    last epochs (so different learning rates, and weights that drifted apart), and one that
    stopped an epoch before the others left them waiting in a collective."""
    if getattr(trainer, "world_size", 1) > 1:  # (a stand-in trainer in tests has none)
        return trainer.strategy.broadcast(values, src=0)
    return values


def _fraction_of_steps(trainer: L.Trainer, offset: int = 0) -> float | None:
    """Steps done of ``max_epochs``/``max_steps``; None when neither bounds the training.
    ``offset``: what the steps done before a resume count as in this run's steps per epoch,
    less the checkpoint's step count (see :meth:`AnnealToDeadline.on_train_start`)."""
    total = trainer.estimated_stepping_batches
    if math.isfinite(total) and total > 0:
        return (trainer.global_step + offset) / total
    return None


def _bound_by_epochs(trainer: L.Trainer, per_epoch: int) -> bool:
    """Whether ``max_epochs`` (not ``max_steps``) ends the training, or a time budget does."""
    max_steps = trainer.max_steps if trainer.max_steps is not None else -1
    if max_steps < 0:
        return True
    epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
    return 0 <= epochs and epochs * per_epoch < max_steps


class AnnealToDeadline(L.Callback):
    """Plans the training that :class:`DeadlineCosineLR` anneals over (module docstring).

    Does nothing for runs without a :class:`DeadlineCosineLR`. Its plan (measured epoch times)
    is saved in checkpoints, so a resumed run keeps to the same budget (Lightning's timer saves
    the time already spent).

    Args:
        recent: Epochs whose longest duration (plus 10 %) predicts the next ones.
    """

    def __init__(self, recent: int = 3) -> None:
        self.recent = int(recent)
        self.epoch_seconds: list[float] = []
        self.planned_epochs: int | None = None
        self._epoch_start: float | None = None
        self._last_epoch: int | None = None
        #: (step, progress) where the current plan takes over: progress runs from there to 1
        #: at the plan's last step, so a re-plan never makes the learning rate jump.
        self._anchor: tuple[int, float] = (0, 0.0)
        #: Whether the time budget, not ``max_epochs``, set the plan's last epoch.
        self._last_by_time = True
        #: The last epoch of a restored run's plan when the time budget set it (the run is done
        #: once past it; a larger ``max_epochs`` on resume extends an epoch-capped plan).
        self._restored_last: int | None = None
        #: Seconds a full validation takes (the last one measured), reserved for the final one.
        self.val_seconds = 0.0
        self._val_start: float | None = None
        #: Optimiser steps per epoch (saved: a resume with another number finds it changed).
        self._per_epoch: int | None = None
        self._restored_per_epoch: int | None = None
        #: Added to the global step: the steps of a run resumed with another number of steps
        #: per epoch, counted as this run's (an epoch of 2 steps on 2 processes is 4 on one).
        self._offset = 0
        #: Leave this process's first epoch out of the plan (set on a resume with saved ones).
        self._skip_first = False
        #: Without a time budget: the steps the schedule runs over (saved), and the plan of a
        #: run resumed with another max_epochs/max_steps (anneals from where it was, as
        #: ``_anchor`` says, to the new end: recomputed over the new total, it jumped up).
        self._total_steps: int | None = None
        self._restored_total: int | None = None
        self._steps_plan: int | None = None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _schedulers(trainer: L.Trainer) -> list[DeadlineCosineLR]:
        return [c.scheduler for c in trainer.lr_scheduler_configs
                if isinstance(c.scheduler, DeadlineCosineLR)]

    def _steps_per_epoch(self, trainer: L.Trainer) -> int:
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:
            return 0
        return max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))

    def progress(self, trainer: L.Trainer) -> float:
        """Fraction of the planned training done: from the progress reached when the current
        plan was made, linearly in optimiser steps to 1 at its last step. A plan shortened by
        one slow epoch (a stall, a load spike) anneals faster from there, a longer one slower;
        neither jumps."""
        per_epoch = self._steps_per_epoch(trainer)
        # the plan's last step: the time budget's, or a resumed run's with another total
        total = (self.planned_epochs * per_epoch if self.planned_epochs is not None and per_epoch
                 else self._steps_plan)
        if total is not None:
            step0, start = self._anchor
            if total <= step0:
                return 1.0
            done = (trainer.global_step + self._offset - step0) / (total - step0)
            return min(1.0, start + (1.0 - start) * max(0.0, done))
        fraction = _fraction_of_steps(trainer, self._offset)
        # None: the first epoch of a time budget, not measured yet: full learning rate.
        return 0.0 if fraction is None else fraction

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._plan(trainer)
        self._set_rates(trainer, epoch_start=True)

    def _plan(self, trainer: L.Trainer) -> None:
        """At an epoch's start: the epochs the time budget has room for, from the recent
        epochs' times (the module docstring)."""
        if (trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
                and trainer.check_val_every_n_epoch is not None):  # not step-based validation
            # The run's last epoch, by max_epochs: validated whatever check_val_every_n_epoch
            # says, so a short run has a best checkpoint and the final model a val score.
            trainer.check_val_every_n_epoch = 1
        timer = _timer(trainer)
        if not self._schedulers(trainer) or timer is None or timer.time_remaining() is None:
            return
        now, left, self.val_seconds = _same_in_every_process(
            trainer, (timer.time_elapsed(), timer.time_remaining(), self.val_seconds))
        if self._epoch_start is not None and now > self._epoch_start:
            if self._skip_first:
                # A resumed process's first epoch: its start-up (workers, allocations,
                # compilation) or a part epoch, not an epoch's time; planned with, it stopped
                # a resumed run with a fifth of its budget unused. The saved epochs plan.
                self._skip_first = False
            else:
                self.epoch_seconds.append(now - self._epoch_start)  # training + validation
                del self.epoch_seconds[:-self.recent]  # only the recent ones plan (and are saved)
        self._epoch_start = now
        if not self.epoch_seconds:
            return
        # The slowest recent epoch, with a margin: an epoch that runs late must not meet the
        # timer before the planned last one is validated.
        epoch_s = 1.1 * max(self.epoch_seconds[-self.recent :])
        # The last epoch is validated whatever check_val_every_n_epoch says: keep time for it.
        remaining = float(left or 0.0) - self.val_seconds
        fit = max(1, int(remaining // epoch_s)) if epoch_s > 0 else 1  # this epoch included
        last = trainer.current_epoch + fit - 1
        self._last_by_time = True
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and last >= trainer.max_epochs - 1:
            last, self._last_by_time = trainer.max_epochs - 1, False  # max_epochs ends it
        self._anchor = (int(trainer.global_step) + self._offset, min(1.0, self.progress(trainer)))
        self.planned_epochs = last + 1
        self._last_epoch = last
        if trainer.current_epoch == last:
            trainer.check_val_every_n_epoch = 1  # validate (and checkpoint) the annealed model

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._set_rates(trainer, epoch_start=False)

    def _set_rates(self, trainer: L.Trainer, epoch_start: bool) -> None:
        """The schedulers' progress, and the learning rate of what starts: a step for a
        scheduler stepped per step, an epoch for one stepped per epoch (at its start's
        progress). Before LearningRateMonitor's hooks, which log that rate."""
        if not self._schedulers(trainer):
            return
        self._per_epoch = self._steps_per_epoch(trainer) or None
        total = getattr(trainer, "estimated_stepping_batches", None)
        if self.planned_epochs is None and isinstance(total, (int, float)) and math.isfinite(total):
            self._total_steps = self._steps_plan or int(total)
        progress = self.progress(trainer)
        for config in trainer.lr_scheduler_configs:
            if not isinstance(config.scheduler, DeadlineCosineLR):
                continue
            if epoch_start == (config.interval == "epoch"):
                config.scheduler.start_step(progress)
            else:
                config.scheduler.progress = progress

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.max_steps is not None and trainer.max_steps > 0
                and trainer.global_step >= trainer.max_steps
                and trainer.check_val_every_n_epoch is not None and not trainer.should_stop):
            # trainer.max_steps ends the run inside an epoch: Lightning stopped there without
            # validating, so the run had no val score and no best checkpoint. Stopping by
            # should_stop validates this step first, as the last epoch is validated.
            trainer.check_val_every_n_epoch = 1
            trainer.should_stop = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_start is None:
            return
        seconds = time.monotonic() - self._val_start
        if trainer.sanity_checking:  # a few batches: scale to the whole val set
            done = max(1, int(trainer.num_sanity_val_steps or 1))
            total = sum(int(n) for n in trainer.num_val_batches if math.isfinite(n)) or done
            seconds *= max(1.0, total / done)
        self.val_seconds = seconds

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_epoch is not None and trainer.current_epoch >= self._last_epoch:
            trainer.should_stop = True  # the planned training is done, inside the budget

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run resumed from the checkpoint of its planned last epoch has nothing left to
        train: stop instead of training (and moving BatchNorm statistics) past the plan.

        A run resumed with another number of optimiser steps per epoch (another number of
        processes, a batch size, images) counts the steps done as this run's, so that the
        schedule goes on from where it was: counted as they were, the progress of a DDP x2
        run resumed on one process fell from 10/24 to 10/60, the learning rate went back up
        and ended at a fifth of its peak instead of annealed."""
        old, self._restored_per_epoch = self._restored_per_epoch, None
        new = self._steps_per_epoch(trainer) if old else 0
        ratio = 1.0
        if (old and new and old != new and self._schedulers(trainer)
                and (self.planned_epochs is not None or _bound_by_epochs(trainer, new))):
            ratio = new / old
            before = self.progress(trainer)
            done = trainer.global_step + self._offset  # in the checkpoint's steps per epoch
            self._offset = round(done * ratio) - trainer.global_step
            step0, start = self._anchor
            self._anchor = (round(step0 * ratio), start)
            rank_zero_info(
                f"Resumed with {new} optimiser steps per epoch where the checkpoint's run took "
                f"{old} (another number of processes, batch size or images): the learning-rate "
                f"schedule goes on from {100 * before:.0f} % of the planned training")
        self._replan_steps(trainer, ratio)
        last = self._restored_last
        if last is not None and trainer.current_epoch > last and self._schedulers(trainer):
            rank_zero_info(
                f"The checkpoint's run already finished its planned training (epoch {last}, "
                "annealed to the deadline); nothing left to train. To train longer, start a new "
                "run (e.g. from its weights with --model.init_from CKPT).")
            trainer.should_stop = True

    def _replan_steps(self, trainer: L.Trainer, ratio: float = 1.0) -> None:
        """A run without a time budget resumed with another ``max_epochs``/``max_steps``: anneal
        from the progress reached to the new end (a cosine recomputed over the new total sent
        the learning rate from 1e-6 back up to 9.5e-5). ``ratio``: this run's optimiser steps
        per epoch over the checkpoint's (its total counted in this run's steps)."""
        old, self._restored_total = self._restored_total, None
        total = getattr(trainer, "estimated_stepping_batches", None)
        if (old is None or self.planned_epochs is not None or not self._schedulers(trainer)
                or not isinstance(total, (int, float)) or not math.isfinite(total)):
            return
        old, new = round(old * ratio), int(total)
        done = trainer.global_step + self._offset
        if new == old or done <= 0:
            return
        before = min(1.0, done / old) if old > 0 else 1.0
        self._anchor, self._steps_plan = (done, before), new
        rank_zero_info(
            f"Resumed with {new} planned optimiser steps where the checkpoint's run planned "
            f"{old}: the learning rate anneals from {100 * before:.0f} % of the schedule to the "
            "new end" + ("; it had annealed already, so it stays at its end: to train on at a "
                         "higher rate, start a new run from its weights (--model.init_from "
                         "CKPT)" if before >= 1.0 else ""))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse to resume a run whose time budget is already spent: Lightning's timer stops
        it before its first step with exit 0, so a run cut short mid-schedule passed for a
        finished one (``fit && test`` tested it)."""
        timer = _timer(trainer)
        remaining = timer.time_remaining() if timer is not None else None
        if trainer.ckpt_path and remaining is not None and remaining <= 0:
            spent = timer.time_elapsed()
            raise ConfigError(
                f"--ckpt_path {trainer.ckpt_path}: its run has already trained "
                f"{timedelta(seconds=int(spent))}, as long as this run's trainer.max_time "
                f"({timedelta(seconds=int(spent + remaining))}) or longer, "
                "so nothing would be trained: the model would stay where the checkpoint left "
                "it. Give a longer --trainer.max_time to go on (a DeadlineCosineLR re-plans to "
                "the new deadline), or score the checkpoint as it is with segpipe test.")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_seconds": list(self.epoch_seconds), "planned_epochs": self.planned_epochs,
                "val_seconds": self.val_seconds, "anchor": list(self._anchor),
                "last_epoch": self._last_epoch if self._last_by_time else None,
                "steps_per_epoch": self._per_epoch, "step_offset": self._offset,
                "total_steps": self._total_steps, "steps_plan": self._steps_plan}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_seconds = [float(v) for v in state_dict.get("epoch_seconds", [])]
        self.planned_epochs = state_dict.get("planned_epochs")
        self.val_seconds = float(state_dict.get("val_seconds", 0.0))
        step0, start = state_dict.get("anchor") or (0, 0.0)
        self._anchor = (int(step0), float(start))
        self._restored_last = state_dict.get("last_epoch")
        self._restored_per_epoch = state_dict.get("steps_per_epoch")
        self._offset = int(state_dict.get("step_offset") or 0)
        self._skip_first = bool(self.epoch_seconds)  # a resume: the saved epochs plan
        total, plan = state_dict.get("total_steps"), state_dict.get("steps_plan")
        self._restored_total = int(total) if total is not None else None
        self._steps_plan = int(plan) if plan is not None else None


def training_progress(trainer: L.Trainer) -> float:
    """Fraction of the planned training done, in [0, 1].

    The plan of :class:`AnnealToDeadline` when it has one (a time budget with
    :class:`DeadlineCosineLR`), else the steps done of ``max_epochs``/``max_steps``, else the
    time spent of ``trainer.max_time``; 0 when none of these bounds the training.
    """
    planner = next((cb for cb in trainer.callbacks if isinstance(cb, AnnealToDeadline)), None)
    if planner is not None and planner.planned_epochs is not None:
        return min(1.0, planner.progress(trainer))
    fraction = _fraction_of_steps(trainer, planner._offset if planner is not None else 0)
    if fraction is not None:
        return min(1.0, fraction)
    timer = _timer(trainer)
    remaining = timer.time_remaining() if timer is not None else None
    if remaining is None:
        return 0.0
    elapsed = float(timer.time_elapsed())
    # process 0's: each process's clock differs (the branch is the same in every process)
    return _same_in_every_process(trainer, min(1.0, elapsed / max(1e-9, elapsed + float(remaining))))


class LateCrop(L.Callback):
    """Builds the training loader again when the data module moves to its late crop size.

    At each training epoch's end it gives the data module the training progress
    (:func:`training_progress`); a data module with ``update_train_crop`` (segpipe's, for
    ``data.late_crop_size``) answers whether its training crops changed, and if so Lightning
    builds the training loader again for the next epoch. Other data modules are left alone.

    A run resumed from a checkpoint written at the validation that closes the switching epoch
    (checkpoints are written before this hook runs) trains one more epoch on the small crops
    before switching.
    """

    def __init__(self) -> None:
        self._reload_every: int | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        update = getattr(trainer.datamodule, "update_train_crop", None)
        if not callable(update):
            return
        progress = training_progress(trainer)
        if update(progress):
            rank_zero_info(f"Epoch {trainer.current_epoch + 1} on: training crops of "
                           f"{trainer.datamodule.train_crop_size} px (data.late_crop_size), "
                           f"{100 * progress:.0f} % into the planned training")
            # Lightning's own switch for building the loader again at the next epoch's start.
            self._reload_every = trainer.reload_dataloaders_every_n_epochs
            trainer.reload_dataloaders_every_n_epochs = 1

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._reload_every is not None:  # the loader has been built again: back to as set
            trainer.reload_dataloaders_every_n_epochs = self._reload_every
            self._reload_every = None
