#!/usr/bin/env python
"""Prediction benchmarks: throughput of `segpipe predict` against a bare loop, and peak memory
of predicting large GeoTIFFs.

1. Throughput: `segpipe predict` (the real code path: its prediction loop, PNG decoding in DataLoader
   workers, softmax/argmax, atomic PNG writes in writer threads) on a folder of 480x360 PNGs,
   against a bare loop that does the same work in turn, as a plain script would: decode and
   normalise a batch, copy it to the device, ``task(x)``, arg-max, labels back to the CPU, one
   plain PNG each (``--bare compute``: over the images preloaded as normalised CPU tensors, no
   decoding or writing; the stricter reference). Same network, precision, batch size and
   ``--device``.
   Each round is one whole pass of each over all the images, bare then segpipe; on CUDA the
   clock is read after ``torch.cuda.synchronize()``. Both after a warm-up. Goal: ratio >= 0.9.
2. Peak host RSS of predicting a synthetic 3-band GeoTIFF of each ``--rss-sizes`` (default 4096
   and 16384 pixels square; ``--rss-height`` for wide, short rasters) with a tiny U-Net and
   ``--rss-classes`` classes, each in a fresh subprocess (``VmHWM``; on CUDA also the peak of
   GPU memory allocated by torch). Goal: well under 3 GB, about the same for every size.
3. Start-up included: the whole ``segpipe predict`` command in a fresh process (imports, loading
   the checkpoint, the images, writing) against a plain script in a fresh process that imports
   torch, Pillow and the network's class alone, loads the weights and decodes, predicts and
   writes the same images in turn (``_plain`` below); wall-clock seconds, alternating, best of
   ``--rounds``.

``--device`` (cpu or cuda; default cuda when available, as `segpipe predict` picks it) sets the
device of both sides and of the raster runs.

    python scripts/bench_predict.py                        # both, default sizes (minutes on 2 cores)
    python scripts/bench_predict.py --skip-rss --images 96 # throughput only
    python scripts/bench_predict.py --skip-throughput --rss-sizes 4096 16384
    python scripts/bench_predict.py --skip-throughput --rss-sizes 65536 --rss-height 1024
    python scripts/bench_predict.py --skip-throughput --skip-rss   # start-up included only
    python scripts/bench_predict.py --device cuda --precision bf16-mixed --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_common import pick_device, precision_for  # noqa: E402

from segpipe.argparsing import at_least, positive_int  # noqa: E402


def autocast_for(device: str, precision: str):  # noqa: ANN201 - a torch.autocast
    """The autocast context matching a Lightning ``precision`` on ``device``."""
    import torch

    dtype = torch.float16 if precision.startswith("16") else torch.bfloat16
    return torch.autocast(device, dtype=dtype, enabled=precision.split("-")[0] in ("bf16", "16"))


# ------------------------------------------------------------------------------ data
def make_images(root: Path, n: int, size: tuple[int, int] = (360, 480)) -> Path:
    """``n`` RGB PNGs of ``size`` (H, W) with blobs and noise."""
    from segpipe.data.io import write_image

    rng = np.random.default_rng(0)
    h, w = size
    for i in range(n):
        img = np.full((h, w, 3), 90, np.int16)
        for _ in range(8):
            y, x = rng.integers(0, h - 60), rng.integers(0, w - 60)
            img[y : y + 60, x : x + 60] = rng.integers(0, 255, 3)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        write_image(root / f"{i:05d}.png", img)
    return root


def make_geotiff(path: Path, size: int, strip: int = 512, height: int | None = None) -> Path:
    """A georeferenced 3-band uint8 GeoTIFF ``size`` wide (and tall unless ``height``),
    written strip by strip."""
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    from segpipe.data.io import RasterWriter

    height = size if height is None else height
    x = np.arange(size, dtype=np.float32)
    with RasterWriter(
        path, width=size, height=height, count=3, dtype=np.uint8, crs=CRS.from_epsg(32633),
        transform=from_origin(500000, 4600000, 10, 10), nodata=0,
    ) as w:
        for r0 in range(0, height, strip):
            r1 = min(height, r0 + strip)
            y = np.arange(r0, r1, dtype=np.float32)[:, None]
            a = 128 + 60 * np.sin(x[None] / 97.0) * np.cos(y / 131.0)
            b = 128 + 60 * np.sin((x[None] + y) / 211.0)
            c = 128 + 60 * np.cos((x[None] - y) / 157.0)
            band = np.clip(np.stack([a, b, c]), 1, 255).astype(np.uint8)
            if r0 == 0:
                band[:, :64, :64] = 0  # a nodata corner
            w.write_rows(r0, band)
    return path


def make_ckpt(path: Path, base_channels: int, depth: int, num_classes: int) -> Path:
    from segpipe.predict.checkpoint import save_predict_checkpoint

    return save_predict_checkpoint(
        path,
        net={"class_path": "segpipe.models.UNet",
             "init_args": {"in_channels": 3, "num_classes": num_classes,
                           "base_channels": base_channels, "depth": depth}},
        data={"num_classes": num_classes, "in_channels": 3},
    )


# ------------------------------------------------------------------------------ throughput
def bench_throughput(args: argparse.Namespace, work: Path) -> dict[str, float]:
    import torch
    from PIL import Image

    from segpipe.data.datasets import PredictDataset
    from segpipe.predict.checkpoint import load_predictor
    from segpipe.predict.command import predict

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precision = args.precision or precision_for(args.device)
    images = make_images(work / "images", args.images)
    ckpt = make_ckpt(work / "unet.ckpt", args.base_channels, args.depth, args.classes)
    common = dict(
        formats=["mask"], batch_size=args.batch_size, precision=precision,
        accelerator="gpu" if cuda else "cpu", progress=False, num_workers=args.num_workers,
        overwrite=True,
    )
    task, cfg = load_predictor(ckpt)
    task.to(device)
    if task.channels_last:
        task.net.to(memory_format=torch.channels_last)
    ds = PredictDataset(sorted(images.glob("*.png")), mean=cfg.mean, std=cfg.std,
                        in_channels=cfg.in_channels)
    batches = [
        torch.stack([ds[j]["image"] for j in range(i, min(i + args.batch_size, len(ds)))])
        for i in range(0, len(ds), args.batch_size)
    ]
    if cuda:
        batches = [b.pin_memory() for b in batches]
    autocast = autocast_for(device.type, precision)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def bare_batch(b: torch.Tensor) -> torch.Tensor:
        x = b.to(device, non_blocking=True)
        return task(x).argmax(dim=1).to("cpu", torch.uint8)

    bare_out = work / "bare_out"
    bare_out.mkdir(parents=True, exist_ok=True)

    def bare_io_batch(i0: int) -> None:
        """Decode and normalise (segpipe's reader), forward, write plain PNGs with Pillow."""
        idx = range(i0, min(i0 + args.batch_size, len(ds)))
        x = torch.stack([ds[j]["image"] for j in idx])
        labels = bare_batch(x.pin_memory() if cuda else x).numpy()
        for j, lab in zip(idx, labels):
            Image.fromarray(lab).save(bare_out / f"{j:05d}.png")

    def run_bare() -> float:
        with torch.inference_mode(), autocast:
            sync()
            t0 = time.perf_counter()
            if args.bare == "io":
                for i0 in range(0, len(ds), args.batch_size):
                    bare_io_batch(i0)
            else:
                for b in batches:
                    bare_batch(b)
            sync()
            return time.perf_counter() - t0

    def run_segpipe() -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        summary = predict(ckpt, images, work / "out", **common)
        sync()
        elapsed = time.perf_counter() - t0
        assert summary.written == args.images and not summary.failed, summary.report()
        return elapsed, summary.seconds

    # warm-up (oneDNN kernels / cuDNN autotuning, file cache), then alternate the two, a whole
    # pass over the images each; each one's best round is kept, and each round's own ratio
    # shown: on a shared machine the load of other processes otherwise decides the ratio
    predict(ckpt, images / "00000.png", work / "warm", **common)
    with torch.inference_mode(), autocast:
        bare_batch(batches[0])
    rounds = []
    for _ in range(args.rounds):
        bare = run_bare()
        total, in_loop = run_segpipe()
        rounds.append((bare, in_loop, total))
    n = args.images
    bare_time = min(r[0] for r in rounds)
    loop_time = min(r[1] for r in rounds)
    seg_time = min(r[2] for r in rounds)
    return {"precision": precision, "segpipe_images_per_s": n / loop_time,
            "segpipe_end_to_end_images_per_s": n / seg_time, "bare_images_per_s": n / bare_time,
            "ratio": bare_time / loop_time, "ratio_end_to_end": bare_time / seg_time,
            "paired_ratios": [round(b / lp, 3) for b, lp, _ in rounds],
            "setup_seconds": seg_time - loop_time}


# ------------------------------------------------------------------------------ start-up
def plain_child(argv: list[str]) -> None:
    """In a fresh process, as a plain script would: import torch, Pillow and the network's
    class only, load the checkpoint's weights, then decode, normalise, predict and write each
    batch of images in turn (plain PNGs)."""
    ckpt_path, images, out, device, precision, batch_size = argv
    import importlib

    import torch
    import torch.nn.functional as F
    from PIL import Image

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    net_cfg = ckpt["hyper_parameters"]["net"]
    module, _, name = net_cfg["class_path"].rpartition(".")
    net = getattr(importlib.import_module(module), name)(**net_cfg["init_args"])
    net.load_state_dict({k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    net.to(device).eval().to(memory_format=torch.channels_last)
    spec = ckpt["hyper_parameters"].get("data_spec") or {}
    mean = torch.tensor(spec.get("mean") or [0.5] * 3, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.get("std") or [0.25] * 3, device=device).view(1, -1, 1, 1)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(images).glob("*.png"))
    step = int(batch_size)
    with torch.inference_mode(), autocast_for(torch.device(device).type, precision):
        for i in range(0, len(files), step):
            batch = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[i:i + step]])
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            h, w = x.shape[-2:]
            m = int(getattr(net, "pad_multiple", 1))
            x = F.pad((x - mean) / std, (0, -w % m, 0, -h % m), mode="reflect")
            logits = net(x.contiguous(memory_format=torch.channels_last))[..., :h, :w]
            labels = logits.argmax(dim=1).to("cpu", torch.uint8).numpy()
            for f, lab in zip(files[i:i + step], labels):
                Image.fromarray(lab).save(out_dir / f.name)


