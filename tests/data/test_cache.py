"""Decoded-pair caches: one process's own, and the one a dataset's forked loader workers share."""

from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import segpipe.data.datasets as datasets_module
from segpipe.data import SegmentationDataModule
from segpipe.data.cache import PairCache, SharedPairCache
from segpipe.data.datasets import SegmentationDataset, scan_folder
from segpipe.data.loading import default_cache_mb, workers_fork
from tests.data.synthetic import make_folder_dataset

forks = pytest.mark.skipif(not workers_fork(), reason="loader workers are not forked here")


def _pair(seed: int, shape=(5, 7, 3), image_dtype=np.uint8, label_dtype=np.uint8):
    rng = np.random.default_rng(seed)
    raw = (rng.random(shape) * 200).astype(image_dtype)
    return raw, rng.integers(0, 200, shape[:2]).astype(label_dtype)


@pytest.mark.parametrize("image_dtype,label_dtype", [
    (np.uint8, np.uint8), (np.uint16, np.uint8), (np.float32, np.int64), (np.int16, np.int64)])
def test_a_stored_pair_comes_back_equal_read_only_and_in_its_dtypes(image_dtype, label_dtype):
    cache = SharedPairCache(3, 2**16)
    raw, labels = _pair(0, image_dtype=image_dtype, label_dtype=label_dtype)
    assert cache.get(1) is None
    cache.put(1, raw, labels)
    got_raw, got_labels = cache.get(1)
    assert got_raw.dtype == image_dtype and got_labels.dtype == label_dtype
    np.testing.assert_array_equal(got_raw, raw)
    np.testing.assert_array_equal(got_labels, labels)
    assert not got_raw.flags.writeable and not got_labels.flags.writeable
    assert cache.get(0) is None and cache.get(2) is None and len(cache) == 1


def test_what_does_not_fit_or_cannot_be_stored_is_left_out():
    raw, labels = _pair(0, shape=(8, 8, 3))  # 192 + 64 bytes: 256 a pair, 64-byte aligned
    cache = SharedPairCache(4, 2 * 256)
    cache.put(0, raw, labels)
    cache.put(1, raw[:, :, 0], labels)  # not (H, W, C)
    cache.put(2, raw, labels[:4])  # labels of another size
    cache.put(3, raw, labels)
    assert [cache.get(i) is not None for i in range(4)] == [True, False, False, True]
    assert cache.used_bytes == 2 * 256
    cache.put(1, raw, labels)  # the budget is spent
    assert cache.get(1) is None
    cache.put(0, raw + 1, labels)  # an item is stored once
    np.testing.assert_array_equal(cache.get(0)[0], raw)


def test_the_private_cache_keeps_pairs_within_its_budget():
    raw, labels = _pair(0, shape=(4, 4, 3))  # 64 bytes a pair
    cache = PairCache(128)
    for i in range(3):
        cache.put(i, raw, labels)
    assert len(cache) == 2 and cache.get(2) is None and cache.get(0)[0] is raw


@forks
def test_what_a_forked_process_stores_every_process_reads():
    cache = SharedPairCache(4, 2**16)
    cache.put(0, *_pair(0))
    pid = os.fork()
    if pid == 0:  # a loader worker: reads the parent's pair, stores one of its own
        ok = np.array_equal(cache.get(0)[0], _pair(0)[0])
        cache.put(1, *_pair(1))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(cache.get(1)[0], _pair(1)[0])
    np.testing.assert_array_equal(cache.get(1)[1], _pair(1)[1])


def test_a_copy_for_another_process_is_a_fresh_private_cache():
    """Spawned workers get the dataset pickled: the mapping cannot go with it."""
    cache = SharedPairCache(2, 4096)
    cache.put(0, *_pair(0))
    for other in (pickle.loads(pickle.dumps(cache)), copy.deepcopy(cache)):
        assert type(other) is PairCache and other.capacity_bytes == 4096 and len(other) == 0


def test_an_item_another_worker_is_storing_is_decoded_not_waited_for():
    cache = SharedPairCache(2, 4096)
    cache._table["state"][0] = 1  # being written elsewhere (or its writer died)
    assert cache.get(0) is None
    cache.put(0, *_pair(0))
    assert cache.get(0) is None and cache.used_bytes == 0


def test_a_lock_held_by_a_dead_worker_does_not_hang_the_others(monkeypatch):
    monkeypatch.setattr("segpipe.data.cache.LOCK_TIMEOUT_S", 0.05)
    cache = SharedPairCache(2, 4096)
    cache.put(0, *_pair(0))
    assert cache._lock.acquire()  # never released, as by a worker killed inside
    assert cache.get(0) is None
    cache.put(1, *_pair(1))
    assert cache.used_bytes == 192  # item 0's alone: 105 + 35 bytes, each aligned to 64


