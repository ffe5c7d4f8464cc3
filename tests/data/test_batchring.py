"""Training batches in shared slots: what a worker sends, what the main process gets back, and
when a slot is free again."""

from __future__ import annotations

import gc
import io
import pickle
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from segpipe.data import SegmentationDataModule
from segpipe.data.batchring import BatchRing, RingBatch, SlotArena, as_batch
from segpipe.data.collate import PadCollate
from segpipe.data.datasets import SegmentationDataset, scan_folder
from segpipe.data.loading import workers_fork
from tests.data.synthetic import make_folder_dataset

forks = pytest.mark.skipif(not workers_fork(), reason="loader workers are not forked here")


def _items(n: int = 3, size: int = 8, weight: bool = False) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        item = {"image": torch.rand(3, size, size, generator=gen),
                "mask": torch.randint(0, 5, (size, size), generator=gen),
                "path": f"img_{i}.png"}
        if weight:
            item["weight"] = torch.rand(size, size, generator=gen)
        items.append(item)
    return items


def _as_received(sent: RingBatch) -> RingBatch:
    """What the main process unpickles from a worker's queue."""
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(sent)
    return pickle.loads(buf.getvalue())


def _in_slot(collate: PadCollate, items: list[dict]) -> RingBatch:
    """Collate as a worker does, with a slot of the collate's ring."""
    arena = SlotArena(collate.ring, collate.ring.claim())
    return arena.batch(collate._collate(items, arena))


def _assert_same_batch(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and got[key].stride() == value.stride(), key
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("weight", [False, True])
def test_a_batch_from_a_slot_equals_the_ordinary_batch(weight: bool) -> None:
    items = _items(weight=weight)
    ring = BatchRing(slots=2, slot_bytes=8192)
    expected = PadCollate(ignore_index=255)(items)
    sent = _in_slot(PadCollate(ignore_index=255, ring=ring), items)
    assert isinstance(sent, RingBatch)
    assert sorted(sent.layout) == sorted(["image", "mask"] + (["weight"] if weight else []))
    assert sent.rest == {"path": expected["path"]}
    assert len(pickle.dumps(sent)) < 1000  # offsets and shapes, not the pixels
    batch = _as_received(sent).materialize()
    _assert_same_batch(batch, expected)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert ring.in_use == 1
    del batch, sent
    gc.collect()
    assert ring.in_use == 0  # free once its tensors are gone


def test_the_slot_is_free_once_the_batch_is_copied_out_or_dropped() -> None:
    """The pin-memory thread copies a batch into pinned memory (here: clones) and frees the slot
    at once; a batch dropped unread (a reset iterator's prefetched ones) frees it too."""
    items = _items()
    ring = BatchRing(slots=3, slot_bytes=4096)
    collate = PadCollate(ignore_index=255, ring=ring)
    copied = _as_received(_in_slot(collate, items)).copy_out(torch.clone)
    assert ring.in_use == 0
    _assert_same_batch(copied, PadCollate(ignore_index=255)(items))
    sent = _in_slot(collate, items)
    received = _as_received(sent)
    assert ring.in_use == 1
    del sent  # the worker's copy never frees the slot: the batch is in flight
    assert ring.in_use == 1
    del received
    gc.collect()
    assert ring.in_use == 0


def test_a_batch_that_does_not_fit_or_finds_no_slot_goes_the_ordinary_way() -> None:
    items = _items(size=8)  # image 3 x 3 x 8 x 8 x 4 = 2304 bytes, mask 3 x 8 x 8 x 8 = 1536
    expected = PadCollate(ignore_index=255)(items)
    ring = BatchRing(slots=1, slot_bytes=2304)  # room for the image only
    sent = _in_slot(PadCollate(ignore_index=255, ring=ring), items)
    assert sorted(sent.layout) == ["image"] and torch.equal(sent.rest["mask"], expected["mask"])
    _assert_same_batch(_as_received(sent).materialize(), expected)
    small = BatchRing(slots=1, slot_bytes=64)  # room for nothing: the slot is freed unused
    out = _in_slot(PadCollate(ignore_index=255, ring=small), items)
    assert isinstance(out, dict) and small.in_use == 0
    _assert_same_batch(out, expected)
    assert small.claim() == 0 and small.claim() is None  # every slot in use


def test_a_failing_collate_frees_its_slot(monkeypatch) -> None:
    ring = BatchRing(slots=1, slot_bytes=4096)
    collate = PadCollate(ignore_index=None, ring=ring)
    monkeypatch.setattr("segpipe.data.collate.get_worker_info", lambda: object())  # a worker
    items = _items()
    items[1]["image"] = torch.rand(3, 9, 9)  # another size without an ignore index
    with pytest.raises(ValueError, match="different sizes"):
        collate(items)
    assert ring.in_use == 0


def test_spawned_workers_get_no_ring_and_collate_as_before() -> None:
    collate = pickle.loads(pickle.dumps(PadCollate(ignore_index=255,
                                                   ring=BatchRing(slots=1, slot_bytes=4096))))
    assert collate.ring is None


def test_as_batch_leaves_ordinary_batches_alone() -> None:
    batch = {"image": torch.zeros(1)}
    assert as_batch(batch) is batch


@forks
@pytest.mark.parametrize("persistent", [True, False])
def test_batches_from_forked_workers_equal_the_ordinary_ones(tmp_path: Path,
                                                             persistent: bool) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=10, n_val=0, n_test=0, size=(16, 16))
    ds = SegmentationDataset(scan_folder(root)["train"], in_channels=3, num_classes=3)
    ring = BatchRing(slots=2 * 2 + 4, slot_bytes=4 * 16 * 16 * (12 + 8))
    plain = list(DataLoader(ds, batch_size=4, num_workers=0, collate_fn=PadCollate(255)))
    loader = DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=persistent,
                        collate_fn=PadCollate(255, ring=ring))
    for _epoch in range(2):
        received = [next_batch for next_batch in loader]
        assert all(isinstance(b, RingBatch) for b in received)
        batches = [as_batch(b) for b in received]
        for got, expected in zip(batches, plain, strict=True):
            _assert_same_batch(got, expected)
        del received, batches, got
        gc.collect()
        assert ring.in_use == 0