def bench_startup(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Wall-clock seconds of the whole ``segpipe predict`` command and of the plain script,
    each in fresh processes, alternating; the best of each."""
    images = work / "images"
    if not images.is_dir():
        make_images(images, args.images)
    ckpt = work / "unet.ckpt"
    if not ckpt.is_file():
        make_ckpt(ckpt, args.base_channels, args.depth, args.classes)
    precision = args.precision or precision_for(args.device)
    path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}  # keep the caller's (carried wheels)
    command = [sys.executable, "-m", "segpipe.cli", "predict", "--ckpt_path", str(ckpt),
               "--input", str(images), "--output", str(work / "startup_segpipe"), "--overwrite",
               "--no_progress", "--precision", precision, "--batch_size", str(args.batch_size),
               "--accelerator", "gpu" if args.device == "cuda" else "cpu"]
    if args.num_workers is not None:
        command += ["--num_workers", str(args.num_workers)]
    plain = [sys.executable, __file__, "_plain", str(ckpt), str(images),
             str(work / "startup_plain"), args.device, precision, str(args.batch_size)]
    times: dict[str, list[float]] = {"segpipe": [], "plain": []}
    for _ in range(args.rounds):
        for name, cmd in (("plain", plain), ("segpipe", command)):
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            times[name].append(time.perf_counter() - t0)
            if res.returncode != 0:
                raise RuntimeError(f"{name}: {res.stderr[-3000:]}")
    return {"segpipe_s": min(times["segpipe"]), "plain_s": min(times["plain"]),
            "rounds": {k: [round(t, 2) for t in v] for k, v in times.items()}}


# ------------------------------------------------------------------------------ memory
def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    ``VmHWM`` (the high-water mark of this process image) where /proc exists: ``ru_maxrss``
    would also count the parent's memory copied at fork time.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(argv: list[str]) -> None:
    """In a fresh process: predict one raster and print peak RSS as JSON."""
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--tile", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--precision", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--formats", nargs="+", default=["geotiff"])
    a = p.parse_args(argv)
    import torch

    from segpipe.predict.command import predict

    cuda = a.device == "cuda"
    before = peak_rss_mb()
    t0 = time.perf_counter()
    summary = predict(a.ckpt, a.input, a.output, formats=a.formats, tile=a.tile,
                      batch_size=a.batch_size, precision=a.precision,
                      accelerator="gpu" if cuda else "cpu", progress=False, num_workers=0,
                      overwrite=True)
    seconds = time.perf_counter() - t0
    assert summary.written == 1, summary.report()
    row = {"peak_rss_mb": peak_rss_mb(), "rss_before_predict_mb": before, "seconds": seconds}
    if cuda:
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(row))


def bench_rss(args: argparse.Namespace, work: Path) -> dict[int, dict[str, float]]:
    ckpt = make_ckpt(work / "tiny.ckpt", args.rss_base_channels, args.rss_depth, args.rss_classes)
    out: dict[int, dict[str, float]] = {}
    for size in args.rss_sizes:
        t0 = time.perf_counter()
        tif = make_geotiff(work / f"scene_{size}.tif", size, height=args.rss_height)
        made = time.perf_counter() - t0
        cmd = [sys.executable, __file__, "_rss", "--ckpt", str(ckpt), "--input", str(tif),
               "--output", str(work / f"out_{size}"), "--tile", str(args.tile),
               "--batch-size", str(args.batch_size), "--device", args.device,
               "--formats", *args.rss_formats]
        if args.precision:
            cmd += ["--precision", args.precision]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if res.returncode != 0:
            raise RuntimeError(f"raster {size}: {res.stderr[-3000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["input_mb_on_disk"] = tif.stat().st_size / 2**20
        row["generate_seconds"] = made
        out[size] = row
        tif.unlink()
    return out


def describe_device(device: str) -> str:
    import torch

    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    return "cpu"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_rss":
        rss_child(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        plain_child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=positive_int, default=48, help="480x360 images for throughput")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--precision", default=None,
                   help="default: segpipe's default precision on the chosen device")
    p.add_argument("--base-channels", type=positive_int, default=16, help="U-Net width (throughput)")
    p.add_argument("--depth", type=positive_int, default=4, help="U-Net depth (throughput)")
    p.add_argument("--classes", type=at_least(2), default=11)
    p.add_argument("--num-workers", type=at_least(0), default=None)
    p.add_argument("--rounds", type=positive_int, default=3, help="alternating timed rounds (best kept)")
    p.add_argument("--bare", choices=["io", "compute"], default="io",
                   help="the bare loop: io (default) decodes, predicts and writes PNGs in turn, "
                        "as a plain script does; compute predicts preloaded tensors only")
    p.add_argument("--rss-sizes", type=positive_int, nargs="+", default=[4096, 16384],
                   help="raster widths (and heights) for the memory runs")
    p.add_argument("--rss-height", type=positive_int, default=None,
                   help="use this height for every raster (memory does not depend on the "
                        "height: e.g. --rss-sizes 65536 --rss-height 1024 gives a 65536-wide "
                        "raster's peak fast)")
    p.add_argument("--tile", type=positive_int, default=512, help="tile of the raster runs")
    p.add_argument("--rss-base-channels", type=positive_int, default=2, help="U-Net width (raster runs)")
    p.add_argument("--rss-depth", type=positive_int, default=1, help="U-Net depth (raster runs)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--skip-startup", action="store_true")
    p.add_argument("--workdir", default=None, help="keep the data here (default: a temp dir)")
    p.add_argument("--rss-classes", type=at_least(2), default=11,
                   help="classes of the raster runs' U-Net (the class-score accumulators hold "
                        "one float per class and pixel)")
    p.add_argument("--rss-formats", nargs="+", default=["geotiff"],
                   help="output formats of the raster runs (geotiff, probs)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="device of both sides and of the raster runs (default: cuda when "
                        "available, as segpipe predict)")
    args = p.parse_args()
    args.device = pick_device(args.device).type  # a string: also the subprocesses' option
    args.precision = args.precision or precision_for(args.device)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        if not args.skip_throughput:
            r = bench_throughput(args, work)
            print(f"throughput on {describe_device(args.device)} ({args.images} images "
                  f"480x360, U-Net({args.base_channels}, depth {args.depth}), batch "
                  f"{args.batch_size}, {r['precision']}, {os.cpu_count()} CPUs); each round a "
                  "whole pass of each, bare then segpipe" + (", clock read after "
                  "torch.cuda.synchronize()" if args.device == "cuda" else "") + ":")
            print(f"  segpipe predict: {r['segpipe_images_per_s']:.2f} images/s (prediction loop: "
                  "decode, normalise, forward, argmax, atomic PNG writes)")
            what = ("decode and normalise each batch, copy to the device, task(x), argmax, "
                    "labels to the CPU, plain PNG writes" if args.bare == "io" else
                    "preloaded CPU tensors: copy to the device, task(x), argmax, labels to the CPU")
            print(f"  bare loop: {r['bare_images_per_s']:.2f} images/s ({what})")
            print(f"  ratio: {r['ratio']:.3f} (best rounds; goal >= 0.9); per round, bare and "
                  f"segpipe back to back: {r['paired_ratios']}")
            print(f"  end to end, with loading the checkpoint and starting the loop "
                  f"({r['setup_seconds']:.2f} s once per run): "
                  f"{r['segpipe_end_to_end_images_per_s']:.2f} images/s, "
                  f"ratio {r['ratio_end_to_end']:.3f}")
        if not args.skip_startup:
            r = bench_startup(args, work)
            print(f"start-up included, each in a fresh process ({args.images} images, best of "
                  f"{args.rounds}; per round {r['rounds']}):")
            print(f"  segpipe predict (the whole command): {r['segpipe_s']:.2f} s")
            print(f"  plain script (torch, Pillow and the network's class; load, decode, "
                  f"predict, write in turn): {r['plain_s']:.2f} s")
            print(f"  ratio: {r['plain_s'] / r['segpipe_s']:.3f} (plain / segpipe)")
        if not args.skip_rss:
            rows = bench_rss(args, work)
            print(f"peak RSS of predicting a 3-band GeoTIFF on {args.device} "
                  f"(U-Net({args.rss_base_channels}, depth {args.rss_depth}), "
                  f"{args.rss_classes} classes, tile {args.tile}, batch {args.batch_size}, "
                  f"formats {' '.join(args.rss_formats)}):")
            for size, row in rows.items():
                cuda_peak = (f", peak CUDA memory {row['peak_cuda_mb']:.0f} MB"
                             if "peak_cuda_mb" in row else "")
                print(f"  {size}x{args.rss_height or size} (WxH): peak {row['peak_rss_mb']:.0f} MB"
                      f"{cuda_peak} "
                      f"(process before predict {row['rss_before_predict_mb']:.0f} MB), "
                      f"{row['seconds']:.1f} s, input {row['input_mb_on_disk']:.0f} MB on disk")


if __name__ == "__main__":
    main()
