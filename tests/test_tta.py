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


# ---------------------------------------------------------------- multi-scale inference
@pytest.mark.parametrize("given, expected", [
    (None, None), ([1], None), ([1.0], None), ((0.5, 1, 2), [0.5, 1.0, 2.0]), ([0.75], [0.75]),
])
def test_scales_are_checked_and_the_evaluation_size_alone_is_none(given, expected) -> None:
    from segpipe.tta import check_scales

    assert check_scales(given) == expected


@pytest.mark.parametrize("given, match", [
    ([], r"model\.test_tta_scales is empty"),
    ([0.5, 0], r"holds 0: each factor of the evaluation size must be a number > 0"),
    ([-1], r"holds -1"), ([float("nan")], r"holds nan"), ([float("inf")], r"holds inf"),
    (["big"], r"holds 'big'"), ([True], r"holds True"),
    ([0.5, 1, 0.5], r"holds 0.5 twice"),
    (0.5, r"must be a list of factors"), ("0.5 1", r"must be a list of factors"),
])
def test_bad_scales_are_refused_naming_the_option(given, match) -> None:
    from segpipe.errors import ConfigError
    from segpipe.tta import check_scales

    with pytest.raises(ConfigError, match=match):
        check_scales(given, "model.test_tta_scales")


@pytest.mark.parametrize("tta, scales, expected", [
    (False, None, []), (True, None, ["--tta"]),
    (False, [0.5, 1.0, 1.25], ["--tta_scales", "0.5", "1", "1.25"]),
    (True, (0.75, 1), ["--tta", "--tta_scales", "0.75", "1"]),
])
def test_predict_view_options_name_the_views(tta, scales, expected) -> None:
    from segpipe.predict.command import build_parser
    from segpipe.tta import predict_view_options

    options = predict_view_options(tta, scales)
    assert options == expected
    args = build_parser().parse_args(["--ckpt_path", "m.ckpt", "--input", "in", "--output", "out",
                                      *options])
    assert args.tta is tta and args.tta_scales == (list(map(float, scales)) if scales else None)


