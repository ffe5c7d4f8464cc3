"""ONNX export that carries its preprocessing, and an onnxruntime stand-in for the task.

``segpipe export`` writes ``model.onnx`` (dynamic batch, height and width; input = normalised
image padded to ``pad_multiple``, output = logits) and a sidecar ``model.json`` with everything
inference needs: class names and colours, input channels, band selection, normalisation, pad
multiple, tile and overlap defaults. ``segpipe predict --onnx model.onnx`` runs the same
prediction path (reading, tiling, TTA, writers) with :class:`OnnxTask` in place of the torch task.
onnx/onnxruntime are imported only here (``pip install segpipe[onnx]``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segpipe.fileio import atomic_path, atomic_write_json
from segpipe.models.base import pad_to_multiple
from segpipe.models.input_norm import input_norm_module
from segpipe.predict.checkpoint import CheckpointError, PredictConfig, load_predictor

__all__ = ["OnnxTask", "export_onnx", "load_onnx_predictor", "sidecar_path"]

SIDECAR_FORMAT = "segpipe-onnx/1"


def sidecar_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.json``."""
    return Path(onnx_path).with_suffix(".json")


def export_onnx(
    ckpt_path: str | Path,
    output: str | Path,
    opset: int = 17,
    tile: int | None = 512,
    overlap: float = 0.25,
    check: bool = True,
) -> tuple[Path, Path]:
    """Export a checkpoint's network to ONNX with a preprocessing sidecar.

    Args:
        ckpt_path: Checkpoint written by ``segpipe fit``.
        output: The ``.onnx`` file to write (the sidecar goes beside it as ``.json``).
        opset: ONNX opset.
        tile: Default tile size recorded for large inputs.
        overlap: Default tile overlap fraction.
        check: Run the exported graph once with onnxruntime and compare with torch.

    Returns:
        ``(onnx path, sidecar path)``.
    """
    task, config = load_predictor(ckpt_path)
    net = task.net.float().eval().to(memory_format=torch.contiguous_format)
    m = config.pad_multiple
    example = torch.randn(1, config.in_channels, 2 * m, 3 * m)
    out = Path(output)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"{out}: the output of segpipe export must end in .onnx")
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            net,
            (example,),
            str(tmp),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                          "logits": {0: "batch", 2: "height", 3: "width"}},
            opset_version=opset,
            dynamo=False,
        )
        if check:
            _check_export(tmp, net, config)
    meta = {
        "format": SIDECAR_FORMAT,
        "onnx": out.name,
        **asdict(config),
        "input": "image: float32 (N, in_channels, H, W), normalised ((x/max - mean) / std), "
        "then, when input_norm is per_image, each image's channels standardised (zero mean, "
        "unit variance over its pixels, before padding), H and W multiples of pad_multiple",
        "output": "logits: float32 (N, num_classes, H, W)",
        "tile": tile,
        "overlap": overlap,
    }
    meta["eval_resize"] = list(config.eval_resize) if config.eval_resize else None
    side = atomic_write_json(sidecar_path(out), meta)
    return out, side


def _session(path: str | Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit("ONNX needs the onnx extra: pip install 'segpipe[onnx]'") from exc
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _check_export(path: Path, net: nn.Module, config: PredictConfig) -> None:
    m = config.pad_multiple
    x = torch.randn(2, config.in_channels, 3 * m, 2 * m)
    with torch.no_grad():
        ref = net(x).numpy()
    got = _session(path).run(None, {"image": x.numpy()})[0]
    if got.shape != ref.shape or not np.allclose(got, ref, atol=1e-3, rtol=1e-3):
        raise RuntimeError(
            f"{path}: the exported graph disagrees with torch (max abs difference "
            f"{float(np.abs(got - ref).max()) if got.shape == ref.shape else 'shape ' + str(got.shape)})"
        )


class OnnxTask(nn.Module):
    """Drop-in for :class:`~segpipe.tasks.SegmentationTask` in prediction, backed by onnxruntime.

    Calling it standardises each image when the model does (``input_norm: per_image``, kept out
    of the graph so that the statistics exclude the padding), pads ``(N, C, H, W)`` to the pad
    multiple, runs the graph and crops the logits back, exactly as the task's ``forward`` does.
    """

    channels_last = False

    def __init__(self, onnx_path: str | Path, config: PredictConfig) -> None:
        super().__init__()
        self.session = _session(onnx_path)
        self.net = nn.Identity()  # the network lives in the ONNX graph
        self.num_classes = config.num_classes
        self.pad_multiple = config.pad_multiple
        self.class_names = list(config.class_names)
        self.ignore_index = config.ignore_index
        self.input_norm = input_norm_module(config.input_norm)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) normalised images -> (N, K, H, W) float32 logits."""
        padded, (h, w) = pad_to_multiple(self.input_norm(x.float()), self.pad_multiple)
        logits = self.session.run(None, {"image": padded.contiguous().cpu().numpy()})[0]
        return torch.from_numpy(logits)[..., :h, :w].to(x.device)


def load_onnx_predictor(onnx_path: str | Path) -> tuple[OnnxTask, PredictConfig, dict[str, Any]]:
    """Open an exported model and its sidecar.

    Returns:
        ``(task stand-in, prediction config, sidecar dict)`` (the sidecar holds tile/overlap).
    """
    path = Path(onnx_path)
    side = sidecar_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file; create it with segpipe export")
    if not side.is_file():
        raise CheckpointError(
            f"{side}: the sidecar with classes and normalisation is missing next to {path.name}; "
            "re-export with segpipe export (it writes both files)"
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{side}: unreadable sidecar ({exc}); re-export the model") from exc
    if meta.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{side}: not a segpipe ONNX sidecar (format {meta.get('format')!r})")
    fields = PredictConfig.__dataclass_fields__
    config = PredictConfig(**{k: v for k, v in meta.items() if k in fields})
    if config.eval_resize is not None:
        config = PredictConfig(**{**asdict(config), "eval_resize": tuple(config.eval_resize)})
    return OnnxTask(path, config), config, meta
