"""Segmenter options given per call (``tta=``, ``tile=``) act as the constructor's do."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segpipe.predict import Segmenter
from tests.predict.conftest import noise_image


def test_tta_given_to_one_call_is_applied_to_that_call(unet_ckpt: Path) -> None:
    """``predict_proba(img, tta=True)`` on a segmenter built without TTA gives what a segmenter
    built with TTA gives, and ``tta=False`` on one built with it turns it off."""
    img = noise_image(40, 56, seed=3)
    plain = Segmenter.from_checkpoint(unet_ckpt, device="cpu", precision="32-true")
    with_tta = Segmenter.from_checkpoint(unet_ckpt, device="cpu", precision="32-true", tta=True)
    p_plain, p_tta = plain.predict_proba(img), with_tta.predict_proba(img)
    assert not np.allclose(p_plain, p_tta, atol=1e-4)  # the views differ for this network
    np.testing.assert_allclose(plain.predict_proba(img, tta=True), p_tta, atol=1e-5)
    np.testing.assert_allclose(with_tta.predict_proba(img, tta=False), p_plain, atol=1e-5)


def test_tta_averages_only_the_symmetries_the_checkpoint_records(tmp_path: Path) -> None:
    """A model trained without flips (``symmetries: []``) has nothing to average: TTA leaves its
    probabilities as they are; one trained with vertical flips averages exactly those."""
    from segpipe.predict.checkpoint import save_predict_checkpoint

    net = {"class_path": "segpipe.models.UNet",
           "init_args": {"in_channels": 3, "num_classes": 3, "base_channels": 4, "depth": 2}}
    img = noise_image(32, 32, seed=5)
    none = save_predict_checkpoint(tmp_path / "none.ckpt", net=net, data={"symmetries": []})
    seg = Segmenter.from_checkpoint(none, device="cpu", precision="32-true")
    np.testing.assert_allclose(seg.predict_proba(img, tta=True), seg.predict_proba(img), atol=1e-6)

    vflip = save_predict_checkpoint(tmp_path / "v.ckpt", net=net, data={"symmetries": ["vflip"]})
    seg = Segmenter.from_checkpoint(vflip, device="cpu", precision="32-true")
    expected = (seg.predict_proba(img) + seg.predict_proba(img[::-1].copy())[:, ::-1]) / 2
    np.testing.assert_allclose(seg.predict_proba(img, tta=True), expected, atol=1e-5)


def test_tile_given_to_one_call_is_applied_to_that_call(unet_ckpt: Path) -> None:
    """``predict_proba(img, tile=32)`` tiles as a segmenter built with ``tile=32`` does (which
    differs from the whole image for a U-Net), and a tile under the size step is refused."""
    import pytest

    img = noise_image(72, 72, seed=7)
    whole = Segmenter.from_checkpoint(unet_ckpt, device="cpu", precision="32-true")
    tiled = Segmenter.from_checkpoint(unet_ckpt, device="cpu", precision="32-true", tile=32)
    p_whole, p_tiled = whole.predict_proba(img), tiled.predict_proba(img)
    assert not np.allclose(p_whole, p_tiled, atol=1e-4)
    np.testing.assert_allclose(whole.predict_proba(img, tile=32), p_tiled, atol=1e-5)
    with pytest.raises(ValueError, match="tile must be at least"):
        whole.predict(img, tile=whole.config.pad_multiple - 1)
