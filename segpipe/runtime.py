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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["default_precision", "tune_allocator"]

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
