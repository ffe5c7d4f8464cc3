"""Process settings the CLI applies: opting out of the allocator tuning, the default precision,
the cgroup layouts a CPU quota is read from, and the thread variables that are the user's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from segpipe import runtime
from tests.test_runtime import _cgroup, _tuned

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")


@linux_only
@pytest.mark.parametrize("env", [{"SEGPIPE_MALLOC": "DEFAULT"}, {"LD_PRELOAD": ""},
                                 {"MALLOC_MMAP_THRESHOLD_": "131072"}])
def test_allocator_left_alone_for_any_spelling_of_default_a_preload_or_an_mmap_threshold(
        env: dict[str, str]) -> None:
    """``SEGPIPE_MALLOC=DEFAULT`` opts out like ``default``; an allocator in ``LD_PRELOAD`` or
    glibc's own ``MALLOC_MMAP_THRESHOLD_`` are the user's choice and are not overridden."""
    assert _tuned(**env) == "False False"


_MAPPED = """
import ctypes
from segpipe.runtime import tune_allocator
tuned = tune_allocator()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
def mapped(n):
    before = libc.mallinfo2().hblks
    libc.malloc(n)
    return libc.mallinfo2().hblks - before
print(tuned, mapped(16 << 20), mapped(48 << 20))
"""


@linux_only
def test_tuned_allocator_keeps_blocks_up_to_32_mib_in_the_heap() -> None:
    """Once tuned, a 16 MiB block (a large activation) comes from the heap and is reused, not
    mapped afresh; a block over 32 MiB is still mapped (and given back to the kernel when
    freed)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD",
                                                         "SEGPIPE_MALLOC")}
    out = subprocess.run([sys.executable, "-c", _MAPPED], capture_output=True, text=True, env=env)
    if "mallinfo2" in out.stderr:
        pytest.skip("glibc without mallinfo2 (< 2.33)")
    assert out.stdout.split() == ["True", "0", "1"], out.stderr


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_default_precision_on_a_gpu(monkeypatch: pytest.MonkeyPatch, bf16: bool,
                                    expected: str) -> None:
    """bf16 on GPUs that support it, fp16 mixed precision on older ones."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert runtime.default_precision() == expected


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_default_precision_on_a_cpu(monkeypatch: pytest.MonkeyPatch, bf16: bool,
                                    expected: str) -> None:
    """On a CPU: bf16 where it has native bf16 (oneDNN says so), fp32 elsewhere."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16)
    assert runtime.default_precision() == expected


def test_cgroup_v1_quota_is_the_cpu_controllers_not_cpusets(tmp_path) -> None:
    """``/proc/self/cgroup`` lists ``cpuset`` beside ``cpu``: only the ``cpu`` controller's path
    leads to the quota, whichever line comes last."""
    files = {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
             "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}
    proc = "4:cpu,cpuacct:/docker/abc\n3:cpuset:/elsewhere\n0::/\n"
    assert _cgroup(tmp_path, files, proc) == 2.0


def test_cgroup_v2_quota_in_a_hybrid_layout(tmp_path) -> None:
    """systemd's hybrid layout mounts cgroup v2 at ``<root>/unified``: its cpu.max counts."""
    files = {"unified/app/cpu.max": "300000 100000\n"}
    assert _cgroup(tmp_path, files, "0::/app\n") == 3.0


def test_cgroup_v1_quota_under_a_cpu_mount(tmp_path) -> None:
    """cgroup v1 mounted as ``<root>/cpu`` (not only ``cpu,cpuacct``)."""
    files = {"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert _cgroup(tmp_path, files, "4:cpu:/\n") == 0.5


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_threads_left_alone_when_either_variable_is_set(monkeypatch: pytest.MonkeyPatch,
                                                        torch_threads: None, name: str) -> None:
    """``MKL_NUM_THREADS`` is the user's choice as much as ``OMP_NUM_THREADS``."""
    for other in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, "2")
    monkeypatch.setattr(runtime, "available_cpus", lambda: 1)
    assert runtime.fit_threads_to_cpus() is None
    assert torch.get_num_threads() == 2
