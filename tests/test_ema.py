"""segpipe.callbacks.EMA: the update, and fit -> test -> predict -> resume through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from segpipe.callbacks import EMA, _EMAModel
from segpipe.cli import main
from tests.cli_args import TINY_UNET
from tests.data.synthetic import make_folder_dataset

TINY = [*TINY_UNET, "--data.num_workers=0"]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def test_update_is_an_ema_with_warmup_and_counters_copied() -> None:
    net = _net()
    ema = _EMAModel(net, decay=0.5, warmup=True)
    expected = [p.detach().clone() for p in net.parameters()]
    for step in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.5).add_(step)
        net.train()
        net(torch.randn(2, 1, 6, 6))  # moves the BatchNorm statistics and its counter
        ema.update_parameters(net)
        if step == 0:  # the first update copies
            expected = [p.detach().clone() for p in net.parameters()]
        else:
            d = min(0.5, (1 + step) / (10 + step))  # warmup: 0.18, 0.25, 0.31 -> capped at 0.5
            expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, net.parameters())]
    for got, want in zip(ema.module.parameters(), expected):
        torch.testing.assert_close(got, want)
    assert ema.module[1].num_batches_tracked == net[1].num_batches_tracked == 4
    assert not torch.equal(ema.module[1].running_mean, net[1].running_mean)  # averaged too
    assert [round(ema.current_decay(n), 4) for n in (1, 8, 100)] == [0.1818, 0.5, 0.5]
    assert _EMAModel(net, 0.9, warmup=False).current_decay(1) == 0.9


def test_count_is_read_back_after_loading() -> None:
    net = _net()
    ema = _EMAModel(net, decay=0.9, warmup=True)
    for _ in range(3):
        ema.update_parameters(net)
    other = _EMAModel(_net(), decay=0.9, warmup=True)
    other.load_state_dict(ema.state_dict())
    assert other._count is None  # re-read from n_averaged, not restarted (which would copy)
    other.update_parameters(net)
    assert other._count == 4 and int(other.n_averaged) == 4


def test_bad_decay_says_the_range() -> None:
    with pytest.raises(ValueError, match=r"EMA decay must be in \(0, 1\), e.g. 0.999; got 1.5"):
        EMA(decay=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="EMA device 'cuda': CUDA is not available here"):
            EMA(device="cuda")


def test_fit_test_predict_and_resume_use_the_average(tmp_path: Path) -> None:
    data = make_folder_dataset(tmp_path / "ds", num_classes=3, size=(40, 40))
    config = tmp_path / "ema.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: segpipe.callbacks.EMA\n"
                      "      init_args: {decay: 0.9}\n")
    run = tmp_path / "run"
    common = ["--config", "configs/folder_unet.yaml", "--config", str(config),
              f"--data.root={data}", f"--trainer.default_root_dir={run}", *TINY]
    assert main(["fit", *common, "--trainer.max_epochs=2"]) == 0
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged if k.startswith("net."))
    steps = int(ckpt["averaging_state"]["n_averaged"])
    assert steps == ckpt["global_step"] > 0

    # test and predict read state_dict: the averaged weights, with no option to remember.
    assert main(["test", *common, "--ckpt_path=last"]) == 0
    metrics = json.loads(next(run.rglob("test_metrics.json")).read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0
    out = tmp_path / "pred"
    assert main(["predict", "--ckpt_path", str(last), "--input", str(data / "test" / "images"),
                 "--output", str(out), "--no-progress", "--num-workers", "0",
                 "--accelerator", "cpu"]) == 0
    assert len(list(out.glob("*.png"))) == len(list((data / "test" / "images").iterdir()))

    # Resuming restores the raw weights for training and the average with its count.
    assert main(["fit", *common, "--trainer.max_epochs=3", "--ckpt_path=last"]) == 0
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] > ckpt["global_step"]
    assert int(resumed["averaging_state"]["n_averaged"]) == resumed["global_step"]
