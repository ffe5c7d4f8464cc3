"""segpipe's batched Lovász-softmax against smp's loop over classes (the reference)."""

from __future__ import annotations

import pytest
import segmentation_models_pytorch as smp
import torch

from segpipe.tasks.losses import LovaszSoftmaxLoss, lovasz_softmax


def _case(n, c, h, w, ignore_index, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * scale
    high = c + (ignore_index is not None)  # label c stands for the ignored one
    target = torch.randint(0, high, (n, h, w), generator=g)
    if ignore_index is not None:
        target[target == c] = ignore_index
    return logits, target


def _value_and_grad(loss_fn, logits, target):
    x = logits.clone().requires_grad_()
    value = loss_fn(x, target)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("n, c, h, w, ignore_index", [
    (2, 3, 6, 7, 255),      # a void label, as CamVid's
    (3, 11, 16, 20, 11),    # CamVid's classes, void = 11
    (2, 2, 9, 9, None),     # binary, nothing ignored
    (1, 5, 8, 8, 0),        # an ignore index inside the class range: class 0 is absent
])
def test_value_and_gradient_equal_smps(n, c, h, w, ignore_index):
    logits, target = _case(n, c, h, w, ignore_index)
    reference = smp.losses.LovaszLoss(mode="multiclass", ignore_index=ignore_index)
    want, want_grad = _value_and_grad(reference, logits, target)
    got, got_grad = _value_and_grad(LovaszSoftmaxLoss(ignore_index), logits, target)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)
    assert float(got) > 0 and got_grad.abs().sum() > 0


def test_absent_classes_are_left_out_of_the_mean():
    logits, target = _case(2, 6, 8, 8, None, seed=3)
    target[target >= 3] = 0  # classes 3-5 absent: the mean runs over 0-2 only
    want = smp.losses.LovaszLoss(mode="multiclass")(logits, target)
    torch.testing.assert_close(lovasz_softmax(logits, target), want)
    all_six = torch.stack([  # smp's own per-class terms, averaged over all six instead
        smp.losses.lovasz._lovasz_softmax_flat(
            *smp.losses.lovasz._flatten_probas(logits.softmax(1), target), classes=[k])
        for k in range(6)]).mean()
    assert not torch.isclose(lovasz_softmax(logits, target), all_six)


def test_classes_sorted_in_several_rounds_give_the_same_loss():
    """A small ``max_sort_elements`` splits the classes into rounds of one to a few."""
    logits, target = _case(2, 7, 12, 10, 255, seed=5)
    whole, whole_grad = _value_and_grad(lambda x, t: lovasz_softmax(x, t, 255), logits, target)
    for limit in (1, 240, 2 * 240 + 1):  # 240 pixels: one class a round, one, two
        got, grad = _value_and_grad(
            lambda x, t: lovasz_softmax(x, t, 255, max_sort_elements=limit), logits, target)
        torch.testing.assert_close(got, whole)
        torch.testing.assert_close(grad, whole_grad)


def test_a_batch_whose_pixels_are_all_ignored_is_zero_with_zero_gradient():
    logits, _ = _case(2, 4, 5, 5, 255)
    target = torch.full((2, 5, 5), 255)
    value, grad = _value_and_grad(LovaszSoftmaxLoss(255), logits, target)
    assert float(value) == 0.0
    assert torch.count_nonzero(grad) == 0


def test_a_perfect_prediction_scores_zero_and_a_wrong_one_more():
    target = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    right = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    wrong = right.roll(1, dims=1)
    assert float(lovasz_softmax(right, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(lovasz_softmax(wrong, target)) > 0.9


def test_low_precision_logits_are_scored_in_float32():
    logits, target = _case(2, 4, 8, 8, 255)
    got = lovasz_softmax(logits.to(torch.bfloat16), target, 255)
    assert got.dtype == torch.float32
    want = lovasz_softmax(logits.to(torch.bfloat16).float(), target, 255)
    torch.testing.assert_close(got, want)


def test_mismatched_shapes_are_refused_with_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\) and \(2, 5, 5\)"):
        lovasz_softmax(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 5, dtype=torch.long))
