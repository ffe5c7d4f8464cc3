"""ONNX export that carries its preprocessing, and an onnxruntime stand-in for the task.

``segpipe export`` writes ``model.onnx`` (dynamic batch, height and width; input = normalised
image padded to ``pad_multiple``, output = logits) and a sidecar ``model.json`` with everything
inference needs: class names and colours, input channels, band selection, normalisation, pad
multiple, tile and overlap defaults. ``segpipe predict --onnx model.onnx`` runs the same
prediction path (reading, tiling, TTA, writers) with :class:`OnnxTask` in place of the torch task.
onnx/onnxruntime are imported only here (``pip install segpipe[onnx]``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segpipe.decision import check_positive_threshold, decision_description
from segpipe.errors import MissingExtraError, looks_like_checkpoint
from segpipe.fileio import atomic_path, atomic_write_json, check_output_dir
from segpipe.models.base import pad_to_multiple
from segpipe.models.input_norm import input_norm_module
from segpipe.predict.checkpoint import CheckpointError, PredictConfig, load_predictor

__all__ = ["OnnxTask", "export_onnx", "load_onnx_predictor", "recorded_tiling", "sidecar_path"]

SIDECAR_FORMAT = "segpipe-onnx/1"


def sidecar_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.json``."""
    return Path(onnx_path).with_suffix(".json")


#: Opsets ``segpipe export`` writes: from 9 (BatchNormalization without the attributes older
#: runtimes refuse) to the TorchScript exporter's newest.
MIN_OPSET = 9


def _max_opset() -> int:
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except ImportError:  # pragma: no cover - older or newer torch
        return 17
    return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


def _file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _graph_dump_held_back() -> Iterator[None]:
    """Hold back what is written to file descriptor 1 while torch exports: when the export
    fails, torch's TorchScript exporter prints the whole graph there (hundreds of lines before
    segpipe's one-line error; its ONNX log is switched on whatever was asked), and that is
    dropped; on success anything written is passed on. (Process-wide: other threads' output
    to fd 1 waits for the export too.)"""
    import tempfile

    sys.stdout.flush()
    with tempfile.TemporaryFile() as held:
        try:
            saved = os.dup(1)
        except OSError:  # no file descriptor 1 (an embedding host): nothing to hold back
            yield
            return
        os.dup2(held.fileno(), 1)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            if not failed:
                held.seek(0)
                sys.stdout.write(held.read().decode(errors="replace"))


