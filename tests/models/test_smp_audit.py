"""Audit tests for segpipe.models.smp: local encoder weights, cache checks, extra arguments."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

from segpipe.models import SmpModel, load_encoder_weights
from segpipe.models.smp import resolve_pretrained
from tests.models.test_smp import _random_state, write_smp_cache


def _encoder_state(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return _random_state(smp.encoders.get_encoder("resnet18", weights=None), seed=seed)


def test_an_imagenet_checkpoint_with_its_classifier_loads_without_warning(tmp_path: Path) -> None:
    """A classification checkpoint (encoder keys plus its ``fc`` head, as torchvision saves
    resnet18) loads silently: the classifier is dropped, every encoder tensor is taken."""
    state = _encoder_state()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save({**state, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, path)
    encoder = SmpModel("unet", "resnet18", num_classes=2).encoder
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_encoder_weights(encoder, path)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_weights_without_batch_counters_load(tmp_path: Path) -> None:
    """State dicts without BatchNorm's ``num_batches_tracked`` counters (converted or older
    checkpoints) still load: the counters are not weights."""
    state = {k: v for k, v in _encoder_state().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_counters.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = SmpModel("unet", "resnet18", num_classes=2, encoder_weights=str(path))
    loaded = model.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_an_smp_cache_missing_one_of_its_files_is_not_cached(hub_offline: Path) -> None:
    """smp reads both config.json and model.safetensors: a cache holding only one of them is
    reported as not cached, and offline the model says the weights are unavailable."""
    from segpipe.models.smp import PretrainedWeightsUnavailableError

    repo = write_smp_cache(hub_offline, "mobilenet_v2", "imagenet",
                           _random_state(smp.encoders.get_encoder("mobilenet_v2"), seed=3))
    (weights,) = repo.rglob("model.safetensors")
    weights.unlink()
    assert not resolve_pretrained("mobilenet_v2", "imagenet").is_cached()
    with pytest.raises(PretrainedWeightsUnavailableError, match="HF_HUB_OFFLINE=1 forbids"):
        SmpModel("unet", "mobilenet_v2", num_classes=2, encoder_weights="imagenet")


def test_fewer_encoder_stages_keep_smps_last_decoder_widths() -> None:
    """At encoder_depth 3 the U-Net decoder uses the last three of smp's default widths
    (64, 32, 16), so the segmentation head sees 16 channels as at depth 5."""
    model = SmpModel("unet", "resnet18", num_classes=2, encoder_depth=3)
    assert model.model.segmentation_head[0].in_channels == 16
    assert [b.conv1[0].out_channels for b in model.model.decoder.blocks] == [64, 32, 16]


def test_smp_kwargs_reach_the_architecture_and_clash_with_keywords() -> None:
    """Arguments given as ``smp_kwargs`` (the config/CLI form) build the network like keyword
    arguments; the same argument given both ways is refused."""
    model = SmpModel("unet", "resnet18", num_classes=2, encoder_depth=3,
                     smp_kwargs={"decoder_channels": (24, 12, 6)})
    assert model.model.segmentation_head[0].in_channels == 6
    with pytest.raises(ValueError, match=r"\['decoder_channels'\] given both in smp_kwargs"):
        SmpModel("unet", "resnet18", num_classes=2, encoder_depth=3,
                 smp_kwargs={"decoder_channels": (24, 12, 6)}, decoder_channels=(8, 8, 8))


def test_the_deprecated_decoder_use_batchnorm_alias_is_accepted() -> None:
    """smp still takes ``decoder_use_batchnorm`` (its older name of decoder_use_norm): it is
    passed on, not refused as an unknown argument."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # smp's own deprecation warning
        model = SmpModel("unet", "resnet18", num_classes=2, decoder_use_batchnorm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.model.decoder.modules())
