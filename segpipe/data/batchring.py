"""Batches that cross from the loader workers in slots of memory they share with the main
process, instead of one file descriptor per tensor.

A DataLoader worker hands each batch tensor to the main process as a shared-memory segment
whose file descriptor the main process fetches from the worker over a socket: a connection, an
authentication handshake and a thread of the worker's that must get the worker's GIL, for every
tensor of every batch. The process that receives the batches (the main process, or with pinned
memory its pin-memory thread) pays about 0.5 ms per tensor on an idle machine, and far more
while another thread of the process holds the GIL, as the training loop does: each of the
handshake's dozen blocking calls gives the GIL up and waits to get it back. With a thread
spinning in Python beside it, receiving a training batch (an image and a mask) took a median
101 ms that way against 21 ms from a slot (``scripts/bench_loading.py --compare batches --spin``).

:class:`BatchRing` maps ``slots`` fixed-size slots of anonymous shared memory before the workers
are forked. A worker's collate function (:class:`~segpipe.data.collate.PadCollate`) claims a
free slot, builds the batch tensors in it (:class:`SlotArena`) and sends a small
:class:`RingBatch`: the slot's number and each tensor's offset, dtype, size and strides. The
main process turns it back into tensors over the slot (:meth:`RingBatch.materialize`, the slot
freed when the last of them is), or with pinned memory copies them into pinned tensors and
frees the slot at once (:meth:`RingBatch.pin_memory`, which the DataLoader's pin-memory thread
calls). A batch that does not fit a slot, or finds none free, goes the ordinary way, as does
every batch of spawned workers (the mapping cannot travel to them). Slots whose batch was
never received (a worker killed mid-way, an iterator shut down with batches in flight) stay
claimed: later batches then go the ordinary way more often, never wrongly.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from segpipe.data.sharedmem import LOCK_TIMEOUT_S, aligned, anonymous_shared, fork_lock

__all__ = ["BatchRing", "RingBatch", "SlotArena", "as_batch"]

_TOKENS = itertools.count()
#: Rings of this process by token: a :class:`RingBatch` unpickled in the main process finds its
#: ring here (the workers were forked from it, so the tokens agree).
_RINGS: weakref.WeakValueDictionary[int, BatchRing] = weakref.WeakValueDictionary()


class BatchRing:
    """Fixed-size slots of anonymous shared memory for batches built in forked loader workers.

    Pages are taken only as slots are written; a worker claims the lowest free slot, so only as
    many slots as there are batches in flight are ever touched.

    Args:
        slots: Number of slots: the batches that may be in flight at once (the workers'
            prefetched ones, those the pin-memory thread and the training loop hold).
        slot_bytes: Bytes per slot: the largest batch to carry (rounded up to 64).
    """

    def __init__(self, slots: int, slot_bytes: int) -> None:
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"a batch ring needs slots >= 1 and slot_bytes >= 1, got "
                             f"{slots} and {slot_bytes}")
        self.slots, self.slot_bytes = int(slots), aligned(slot_bytes)
        self._data = anonymous_shared(self.slots * self.slot_bytes)
        self._table = anonymous_shared(self.slots)
        self._busy = np.ndarray((self.slots,), np.uint8, buffer=self._table)
        self._lock = fork_lock()
        self.token = next(_TOKENS)
        _RINGS[self.token] = self

    def __reduce__(self) -> tuple[Any, ...]:
        return _detached, ()  # a spawned worker: no slots, batches go the ordinary way

    def claim(self) -> int | None:
        """A free slot, now claimed; None when every slot is in use."""
        if not self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            return None
        try:
            free = np.flatnonzero(self._busy == 0)
            if not free.size:
                return None
            slot = int(free[0])
            self._busy[slot] = 1
            return slot
        finally:
            self._lock.release()

    def release(self, slot: int) -> None:
        """Free ``slot`` (its batch has been copied out, or its tensors are gone)."""
        if self._lock.acquire(timeout=LOCK_TIMEOUT_S):
            try:
                self._busy[slot] = 0
            finally:
                self._lock.release()

    @property
    def in_use(self) -> int:
        """Slots claimed now (in all processes)."""
        return int(np.count_nonzero(self._busy))

    def _slot_bytes_tensor(self, slot: int) -> torch.Tensor:
        """The slot's bytes as a uint8 tensor (no copy)."""
        return torch.frombuffer(self._data, dtype=torch.uint8, count=self.slot_bytes,
                                offset=slot * self.slot_bytes)


def _detached() -> None:
    return None


