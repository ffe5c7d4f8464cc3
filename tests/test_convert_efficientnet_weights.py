"""scripts/convert_efficientnet_weights.py: EfficientNet-PyTorch's names to timm's, checked."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from tests.scripts import load_script

timm = pytest.importorskip("timm")
convert = load_script("convert_efficientnet_weights")


def _efficientnet_pytorch_names(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as lukemelas' EfficientNet-PyTorch names it, written out by hand.

    Blocks are numbered through all stages; a block with an expansion convolution names its
    layers _expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2, one without
    _depthwise_conv/_bn1/_project_conv/_bn2. Distinct random values make any mix-up visible.
    """
    blocks: list[str] = []
    for key in timm_state:
        match = re.match(r"blocks\.\d+\.\d+\.", key)
        if match and match.group(0) not in blocks:
            blocks.append(match.group(0))
    expanded = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                "conv_pwl": "_project_conv", "bn3": "_bn2"}
    separable = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
           "classifier": "_fc"}
    out = {}
    for key, tensor in timm_state.items():
        prefix = next((p for p in blocks if key.startswith(p)), None)
        if prefix is None:
            layer, _, param = key.partition(".")
            name = f"{top[layer]}.{param}"
        else:
            layer, _, param = key[len(prefix):].partition(".")
            if layer == "se":  # squeeze-and-excitation (EfficientNet-B*, not Lite)
                conv, _, param = param.partition(".")
                name = f"_blocks.{blocks.index(prefix)}._se_{conv.removeprefix('conv_')}.{param}"
            else:
                table = expanded if f"{prefix}conv_pwl.weight" in timm_state else separable
                name = f"_blocks.{blocks.index(prefix)}.{table[layer]}.{param}"
        out[name] = torch.randn(tensor.shape) if tensor.is_floating_point() else tensor.clone()
    return out


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    return timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()


@pytest.mark.parametrize("model", ["tf_efficientnet_lite0", "tf_efficientnet_lite2", "tf_efficientnet_b0"])
def test_every_tensor_lands_on_its_timm_key(model) -> None:
    state = timm.create_model(model, pretrained=False).state_dict()
    source = _efficientnet_pytorch_names(state)
    if model.endswith("b0"):
        assert any("._se_reduce." in k for k in source)
    renamed = convert.rename(source, state)
    assert set(renamed) == set(state)
    expected = dict(zip(state, source.values()))  # the hand-written names keep timm's order
    for key, tensor in renamed.items():
        assert torch.equal(tensor, expected[key]), key


def test_the_script_writes_an_encoder_file_that_smp_loads_without_complaint(tmp_path, lite0_state) -> None:
    from segpipe.models import SmpModel

    src, out = tmp_path / "lite0.pth", tmp_path / "weights" / "lite0_timm.pth"
    source = _efficientnet_pytorch_names(lite0_state)
    torch.save(source, src)
    assert convert.main(["--src", str(src), "--out", str(out)]) == 0
    written = torch.load(out, weights_only=True)
    assert not any(k.startswith(("conv_head.", "bn2.", "classifier.")) for k in written)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = SmpModel(arch="unet", encoder_name="tu-tf_efficientnet_lite0", encoder_weights=str(out),
                         in_channels=3, num_classes=4)
    stem = model.model.encoder.state_dict()["model.conv_stem.weight"]
    assert torch.equal(stem, source["_conv_stem.weight"])


def test_weights_of_another_model_size_are_refused_with_the_key_and_both_shapes(tmp_path) -> None:
    lite1 = timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict()
    src = tmp_path / "lite1.pth"
    torch.save(_efficientnet_pytorch_names(lite1), src)
    # Lite1's third stage has 5x5 kernels where Lite0's has 3x3
    with pytest.raises(SystemExit, match=r"lite1\.pth: _blocks\.\d+\._depthwise_conv\.weight -> "
                       r"blocks\.\d+\.\d+\.conv_dw\.weight: shape \(144, 1, 3, 3\) where the "
                       r"timm model has \(144, 1, 5, 5\)"):
        convert.main(["--src", str(src), "--out", str(tmp_path / "out.pth")])
    assert not (tmp_path / "out.pth").exists()


def test_a_foreign_key_is_named(lite0_state) -> None:
    source = _efficientnet_pytorch_names(lite0_state)
    source["_blocks.0._gate.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"_blocks\.0\._gate\.weight.*'_gate'"):
        convert.rename(source, lite0_state)
    del source["_blocks.0._gate.weight"]
    del source["_conv_stem.weight"]
    with pytest.raises(ValueError, match=r"1 key\(s\) of the timm model got no tensor.*conv_stem\.weight"):
        convert.rename(source, lite0_state)
