"""When a fit stops, as far as the trainer can say during an epoch.

One predicate for the callbacks and the data module that plan around the run's end:
:class:`~segpipe.callbacks.LastCheckpoint` always saves the last epoch, and the training loader
(:class:`~segpipe.data.loading.ResumableDataLoader`) loads no epoch after it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ends_after_this_epoch"]


def ends_after_this_epoch(trainer: Any, steps_to_come: int = 0) -> bool:
    """Whether training stops after the epoch under way: a stop (``trainer.should_stop``: a time
    budget's plan, early stopping), its last epoch by ``max_epochs``, or ``max_steps`` reached
    once ``steps_to_come`` more optimiser steps are taken. A time budget's last epoch is known
    only once its plan sets ``should_stop``.

    Args:
        trainer: A Lightning ``Trainer`` (its ``should_stop``, ``max_epochs``, ``max_steps``,
            ``current_epoch`` and ``global_step``).
        steps_to_come: Optimiser steps of this epoch not yet taken.

    Returns:
        True when no further epoch will be trained.
    """
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    return bool(trainer.should_stop
                or (max_epochs is not None and max_epochs >= 0
                    and trainer.current_epoch + 1 >= max_epochs)
                or (max_steps is not None and max_steps >= 0
                    and trainer.global_step + steps_to_come >= max_steps))
