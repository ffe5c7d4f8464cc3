"""Freeze-then-fine-tune: a fit that ends while the encoder is still frozen hands the network
back trainable."""

from __future__ import annotations

import warnings

from torch import nn

from tests.tasks.test_finetune import BlobDM, _fit, _freeze_task, _trainer


def test_a_fit_that_ends_in_the_frozen_epochs_leaves_the_encoder_trainable() -> None:
    """Stopped inside its frozen epochs (max_epochs, max_time, early stopping), the fit still
    restores the encoder: every parameter trains again and the modules follow the task's mode,
    so a later fit or fine-tuning in Python does not silently keep the encoder fixed."""
    task = _freeze_task()  # freeze_encoder_epochs=2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "stays frozen for the whole run"
        rec = _fit(task, max_epochs=1)
    assert rec.frozen == {0: True}
    assert all(p.requires_grad for p in task.net.parameters())
    task.train()
    bns = [m for m in task.net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)



def test_unfreezing_releases_only_what_the_freeze_froze() -> None:
    """Encoder parameters the user froze before the fit stay frozen (and unchanged) when the
    frozen epochs end; the rest of the encoder trains again."""
    import torch

    task = _freeze_task()  # freeze_encoder_epochs=2
    for p in task.net.inc.parameters():
        p.requires_grad_(False)
    kept = {k: v.clone() for k, v in task.net.inc.state_dict().items() if "running" not in k
            and "num_batches" not in k}
    _trainer(max_epochs=3).fit(task, BlobDM())
    assert not any(p.requires_grad for p in task.net.inc.parameters())
    assert all(p.requires_grad for p in task.net.downs.parameters())
    now = task.net.inc.state_dict()
    assert all(torch.equal(kept[k], now[k]) for k in kept)
