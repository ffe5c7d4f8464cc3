"""Tests for segpipe.models.SmpModel and load_encoder_weights (no downloads, tiny inputs).

Named pretrained weights are tested against caches written by code in the layouts smp and timm
read (Hugging Face hub cache, torch hub folder), with huggingface_hub in offline mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from segpipe.models import SmpModel, load_encoder_weights
from segpipe.models.smp import (
    PretrainedSource,
    PretrainedWeightsUnavailableError,
    no_pretrained_weights,
    resolve_pretrained,
)

ENCODER = "resnet18"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def hub_cache(hub_offline: Path) -> Path:
    """Every test here runs with an empty, offline hub cache (tests/conftest.py)."""
    return hub_offline


def write_smp_cache(cache: Path, encoder: str, weights: str, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` where smp's get_encoder reads ``encoder``'s ``weights``: the pinned
    revision's snapshot of the repo smp names (config.json and model.safetensors)."""
    import segmentation_models_pytorch as smp

    settings = smp.encoders.encoders[encoder]["pretrained_settings"][weights]
    repo = cache / ("models--" + settings["repo_id"].replace("/", "--"))
    snapshot = repo / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    config = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    (snapshot / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return repo


def write_timm_cache(cache: Path, hf_repo: str, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` where timm reads a pretrained tag from the hub: ``refs/main`` pointing at
    a snapshot holding model.safetensors."""
    repo = cache / ("models--" + hf_repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    file = repo / "snapshots" / commit / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    return repo


@pytest.fixture(scope="module")
def source_model() -> SmpModel:
    torch.manual_seed(1)
    model = SmpModel("unet", ENCODER, in_channels=3, num_classes=2)
    # make the BN statistics non-trivial so the round trip checks buffers too
    with torch.no_grad():
        for module in model.encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model


def _assert_encoders_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    ("arch", "encoder", "in_channels", "num_classes"),
    [
        ("unet", "resnet18", 3, 2),
        ("fpn", "mobilenet_v2", 1, 5),
        ("deeplabv3plus", "mobilenet_v2", 4, 1),
        ("linknet", "resnet18", 3, 3),
        ("pspnet", "mobilenet_v2", 3, 2),
    ],
)
def test_forward_shapes(arch: str, encoder: str, in_channels: int, num_classes: int) -> None:
    model = SmpModel(arch, encoder, in_channels=in_channels, num_classes=num_classes).eval()
    assert (model.in_channels, model.num_classes, model.pad_multiple) == (in_channels, num_classes, 32)
    with torch.no_grad():
        out = model(torch.randn(1, in_channels, 64, 64))
    assert out.shape == (1, num_classes, 64, 64)
    assert torch.isfinite(out).all()


def test_encoder_depth_sets_pad_multiple() -> None:
    model = SmpModel("unet", "mobilenet_v2", num_classes=2, encoder_depth=3, decoder_channels=(16, 8, 4))
    model.eval()
    assert model.pad_multiple == 8
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 48)).shape == (1, 2, 40, 48)


@pytest.mark.parametrize(("arch", "depth"), [("pspnet", 5), ("pspnet", 4), ("fpn", 4), ("fpn", 3)])
def test_upsampling_follows_encoder_depth(arch: str, depth: int) -> None:
    """smp's default upsampling of pspnet/fpn only fits its own default depth; ours always does."""
    model = SmpModel(arch, "mobilenet_v2", num_classes=2, encoder_depth=depth).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_wrong_explicit_upsampling_is_reported() -> None:
    model = SmpModel("fpn", "mobilenet_v2", num_classes=2, upsampling=2).eval()
    pattern = r"returned \(32, 32\) logits for a \(64, 64\) input; set its upsampling="
    with pytest.raises(RuntimeError, match=pattern):
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"arch": "unetx"}, ValueError, r"arch must be one of .*'unet'.*got 'unetx'.*Did you mean 'unet'"),
        ({"encoder_name": "resnet19"}, ValueError, r"encoder_name must be one of .*got 'resnet19'"),
        ({"encoder_name": "tu-not_a_model"}, ValueError, r"'tu-not_a_model' names no timm model"),
        ({"encoder_depth": 6}, ValueError, r"encoder_depth must be an int in \[1, 5\], got 6"),
        ({"num_classes": 0}, ValueError, r"num_classes must be an int >= 1, got 0"),
        ({"in_channels": "3"}, ValueError, r"in_channels must be an int >= 1, got '3'"),
        ({"freeze_encoder": 1}, ValueError, r"freeze_encoder must be a bool, got 1"),
        ({"classes": 3}, ValueError, r"pass num_classes, not classes"),
        ({"activation": "sigmoid"}, ValueError, r"activation must be None, got 'sigmoid': SmpModel returns raw logits"),
        ({"encoder_weights": "imagenet21k"}, ValueError, r"='imagenet21k'.*no such .*\['imagenet'\]"),
        ({"encoder_weights": True}, ValueError, r"encoder_weights must be None, the name .* got True"),
        ({"encoder_weights": "no/such/file.pth"}, FileNotFoundError, r"no/such/file\.pth"),
        ({"encoder_weights": "missing.safetensors"}, ValueError, r"missing\.safetensors.*or null"),
        ({"encoder_weights": "file:///x/enc.pth"}, ValueError,
         r"is a file:// URL; give the file's path itself: encoder_weights: /x/enc\.pth"),
        ({"encoder_weights": "https://x/enc.pth"}, ValueError, r"is a URL; give the weights file's"),
        ({"encoder_weights": ""}, ValueError, r"encoder_weights is empty; give null"),  # not '.'
        ({"encoder_name": "timm-regnetx_99"}, ValueError, r"encoder_name must be one of"),
        ({"arch": "unetplusplus", "encoder_depth": 1}, ValueError,
         r"arch='unetplusplus' needs encoder_depth >= 2"),  # it failed at the first batch
        ({"arch": "dpt", "encoder_name": "tu-resnet18"}, ValueError,
         r"arch='dpt' needs a vision-transformer encoder .*'tu-resnet18' is not one"),
        ({"bogus_option": 1}, ValueError, r"takes no argument\(s\) \['bogus_option'\].*decoder_channels"),
        ({"encoder_depth": 3, "decoder_channels": [256, 128, 64, 32, 16]}, ValueError,
         r"could not build arch='unet'.*encoder_depth=3.*decoder_channels"),
    ],
)
def test_bad_arguments_rejected(kwargs: dict, exc: type[Exception], pattern: str) -> None:
    kwargs = {"encoder_name": "mobilenet_v2", **kwargs}
    with pytest.raises(exc, match=pattern):
        SmpModel(**kwargs)


def test_smps_older_timm_names_are_built() -> None:
    """smp still builds its older 'timm-' names of timm models as 'tu-' encoders: they were
    refused, with unrelated encoders suggested."""
    model = SmpModel("unet", "timm-regnetx_002", num_classes=2, encoder_depth=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_weights_round_trip_pth_nested_and_prefixed(source_model: SmpModel, tmp_path: Path) -> None:
    state = {f"module.encoder.{k}": v for k, v in source_model.encoder.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(1000, 512)  # ImageNet classifier: dropped
    state["module.fc.bias"] = torch.zeros(1000)
    path = tmp_path / "encoder.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)

    model = SmpModel("unet", ENCODER, num_classes=2, encoder_weights=str(path))
    _assert_encoders_equal(model.encoder, source_model.encoder)


def test_weights_round_trip_safetensors(source_model: SmpModel, tmp_path: Path) -> None:
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source_model.encoder.state_dict().items()}, str(path))

    model = SmpModel("fpn", ENCODER, num_classes=3, encoder_weights=path)
    _assert_encoders_equal(model.encoder, source_model.encoder)


def test_weights_from_whole_model_checkpoint(source_model: SmpModel, tmp_path: Path) -> None:
    """A Lightning-style checkpoint of the whole model: decoder/head keys are ignored."""
    path = tmp_path / "last.pt"
    torch.save({"model": {f"model.{k}": v for k, v in source_model.model.state_dict().items()}}, path)
    encoder = SmpModel("unet", ENCODER, num_classes=2).encoder
    load_encoder_weights(encoder, path)
    _assert_encoders_equal(encoder, source_model.encoder)


def test_shape_mismatch_names_key_and_shapes(source_model: SmpModel, tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    state = source_model.encoder.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 32, 3, 3)  # another network's layer
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        SmpModel("unet", ENCODER, in_channels=3, num_classes=2, encoder_weights=str(path))
    message = str(info.value)
    assert str(path) in message
    assert "layer1.0.conv1.weight: file (64, 32, 3, 3) vs model (64, 64, 3, 3)" in message
    assert "same in_channels" in message


def test_missing_key_named(source_model: SmpModel, tmp_path: Path) -> None:
    state = source_model.encoder.state_dict()
    del state["layer2.0.bn1.weight"]
    path = tmp_path / "partial.bin"
    torch.save(state, path)
    encoder = SmpModel("unet", ENCODER, num_classes=2).encoder
    with pytest.raises(ValueError, match=r"layer2\.0\.bn1\.weight: model \(128,\), absent from the file"):
        load_encoder_weights(encoder, path)


def test_unrelated_keys_warn(source_model: SmpModel, tmp_path: Path) -> None:
    state = dict(source_model.encoder.state_dict())
    state["extra_block.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    encoder = SmpModel("unet", ENCODER, num_classes=2).encoder
    with pytest.warns(UserWarning, match="extra_block.weight"):
        load_encoder_weights(encoder, path)
    _assert_encoders_equal(encoder, source_model.encoder)


def test_weights_of_a_larger_encoder_of_the_family_are_refused(tmp_path: Path) -> None:
    # resnet34 weights into resnet18: every resnet18 key found, 96 of 218 left over; the
    # encoder built with a mix of the two and a warning.
    import segmentation_models_pytorch as smp

    path = tmp_path / "r34.pth"
    torch.save(smp.encoders.get_encoder("resnet34", weights=None).state_dict(), path)
    encoder = SmpModel("unet", "resnet18", num_classes=2).encoder
    with pytest.raises(ValueError, match=r"96 of the file's 216 encoder keys have no place .* "
                                         r"the weights of a larger encoder"):
        load_encoder_weights(encoder, path)


def test_load_encoder_weights_path_errors(tmp_path: Path) -> None:
    encoder = nn.Conv2d(1, 1, 1)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_encoder_weights(encoder, tmp_path / "nothere.pth")
    with pytest.raises(ValueError, match=r"local files only.*SmpModel\(encoder_weights='imagenet'\)"):
        load_encoder_weights(encoder, "imagenet")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"suffix '\.npz'.*\.safetensors"):
        load_encoder_weights(encoder, odd)


def test_unreadable_weights_files_are_one_line_with_the_fix(tmp_path: Path) -> None:
    import argparse

    encoder = nn.Conv2d(1, 1, 1)
    pickled = tmp_path / "pickled.pth"
    torch.save({"weight": torch.zeros(1, 1, 1, 1), "meta": argparse.Namespace(lr=1)}, pickled)
    truncated = tmp_path / "truncated.pth"
    torch.save({"weight": torch.zeros(64, 64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    image = tmp_path / "image.pth"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "enc.pth").write_bytes(b"")
    for path, words in ((pickled, "pickled Python objects.*state_dict"),
                        (truncated, "truncated or corrupt"),
                        (image, "is not a PyTorch checkpoint"),
                        (folder, r"is a folder; give the weights file in it, e.g. .*enc\.pth")):
        with pytest.raises(ValueError, match=words) as caught:
            load_encoder_weights(encoder, path)
        assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_a_folder_named_like_the_weights_does_not_shadow_the_name(
        hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import segmentation_models_pytorch as smp

    write_smp_cache(hub_cache, "mobilenet_v2", "imagenet",
                    _random_state(smp.encoders.get_encoder("mobilenet_v2"), seed=3))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "ssl").write_bytes(b"")
    model = SmpModel("unet", "mobilenet_v2", num_classes=2, encoder_weights="imagenet")
    assert model.encoder_pretrained
    with pytest.raises(ValueError, match=r"no such pretrained.*'ssl' is read as a weights name.*"
                                         r"\./ssl\.pth"):
        SmpModel("unet", "mobilenet_v2", num_classes=2, encoder_weights="ssl")


def _one_sgd_step(model: SmpModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The state dict before and after one SGD step on a random 2x3x64x64 batch (2 classes)."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.randint(0, 2, (2, 64, 64)))
    loss.backward()
    optimizer.step()
    return before, model.state_dict()


@pytest.mark.parametrize("encoder, stages, frozen_prefixes, trained_prefix", [
    # timm: stage k ends with the module feature_info names for stride 2**k
    ("tu-resnet18", 1, ("model.conv1.", "model.bn1."), "model.layer1."),
    ("tu-resnet18", 3, ("model.conv1.", "model.bn1.", "model.layer1.", "model.layer2."), "model.layer3."),
    ("tu-tf_efficientnet_lite0", 3,
     ("model.conv_stem.", "model.bn1.", "model.blocks.0.", "model.blocks.1.", "model.blocks.2."),
     "model.blocks.3."),
    # smp's own encoders mark their stride-16 and stride-32 stages only
    ("resnet18", 3, ("conv1.", "bn1.", "layer1.", "layer2."), "layer3."),
    ("resnet18", 4, ("conv1.", "bn1.", "layer1.", "layer2.", "layer3."), "layer4."),
])
def test_freeze_encoder_stages_freezes_the_first_stages_only(
    encoder: str, stages: int, frozen_prefixes: tuple[str, ...], trained_prefix: str
) -> None:
    model = SmpModel("unet", encoder, num_classes=2, freeze_encoder_stages=stages,
                     decoder_channels=(16, 8, 8, 4, 4))
    model.train()
    frozen = {n for n, p in model.encoder.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.encoder.named_parameters() if n.startswith(frozen_prefixes)}
    assert any(n.startswith(trained_prefix) for n, _ in model.encoder.named_parameters())
    # the frozen stages' BatchNorm layers keep their statistics; the later ones train
    norms = {n + ".": m for n, m in model.encoder.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert all(m.training != n.startswith(frozen_prefixes) for n, m in norms.items())
    assert model.training and model.encoder.training and model.model.decoder.training

    before, after = _one_sgd_step(model)
    for key in before:  # the frozen stages' weights and BatchNorm statistics are untouched
        if key.removeprefix("model.encoder.").startswith(frozen_prefixes):
            assert torch.equal(after[key], before[key]), key
        elif key.endswith("running_var"):  # the later stages' BatchNorm layers train
            assert not torch.equal(after[key], before[key]), key
    for name, param in model.named_parameters():  # the rest is in the backward pass
        assert (param.grad is None) == name.removeprefix("model.encoder.").startswith(frozen_prefixes), name

    model.eval()
    model.train()  # back in training mode, the frozen stages stay in eval mode
    assert all(m.training != n.startswith(frozen_prefixes) for n, m in norms.items())
    assert "freeze_encoder_stages=" + str(stages) in repr(model)


@pytest.mark.parametrize("kwargs, message", [
    ({"encoder_name": "resnet18", "freeze_encoder_stages": 2},
     r"freeze_encoder_stages=2: encoder 'resnet18' does not say where its stages 1-2 end \(smp's "
     r"own encoders mark only the stride-16 and stride-32 stages, so 3 or 4 here\); use a timm "
     r"encoder \('tu-...'\), or freeze the whole encoder"),
    ({"encoder_name": "resnet18", "freeze_encoder_stages": 5},
     r"to freeze the whole encoder give freeze_encoder: true alone; freeze_encoder_stages freezes "
     r"the first 1 \.\. 4 of its stages"),
    ({"encoder_name": "resnet18", "freeze_encoder_stages": 3, "encoder_depth": 3},
     r"freeze_encoder_stages=3 .* 1 \.\. 2 of its stages"),
    ({"encoder_name": "resnet18", "freeze_encoder_stages": 1, "freeze_encoder": True},
     r"give freeze_encoder: true alone"),
    ({"encoder_name": "tu-convnext_atto", "freeze_encoder_stages": 1},
     r"encoder 'tu-convnext_atto' has no stage ending at stride 2 \(its stages end at strides "
     r"\[4, 8, 16, 32\]\); use one of \[2, 3, 4\]"),
    ({"encoder_name": "resnet18", "freeze_encoder_stages": -1}, r"freeze_encoder_stages"),
    ({"encoder_name": "resnet18", "freeze_encoder_stages": True}, r"freeze_encoder_stages"),
])
def test_freeze_encoder_stages_refuses_what_it_cannot_freeze(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SmpModel("unet", num_classes=2, **kwargs)


def test_freeze_encoder_trains_only_decoder_and_head() -> None:
    model = SmpModel(
        "unet", "mobilenet_v2", num_classes=2, freeze_encoder=True, decoder_channels=(16, 8, 8, 4, 4)
    )
    model.train()
    assert model.training and model.model.decoder.training
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert all(not m.training for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(p.requires_grad for p in model.model.decoder.parameters())
    assert all(p.requires_grad for p in model.model.segmentation_head.parameters())

    before, after = _one_sgd_step(model)

    for key in before:
        if key.startswith("model.encoder."):
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)  # incl. BN stats
    for name, param in model.named_parameters():
        if not name.startswith("model.encoder."):
            assert not torch.equal(param.detach(), before[name]), f"{name} did not change"

    model.eval()
    model.train(True)
    assert not model.encoder.training and model.model.segmentation_head.training


# ------------------------------------------------------------------ named pretrained weights
def _random_state(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        random = torch.randn_like(value.float()).to(value.dtype)
        state[key] = random if value.is_floating_point() else value
    return state


def test_smp_named_weights_load_from_the_cache_offline(hub_cache: Path) -> None:
    import segmentation_models_pytorch as smp

    state = _random_state(smp.encoders.get_encoder("mobilenet_v2"), seed=3)
    write_smp_cache(hub_cache, "mobilenet_v2", "imagenet", state)
    assert resolve_pretrained("mobilenet_v2", "imagenet").is_cached()

    model = SmpModel("unet", "mobilenet_v2", num_classes=2, encoder_weights="imagenet")
    loaded = model.encoder.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    # 1-channel input: smp adapts the pretrained first conv (sum over RGB).
    gray = SmpModel("unet", "mobilenet_v2", in_channels=1, num_classes=2, encoder_weights="imagenet")
    torch.testing.assert_close(
        gray.encoder.state_dict()["features.0.0.weight"],
        state["features.0.0.weight"].sum(1, keepdim=True),
    )


def test_another_encoders_weights_in_the_cache_are_one_line_naming_the_folder(
        hub_cache: Path) -> None:
    """A mis-copied cache (resnet34's weights under resnet18's folder) gave torch's 2 800-
    character list of keys, naming neither the folder nor the fix."""
    import segmentation_models_pytorch as smp

    state = _random_state(smp.encoders.get_encoder("resnet34"), seed=3)
    repo = write_smp_cache(hub_cache, "resnet18", "imagenet", state)
    with pytest.raises(PretrainedWeightsUnavailableError) as exc:
        SmpModel("unet", "resnet18", num_classes=2, encoder_weights="imagenet")
    text = str(exc.value)
    assert "\n" not in text and len(text) < 1000, text
    assert f"in {repo} do not fit encoder 'resnet18'" in text
    assert "unexpected tensor(s)" in text and "delete that folder and fetch them again" in text


def test_a_truncated_cached_weights_file_is_one_line_naming_the_folder(hub_cache: Path) -> None:
    # A cache copied half-way to an offline machine: safetensors' traceback named no file.
    import segmentation_models_pytorch as smp

    state = _random_state(smp.encoders.get_encoder("mobilenet_v2"), seed=3)
    repo = write_smp_cache(hub_cache, "mobilenet_v2", "imagenet", state)
    (weights,) = repo.rglob("model.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PretrainedWeightsUnavailableError) as exc:
        SmpModel("unet", "mobilenet_v2", num_classes=2, encoder_weights="imagenet")
    text = str(exc.value)
    assert "cannot be read" in text and "delete that folder and fetch them again" in text
    assert str(resolve_pretrained("mobilenet_v2", "imagenet").cache_folder) in text


@pytest.mark.parametrize(
    ("name", "weights"),
    [("tu-test_resnet", "imagenet"), ("tu-test_resnet", "r160_in1k"), ("tu-test_resnet.r160_in1k", "imagenet")],
)
def test_timm_named_weights_load_from_the_cache_offline(hub_cache: Path, name: str, weights: str) -> None:
    import timm

    source = resolve_pretrained(name, weights)
    assert source.hf_repo == "timm/test_resnet.r160_in1k"
    assert source.build_name == "tu-test_resnet.r160_in1k"
    state = _random_state(timm.create_model("test_resnet"), seed=4)
    write_timm_cache(hub_cache, source.hf_repo, state)
    assert source.is_cached()

    model = SmpModel("unet", name, num_classes=2, encoder_weights=weights)
    loaded = model.encoder.model.state_dict()
    assert loaded and all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_not_cached_offline_names_weights_cache_and_fetch_command(hub_cache: Path) -> None:
    with pytest.raises(PretrainedWeightsUnavailableError) as info:
        SmpModel("unet", "resnet34", num_classes=2, encoder_weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert "'imagenet'" in message and "'resnet34'" in message and "smp-hub/resnet34.imagenet" in message
    assert str(hub_cache / "models--smp-hub--resnet34.imagenet") in message
    assert "HF_HUB_OFFLINE=1 forbids downloading" in message
    assert (
        'python -c "from segpipe.models import SmpModel; '
        "SmpModel(encoder_name='resnet34', encoder_weights='imagenet')\"" in message
    )
    assert "hf download smp-hub/resnet34.imagenet config.json model.safetensors --revision" in message
    # timm weights name their repo and cache folder too
    pattern = r"timm/test_resnet\.r160_in1k.*models--timm--test_resnet"
    with pytest.raises(PretrainedWeightsUnavailableError, match=pattern):
        SmpModel("unet", "tu-test_resnet", num_classes=2, encoder_weights="imagenet")


def test_failed_download_is_reported_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online but unreachable: the library's error becomes the same one-line error."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    import segpipe.models.smp as smp_module

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args: object, **kwargs: object) -> None:
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(smp_module.smp, "create_model", unreachable)
    pattern = r"downloading them failed \(LocalEntryNotFoundError"
    with pytest.raises(PretrainedWeightsUnavailableError, match=pattern):
        SmpModel("unet", "resnet18", num_classes=2, encoder_weights="imagenet")


def test_resolve_pretrained_follows_smp_and_timm() -> None:
    import segmentation_models_pytorch as smp

    source = resolve_pretrained("resnet34", "imagenet")
    settings = smp.encoders.encoders["resnet34"]["pretrained_settings"]["imagenet"]
    assert (source.hf_repo, source.hf_revision) == (settings["repo_id"], settings["revision"])
    assert source.hf_files == ("config.json", "model.safetensors") and not source.hf_any_file
    assert resolve_pretrained("resnet18", "ssl").hf_repo == "smp-hub/resnet18.ssl"
    timm_source = resolve_pretrained("tu-resnet18", "tv_in1k")
    assert (timm_source.hf_repo, timm_source.build_weights) == ("timm/resnet18.tv_in1k", True)
    with pytest.raises(ValueError, match=r"no pretrained weights 'resnet18\.nope'.*'a1_in1k'"):
        resolve_pretrained("tu-resnet18", "nope")
    with pytest.raises(ValueError, match=r"contradicts the pretrained tag 'a1_in1k'"):
        resolve_pretrained("tu-resnet18.a1_in1k", "tv_in1k")


def test_torch_hub_url_source_uses_torch_home(tmp_path: Path) -> None:
    source = PretrainedSource("tu-x", "imagenet", "tu-x", True, url="https://example.org/w/x-123.pth")
    assert source.cache_folder == str(tmp_path / "torch" / "hub" / "checkpoints")
    assert not source.is_cached()
    Path(source.cache_folder).mkdir(parents=True)
    (Path(source.cache_folder) / "x-123.pth").write_bytes(b"0")
    assert source.is_cached()
    assert "TORCH_HOME" in source.unavailable_message("offline")


def test_no_pretrained_weights_reads_nothing(hub_cache: Path) -> None:
    """Rebuilding a trained model for its checkpoint's weights needs neither cache nor file."""
    with no_pretrained_weights():
        SmpModel("unet", "resnet18", num_classes=2, encoder_weights="imagenet")
        SmpModel("unet", "resnet18", num_classes=2, encoder_weights="gone/encoder.pth")
    with pytest.raises(PretrainedWeightsUnavailableError):
        SmpModel("unet", "resnet18", num_classes=2, encoder_weights="imagenet")


def test_encoder_modules_is_the_smp_encoder() -> None:
    model = SmpModel("unet", "mobilenet_v2", num_classes=2)
    assert model.encoder_modules() == [model.model.encoder]


@pytest.mark.parametrize("arch, encoder, depth, step, least", [
    ("pan", "resnet18", 5, 32, 128),  # its attention pools the deepest map three more times
    # at depths 3 and 4 (they needed 64 and 128; 32 and 64 were taken, and fit crashed)
    ("pan", "resnet18", 4, 16, 128),
    ("pan", "resnet18", 3, 8, 64),
    ("dpt", "tu-vit_tiny_patch16_224", None, 32, 0),  # a ViT at any multiple of twice its patch
])
def test_architectures_with_size_needs_take_any_size_through_the_task(
    arch: str, encoder: str, depth: int | None, step: int, least: int
) -> None:
    from segpipe.tasks import SegmentationTask

    net = SmpModel(arch, encoder, in_channels=3, num_classes=2, encoder_depth=depth)
    assert (net.pad_multiple, net.min_size) == (step, least)
    task = SegmentationTask(net).eval()
    with torch.no_grad():
        for size in ((40, 56), (96, 64), (150, 70)):
            assert task(torch.randn(1, 3, *size)).shape[-2:] == size
    if least:
        with pytest.raises(ValueError, match=f"needs H and W of at least {least}"):
            net(torch.randn(1, 3, least - step, least - step))
        with torch.no_grad():
            assert net.eval()(torch.randn(1, 3, least, least)).shape[-2:] == (least, least)


def test_a_segpipe_checkpoint_gives_encoder_weights(source_model: SmpModel, tmp_path: Path) -> None:
    """A segpipe checkpoint (the task's ``net.model.encoder.*`` keys) as encoder_weights."""
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in source_model.state_dict().items()},
                "epoch": 3}, ckpt)
    model = SmpModel("unet", ENCODER, in_channels=3, num_classes=5, encoder_weights=str(ckpt))
    for name, value in source_model.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], value), name


@pytest.mark.parametrize("arch", ["unet", "unetplusplus", "manet"])
def test_fewer_encoder_stages_get_as_many_decoder_blocks(arch: str) -> None:
    """smp's default decoder_channels lists five blocks; depth 3 takes its last three."""
    model = SmpModel(arch, ENCODER, in_channels=3, num_classes=2, encoder_depth=3).eval()
    assert model.pad_multiple == 8
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 48)).shape == (1, 2, 40, 48)


def test_local_weights_of_another_channel_count_adapt_the_first_conv(
    source_model: SmpModel, tmp_path: Path
) -> None:
    """As named pretrained weights and init_from do: sum for one channel, repeat and scale."""
    path = tmp_path / "rgb_encoder.pth"
    torch.save(source_model.encoder.state_dict(), path)
    gray = SmpModel("unet", ENCODER, in_channels=1, num_classes=2, encoder_weights=str(path))
    conv = next(n for n, t in source_model.encoder.state_dict().items() if t.dim() == 4)
    rgb_w = source_model.encoder.state_dict()[conv]
    torch.testing.assert_close(gray.encoder.state_dict()[conv], rgb_w.sum(1, keepdim=True))
    four = SmpModel("unet", ENCODER, in_channels=4, num_classes=2, encoder_weights=str(path))
    assert four.encoder.state_dict()[conv].shape[1] == 4
