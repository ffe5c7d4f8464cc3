"""The allocator tuning the CLI applies (checked in fresh processes: it is once per process).

Its effect on speed is measured by ``scripts/bench_train.py``, not asserted here: page-fault
counts of small probes vary with transparent huge pages and heap placement.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

_PROBE = "from segpipe.runtime import tune_allocator as t; print(t(), t())"


def _tuned(**env: str) -> str:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD",
                                                             "SEGPIPE_MALLOC")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          env=environ, check=True).stdout.strip()


def test_allocator_is_tuned_once_per_process() -> None:
    assert _tuned() == "True True"


@pytest.mark.parametrize(
    "env",
    [{"SEGPIPE_MALLOC": "default"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"},
     {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}],
)
def test_allocator_left_alone_when_asked_or_configured(env: dict[str, str]) -> None:
    assert _tuned(**env) == "False False"


# --- CPUs this process may use: affinity mask and cgroup CPU quota ---------------------------

import torch  # noqa: E402

from segpipe import runtime  # noqa: E402


def _cgroup(tmp_path, files: dict[str, str], proc: str):
    for rel, text in files.items():
        path = tmp_path / "fs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "fs").mkdir(exist_ok=True)
    (tmp_path / "cgroup").write_text(proc)
    return runtime.cgroup_cpu_limit(tmp_path / "fs", tmp_path / "cgroup")


def test_cgroup_v2_quota_of_the_container(tmp_path) -> None:
    """Docker ``--cpus 4`` with a private cgroup namespace: cpu.max at the mount's root."""
    assert _cgroup(tmp_path, {"cpu.max": "400000 100000\n"}, "0::/\n") == 4.0


def test_cgroup_v2_tightest_quota_along_the_path(tmp_path) -> None:
    """A Kubernetes pod's limit sits on the pod's cgroup, the container's own says max."""
    files = {"kubepods/pod1/cpu.max": "250000 100000\n", "kubepods/pod1/c1/cpu.max": "max 100000\n",
             "kubepods/cpu.max": "3200000 100000\n"}
    assert _cgroup(tmp_path, files, "0::/kubepods/pod1/c1\n") == 2.5


def test_cgroup_v1_quota(tmp_path) -> None:
    files = {"cpu,cpuacct/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    proc = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n"
    assert _cgroup(tmp_path, files, proc) == 1.5


@pytest.mark.parametrize("files", [
    {},
    {"cpu.max": "max 100000\n"},
    {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
    {"cpu.max": "garbage\n", "cpu/cpu.cfs_quota_us": "x\n"},
])
def test_no_cgroup_quota(tmp_path, files: dict[str, str]) -> None:
    assert _cgroup(tmp_path, files, "0::/\n4:cpu:/\n") is None


def test_available_cpus_rounds_a_quota_down(monkeypatch) -> None:
    affinity = len(os.sched_getaffinity(0))
    for quota, expected in [(0.5, 1), (1.5, 1), (None, affinity), (1000.0, affinity)]:
        monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda q=quota: q)
        runtime.available_cpus.cache_clear()
        assert runtime.available_cpus() == expected, quota
    runtime.available_cpus.cache_clear()


def test_threads_capped_to_the_cpus_a_quota_grants(monkeypatch, torch_threads, capsys) -> None:
    for name in runtime.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "available_cpus", lambda: 1)
    assert runtime.fit_threads_to_cpus() == 1
    assert torch.get_num_threads() == 1
    assert "may use 1 CPU(s)" in capsys.readouterr().err
    assert runtime.fit_threads_to_cpus() is None  # already fits: nothing to say


def test_threads_left_alone_when_set_or_fitting(monkeypatch, torch_threads, capsys) -> None:
    for name in runtime.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "available_cpus", lambda: 64)
    assert runtime.fit_threads_to_cpus() is None  # never raised above PyTorch's own count
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(runtime, "available_cpus", lambda: 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.fit_threads_to_cpus() is None
    assert torch.get_num_threads() == 2
    assert capsys.readouterr().err == ""


def test_worker_defaults_count_available_cpus(monkeypatch, torch_threads) -> None:
    """Loader and writer defaults count the CPUs the quota grants, not the host's."""
    from segpipe.data import loading
    from segpipe.predict import command

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the host's count: must not be used
    for cpus, workers in [(2, 0), (3, 1), (8, 4)]:
        monkeypatch.setattr(loading, "available_cpus", lambda c=cpus: c)
        monkeypatch.setattr(command, "available_cpus", lambda c=cpus: c)
        assert loading.default_num_workers() == workers, cpus
        assert command.default_write_workers(on_accelerator=False) == workers, cpus


def test_predict_command_fits_its_threads(monkeypatch, torch_threads, tmp_path, capsys) -> None:
    """``segpipe predict`` caps the threads before it loads anything (here: a missing checkpoint)."""
    from segpipe.predict import command

    for name in runtime.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runtime, "available_cpus", lambda: 1)
    code = command.main(["--ckpt_path", str(tmp_path / "missing.ckpt"), "--input", str(tmp_path),
                         "--output", str(tmp_path / "out")])
    assert code == 2
    assert torch.get_num_threads() == 1
    err = capsys.readouterr().err
    assert "may use 1 CPU(s)" in err and "missing.ckpt" in err
