"""TTA over the symmetries the model was trained with, recorded in the data spec."""

from __future__ import annotations

import pytest
import torch

from segpipe.data import SegmentationDataModule
from segpipe.data.spec import spec_from_legacy
from segpipe.predict.scoring import ProbabilityFn
from segpipe.tta import model_views, tta_mean, tta_views


@pytest.mark.parametrize(
    "symmetries, n",
    [(None, 1), ([], 1), (["hflip"], 2), (["vflip"], 2), (["hflip", "vflip"], 4),
     (["rot90"], 4), (["hflip", "rot90"], 8), (["hflip", "vflip", "rot90"], 8)],
)
def test_views_are_the_group_the_symmetries_generate(symmetries, n) -> None:
    views = tta_views(symmetries)
    assert len(views) == n and views[0] == (0, ())


def test_mean_of_an_equivariant_map_is_the_map_and_undoes_each_view() -> None:
    x = torch.randn(2, 3, 5, 7)  # not square: rotations change H and W, and are undone
    f = lambda t: t[:, :2] * 2.0  # noqa: E731 - pixel-wise, so equivariant to every view
    out = tta_mean(f, x, tta_views(["hflip", "vflip", "rot90"]))
    torch.testing.assert_close(out, f(x))
    g = lambda t: t[:, :1].cumsum(dim=3)  # noqa: E731 - not flip-equivariant
    assert not torch.allclose(tta_mean(g, x, tta_views(["hflip"])), g(x))


class _Net(torch.nn.Module):
    """Probabilities depend on the row: a model that has only seen the sky on top."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.linspace(-4, 4, x.shape[2], device=x.device)[None, None, :, None]
        top = -rows.expand(x.shape[0], 1, x.shape[2], x.shape[3])
        return torch.cat([top, -top], dim=1)


def test_probability_fn_uses_only_the_trained_symmetries() -> None:
    x = torch.zeros(1, 3, 8, 8)
    plain = ProbabilityFn(_Net(), tta=False)(x)
    hflip_only = ProbabilityFn(_Net(), tta=True, symmetries=["hflip"])(x)
    torch.testing.assert_close(hflip_only, plain)  # a vertical structure survives h-flips
    all_flips = ProbabilityFn(_Net(), tta=True, symmetries=["hflip", "vflip"])(x)
    torch.testing.assert_close(all_flips, torch.full_like(plain, 0.5))  # v-flips wash it out


def test_specs_record_the_training_symmetries(tmp_path) -> None:
    assert SegmentationDataModule(str(tmp_path), num_classes=2).spec.symmetries == ["hflip"]
    dm = SegmentationDataModule(str(tmp_path), num_classes=2, vflip=True, rotate90=True)
    assert dm.spec.symmetries == ["hflip", "vflip", "rot90"]
    assert SegmentationDataModule(str(tmp_path), num_classes=2, augment="none").spec.symmetries == []
    legacy = spec_from_legacy({"num_classes": 2}, {"num_classes": 2, "root": "x"})
    assert legacy is not None and legacy.symmetries == ["hflip"]  # the old defaults


def test_segpipe_test_can_score_the_tta_prediction() -> None:
    from segpipe.tasks import SegmentationTask
    from tests.tasks.test_segmentation import DM, PixelNet, _trainer

    torch.manual_seed(0)
    task = SegmentationTask(PixelNet(), ignore_index=255, test_tta=True,
                            optimizer=lambda p: torch.optim.Adam(p, lr=0.1))
    trainer = _trainer(max_epochs=5, limit_val_batches=1)
    trainer.fit(task, DM(ignore=255))
    trainer.test(task, DM(ignore=255))
    assert task.test_report["mIoU"] > 0.8  # pixel-wise model: flips change nothing


def test_given_identity_logits_are_reused_not_recomputed() -> None:
    from segpipe.tta import tta_probabilities

    calls: list[int] = []

    def net(t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return _Net()(t)

    x = torch.randn(2, 3, 8, 8)
    views = tta_views(["hflip", "vflip"])
    fresh = tta_probabilities(net, x, views)
    assert len(calls) == 4
    calls.clear()
    reused = tta_probabilities(net, x, views, identity_logits=_Net()(x))
    assert len(calls) == 3  # the identity view is not run again
    torch.testing.assert_close(reused, fresh)


def test_segpipe_test_with_tta_runs_one_forward_per_view() -> None:
    from segpipe.tasks import SegmentationTask
    from tests.tasks.test_segmentation import DM, PixelNet, _trainer

    task = SegmentationTask(PixelNet(), ignore_index=255, test_tta=True)
    batches: list[int] = []
    task.net.register_forward_hook(lambda *_: batches.append(1))
    dm = DM(ignore=255)
    _trainer(max_epochs=1).test(task, dm)
    n_batches = len(dm.test_dataloader())
    views = len(model_views(task.spec.symmetries, warn=False))
    assert views > 1 and len(batches) == n_batches * views  # the loss's forward is the identity's
