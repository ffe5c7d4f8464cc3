"""Memory shared with DataLoader workers by inheritance: anonymous mappings made before the
workers are forked (no ``/dev/shm`` file, whose size containers often cap), and a lock that
never hangs a process for long.

Used by the decoded-pair cache (:mod:`segpipe.data.cache`) and the batch slots
(:mod:`segpipe.data.batchring`).
"""

from __future__ import annotations

import mmap
import multiprocessing
from typing import Any

__all__ = ["ALIGN", "LOCK_TIMEOUT_S", "aligned", "anonymous_shared", "fork_lock"]

#: Alignment of the arrays placed in a mapping (a cache line; enough for every dtype).
ALIGN = 64
#: How long a process waits for a table's lock (held for microseconds) before it does without
#: the shared memory for that item: a holder killed mid-way must not hang the others.
LOCK_TIMEOUT_S = 1.0


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to :data:`ALIGN`."""
    return -(-int(nbytes) // ALIGN) * ALIGN


def anonymous_shared(nbytes: int) -> mmap.mmap:
    """A zero-filled mapping of ``nbytes`` (at least 1) shared with the processes forked after
    it is made; pages are taken only as they are written.

    Raises:
        OSError: The system refuses the mapping (e.g. strict overcommit).
    """
    return mmap.mmap(-1, max(int(nbytes), 1), flags=mmap.MAP_SHARED)


def fork_lock() -> Any:
    """A lock that processes forked from this one share (made without fixing the default start
    method)."""
    return multiprocessing.get_context("fork").Lock()