def _module(root: Path, **kw) -> SegmentationDataModule:
    dm = SegmentationDataModule(root=str(root), num_classes=3, batch_size=2, **kw)
    dm.setup("fit")
    return dm


def test_the_loaders_get_rings_sized_for_their_largest_batches(tmp_path: Path,
                                                                    monkeypatch) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(40, 40))
    dm = _module(root, num_workers=2, crop_size=16, late_crop_size=24)
    ring = dm.train_dataloader().collate_fn.ring
    if not workers_fork():
        assert ring is None
        return
    assert ring.slots == 2 * 2 + 4
    assert ring.slot_bytes >= 2 * 24 * 24 * (4 * 3 + 8)  # float32 RGB images, int64 masks
    val_ring = dm.val_dataloader().collate_fn.ring  # for the largest val image: 40x40
    assert val_ring.slot_bytes >= 2 * 40 * 40 * (4 * 3 + 8)
    resized = _module(root, num_workers=2, crop_size=16, eval_resize=[64, 64])
    assert resized.val_dataloader().collate_fn.ring.slot_bytes >= 2 * (64 * 64 * 12 + 40 * 40 * 8)
    assert _module(root, num_workers=2).train_dataloader().collate_fn.ring is None  # no crop
    for kw in ({"num_workers": 0, "crop_size": 16},
               {"num_workers": 2, "crop_size": 16, "shared_batches": False}):
        dm = _module(root, **kw)
        assert dm.train_dataloader().collate_fn.ring is None, kw
        assert dm.val_dataloader().collate_fn.ring is None, kw
    monkeypatch.setattr("segpipe.data.datamodule.workers_fork", lambda: False)
    dm = _module(root, num_workers=2, crop_size=16)
    assert dm.train_dataloader().collate_fn.ring is None
    assert dm.val_dataloader().collate_fn.ring is None


@forks
def test_val_batches_through_slots_equal_the_ordinary_ones(tmp_path: Path) -> None:
    """Val images of different sizes, padded per batch: the batches (and their slots) come back
    as the ordinary loader builds them, epoch after epoch."""
    from segpipe.data.io import write_image, write_mask

    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=5, n_test=0, size=(24, 32))
    rng = torch.Generator().manual_seed(1)
    write_image(root / "val" / "images" / "wide.png",
                torch.randint(0, 255, (20, 44, 3), generator=rng, dtype=torch.uint8).numpy())
    write_mask(root / "val" / "masks" / "wide.png",
               torch.randint(0, 3, (20, 44), generator=rng, dtype=torch.uint8).numpy())
    batches = {}
    for shared in (True, False):
        dm = _module(root, num_workers=2, ignore_index=255, shared_batches=shared)
        loader = dm.val_dataloader()
        assert (loader.collate_fn.ring is not None) is shared
        batches[shared] = [list(loader) for _epoch in range(2)]
    for epoch_shared, epoch_plain in zip(batches[True], batches[False], strict=True):
        for got, expected in zip(epoch_shared, epoch_plain, strict=True):
            _assert_same_batch(got, expected)