class SlotArena:
    """One claimed slot, filled front to back by a worker's collate function.

    Args:
        ring: The ring.
        slot: A slot claimed from it.
    """

    def __init__(self, ring: BatchRing, slot: int) -> None:
        self.ring, self.slot = ring, slot
        self._bytes = ring._slot_bytes_tensor(slot)
        self._used = 0
        #: ``(tensor, offset, nbytes)`` of each tensor handed out.
        self._tensors: list[tuple[torch.Tensor, int, int]] = []

    def empty(self, dtype: torch.dtype, shape: tuple[int, ...],
              channels_last: bool = False) -> torch.Tensor | None:
        """An uninitialised tensor in the slot (a 4-D one laid out channels-last if asked), or
        None when the slot has no room left for it."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        offset = self._used
        if offset + nbytes > self.ring.slot_bytes:
            return None
        self._used = aligned(offset + nbytes)
        flat = self._bytes[offset:offset + nbytes].view(dtype)
        if channels_last and len(shape) == 4:
            n, c, h, w = shape
            tensor = flat.view(n, h, w, c).permute(0, 3, 1, 2)
        else:
            tensor = flat.view(shape)
        self._tensors.append((tensor, offset, nbytes))
        return tensor

    def batch(self, out: Mapping[str, Any]) -> RingBatch | Mapping[str, Any]:
        """What the worker sends for the collated ``out``: a :class:`RingBatch` naming the
        slot's tensors among its values, or ``out`` itself (the slot freed) if none is."""
        layout: dict[str, tuple[int, int, torch.dtype, tuple[int, ...], tuple[int, ...]]] = {}
        rest: dict[str, Any] = {}
        for key, value in out.items():
            found = next(((off, nbytes) for t, off, nbytes in self._tensors if t is value), None)
            if found is None:
                rest[key] = value
            else:
                layout[key] = (*found, value.dtype, tuple(value.shape), tuple(value.stride()))
        if not layout:
            self.abandon()
            return out
        return RingBatch(self.ring.token, self.slot, layout, rest)

    def abandon(self) -> None:
        """Free the slot unused (the collate function failed or used none of it)."""
        self.ring.release(self.slot)


class RingBatch:
    """A batch whose tensors lie in a :class:`BatchRing` slot, as the main process receives it.

    Made in a worker by :meth:`SlotArena.batch`; unpickled in the main process, it owns the
    slot: :meth:`materialize` or :meth:`pin_memory` turn it into the batch dict, and one dropped
    without either (a reset iterator's prefetched batches) frees the slot.
    """

    def __init__(self, token: int, slot: int,
                 layout: Mapping[str, tuple[int, int, torch.dtype, tuple[int, ...],
                                            tuple[int, ...]]],
                 rest: Mapping[str, Any], owner: bool = False) -> None:
        self.token, self.slot, self.layout, self.rest = token, slot, dict(layout), dict(rest)
        self._owner = owner

    def __reduce__(self) -> tuple[Any, ...]:
        return _received, (self.token, self.slot, self.layout, self.rest)

    def _ring(self) -> BatchRing:
        ring = _RINGS.get(self.token)
        if ring is None:
            raise RuntimeError("a loader worker sent a batch in a shared slot, but this process "
                               "has no such slot ring (the loader was not made here)")
        return ring

    def _views(self, flat: torch.Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, (offset, nbytes, dtype, size, stride) in self.layout.items():
            out[key] = flat[offset:offset + nbytes].view(dtype).as_strided(size, stride)
        out.update(self.rest)
        return out

    def materialize(self) -> dict[str, Any]:
        """The batch as tensors over the slot (no copy); the slot is freed once none of them
        (nor any view of them) is left."""
        ring = self._ring()
        self._owner = False
        array = np.frombuffer(ring._data, np.uint8, count=ring.slot_bytes,
                              offset=self.slot * ring.slot_bytes)
        weakref.finalize(array, ring.release, self.slot)
        return self._views(torch.from_numpy(array))

    def copy_out(self, copy: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """The batch with each slot tensor replaced by ``copy(tensor)``; the slot is freed as
        soon as they are made."""
        ring = self._ring()
        self._owner = False
        try:
            views = self._views(ring._slot_bytes_tensor(self.slot))
            return {key: copy(value) if key in self.layout else value
                    for key, value in views.items()}
        finally:
            ring.release(self.slot)

    def pin_memory(self, device: Any = None) -> dict[str, Any]:
        """The batch in pinned memory (what the DataLoader's pin-memory thread asks for)."""
        return self.copy_out(lambda tensor: tensor.pin_memory())

    def __del__(self) -> None:
        if self._owner:
            try:
                ring = _RINGS.get(self.token)
                if ring is not None:
                    ring.release(self.slot)
            except Exception:  # noqa: BLE001 - at interpreter exit the modules may be gone
                pass


def _received(token: int, slot: int, layout: Mapping[str, Any],
              rest: Mapping[str, Any]) -> RingBatch:
    return RingBatch(token, slot, layout, rest, owner=True)


def as_batch(batch: Any) -> Any:
    """``batch``, or the tensors of a :class:`RingBatch` (see :meth:`RingBatch.materialize`)."""
    return batch.materialize() if isinstance(batch, RingBatch) else batch
