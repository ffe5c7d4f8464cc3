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


@pytest.fixture()
def hub_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face / torch hub cache under tmp_path, with huggingface_hub offline.

    huggingface_hub reads HF_HOME/HF_HUB_OFFLINE when imported, so its constants are patched
    too; nothing in a test using it can reach the network.

    Returns:
        The hub cache folder (``HF_HUB_CACHE``).
    """
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture()
def torch_threads():
    """Two torch threads for the test; the former count restored after it."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)