def _count_decodes(monkeypatch) -> multiprocessing.Value:
    """Counts image decodes in this process and in workers forked from it."""
    count = multiprocessing.get_context("fork").Value("i", 0)
    real = datasets_module.read_image_valid

    def counting(*args, **kwargs):
        with count.get_lock():
            count.value += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets_module, "read_image_valid", counting)
    return count


@forks
@pytest.mark.parametrize("shared", [True, False])
def test_loader_workers_decode_each_image_once_with_the_shared_cache(tmp_path: Path, monkeypatch,
                                                                     shared: bool) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=12, n_val=0, n_test=0, size=(16, 16))
    samples = scan_folder(root)["train"]
    plain = SegmentationDataset(samples, in_channels=3, num_classes=3)
    reference = {str(s.image): plain[i] for i, s in enumerate(samples)}
    ds = SegmentationDataset(samples, in_channels=3, num_classes=3, cache_mb=1,
                             shared_cache=shared)
    decodes = _count_decodes(monkeypatch)
    first_loader = None
    for persistent in (True, False):  # per-epoch workers too: the shared cache outlives them
        loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=2,
                            persistent_workers=persistent,
                            generator=torch.Generator().manual_seed(0))
        for _epoch in range(3):
            for batch in loader:
                for path, image, mask in zip(batch["path"], batch["image"], batch["mask"]):
                    assert torch.equal(image, reference[path]["image"])
                    assert torch.equal(mask, reference[path]["mask"])
        if first_loader is None:
            first_loader = decodes.value
    if shared:
        assert decodes.value == 12 and len(ds._cache) == 12  # each image once, in all
    else:  # each worker decodes what it draws; new workers start with nothing
        assert 12 < first_loader < decodes.value
        assert len(ds._cache) == 0  # and the main process never sees their caches


@forks
def test_workers_fill_the_shared_cache_the_next_loader_reads(tmp_path: Path, monkeypatch) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=10, n_val=0, n_test=0, size=(16, 16))
    ds = SegmentationDataset(scan_folder(root)["train"], in_channels=3, num_classes=3,
                             cache_mb=1, shared_cache=True)
    decodes = _count_decodes(monkeypatch)
    first = {p: (i, m) for b in DataLoader(ds, batch_size=2, num_workers=2)
             for p, i, m in zip(b["path"], b["image"], b["mask"])}
    assert decodes.value == 10 and len(ds._cache) == 10  # stored by the workers, seen here
    for sample in ds.samples:
        sample.image.unlink()
    again = [b for b in DataLoader(ds, batch_size=2, num_workers=2, shuffle=True)]
    assert decodes.value == 10
    for b in again:
        for p, i, m in zip(b["path"], b["image"], b["mask"]):
            assert torch.equal(i, first[p][0]) and torch.equal(m, first[p][1])


def test_the_data_module_shares_the_cache_where_workers_fork(tmp_path: Path, monkeypatch) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(16, 16))

    def module(**kw) -> SegmentationDataModule:
        dm = SegmentationDataModule(root=str(root), num_classes=3, batch_size=2, **kw)
        dm.setup("fit")
        return dm

    dm = module(num_workers=2)
    assert dm.shared_cache is workers_fork()
    assert dm.cache_mb == default_cache_mb(2, shared=dm.shared_cache)
    for split in ("train", "val"):
        assert dm.datasets[split]._cache.shared is dm.shared_cache
    assert not module(num_workers=2, shared_cache=False).datasets["train"]._cache.shared
    assert not module(num_workers=0).datasets["train"]._cache.shared
    monkeypatch.setattr("segpipe.data.datamodule.workers_fork", lambda: False)  # spawn
    assert not module(num_workers=2).datasets["train"]._cache.shared


def test_the_shared_default_budget_is_what_the_workers_had_together() -> None:
    ram_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    for workers in (1, 2, 8):
        assert default_cache_mb(workers, shared=True) == pytest.approx(
            min(ram_mb / 8, workers * default_cache_mb(workers)), rel=1e-9)


def test_a_refused_mapping_falls_back_to_per_worker_caches(tmp_path: Path, monkeypatch,
                                                            caplog) -> None:
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr("segpipe.data.cache.anonymous_shared", refuse)
    root = make_folder_dataset(tmp_path / "ds", n_train=2, n_val=0, n_test=0, size=(16, 16))
    with caplog.at_level("WARNING"):
        ds = SegmentationDataset(scan_folder(root)["train"], in_channels=3, num_classes=3,
                                 cache_mb=1, shared_cache=True)
    assert type(ds._cache) is PairCache and ds._cache.capacity_bytes == 2**20
    assert "each loader worker keeps its own" in caplog.text
    ds[0]
    assert len(ds._cache) == 1
