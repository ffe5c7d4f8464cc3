"""scripts/setup_env.sh, behind the README's two commands: what it refuses and repairs, without
installing anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "setup_env.sh"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash scripts")


def _setup(venv: Path, python: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEGPIPE_VENV": str(venv), "PYTHON": python}
    return subprocess.run(["bash", str(SETUP), "test"], env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_python_older_than_3_10_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    old = tmp_path / "python3.9"
    old.write_text("#!/usr/bin/env bash\n"
                   "case \"$1\" in --version) echo 'Python 3.9.18';; *) exit 1;; esac\n")
    old.chmod(0o755)
    res = _setup(tmp_path / "venv", str(old))
    assert res.returncode == 1 and not (tmp_path / "venv").exists(), res.stderr
    assert f"segpipe: needs Python >= 3.10; {old} is Python 3.9.18" in res.stderr


def test_a_half_made_environment_is_made_again_not_reused(tmp_path: Path) -> None:
    """`python -m venv` without ensurepip (Debian without python3-venv) left a venv without pip,
    which every later run reused and failed in ("No module named pip")."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    res = _setup(venv, "false")  # after the half-made venv is gone, nothing to make it with
    assert f"segpipe: {venv} has no Python >= 3.10 with pip; making it again" in res.stderr
    assert res.returncode == 1 and not venv.exists(), res.stderr
