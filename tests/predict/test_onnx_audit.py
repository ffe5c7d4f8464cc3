"""ONNX export options, the sidecar's checks and the graph check: edge cases of
``segpipe export`` / ``Segmenter.from_onnx`` that the broader ONNX tests do not reach."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from segpipe.predict.checkpoint import CheckpointError, save_predict_checkpoint
from tests.predict.conftest import make_ckpt, noise_image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from segpipe.predict import Segmenter  # noqa: E402
from segpipe.predict.onnx import _max_opset, export_onnx, load_onnx_predictor  # noqa: E402


class ExportDivergentNet(nn.Module):
    """A 1×1 convolution whose traced graph differs from its eager forward (as a network with
    a branch the exporter cannot follow would): the exported graph disagrees with torch."""

    def __init__(self, in_channels: int = 3, num_classes: int = 3) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.pad_multiple = 4
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return y * 0.0 if torch.onnx.is_in_onnx_export() else y


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny U-Net (size step 4), 3 bands -> 3 classes."""
    torch.manual_seed(0)
    return make_ckpt(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", "segpipe.models.UNet",
                     {"in_channels": 3, "num_classes": 3, "base_channels": 4, "depth": 2})


@pytest.fixture(scope="module")
def exported(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """An exported pair and its sidecar's contents (without the graph checksum, as after a
    hand edit, so that edited sidecars are judged on their fields)."""
    model, side = export_onnx(tiny_ckpt, tmp_path_factory.mktemp("onnx") / "m.onnx")
    meta = json.loads(side.read_text())
    meta.pop("onnx_sha256")
    return model, meta


def _with_sidecar(tmp_path: Path, exported: tuple[Path, dict], **changes: object) -> Path:
    """A copy of the exported graph beside its sidecar updated with ``changes``."""
    model, meta = exported
    copy = tmp_path / "model.onnx"
    copy.write_bytes(model.read_bytes())
    copy.with_suffix(".json").write_text(json.dumps({**meta, **changes}))
    return copy


# ------------------------------------------------------------------ export options
def test_export_output_must_be_an_onnx_file(tmp_path: Path, tiny_ckpt: Path) -> None:
    """An output not named ``.onnx`` is refused (its sidecar would be named after it and
    ``--onnx`` would not take it), and nothing is written."""
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(tiny_ckpt, tmp_path / "model.txt")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_an_overlap_of_one(tmp_path: Path, tiny_ckpt: Path) -> None:
    """Overlap is a fraction in [0, 1): 1.0 (tiles that never advance) is refused up front."""
    with pytest.raises(ValueError, match=r"--overlap must be a fraction in \[0, 1\)"):
        export_onnx(tiny_ckpt, tmp_path / "m.onnx", overlap=1.0)
    assert not (tmp_path / "m.onnx").exists()


def test_export_accepts_the_exporters_newest_opset(tmp_path: Path, tiny_ckpt: Path) -> None:
    """The whole advertised opset range exports, its upper end included."""
    model, side = export_onnx(tiny_ckpt, tmp_path / "m.onnx", opset=_max_opset(), check=False)
    assert model.stat().st_size > 0 and side.is_file()


def test_export_accepts_a_tile_of_exactly_the_size_step(tmp_path: Path, tiny_ckpt: Path) -> None:
    """The smallest tile the network takes (its size step) is a valid recorded default."""
    _, side = export_onnx(tiny_ckpt, tmp_path / "m.onnx", tile=4, check=False)
    assert json.loads(side.read_text())["tile"] == 4


def test_export_does_not_replace_a_lone_existing_sidecar(tmp_path: Path, tiny_ckpt: Path) -> None:
    """A ``model.json`` already beside the output (say another export's, its graph removed)
    is not overwritten without ``overwrite``."""
    side = tmp_path / "m.json"
    side.write_text('{"keep": true}')
    with pytest.raises(ValueError, match="already exist"):
        export_onnx(tiny_ckpt, tmp_path / "m.onnx")
    assert json.loads(side.read_text()) == {"keep": True}


def test_recorded_overlap_of_zero_is_kept(tmp_path: Path, tiny_ckpt: Path) -> None:
    """``export --overlap 0`` (tiles that only meet) is the ONNX model's default overlap, not
    replaced by predict's 0.25."""
    model, _ = export_onnx(tiny_ckpt, tmp_path / "m.onnx", tile=32, overlap=0.0, check=False)
    seg = Segmenter.from_onnx(model)
    assert (seg.tile, seg.overlap) == (32, 0.0)


def test_export_refuses_a_graph_that_disagrees_with_torch(tmp_path: Path) -> None:
    """The check run after export catches a graph whose outputs differ from the network's,
    and nothing is left at the output."""
    ckpt = save_predict_checkpoint(
        tmp_path / "div.ckpt", net={"class_path": "tests.predict.test_onnx_audit.ExportDivergentNet",
                                    "init_args": {"in_channels": 3, "num_classes": 3}},
        data={"num_classes": 3, "in_channels": 3})
    with pytest.raises(RuntimeError, match="the exported graph disagrees with torch"):
        export_onnx(ckpt, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.json").exists()


# ------------------------------------------------------------------ sidecar checks
@pytest.mark.parametrize("changes,message", [
    ({"tile": 2}, "tile 2 is not a usable default"),          # below the size step 4
    ({"overlap": 1.0}, "overlap 1.0 is not a usable default"),
    ({"min_size": -1}, "min_size must be a whole number >= 0"),
    ({"std": None}, "lacks ['std']"),
])
def test_a_hand_edited_sidecar_with_an_unusable_field_is_refused(
        tmp_path: Path, exported: tuple[Path, dict], changes: dict, message: str) -> None:
    """Fields that would make every prediction fail or silently differ are refused when the
    model is opened, with the fix (re-export)."""
    model = _with_sidecar(tmp_path, exported, **changes)
    with pytest.raises(CheckpointError, match="export the model again") as info:
        load_onnx_predictor(model)
    assert message in str(info.value)


def test_a_sidecar_naming_other_input_channels_is_one_clear_error(
        tmp_path: Path, exported: tuple[Path, dict]) -> None:
    """A sidecar from a 4-band export beside a 3-band graph names the mismatch."""
    model = _with_sidecar(tmp_path, exported, in_channels=4, mean=[0.5] * 4, std=[0.25] * 4)
    with pytest.raises(CheckpointError, match="has 3 input channels but its sidecar model.json "
                                              "says in_channels=4"):
        load_onnx_predictor(model)


def test_an_older_sidecar_without_the_newer_fields_gets_their_defaults(
        tmp_path: Path, exported: tuple[Path, dict]) -> None:
    """Sidecars written before ``pad_multiple`` and ``input_norm`` were recorded pad to 32
    and do not standardise each image, as those exports did."""
    model, meta = exported
    old = {k: v for k, v in meta.items() if k not in ("pad_multiple", "input_norm")}
    copy = tmp_path / "model.onnx"
    copy.write_bytes(model.read_bytes())
    copy.with_suffix(".json").write_text(json.dumps(old))
    task, config, _ = load_onnx_predictor(copy)
    assert config.pad_multiple == 32 and config.input_norm == "none"
    x = torch.from_numpy(noise_image(20, 28).transpose(2, 0, 1).astype(np.float32) / 255.0)[None]
    assert task(x).shape == (1, 3, 20, 28)
    # not standardised per image: a brighter copy of the image gets other logits
    assert not torch.allclose(task(x * 2 + 1), task(x), atol=1e-3)
