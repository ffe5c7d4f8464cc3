"""The benchmark scripts still run (tiny sizes; their figures are not checked: timing is noise here).

Each run imports torch and Lightning in a subprocess and trains or predicts a little: marked
`slow` (about 3 minutes together on the 2-core CPU), so the default run keeps only the scripts'
quick refusals of bad arguments.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


TINY = ["--images", "8", "--batch-size", "2", "--crop", "32", "--base", "4", "--classes", "3",
        "--precision", "32-true"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["interleaved", "rounds"])
def test_bench_train_prints_paired_throughput(mode: str) -> None:
    extra = ["--epochs", "1"] if mode == "interleaved" else ["--epochs", "1", "--rounds", "2"]
    res = subprocess.run(
        [sys.executable, "scripts/bench_train.py", "--device", "cpu", "--mode", mode, *TINY,
         *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rounds = re.findall(r"round \d: segpipe fit +([\d.]+) images/s, bare loop +([\d.]+) images/s, "
                        r"ratio ([\d.]+)", res.stdout)
    assert len(rounds) == (1 if mode == "interleaved" else 2), res.stdout
    for seg, bare, ratio in rounds:
        assert float(seg) > 0 and float(bare) > 0
        # seg and bare are printed to 0.01, the ratio (to 0.001) from their unrounded values
        s, b, r = float(seg), float(bare), float(ratio)
        assert (s - 0.005) / (b + 0.005) - 5e-4 <= r <= (s + 0.005) / (b - 0.005) + 5e-4
    if mode == "interleaved":  # 8 images, batch 2: one timed epoch of 4 steps
        assert re.search(r"4 paired steps; ratio per fifth", res.stdout), res.stdout
    else:
        assert len(re.findall(r"1 timed epoch\(s\) of 4 steps each side", res.stdout)) == 2, res.stdout
        assert len(re.findall(r"waiting for batches \d+ ms \(for the first one \d+ ms\), steps "
                              r"\d+ ms, epoch end \d+ ms; bare \d+ ms", res.stdout)) == 2, res.stdout
        # the run's final checkpoint, paid once per run, printed apart from the routine ends
        assert len(re.findall(r"of the epoch ends: the run's last one \d+ ms \(its final "
                              r"last\.ckpt included, paid once per run\); the others \d+ ms each",
                              res.stdout)) == 2, res.stdout
    assert re.search(r"^ratio: [\d.]+ +\(goal >= 0.95\)$", res.stdout, re.M), res.stdout


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers fork on Linux")
def test_bench_loading_compares_per_worker_and_shared_caches() -> None:
    res = subprocess.run(
        [sys.executable, "scripts/bench_loading.py", "--images", "8", "--batch-size", "2",
         "--crop", "32", "--classes", "3", "--workers", "2", "--epochs", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    runs = re.split(r"^round 1, ", res.stdout, flags=re.M)[1:]
    assert [r.split(",")[0] for r in runs] == ["data.shared_cache=false",
                                               "data.shared_cache=true"], res.stdout
    for run in runs:
        assert re.search(r"epoch 0: +[\d.]+ images/s, +8 of 8 images decoded", run), run
        assert re.search(r"loading processes' memory \d+ MiB", run), run
    # the shared cache's second epoch decodes nothing: the first one's workers stored all 8
    assert re.search(r"epoch 1: +[\d.]+ images/s, +0 of 8 images decoded", runs[1]), runs[1]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers fork on Linux")
def test_bench_loading_times_receiving_batches_both_ways() -> None:
    res = subprocess.run(
        [sys.executable, "scripts/bench_loading.py", "--compare", "batches", "--images", "8",
         "--batch-size", "2", "--crop", "32", "--classes", "3", "--workers", "2", "--epochs", "2",
         "--pause", "0.01", "--spin"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    heads = re.findall(r"^round 1, (data\.shared_batches=\w+), 2 workers, a thread spinning:$",
                       res.stdout, re.M)
    assert heads == ["data.shared_batches=false", "data.shared_batches=true"], res.stdout
    assert len(re.findall(r"receiving a built batch: median [\d.]+ ms, 90th percentile [\d.]+ ms "
                          r"\(4 batches after the first epoch\)", res.stdout)) == 2, res.stdout


@pytest.mark.slow
def test_bench_malloc_compares_both_settings() -> None:
    res = subprocess.run(
        [sys.executable, "scripts/bench_malloc.py", "--pairs", "1", "--steps", "2", "--warmup", "1",
         "--crop", "32", "--base", "4", "--batch-size", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"pair 1: glibc default +[\d.]+ ms/step", res.stdout), res.stdout
    if sys.platform.startswith("linux"):
        assert re.search(r"pair 1: segpipe \(mallopt\) +[\d.]+ ms/step", res.stdout), res.stdout
    assert "median: glibc default" in res.stdout


@pytest.mark.slow
def test_bench_predict_runs_every_part_on_cpu(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "scripts/bench_predict.py", "--device", "cpu", "--images", "4",
         "--batch-size", "2", "--base-channels", "4", "--depth", "2", "--classes", "3",
         "--rounds", "1", "--precision", "32-true", "--rss-sizes", "300", "--rss-height", "200",
         "--tile", "128", "--rss-classes", "3", "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"^throughput on cpu \(4 images", res.stdout, re.M), res.stdout
    assert re.search(r"ratio: [\d.]+ \(best rounds", res.stdout), res.stdout
    assert re.search(r"300x200 \(WxH\): peak \d+ MB", res.stdout), res.stdout
    assert re.search(r"segpipe predict \(the whole command\): [\d.]+ s", res.stdout), res.stdout
    assert re.search(r"plain script .*: [\d.]+ s\n  ratio: [\d.]+", res.stdout), res.stdout


@pytest.mark.skipif(torch_cuda_available(), reason="CUDA is available here")
@pytest.mark.parametrize(("script", "option"), [
    ("bench_train.py", ["--device", "cuda"]), ("bench_predict.py", ["--device", "cuda"]),
    ("bench_epochs.py", ["--device=cuda"]), ("bench_nets.py", ["--device", "cuda"]),
    ("bench_losses.py", ["--device", "cuda"]),
])
def test_device_cuda_without_cuda_fails_in_one_line(script: str, option: list[str]) -> None:
    # -X importtime lists each module imported, on stderr, before the refusal's line
    res = subprocess.run(
        [sys.executable, "-X", "importtime", f"scripts/{script}", *option],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode != 0
    imported, others = [], []
    for line in res.stderr.splitlines():
        if line.startswith("import time:"):
            imported.append(line.rsplit("|", 1)[-1].strip())
        else:
            others.append(line)
    assert "torch" in imported and "lightning" not in imported  # refused before Lightning's import
    lines = "\n".join(others).strip().splitlines()
    assert len(lines) == 1, "\n".join(others)
    assert re.fullmatch(rf"{script}: error: --device cuda: CUDA is not available \(.+\); "
                        r"use --device cpu", lines[0]), lines[0]
    assert "Traceback" not in res.stderr and not res.stdout.strip()


def test_bench_losses_times_both_lovasz_losses_and_checks_they_agree() -> None:
    res = subprocess.run(
        [sys.executable, "scripts/bench_losses.py", "--device", "cpu", "--batch-size", "2",
         "--crop", "16", "--classes", "4", "--repeats", "1", "--rounds", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    losses = re.search(r"losses ([\d.]+) and ([\d.]+) \(difference", res.stdout)
    assert losses and float(losses[1]) == pytest.approx(float(losses[2]), abs=1e-5), res.stdout
    assert re.search(r"smp LovaszLoss +forward \+ backward +[\d.]+ ms  \(1\.00x", res.stdout)
    assert re.search(r"segpipe LovaszSoftmaxLoss +forward \+ backward +[\d.]+ ms  \([\d.]+x",
                     res.stdout), res.stdout


@pytest.mark.slow
def test_bench_nets_times_each_net_in_each_precision_in_rounds() -> None:
    from segpipe.models import UNet

    nets = ["segpipe.models.UNet {base_channels: 16, depth: 4}",  # 1.9 M parameters
            "segpipe.models.SmpModel {encoder_name: resnet18, encoder_depth: 3, "
            "smp_kwargs: {decoder_channels: [16, 8, 4]}}"]
    res = subprocess.run(
        [sys.executable, "scripts/bench_nets.py", "--device", "cpu", "--net", nets[0], "--net",
         nets[1], "--precision", "32-true", "bf16-mixed", "--in-channels", "1", "--classes", "3",
         "--batch-size", "2", "--crop", "32", "--eval-size", "32", "48", "--eval-batch-size", "1",
         "--steps", "1", "--warmup", "1", "--rounds", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "training batch 2x1x32x32, evaluation batch 1x1x32x48, 3 classes" in res.stdout
    assert "the fastest of 2 rounds taken in turn" in res.stdout  # each row once, not per round
    rows = re.findall(r"^(32-true|bf16-mixed) +([\d.]+)M +([\d.]+) +([\d.]+) +([\d.]+)  (.+)$",
                      res.stdout, re.M)
    assert [(r[0], r[5]) for r in rows] == [(p, n) for n in nets for p in ("32-true", "bf16-mixed")]
    unet_params = sum(p.numel() for p in UNet(1, 3, base_channels=16, depth=4).parameters())
    assert float(rows[0][1]) == pytest.approx(unet_params / 1e6, abs=0.051)
    for _, _, train, images, evaluation, _ in rows:
        assert float(train) > 0 and float(evaluation) > 0
        assert float(images) == pytest.approx(2 / float(train) * 1e3, rel=0.02, abs=0.1)


@pytest.mark.slow
def test_bench_nets_feeds_a_net_its_own_in_channels_in_both_batches() -> None:
    spec = "segpipe.models.UNet {base_channels: 4, depth: 2, in_channels: 4}"
    res = subprocess.run(
        [sys.executable, "scripts/bench_nets.py", "--device", "cpu", "--net", spec, "--precision",
         "32-true", "--batch-size", "2", "--crop", "32", "--eval-size", "32", "32", "--steps", "1",
         "--warmup", "1"],  # --in-channels stays 3
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(rf"^32-true .+  {re.escape(spec)}$", res.stdout, re.M), res.stdout


@pytest.mark.parametrize(("spec", "why"), [
    ("segpipe.models.NoSuchNet", r"no class 'segpipe\.models\.NoSuchNet'"),
    ("segpipe.models.UNet [16, 4]", r"the init args '\[16, 4\]' are not a YAML mapping"),
])
def test_bench_nets_names_a_bad_net_spec(spec: str, why: str) -> None:
    res = subprocess.run([sys.executable, "scripts/bench_nets.py", "--device", "cpu", "--net", spec],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert re.search(rf"bench_nets\.py: error: --net '{re.escape(spec)}': {why}", res.stderr), res.stderr


@pytest.mark.slow
def test_bench_epochs_prints_the_per_epoch_overhead(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "scripts/bench_epochs.py", "--device", "cpu", "--steps", "14",
         "--samples-per-epoch", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"^one pass per epoch \(6 steps\) +3 ", res.stdout, re.M), res.stdout
    assert re.search(r"^samples_per_epoch=8 +7 .* ms .*%", res.stdout, re.M), res.stdout


@pytest.mark.slow
def test_bench_epochs_times_each_validations_first_batch_both_ways() -> None:
    res = subprocess.run(
        [sys.executable, "scripts/bench_epochs.py", "--device", "cpu", "--num-workers", "1",
         "--validations", "2", "--samples-per-epoch", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    for label in ("loaded when it begins", "next validation started when one ends"):
        assert re.search(rf"^  {label}: first val batch after [\d.]+ ms \(median of 2 "
                         r"validations; min [\d.]+, max [\d.]+\)$", res.stdout, re.M), res.stdout


@pytest.mark.slow
def test_bench_train_compares_the_smp_network_on_both_sides() -> None:
    """--net smp-r34: segpipe fit and the bare loop train smp's ResNet-34 U-Net."""
    res = subprocess.run(
        [sys.executable, "scripts/bench_train.py", "--device", "cpu", "--mode", "rounds",
         *TINY, "--net", "smp-r34", "--crop", "64", "--epochs", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "smp U-Net(resnet34), batch 2" in res.stdout, res.stdout
    assert re.search(r"round 1: segpipe fit +[\d.]+ images/s, bare loop +[\d.]+ images/s",
                     res.stdout), res.stdout


def _cpu_quota_possible() -> bool:
    """Root on Linux with a writable cgroup CPU controller (v1 ``cpu`` or v2 with ``cpu``)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    if Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():
        return os.access("/sys/fs/cgroup/cpu", os.W_OK)
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    return controllers.exists() and "cpu" in controllers.read_text().split()


_TINY = ["--pairs", "1", "--steps", "2", "--warmup", "1", "--crop", "32", "--base", "4",
         "--batch-size", "2"]


@pytest.mark.slow
def test_bench_threads_without_a_quota() -> None:
    res = subprocess.run([sys.executable, "scripts/bench_threads.py", "--quota", "0", *_TINY],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no cgroup" in res.stdout
    assert re.search(r"pair 1: PyTorch default: +\d+ threads, +[\d.]+ ms/step", res.stdout)
    assert re.search(r"pair 1: segpipe threads: +\d+ threads", res.stdout)
    assert "median: PyTorch default" in res.stdout


@pytest.mark.slow
@pytest.mark.skipif(not _cpu_quota_possible(), reason="needs root and a cgroup CPU controller")
def test_bench_threads_detects_a_real_cgroup_quota() -> None:
    """In a real cgroup with a 1-CPU quota, segpipe sees 1 CPU and computes with 1 thread."""
    res = subprocess.run([sys.executable, "scripts/bench_threads.py", "--quota", "1", *_TINY],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "a quota of 1 CPU(s)" in res.stdout
    assert re.search(r"segpipe threads: +1 threads, +[\d.]+ ms/step \(available_cpus 1\)",
                     res.stdout), res.stdout
    assert re.search(r"PyTorch default: +\d+ threads, .*\(available_cpus 1\)", res.stdout)
    assert not list(Path("/sys/fs/cgroup/cpu").glob("segpipe-bench-threads-*"))


@pytest.mark.slow
def test_device_bench_script_runs_every_benchmark(tmp_path: Path) -> None:
    """scripts/device_bench.sh, the one-call GPU check, end to end on the CPU at tiny sizes:
    every benchmark's flags are accepted; the summary and every log land in $OUT, in two files
    (the device tool brings back at most 8)."""
    env = {**os.environ, "DEVICE": "cpu", "SMOKE": "1", "OUT": str(tmp_path),
           "PYTHON": sys.executable}
    res = subprocess.run(["bash", "scripts/device_bench.sh"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "summary.txt").read_text()
    assert res.returncode == 0, summary[-4000:]
    names = ["train_unet16", "train_unet64", "train_smp_r34", "train_unet16_compiled",
             "train_unet16_cpu", "predict", "epochs_isbi", "profile_step", "loading", "lovasz"]
    assert re.findall(r"^== (\w+) ", summary, re.M) == names, summary
    assert summary.count("\nexit 0\n") == len(names), summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.txt", "summary.txt"]
    logs = (tmp_path / "logs.txt").read_text()
    assert re.findall(r"^===== (\w+) \(exit 0\)", logs, re.M) == names, logs[-4000:]
    assert len(re.findall(r"^ratio: [\d.]+ +\(goal >= 0.95\)$", summary, re.M)) == 5, summary
    assert "--model.compile={backend: eager}" in summary  # reduce-overhead on the GPU
    assert len(re.findall(r"ratio: [\d.]+ \(best rounds", summary)) == 1, summary
    assert "smp U-Net(resnet34)" in logs and "per-epoch overhead" in logs
    assert "segpipe fit: cProfile" in logs and "bare loop:" in logs
    assert "data.shared_cache=true" in logs
    assert "segpipe LovaszSoftmaxLoss" in summary