def export_onnx(
    ckpt_path: str | Path,
    output: str | Path,
    opset: int = 17,
    tile: int | None = None,
    overlap: float | None = None,
    check: bool = True,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Export a checkpoint's network to ONNX with a preprocessing sidecar.

    Args:
        ckpt_path: Checkpoint written by ``segpipe fit``.
        output: The ``.onnx`` file to write (the sidecar goes beside it as ``.json``).
        opset: ONNX opset (:data:`MIN_OPSET` to the exporter's newest).
        tile: Tile size that ``segpipe predict --onnx`` and ``Segmenter.from_onnx`` use when
            none is given (None: whole images, as from the checkpoint).
        overlap: Their tile overlap when none is given (None: predict's 0.25).
        check: Run the exported graph once with onnxruntime and compare with torch.
        overwrite: Replace an existing ``.onnx`` or sidecar (else they are an error).

    Returns:
        ``(onnx path, sidecar path)``.

    Raises:
        ValueError: A bad output name, opset, tile or overlap, or outputs that exist.
    """
    out = Path(output)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"{out}: the output of segpipe export must end in .onnx")
    top = _max_opset()
    if isinstance(opset, bool) or not MIN_OPSET <= int(opset) <= top:
        raise ValueError(f"--opset must be between {MIN_OPSET} and {top} (what torch exports and "
                         f"onnxruntime runs), got {opset}; the default 17 suits most runtimes")
    if overlap is not None and not 0.0 <= overlap < 1.0:
        raise ValueError(f"--overlap must be a fraction in [0, 1), got {overlap}")
    check_output_dir(out.parent, "the ONNX export", "output")  # before any work
    existing = [p for p in (out, sidecar_path(out)) if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{', '.join(map(str, existing))} already exist(s); pass --overwrite to "
                         "replace, or choose another --output")
    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # torch's message blamed the opset
        raise MissingExtraError("ONNX export needs the onnx package: pip install 'segpipe[onnx]'")
    task, config = load_predictor(ckpt_path)
    if tile is not None and (tile < config.pad_multiple):
        raise ValueError(f"--tile must be at least the network's size step "
                         f"{config.pad_multiple}, got {tile}")
    net = task.net.float().eval().to(memory_format=torch.contiguous_format)
    m = config.pad_multiple
    b = -(-max(2 * m, config.min_size) // m) * m  # the least size the network takes
    example = torch.randn(1, config.in_channels, b, b + m)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        try:
            with _graph_dump_held_back():
                torch.onnx.export(
                    net,
                    (example,),
                    str(tmp),
                    input_names=["image"],
                    output_names=["logits"],
                    dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                  "logits": {0: "batch", 2: "height", 3: "width"}},
                    opset_version=int(opset),
                    dynamo=False,
                )
        except Exception as exc:  # noqa: BLE001 - torch's message ends with the whole graph
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            first = first.split(" Please feel free to request support")[0]
            hint = ""
            if "adaptive_avg_pool2d" in first:
                hint = (" (the network pools to a fixed grid, as PSPNet and UperNet do, which "
                        "ONNX cannot express for the dynamic image size segpipe exports; "
                        "predict with the checkpoint instead)")
            elif "upsample_bicubic" in first:
                hint = (" (bicubic resizing, as DPT's ViT encoder does, has no ONNX operator "
                        "here; predict with the checkpoint instead)")
            raise RuntimeError(f"{ckpt_path}: torch could not export the network at opset "
                               f"{opset}: {first}{hint}") from None
        if check:
            _check_export(tmp, net, config)
        digest = _file_digest(tmp)
    meta = {
        "format": SIDECAR_FORMAT,
        "onnx": out.name,
        **asdict(config),
        "input": "image: float32 (N, in_channels, H, W), normalised ((x/max - mean) / std), "
        "then, when input_norm is per_image, each image's channels standardised (zero mean, "
        "unit variance over its pixels, before padding), H and W multiples of pad_multiple",
        "output": "logits: float32 (N, num_classes, H, W)",
        "labels": decision_description(config.positive_threshold, config.class_names),
        "tile": tile,
        "overlap": overlap,
        "onnx_sha256": digest,  # ties the sidecar to its graph
    }
    meta["eval_resize"] = list(config.eval_resize) if config.eval_resize else None
    meta["checkpoint"] = str(Path(ckpt_path).resolve())  # still names it once the pair is copied
    side = atomic_write_json(sidecar_path(out), meta)
    return out, side


def _session(path: str | Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingExtraError("running an ONNX model needs onnxruntime: pip install "
                                "'segpipe[onnx]'") from exc
    opts = ort.SessionOptions()
    # fatal only: each error reaches segpipe as an exception, reported in one line; at 3, a
    # failing run also printed onnxruntime's coloured "[E:onnxruntime:...]" line before it
    opts.log_severity_level = 4
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable ONNX model ({first}); export it again "
                              "with segpipe export") from None


def _check_export(path: Path, net: nn.Module, config: PredictConfig) -> None:
    m = config.pad_multiple
    b = -(-max(2 * m, config.min_size) // m) * m
    x = torch.randn(2, config.in_channels, b + m, b)
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
        self.min_size = config.min_size
        self.class_names = list(config.class_names)
        self.ignore_index = config.ignore_index
        self.input_norm = input_norm_module(config.input_norm)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) normalised images -> (N, K, H, W) float32 logits."""
        padded, (h, w) = pad_to_multiple(self.input_norm(x.float()), self.pad_multiple,
                                         self.min_size)
        logits = self.session.run(None, {"image": padded.contiguous().cpu().numpy()})[0]
        return torch.from_numpy(logits)[..., :h, :w].to(x.device)


def load_onnx_predictor(onnx_path: str | Path) -> tuple[OnnxTask, PredictConfig, dict[str, Any]]:
    """Open an exported model and its sidecar.

    Returns:
        ``(task stand-in, prediction config, sidecar dict)`` (the sidecar holds tile/overlap).
    """
    path = Path(onnx_path).expanduser()
    side = sidecar_path(path)
    if not side.is_file() and path.is_symlink():  # latest.onnx -> runs/a/model.onnx
        side = sidecar_path(path.resolve())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file; create it with segpipe export")
    if looks_like_checkpoint(path):
        raise CheckpointError(
            f"{path} is a PyTorch checkpoint, not an ONNX model: load it with "
            "Segmenter.from_checkpoint (segpipe predict --ckpt_path), or export it with "
            "segpipe export first")
    if not side.is_file():
        raise CheckpointError(
            f"{side}: the sidecar with classes and normalisation is missing next to {path.name}; "
            "re-export with segpipe export (it writes both files)"
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{side}: unreadable sidecar ({exc}); re-export the model") from exc
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{side}: not a segpipe ONNX sidecar (format {found!r}, this "
                              f"segpipe reads {SIDECAR_FORMAT!r}); export the model again with "
                              "segpipe export")
    config = _sidecar_config(side, meta)
    task = OnnxTask(path, config)  # a damaged graph fails here, as unreadable
    digest = meta.get("onnx_sha256")
    if digest and _file_digest(path) != digest:
        raise CheckpointError(
            f"{side} was written for another graph than {path} (its checksum differs: the "
            "graph was changed after the export, or the two files come from different "
            "exports); export the two files again with segpipe export")
    _check_graph(path, task.session, config)
    return task, config, meta


def recorded_tiling(meta: dict[str, Any]) -> tuple[int | None, float | None]:
    """The ``(tile, overlap)`` that ``segpipe export --tile/--overlap`` recorded, or Nones.

    Sidecars from before the graph checksum (``onnx_sha256``) recorded ``tile: 512`` whether or
    not it was asked for, so theirs are not taken: their models keep predicting whole images.
    """
    if not meta.get("onnx_sha256"):
        return None, None
    tile, overlap = meta.get("tile"), meta.get("overlap")
    return (int(tile) if tile else None), (float(overlap) if overlap is not None else None)


def _sidecar_config(side: Path, meta: dict[str, Any]) -> PredictConfig:
    """The prediction settings of a sidecar, checked as a checkpoint's data spec is.

    Raises:
        CheckpointError: A missing or invalid field, named with the fix (re-export).
    """
    from segpipe.data.spec import DataSpec

    required = ("num_classes", "class_names", "class_colors", "in_channels", "mean", "std")
    missing = [k for k in required if meta.get(k) is None]  # `"mean": null` too: not a default
    if missing:
        raise CheckpointError(f"{side}: the sidecar lacks {missing}; export the model again "
                              "with segpipe export")
    try:
        spec = DataSpec.from_dict(  # the same checks as a checkpoint's data spec
            {k: meta.get(k) for k in ("num_classes", "class_names", "class_colors",
                                       "ignore_index", "in_channels", "bands", "mean", "std",
                                       "eval_resize", "symmetries", "input_dtype")},
            where="sidecar")
        pad = meta.get("pad_multiple", 32)
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 1:
            raise ValueError(f"pad_multiple must be a positive whole number, got {pad!r}")
        norm = meta.get("input_norm", "none")
        if norm not in ("none", "per_image"):
            raise ValueError(f"input_norm must be 'none' or 'per_image', got {norm!r}")
        for key, ok in (("tile", lambda v: v is None or (isinstance(v, int) and v >= pad)),
                        ("overlap", lambda v: v is None or (isinstance(v, (int, float))
                                                             and 0 <= v < 1))):
            if not ok(meta.get(key)):
                raise ValueError(f"{key} {meta.get(key)!r} is not a usable default")
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{side}: {exc}; export the model again with segpipe export"
                              ) from None
    min_size = meta.get("min_size", 0)
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise CheckpointError(f"{side}: min_size must be a whole number >= 0, got {min_size!r}; "
                              "export the model again with segpipe export")
    config = PredictConfig.from_spec(spec, checkpoint=str(meta.get("checkpoint", "")),
                                     pad_multiple=pad, net=str(meta.get("net", "")),
                                     input_norm=norm, min_size=min_size)
    try:  # absent from sidecars written before the option: the arg-max
        threshold = check_positive_threshold(meta.get("positive_threshold"), spec.num_classes,
                                             "positive_threshold")
    except ValueError as exc:
        raise CheckpointError(f"{side}: {exc}; export the model again with segpipe export"
                              ) from None
    return replace(config, positive_threshold=threshold)


def _check_graph(path: Path, session: Any, config: PredictConfig) -> None:
    """The graph's input channels and output classes against the sidecar's."""
    shapes = [(session.get_inputs()[0].shape, config.in_channels, "input channels", "in_channels"),
              (session.get_outputs()[0].shape, config.num_classes, "output classes",
               "num_classes")]
    for shape, want, what, key in shapes:
        got = shape[1] if len(shape) == 4 else None
        if isinstance(got, int) and got != want:
            raise CheckpointError(
                f"{path} has {got} {what} but its sidecar {sidecar_path(path).name} says "
                f"{key}={want}; the two files come from different exports: export them again "
                "with segpipe export")
    # One small input of the sidecar's size step: a pad_multiple the graph cannot take (a
    # hand-edited sidecar) failed every file with onnxruntime's "mismatched dimensions".
    m = config.pad_multiple
    b = -(-max(2 * m, config.min_size) // m) * m
    probe = np.zeros((1, config.in_channels, b, b + m), dtype=np.float32)
    try:
        session.run(None, {session.get_inputs()[0].name: probe})
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"{path} does not run on a {b}x{b + m} input, a multiple of the pad_multiple {m} "
            f"its sidecar {sidecar_path(path).name} gives ({first[:200]}); export the two "
            "files again with segpipe export") from None
