"""SegmentationTask behaviour the existing task tests ran but did not check (found by mutation
testing): class weights reaching the Dice and focal losses, focal/Lovász losses on batches with
some ignored pixels, the worst-image gallery, a second test on the same task and the count of
images in no case."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch

from segpipe.tasks import SegmentationTask
from tests.tasks.test_segmentation import ArgmaxData, PixelNet, _BatchedDM, _trainer


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 6, 7, generator=g)
    target = torch.randint(0, 3, (2, 6, 7), generator=g)
    target[:, 0] = 255  # some pixels ignored, as in every CamVid batch
    return logits, target


@pytest.mark.parametrize("loss, smp_loss", [("dice", smp.losses.DiceLoss),
                                            ("focal", smp.losses.FocalLoss)])
def test_class_weights_weigh_the_dice_and_focal_losses(loss, smp_loss):
    weights = [0.1, 1.0, 4.0]
    logits, target = _batch()
    task = SegmentationTask(PixelNet(), loss=loss, class_weights=weights, ignore_index=255)
    got = task.criterion(logits, target)
    weighted = smp_loss(mode="multiclass", ignore_index=255, class_weights=weights)(logits, target)
    plain = smp_loss(mode="multiclass", ignore_index=255)(logits, target)
    torch.testing.assert_close(got, weighted)
    assert not torch.isclose(got, plain)


@pytest.mark.parametrize("loss", ["focal", "lovasz"])
def test_focal_and_lovasz_score_a_batch_with_some_ignored_pixels(loss):
    """Only a batch whose pixels are all ignored is 0: one with some ignored pixels is smp's
    loss over the others (else every CamVid batch, which has void pixels, trained nothing)."""
    logits, target = _batch(1)
    task = SegmentationTask(PixelNet(), loss=loss, ignore_index=255)
    reference = {"focal": smp.losses.FocalLoss, "lovasz": smp.losses.LovaszLoss}[loss](
        mode="multiclass", ignore_index=255)
    got = task.criterion(logits, target)
    assert float(got) > 0
    torch.testing.assert_close(got, reference(logits, target))


def test_the_gallery_holds_the_lowest_iou_images_lowest_first():
    torch.manual_seed(0)
    ds = ArgmaxData(n=10)
    ds.masks[1::3] = (ds.masks[1::3] + 1) % 3  # some images far worse than others
    task = SegmentationTask(PixelNet(), num_worst_images=3)
    _trainer().test(task, _BatchedDM(ds, 4), verbose=False)
    report = task.test_report
    ious = sorted(row["IoU"] for row in report["per_image"])
    worst = [row["IoU"] for row in report["worst_images"]]
    assert worst == pytest.approx(ious[:3])
    assert worst == sorted(worst)


def test_a_second_test_of_the_same_task_reports_its_own_images():
    ds = ArgmaxData(n=5)
    task = SegmentationTask(PixelNet())
    for _ in range(2):
        _trainer().test(task, _BatchedDM(ds, 2), verbose=False)
        assert task.test_report["num_images"] == 5
        assert len(task.test_report["per_image"]) == 5


def test_images_in_no_case_are_counted():
    class _Cases(ArgmaxData):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "case": "AB"[i % 2] if i < 4 else ""}

    task = SegmentationTask(PixelNet())
    _trainer().test(task, _BatchedDM(_Cases(n=7), 3), verbose=False)
    per_case = task.test_report["per_case"]
    assert per_case["images_without_case"] == 3
    assert sum(row["num_images"] for row in per_case["cases"]) == 4