class _SizeNet(torch.nn.Module):
    """Logits from a per-pixel map of the input plus the input's height: outputs differ with the
    size a view is seen at, and the sizes seen are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-2:]))
        return torch.cat([x[:, :1] * 3.0, -x[:, 1:2] + x.shape[-2] / 10.0], dim=1)


def test_multiscale_views_are_the_base_size_times_each_scale_and_weigh_equally() -> None:
    import torch.nn.functional as F

    from segpipe.tta import multiscale_probabilities

    x = torch.randn(2, 3, 10, 20)
    net = _SizeNet()
    out = multiscale_probabilities(net, x, [(0, ())], [0.5, 1.0, 1.5], base_size=(8, 16))
    assert net.seen == [(4, 8), (8, 16), (12, 24)] and out.shape == (2, 2, 10, 20)
    expected = sum(
        F.interpolate(_SizeNet()(F.interpolate(x, size=s, mode="bilinear", align_corners=False))
                      .softmax(1), size=(10, 20), mode="bilinear", align_corners=False)
        for s in [(4, 8), (8, 16), (12, 24)]) / 3
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 10, 20))
    # without a base size the scales are the image's own; scale 1 is the image itself
    net.seen.clear()
    alone = multiscale_probabilities(net, x, [(0, ())], [1.0, 0.5])
    assert net.seen == [(10, 20), (5, 10)]
    plain = _SizeNet()(x).softmax(1)
    assert not torch.allclose(alone, plain)  # the half-size view moved it
    torch.testing.assert_close(multiscale_probabilities(net, x, [(0, ())], [1.0]), plain)


def test_multiscale_with_flips_runs_every_view_at_every_scale() -> None:
    import torch.nn.functional as F

    from segpipe.tta import multiscale_probabilities, tta_probabilities

    x = torch.randn(1, 3, 8, 8)
    net = _SizeNet()
    views = tta_views(["hflip", "vflip"])
    out = multiscale_probabilities(net, x, views, [1.0, 2.0])
    assert net.seen == [(8, 8)] * 4 + [(16, 16)] * 4
    plain = tta_probabilities(_SizeNet(), x, views)
    big = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    doubled = F.interpolate(tta_probabilities(_SizeNet(), big, views), size=(8, 8),
                            mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, (plain + doubled) / 2)
    torch.testing.assert_close(multiscale_probabilities(_SizeNet(), x, views, [1.0]), plain)


def test_probability_fn_averages_over_scales_of_the_size_given() -> None:
    net = _SizeNet()
    fn = ProbabilityFn(net, tta=False, scales=[0.5, 1])
    assert fn.averages and not ProbabilityFn(net).averages
    assert ProbabilityFn(net, scales=[1]).scales is None  # the evaluation size alone
    fn(torch.zeros(1, 3, 12, 16), base_size=(6, 8))
    assert net.seen == [(3, 4), (6, 8)]


class _NativeData(torch.utils.data.Dataset):
    """Images of 16x16 (or ``image_size``) with native 16x16 masks, as data.eval_resize gives
    them (``"size"``)."""

    def __init__(self, image_size: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(4, 3, image_size, image_size, generator=g)
        self.masks = torch.randn(4, 3, 16, 16, generator=g).argmax(1)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": self.masks[i], "path": f"{i}.png",
                "size": torch.tensor([16, 16])}


class _NativeDM:
    """A data module that resizes its test images unless asked for native ones."""

    def __new__(cls, keeps: bool):
        import lightning.pytorch as L

        class DM(L.LightningDataModule):
            def __init__(self) -> None:
                super().__init__()
                self.num_classes = 3
                self.native = False
                if keeps:
                    self.keep_test_images_native = lambda: setattr(self, "native", True)

            def test_dataloader(self):
                data = _NativeData(16 if self.native else 8)
                return torch.utils.data.DataLoader(data, batch_size=2)

        return DM()


class _BatchNormNet(torch.nn.Module):
    """1x1 convolution and BatchNorm (for bn_adapt)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.pad_multiple = 3, 3, 8
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _scaled_task(**options):
    from segpipe.data.spec import DataSpec
    from segpipe.tasks import SegmentationTask

    spec = DataSpec.create(num_classes=3, eval_resize=[8, 8], symmetries=["hflip"])
    task = SegmentationTask(_BatchNormNet(), data_spec=spec.to_dict(), **options)
    seen: list[tuple[int, int]] = []
    task.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    return task, seen


def test_segpipe_test_asks_for_native_images_and_scales_eval_resize() -> None:
    from tests.tasks.test_segmentation import _trainer

    task, seen = _scaled_task(test_tta=True, test_tta_scales=[0.5, 1, 2], bn_adapt=0.5)
    _trainer().test(task, _NativeDM(keeps=True))
    # bn_adapt's pass over the two batches sees the plain view, as scored (not the 16x16
    # native images); then each batch: the loss's plain view, and two flips at each scale
    per_batch = [(8, 8)] + [(4, 4)] * 2 + [(8, 8)] * 2 + [(16, 16)] * 2
    assert seen == [(8, 8)] * 2 + per_batch * 2
    assert "at 3 scales (0.5, 1, 2 x data.eval_resize 8x8" in task.test_report[
        "test_time_augmentation"]


def test_segpipe_test_refuses_scales_of_images_already_resized() -> None:
    from segpipe.errors import ConfigError
    from tests.tasks.test_segmentation import _trainer

    task, _ = _scaled_task(test_tta_scales=[0.5, 1])
    with pytest.raises(ConfigError, match=r"model.test_tta_scales resizes each view from the test "
                       r"images at their native size, but the data module .* resized them to "
                       r"data.eval_resize \[8, 8\] \(\[8, 8\] images, \[16, 16\] masks\): give it "
                       r"a keep_test_images_native\(\) method"):
        _trainer().test(task, _NativeDM(keeps=False))
