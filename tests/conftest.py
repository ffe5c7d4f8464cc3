"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder with the real data sets (``SEGPIPE_DATA_DIR``); skips the test when unset/missing.

    Returns:
        The data folder, e.g. ``/work/shared/data`` with ``camvid/``, ``lgg_mri/`` and
        ``isbi2012_em/``.
    """
    value = os.environ.get("SEGPIPE_DATA_DIR", "")
    path = Path(value) if value else None
    if path is None or not path.is_dir():
        pytest.skip("SEGPIPE_DATA_DIR not set: real-data test skipped")
    return path