@forks
def test_fit_with_shared_batches_trains_as_without(tmp_path: Path, monkeypatch) -> None:
    """Through Lightning with 2 loader workers: every training and validation batch came through
    a slot, and the weights equal those of a fit whose batches crossed tensor by tensor."""
    import lightning.pytorch as L

    from tests.cli_args import fit_with_workers

    class Rings(L.Callback):
        def __init__(self) -> None:
            self.rings: list[BatchRing | None] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.rings.append(trainer.train_dataloader.collate_fn.ring)

    from_slots = []

    def counting(batch):
        from_slots.append(isinstance(batch, RingBatch))
        return as_batch(batch)

    monkeypatch.setattr("segpipe.data.loading.as_batch", counting)
    root = make_folder_dataset(tmp_path / "ds", n_train=8, n_val=2, n_test=0, size=(40, 40),
                               num_classes=3)
    weights = {}
    for shared in (True, False):
        probe = Rings()
        from_slots.clear()
        cli = fit_with_workers(root, tmp_path / str(shared), 2, [probe],
                               f"--data.shared_batches={str(shared).lower()}")
        assert len(probe.rings) == 4 and all((r is not None) is shared for r in probe.rings)
        # 2 epochs of 2 training batches, and the validation's batches
        assert len(from_slots) > 4 and set(from_slots) == {shared}
        weights[shared] = cli.model.state_dict()
    for name, value in weights[True].items():
        assert torch.equal(value, weights[False][name]), name


def test_a_slot_table_lock_held_by_a_dead_worker_does_not_hang_the_others(monkeypatch) -> None:
    monkeypatch.setattr("segpipe.data.batchring.LOCK_TIMEOUT_S", 0.05)
    monkeypatch.setattr("segpipe.data.collate.get_worker_info", lambda: object())  # a worker
    ring = BatchRing(slots=2, slot_bytes=8192)
    assert ring._lock.acquire()  # never released, as by a worker killed inside
    items = _items()
    out = PadCollate(ignore_index=255, ring=ring)(items)
    assert isinstance(out, dict)  # no slot: the ordinary way
    _assert_same_batch(out, PadCollate(ignore_index=255)(items))


def test_the_pin_memory_thread_gets_the_batch_dict_and_the_slot_back_at_once(monkeypatch) -> None:
    """torch's pin-memory thread calls ``pin_memory()`` on what it receives: a slot batch comes
    out as the batch dict of pinned copies (here clones: no CUDA), its slot free."""
    from torch.utils.data._utils.pin_memory import pin_memory

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self.clone())
    items = _items()
    ring = BatchRing(slots=2, slot_bytes=8192)
    received = _as_received(_in_slot(PadCollate(ignore_index=255, ring=ring), items))
    pinned = pin_memory(received, None)
    assert isinstance(pinned, dict) and ring.in_use == 0
    _assert_same_batch(pinned, PadCollate(ignore_index=255)(items))


def test_a_refused_mapping_leaves_the_batches_the_ordinary_way(tmp_path: Path, monkeypatch,
                                                               caplog) -> None:
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr("segpipe.data.batchring.anonymous_shared", refuse)
    monkeypatch.setattr("segpipe.data.datamodule.workers_fork", lambda: True)
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(40, 40))
    with caplog.at_level("WARNING"):
        dm = _module(root, num_workers=2, crop_size=16)
        assert dm.train_dataloader().collate_fn.ring is None
    assert "batches cross tensor by tensor" in caplog.text


def test_no_slots_where_they_would_take_more_than_a_sixteenth_of_the_ram(tmp_path: Path,
                                                                         monkeypatch) -> None:
    """A slot's pages stay taken while its loader lives: val batches of large rasters would
    have kept gigabytes; they cross the ordinary way instead."""
    monkeypatch.setattr("segpipe.data.datamodule.workers_fork", lambda: True)
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(40, 40))
    dm = _module(root, num_workers=2, crop_size=16)
    train_bytes = 8 * (2 * 16 * 16 * (4 * 3 + 8) + 3 * 64)  # 8 slots of a 2 x 16² batch
    val_bytes = 8 * (2 * 40 * 40 * (4 * 3 + 8) + 3 * 64)
    monkeypatch.setattr("segpipe.data.datamodule.ram_bytes", lambda: 16 * val_bytes)
    assert dm.train_dataloader().collate_fn.ring is not None
    assert dm.val_dataloader().collate_fn.ring is not None  # just fits
    monkeypatch.setattr("segpipe.data.datamodule.ram_bytes", lambda: 16 * val_bytes - 16)
    assert dm.val_dataloader().collate_fn.ring is None
    assert dm.train_dataloader().collate_fn.ring is not None
    monkeypatch.setattr("segpipe.data.datamodule.ram_bytes", lambda: 16 * train_bytes - 16)
    assert dm.train_dataloader().collate_fn.ring is None
