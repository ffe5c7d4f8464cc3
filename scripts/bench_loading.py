"""Training-loader benchmarks: the workers' shared decoded-image cache, and their shared batch slots.

``--compare cache`` (default): with a per-process cache each of ``w`` workers decodes the images
it happens to draw until it has seen them all, so on a GPU (whose steps are milliseconds) the
first few epochs are as slow as decoding. This iterates segpipe's training loader (the data
module's: augmentation, collation, workers) over the same epochs twice, alternating
``data.shared_cache`` false and true with fresh workers, with no network, and prints each
epoch's images/s, how many images were decoded, and the memory of the loading processes at the
end (the sum of their proportional set sizes: shared pages counted once).

``--compare batches``: how long the main process takes to receive a batch the workers have
already built (they are given ``--pause`` seconds per batch to get ahead), with
``data.shared_batches`` false (each tensor a shared-memory file whose descriptor is fetched from
the worker) and true (slots mapped before the workers fork), for training batches or with
``--split val`` validation ones. ``--spin`` runs a thread that spins in Python beside it, as a
training loop holds the GIL while the pin-memory thread receives.

    python scripts/bench_loading.py                       # 368 synthetic 480x360 PNGs, 2 workers
    python scripts/bench_loading.py --workers 8 --epochs 5
    python scripts/bench_loading.py --data-root ../shared/data/camvid --layout camvid --classes 11 --ignore-index 11
    python scripts/bench_loading.py --compare batches --spin

Run it alone on the machine: the workers use every core.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import segpipe.data.datasets as datasets_module  # noqa: E402
from segpipe.argparsing import at_least, positive_int  # noqa: E402
from segpipe.data import SegmentationDataModule  # noqa: E402
from segpipe.data.loading import workers_fork  # noqa: E402

from bench_train import make_data  # noqa: E402


def loading_pss_mb() -> float | None:
    """Proportional set size of this process and its children, in MiB (Linux), else None."""
    pids = [os.getpid()]
    try:
        for task in os.listdir(f"/proc/{os.getpid()}/task"):
            with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        total_kb = 0
        for pid in pids:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total_kb += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):
        return None
    return total_kb / 1024


def count_decodes() -> multiprocessing.Value:
    """Counts image decodes here and in the workers forked from here."""
    count = multiprocessing.get_context("fork").Value("i", 0)
    real = datasets_module.read_image_valid

    def counting(*args, **kwargs):
        with count.get_lock():
            count.value += 1
        return real(*args, **kwargs)

    datasets_module.read_image_valid = counting
    return count


def train_loader(args: argparse.Namespace, root: Path, **data: object):
    dm = SegmentationDataModule(
        root=str(root), layout=args.layout, num_classes=args.classes,
        ignore_index=args.ignore_index, batch_size=args.batch_size, crop_size=args.crop,
        num_workers=args.workers, pin_memory=False, **data,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.next_epoch_expected = lambda: False  # epochs timed apart, no early start
    return dm, loader


def run_receive(args: argparse.Namespace, root: Path, shared: bool) -> None:
    """Per batch: ``--pause`` seconds for the workers to get ahead, then the time ``next`` takes."""
    dm, loader = train_loader(args, root, shared_batches=shared)
    if args.split == "val":
        loader = dm.val_dataloader()
    times = []
    for epoch in range(args.epochs):
        if args.split == "train":
            loader.sampler.set_epoch(epoch)
        iterator = iter(loader)
        for _ in range(len(loader)):
            time.sleep(args.pause)
            start = time.perf_counter()
            next(iterator)
            times.append(time.perf_counter() - start)
        del iterator
        if epoch == 0:
            times.clear()  # decoding into the cache
    times.sort()
    print(f"  receiving a built batch: median {1e3 * times[len(times) // 2]:.2f} ms, "
          f"90th percentile {1e3 * times[int(0.9 * (len(times) - 1))]:.2f} ms "
          f"({len(times)} batches after the first epoch)", flush=True)
    del loader
    dm.teardown("fit")


def run(args: argparse.Namespace, root: Path, shared: bool, decodes) -> None:
    dm, loader = train_loader(args, root, shared_cache=shared)
    images = len(loader) * args.batch_size
    rates = []
    for epoch in range(args.epochs):
        before = decodes.value
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        for _batch in loader:
            pass
        seconds = time.perf_counter() - start
        rates.append(images / seconds)
        print(f"  epoch {epoch}: {images / seconds:7.1f} images/s, "
              f"{decodes.value - before:4d} of {images} images decoded", flush=True)
    pss = loading_pss_mb()
    later = statistics.mean(rates[1:]) if len(rates) > 1 else rates[0]
    print(f"  after the first epoch {later:.1f} images/s; loading processes' memory "
          + (f"{pss:.0f} MiB" if pss is not None else "not readable here"), flush=True)
    del loader
    dm.teardown("fit")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, help="real data instead of synthetic (e.g. CamVid)")
    p.add_argument("--layout", default="folder")
    p.add_argument("--classes", type=at_least(2), default=11)
    p.add_argument("--ignore-index", type=int, default=None)
    p.add_argument("--images", type=positive_int, default=368, help="synthetic training images")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--crop", type=positive_int, default=224)
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--epochs", type=at_least(2), default=4)
    p.add_argument("--rounds", type=positive_int, default=1, help="pairs of runs, alternating")
    p.add_argument("--compare", choices=["cache", "batches"], default="cache",
                   help="data.shared_cache (throughput) or data.shared_batches (receiving)")
    p.add_argument("--pause", type=float, default=0.03,
                   help="--compare batches: seconds per batch for the workers to get ahead")
    p.add_argument("--split", choices=["train", "val"], default="train",
                   help="--compare batches: the training loader's batches (crops) or the val "
                        "loader's (whole images, padded per batch)")
    p.add_argument("--spin", action="store_true",
                   help="--compare batches: a thread spinning in Python beside the receiver")
    args = p.parse_args()
    if not workers_fork():
        sys.exit("loader workers are not forked on this platform: nothing is shared")
    decodes = count_decodes()
    option = {"cache": "data.shared_cache", "batches": "data.shared_batches"}[args.compare]
    if args.spin:
        threading.Thread(target=spin, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root or make_data(Path(tmp) / "data", args.images, args.classes)
        for round_ in range(args.rounds):
            for shared in (False, True):
                print(f"round {round_ + 1}, {option}={str(shared).lower()}, "
                      f"{args.workers} workers" + (", a thread spinning" if args.spin else "")
                      + ":", flush=True)
                if args.compare == "cache":
                    run(args, root, shared, decodes)
                else:
                    run_receive(args, root, shared)


def spin() -> None:
    """Python bytecode without end: holds the GIL as a training loop launching kernels does."""
    count = 0
    while True:
        count += 1


if __name__ == "__main__":
    main()
