"""Dataset records, fast normalisation, TTA and the summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.data.datasets import PredictDataset
from segpipe.data.io import input_fingerprint, write_image
from segpipe.predict.checkpoint import load_predictor
from segpipe.predict.engine import InputFile, PredictInputs, PredictSummary
from segpipe.predict.scoring import ProbabilityFn
from segpipe.predict.writers import PredictionWriter
from tests.predict.conftest import noise_image


@pytest.mark.parametrize("channels,in_channels", [(3, 3), (1, 3), (1, 1)])
def test_images_are_normalised_as_the_dataset_does_in_channels_last_memory(
    tmp_path: Path, pointwise_ckpt: Path, channels: int, in_channels: int
) -> None:
    _, cfg = load_predictor(pointwise_ckpt)
    cfg = type(cfg)(**{**cfg.__dict__, "in_channels": in_channels,
                       "mean": cfg.mean[:in_channels], "std": cfg.std[:in_channels]})
    img = noise_image(37, 41, channels)
    write_image(tmp_path / "a.png", img if channels > 1 else img[..., 0])
    ref = PredictDataset([tmp_path / "a.png"], mean=cfg.mean, std=cfg.std,
                         in_channels=in_channels)[0]["image"]
    writer = PredictionWriter(tmp_path / "out", ["mask"], cfg)
    rec = PredictInputs([InputFile(tmp_path / "a.png", Path("a.png"))], writer, cfg)[0]
    assert rec["image"].shape == ref.shape == (in_channels, 37, 41)
    assert torch.equal(rec["image"], ref) and rec["size"].tolist() == [37, 41]
    assert rec["image"].permute(1, 2, 0).is_contiguous()  # channels-last memory for the network


def test_records_skip_done_files_and_report_bad_ones(tmp_path: Path, pointwise_ckpt: Path) -> None:
    _, cfg = load_predictor(pointwise_ckpt)
    write_image(tmp_path / "in" / "ok.png", noise_image(8, 8))
    (tmp_path / "in" / "bad.png").write_bytes(b"")
    writer = PredictionWriter(tmp_path / "out", ["mask"], cfg)
    files = [InputFile(tmp_path / "in" / n, Path(n)) for n in ("ok.png", "bad.png")]
    files.append(InputFile(tmp_path / "in" / "ok.png", Path("clash.png"), error="name clash"))
    ds = PredictInputs(files, writer, cfg)
    ok, bad, clash = ds[0], ds[1], ds[2]
    assert ok["kind"] == "image" and ok["formats"] == ["mask"] and ok["size"].tolist() == [8, 8]
    assert bad["status"] == "failed" and "0 bytes" in bad["reason"]
    assert clash["status"] == "failed" and clash["reason"] == "name clash"
    # a file segpipe did not write (ground-truth masks, an image) is neither done nor replaced
    write_image(tmp_path / "out" / "ok.png", np.zeros((8, 8), np.uint8))
    assert ds[0]["status"] == "failed" and "does not say segpipe predict made it" in ds[0]["reason"]
    writer.overwrite = True
    assert ds[0]["status"] == "failed"
    writer.overwrite = False
    # an output stamped with this input as it is: done; with the input since replaced: remade
    stamp = writer.stamp("ok.png", "mask", input_fingerprint(tmp_path / "in" / "ok.png"))
    write_image(tmp_path / "out" / "ok.png", np.zeros((8, 8), np.uint8), stamp=stamp)
    assert ds[0]["status"] == "skipped"
    write_image(tmp_path / "in" / "ok.png", noise_image(8, 9))
    assert ds[0]["formats"] == ["mask"]
    # another input's output under this one's output name: failed, naming it
    other = writer.stamp("ok_palette.png", "mask", input_fingerprint(tmp_path / "in" / "ok.png"))
    write_image(tmp_path / "out" / "ok.png", np.zeros((8, 8), np.uint8), stamp=other)
    assert "holds the mask output of ok_palette.png" in ds[0]["reason"]
    # another input folder's output of the same name: neither done nor replaced
    writer.input_root = "/elsewhere"
    elsewhere = writer.stamp("ok.png", "mask", "another image's fingerprint")
    writer.input_root = None
    write_image(tmp_path / "out" / "ok.png", np.zeros((8, 8), np.uint8), stamp=elsewhere)
    assert "in /elsewhere, another input folder than this run's" in ds[0]["reason"]
    # an older segpipe's folder (its record says its outputs have no stamps): done as before
    write_image(tmp_path / "out" / "ok.png", np.zeros((8, 8), np.uint8))
    writer.unstamped_outputs = True
    assert ds[0]["status"] == "skipped"


def test_tta_averages_flipped_probabilities() -> None:
    class Left(torch.nn.Module):  # not flip-invariant: depends on the column
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            cols = torch.linspace(-1, 1, x.shape[-1])
            return torch.stack([cols.expand(x.shape[-2], -1), -cols.expand(x.shape[-2], -1)])[None]

    x = torch.zeros(1, 3, 4, 6)
    plain = ProbabilityFn(Left(), tta=False)(x)  # type: ignore[arg-type]
    tta = ProbabilityFn(Left(), tta=True)(x)  # type: ignore[arg-type]
    assert not torch.allclose(plain, torch.full_like(plain, 0.5))
    assert torch.allclose(tta, torch.full_like(tta, 0.5))  # h-flip cancels the left/right bias


def test_summary_line_and_report() -> None:
    s = PredictSummary(12, 3, [("a.png", "file is empty (0 bytes)")])
    assert s.line() == "predict: 12 written, 3 skipped (already done), 1 failed"
    assert s.report().splitlines()[1] == "  a.png: file is empty (0 bytes)"


def test_one_device_runs_in_process_and_the_rest_under_lightning(monkeypatch) -> None:
    """`--devices 1` with the default strategy runs in a plain loop; what only Lightning does
    (several devices or processes, a strategy, other precisions or accelerators) goes to it."""
    from segpipe.predict.engine import in_process_device

    cpu = torch.device("cpu")
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert in_process_device("cpu", 1, "auto", "32-true") == cpu
    assert in_process_device("cpu", "1", "auto", "bf16-mixed") == cpu
    if not torch.cuda.is_available():
        assert in_process_device("auto", 1, "auto", "32-true") == cpu
        assert in_process_device("gpu", 1, "auto", "32-true") is None  # Lightning says why
    for args in [("cpu", 2, "auto", "32-true"), ("cpu", "auto", "auto", "32-true"),
                 ("cpu", 1, "ddp", "32-true"), ("cpu", 1, "auto", "64-true"),
                 ("cpu", 1, "auto", "17"), ("cpu", 1, "auto", "16-mixed"),
                 ("tpu", 1, "auto", "32-true"), ("cpu", [0], "auto", "32-true"),
                 ("CPU", 1, "auto", "32-true")]:  # Lightning's spelling only (it refuses that)
        assert in_process_device(*args) is None, args
    monkeypatch.setenv("WORLD_SIZE", "2")  # one rank of torchrun's processes
    assert in_process_device("cpu", 1, "auto", "32-true") is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert in_process_device("cpu", 1, "auto", "32-true") == cpu


def test_lightning_leaves_the_records_where_they_are() -> None:
    """Under a Trainer the records are not moved to the device (a nodata mask on the GPU failed
    its file: `.numpy()` of a CUDA tensor); the module moves the stacked images itself."""
    from segpipe.predict.distributed import _LightningModule

    batch = [{"image": torch.zeros(3, 4, 4), "valid": torch.ones(4, 4, dtype=torch.bool)}]
    module = _LightningModule(torch.nn.Identity())
    assert module.transfer_batch_to_device(batch, torch.device("meta"), 0) is batch
