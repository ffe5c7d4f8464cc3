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
