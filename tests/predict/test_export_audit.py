"""``segpipe export`` on the command line: its options reach the exported pair, its errors are
one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segpipe.cli import main as cli_main
from segpipe.predict.checkpoint import save_predict_checkpoint
from tests.predict.conftest import make_ckpt

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")



@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny U-Net (size step 4), 3 bands -> 3 classes."""
    return make_ckpt(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", "segpipe.models.UNet",
                     {"in_channels": 3, "num_classes": 3, "base_channels": 4, "depth": 2})


def _divergent_ckpt(path: Path) -> Path:
    """A network whose exported graph disagrees with its eager forward."""
    return save_predict_checkpoint(
        path, net={"class_path": "tests.predict.test_onnx_audit.ExportDivergentNet",
                   "init_args": {"in_channels": 3, "num_classes": 3}},
        data={"num_classes": 3, "in_channels": 3})


def test_export_defaults_to_opset_17_and_records_tile_and_overlap(
        tmp_path: Path, tiny_ckpt: Path, capsys) -> None:
    """Without --opset the graph is written at opset 17 (what most runtimes read); --tile and
    --overlap are recorded in the sidecar as the ONNX model's tiling defaults."""
    out = tmp_path / "m.onnx"
    assert cli_main(["export", "--ckpt_path", str(tiny_ckpt), "--output", str(out),
                     "--tile", "32", "--overlap", "0.5"]) == 0
    opsets = {o.domain: o.version for o in onnx.load(str(out)).opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 17
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["tile"], meta["overlap"]) == (32, 0.5)
    assert f"Wrote {out}" in capsys.readouterr().out


def test_export_checks_the_graph_unless_told_not_to(tmp_path: Path, capsys) -> None:
    """By default a graph that disagrees with torch is refused (exit 2, one line, nothing
    written); --no_check skips that check and writes the pair."""
    ckpt = _divergent_ckpt(tmp_path / "div.ckpt")
    out = tmp_path / "m.onnx"
    assert cli_main(["export", "--ckpt_path", str(ckpt), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segpipe export: error:") and "disagrees with torch" in err, err
    assert not out.exists()
    assert cli_main(["export", "--ckpt_path", str(ckpt), "--output", str(out), "--no_check"]) == 0
    assert out.exists() and out.with_suffix(".json").exists()
