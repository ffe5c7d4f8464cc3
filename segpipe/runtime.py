"""Process-wide settings and machine defaults for training and inference.

:func:`tune_allocator` keeps glibc's allocator from handing every large tensor back to the
kernel. PyTorch's CPU tensors come straight from ``malloc``; with glibc's defaults a training
step of even a small U-Net frees and re-allocates tens of MB of activations, which glibc returns
to the kernel (``munmap`` or heap trimming) and the next step faults back in page by page, every
step; the settings below remove most of those page faults (``scripts/bench_malloc.py`` counts
them and times the steps with and without the settings; figures in the README's Speed
section). Intel's PyTorch CPU guide recommends
jemalloc or tcmalloc through ``LD_PRELOAD`` for this; ``mallopt`` gets the same effect
in-process, with nothing to install: blocks up to 32 MiB (glibc's maximum) come from the heap
and freed heap memory is kept for reuse. The cost is that the process keeps its peak heap size
until it exits.

:func:`available_cpus` counts the CPUs this process may use: its affinity mask and, in a
container, the cgroup CPU quota (Docker's ``--cpus``, a Kubernetes CPU limit), which neither
``os.cpu_count()`` nor PyTorch's default thread count sees. :func:`fit_threads_to_cpus` caps
PyTorch's compute threads to it: under a 4-CPU quota on a 64-core host PyTorch would otherwise
start a thread per host core, and threads that meet at every operation's barrier stall
whenever the kernel throttles the group for exceeding its quota (``scripts/bench_threads.py``
measures it in a cgroup made for the purpose).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path

__all__ = ["available_cpus", "cgroup_cpu_limit", "default_precision", "fit_threads_to_cpus",
           "tune_allocator"]

#: Environment variables that set the compute threads; where one is set, segpipe leaves them be.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1 << 30

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep freed memory in the heap (glibc only; once per process; inherited by forked workers).

    Does nothing when ``SEGPIPE_MALLOC=default`` is set, when glibc's ``malloc`` tunables are
    already given in the environment (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
    ``GLIBC_TUNABLES``), when another allocator is preloaded (``LD_PRELOAD``), or on platforms
    without glibc.

    Returns:
        Whether the allocator is tuned.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    opted_out = os.environ.get("SEGPIPE_MALLOC", "").lower() == "default"
    if opted_out or not sys.platform.startswith("linux"):
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                     "GLIBC_TUNABLES", "LD_PRELOAD")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # absent outside glibc (e.g. musl)
    except (OSError, AttributeError):
        return False
    del gnu_get_libc_version
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Both or neither: setting either one turns off glibc's dynamic thresholds, so a trim
    # threshold alone would leave the mmap threshold at 128 KiB and map every tensor afresh
    # (far worse than the default).
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
    return _tuned


def default_precision() -> str:
    """Fastest precision that keeps accuracy on the machine at hand.

    bf16 autocast on CUDA GPUs that support it (fp16 on older ones) and on CPUs with native bf16
    (AVX512-BF16/AMX), where it is faster than fp32 at equal accuracy (README, "Speed";
    ``scripts/bench_precision.py``); fp32 elsewhere.

    Returns:
        A Lightning ``precision`` value.
    """
    import torch

    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "bf16-mixed"
    except (AttributeError, RuntimeError):
        pass
    return "32-true"


def _cgroup_paths(proc_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup v2 path and cgroup v1 ``cpu`` controller path ("/" if unknown)."""
    v2 = v1 = "/"
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2] or "/"
        elif "cpu" in parts[1].split(","):
            v1 = parts[2] or "/"
    return v2, v1


def _read_quota_v2(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _read_quota_v1(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cgroup_cpu_limit(root: str | os.PathLike[str] = "/sys/fs/cgroup",
                     proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup") -> float | None:
    """CPUs' worth of time the cgroup CPU quota grants this process, or None without a quota.

    Reads cgroup v2's ``cpu.max`` and cgroup v1's ``cpu.cfs_quota_us``/``cpu.cfs_period_us``,
    both at the mount's root (a container's own cgroup) and along this process's cgroup path
    from ``/proc/self/cgroup`` up to the root; the tightest quota found applies.

    Args:
        root: Where the cgroup file systems are mounted.
        proc_cgroup: The ``/proc/<pid>/cgroup`` file naming this process's cgroups.

    Returns:
        The quota in CPUs (e.g. 4.0 for ``400000 100000``, 1.5 for Docker's ``--cpus 1.5``).
    """
    root = Path(root)
    v2, v1 = _cgroup_paths(Path(proc_cgroup))
    mounts = [(root, v2, _read_quota_v2), (root / "unified", v2, _read_quota_v2)]
    mounts += [(root / name, v1, _read_quota_v1) for name in ("cpu", "cpu,cpuacct")]
    limits: list[float] = []
    for base, rel, read in mounts:
        folder = base / rel.strip("/")
        chain = [folder, *folder.parents]  # this cgroup up to the mount's root
        chain = chain[: chain.index(base) + 1] if base in chain else [base]
        limits += [quota for quota in map(read, chain) if quota is not None]
    return min(limits) if limits else None


@functools.lru_cache(maxsize=None)
def available_cpus() -> int:
    """CPUs this process may keep busy: its affinity mask, capped by a cgroup CPU quota.

    ``os.cpu_count()`` counts the host's CPUs; inside a container limited by a quota (Docker's
    ``--cpus``, a Kubernetes CPU limit) every host CPU stays visible, so counts taken from it
    oversubscribe the quota. A fractional quota rounds down (at least 1): one thread more than
    the quota can run gets the whole group throttled. Cached for the process.

    Returns:
        Number of CPUs, at least 1.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


def fit_threads_to_cpus() -> int | None:
    """Cap PyTorch's compute threads to :func:`available_cpus` (never more threads than CPUs).

    Does nothing where ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set (the user's choice) or
    where PyTorch's threads already fit; never raises PyTorch's own count. Says on stderr when it
    changes the count.

    Returns:
        The number of threads set, or None where nothing was changed.
    """
    if any(os.environ.get(name) for name in THREAD_ENV_VARS):
        return None
    import torch

    cpus = available_cpus()
    threads = torch.get_num_threads()
    if threads <= cpus:
        return None
    torch.set_num_threads(cpus)
    print(f"segpipe: this process may use {cpus} CPU(s) (cgroup CPU quota or affinity mask), "
          f"so PyTorch computes with {cpus} thread(s) instead of {threads}; set OMP_NUM_THREADS "
          "to choose.", file=sys.stderr)
    return cpus
