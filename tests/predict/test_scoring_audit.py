"""The shared inference path: which images are tiled, what scores come back (logits or
probabilities, with TTA), the overlap passed on, resizing scores back to the input, and each
image's scores and labels read back from a stacked batch."""

from __future__ import annotations

import torch

from segpipe.decision import decide
from segpipe.predict.scoring import ProbabilityFn, batch_scores, score_batch, to_size
from segpipe.predict.tiling import predict_tiled


class _ColumnNet(torch.nn.Module):
    """Logits that depend on the column (not flip-invariant), any input size: (N, 2, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = torch.linspace(-2.0, 2.0, x.shape[-1]).expand(x.shape[0], 1, x.shape[-2], -1)
        return torch.cat([cols + x[:, :1], -cols], dim=1)


class _ConvNet(torch.nn.Module):
    """A 3×3 convolution: its tiled output depends on the tile overlap."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@torch.no_grad()
def test_an_image_wider_than_the_tile_is_tiled() -> None:
    """An image only wider (or only taller) than the tile is predicted tile by tile, as one
    larger on both sides is: the tile bounds the memory of a long strip."""
    task = _ColumnNet()
    fn = ProbabilityFn(task)  # type: ignore[arg-type]
    seen: list[int] = []
    for shape in ((1, 3, 16, 80), (1, 3, 80, 16)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        scores = batch_scores(x, task, fn, num_classes=2, tile=32, on_tiles=seen.append)
        assert scores.shape == (1, 2, *shape[-2:])
        torch.testing.assert_close(scores.sum(1), torch.ones(1, *shape[-2:]))  # probabilities
    assert sum(seen) > 2  # several tiles each


@torch.no_grad()
def test_untiled_scores_are_logits_probabilities_on_request_and_tta_applied() -> None:
    """Whole images give the network's logits; with ``probs`` their softmax; with TTA the
    probabilities averaged over the training symmetries (a flip here), not the plain ones."""
    task = _ColumnNet()
    x = torch.zeros(2, 3, 8, 12)
    logits = task(x)
    plain = ProbabilityFn(task)  # type: ignore[arg-type]
    torch.testing.assert_close(batch_scores(x, task, plain, num_classes=2), logits)
    torch.testing.assert_close(batch_scores(x, task, plain, num_classes=2, probs=True),
                               logits.softmax(1))
    tta = ProbabilityFn(task, tta=True, symmetries=["hflip"])  # type: ignore[arg-type]
    averaged = batch_scores(x, task, tta, num_classes=2)
    # the flip cancels the column bias: every pixel is even between the two classes
    torch.testing.assert_close(averaged, torch.full_like(averaged, 0.5))


@torch.no_grad()
def test_the_tile_overlap_is_passed_to_the_sliding_window() -> None:
    """The overlap asked for is the one the sliding window uses (a 3×3 convolution's tiled
    result depends on it)."""
    task = _ConvNet().eval()
    fn = ProbabilityFn(task)  # type: ignore[arg-type]
    x = torch.randn(1, 3, 40, 70, generator=torch.Generator().manual_seed(1))
    for overlap in (0.0, 0.5):
        got = batch_scores(x, task, fn, num_classes=4, tile=24, overlap=overlap)
        torch.testing.assert_close(got[0], predict_tiled(x[0], fn, 4, 24, overlap))
    assert not torch.allclose(predict_tiled(x[0], fn, 4, 24, 0.0),
                              predict_tiled(x[0], fn, 4, 24, 0.5))


def test_to_size_resizes_scores_bilinearly_with_pixel_centres_aligned() -> None:
    """Scores come back to (H, W) (height first), interpolated linearly between pixel centres
    as images are resized (not corner-aligned): a 2-pixel ramp doubled to 4 pixels."""
    scores = torch.tensor([[[0.0, 1.0]]]).expand(1, 3, 2).contiguous()  # (K=1, 3, 2)
    out = to_size(scores, (3, 4))
    assert out.shape == (1, 3, 4)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    tall = to_size(torch.rand(2, 5, 7), (10, 6))
    assert tall.shape == (2, 10, 6)
    same = torch.rand(2, 5, 7)
    assert to_size(same, (5, 7)) is same


@torch.no_grad()
def test_a_scored_batch_is_stacked_channels_last_and_labelled_per_image() -> None:
    """Images the network sees at their own size: the stack is channels-last in memory (no
    conversion before the first convolution), the scores are the logits, each image's labels
    are the batch's arg-max, and a threshold labels from probabilities instead."""
    task = _ColumnNet()
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 6, 10, generator=gen) for _ in range(3)]
    scored = score_batch(images, [(6, 10)] * 3, torch.device("cpu"), task,
                         ProbabilityFn(task), num_classes=2)  # type: ignore[arg-type]
    assert not scored.resized
    assert scored.x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(scored.x, torch.stack(images))
    logits = task(torch.stack(images))
    torch.testing.assert_close(scored.scores, logits)
    for j in range(3):
        p, lab = scored.image(j)
        torch.testing.assert_close(p, logits[j])
        assert torch.equal(lab, logits[j].argmax(0))
        assert scored.image(j, labels=False)[1] is None
    high = score_batch(images, [(6, 10)] * 3, torch.device("cpu"), task,
                       ProbabilityFn(task), num_classes=2, threshold=0.9)  # type: ignore[arg-type]
    torch.testing.assert_close(high.scores, logits.softmax(1))  # a threshold reads probabilities
    for j in range(3):
        assert torch.equal(high.image(j)[1], (logits[j].softmax(0)[1] > 0.9).long())
    assert int(high.image(0)[1].sum()) < int(scored.image(0)[1].sum())  # the threshold bites


@torch.no_grad()
def test_resized_images_get_probabilities_and_labels_at_their_own_size() -> None:
    """Images resized for the network (eval_resize): each comes back as probabilities resized
    to its own size, labelled there, whatever the logits asked for."""
    task = _ColumnNet()
    images = [torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]
    sizes = [(16, 12), (5, 20)]
    scored = score_batch(images, sizes, torch.device("cpu"), task, ProbabilityFn(task),
                         num_classes=2)  # type: ignore[arg-type]
    assert scored.resized
    probs = task(torch.stack(images)).softmax(1)
    torch.testing.assert_close(scored.scores, probs)
    for j, size in enumerate(sizes):
        p, lab = scored.image(j)
        assert p.shape == (2, *size) and lab.shape == size
        torch.testing.assert_close(p, to_size(probs[j], size))
        assert torch.equal(lab, decide(p, None, dim=0))
        assert lab.unique().numel() == 2  # both classes, split by the column
