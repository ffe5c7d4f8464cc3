"""Loading for training and evaluation: worker defaults, samplers and the resumable loader.

* :func:`default_num_workers` / :func:`default_cache_mb`: what this machine can spare for
  loading; :func:`workers_fork`: whether the workers can share one decoded-sample cache.
* :class:`EpochSampler`: a training order that is a function of ``(seed, epoch)``, sharded
  over ranks; :class:`ResumableDataLoader` resumes it in the middle of an epoch.
* :class:`UnrepeatedSampler`: every val/test image on exactly one rank; :class:`SlotDataLoader`
  (val/test) and :class:`ResumableDataLoader` turn batches sent in shared slots
  (:mod:`segpipe.data.batchring`) back into batch dicts.
* :func:`seed_worker`: each DataLoader worker's own augmentation stream.
"""

from __future__ import annotations

import atexit
import importlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, DistributedSampler, get_worker_info

from segpipe.data.batchring import as_batch
from segpipe.data.datasets import ItemKey, stable_seed
from segpipe.errors import ConfigError
from segpipe.runtime import available_cpus

__all__ = [
    "EpochSampler",
    "ResumableDataLoader",
    "SlotDataLoader",
    "UnrepeatedSampler",
    "default_cache_mb",
    "default_num_workers",
    "ignore_sigterm",
    "ram_bytes",
    "seed_worker",
    "workers_fork",
]


#: Most loader workers by default: with a GPU, and on a CPU.
MAX_WORKERS_GPU, MAX_WORKERS_CPU = 8, 4


def default_num_workers() -> int:
    """DataLoader workers for this machine: only CPUs that training leaves free, at most 8
    with a GPU and 4 without.

    CPUs are those this process may use (:func:`segpipe.runtime.available_cpus`: the affinity
    mask and a container's CPU quota, not the host's count). With a GPU, ``cpus - 1`` (the main
    process feeds the GPU), at most 8: on an H200 with 16 CPU cores, a U-Net base 64 (batch 16,
    224² crops of 480x360 PNGs) trained at 404 images/s with 4 workers and 550 with 8, against
    1020 for the same network on batches already on the GPU (``scripts/bench_train.py``); the
    workers share one decoded-image cache (:func:`default_cache_mb`). Without one,
    training runs ``torch.get_num_threads()`` compute threads, by default one per core, so a
    worker process can only run by pre-empting one of them, and each pre-emption stalls the
    other threads at the next synchronisation: measured on a 2-core CPU
    (``scripts/bench_train.py``), one worker slowed U-Net training steps by about twice its own
    CPU time, while loading the same batches in the main process between steps cost only their
    CPU time. So on a CPU the default is ``cpus - torch.get_num_threads()`` (0 where training
    uses every core), at most 4.

    Returns:
        Number of worker processes.
    """
    cpus = available_cpus()
    if torch.cuda.is_available():
        return min(MAX_WORKERS_GPU, max(0, cpus - 1))
    return min(MAX_WORKERS_CPU, max(0, cpus - torch.get_num_threads()))


def default_cache_mb(num_workers: int, shared: bool = False) -> float:
    """Decoded-sample cache per dataset: an eighth of the RAM, at most 1 GiB per loading process.

    Args:
        num_workers: DataLoader workers (0 = the main process loads).
        shared: Whether the workers share one cache (:func:`workers_fork`): it gets what they
            would have had together, ``min(RAM / 8, 1 GiB × workers)``. Otherwise each loading
            process gets its share of an eighth of the RAM, at most 1 GiB.

    Returns:
        MiB.
    """
    ram_mb = ram_bytes() / 2**20
    processes = max(1, num_workers)
    if shared:
        return float(min(ram_mb / 8, 1024.0 * processes))
    return float(min(1024.0, ram_mb / 8 / processes))


def ram_bytes() -> int:
    """The machine's physical memory in bytes (8 GiB where it cannot be read)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not POSIX
        return 8 * 2**30


def workers_fork() -> bool:
    """Whether DataLoader workers will be forked from this process (Python's start method,
    as the loaders here do not choose one): what a :class:`~segpipe.data.cache.SharedPairCache`
    needs. Reads the method without fixing it."""
    import multiprocessing

    method = multiprocessing.get_start_method(allow_none=True)
    return (method or multiprocessing.get_all_start_methods()[0]) == "fork"


def _kill_leftover_loader_workers() -> None:
    """At exit: SIGKILL the daemonic child processes still alive that ignore SIGTERM, as the
    loader processes do (:func:`ignore_sigterm`; an iterator that was never shut down).
    multiprocessing's own exit handler, which runs after this one, sends its daemonic
    children SIGTERM and waits for them: the process never ended. (Linux reads a process's
    ignored signals from /proc; where there is none, as on macOS, every daemonic child left is
    killed, as multiprocessing would have ended it.)"""
    import multiprocessing
    import signal

    term = 1 << (signal.SIGTERM - 1)
    for child in multiprocessing.active_children():
        if not child.daemon:
            continue
        try:
            with open(f"/proc/{child.pid}/status", encoding="ascii") as fh:
                ignored = next((int(line.split()[1], 16) for line in fh
                                if line.startswith("SigIgn:")), 0)
        except (OSError, ValueError):
            if os.path.isdir("/proc"):  # gone, or unreadable: left to multiprocessing
                continue
            ignored = term  # no /proc to ask
        if ignored & term:
            if hasattr(signal, "SIGCHLD"):  # torch's handler would report a failed loader
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            child.kill()
            child.join(timeout=10)


# Registered after multiprocessing's exit handler (util registers it on import), so it runs
# before it (atexit runs the last registered first).
importlib.import_module("multiprocessing.util")
atexit.register(_kill_leftover_loader_workers)


def ignore_sigterm(worker_id: int | None = None) -> None:
    """In a loader process (a DataLoader ``worker_init_fn``): leave SIGTERM to the main
    process. A scheduler (SLURM at a time limit, a pre-emption) signals the whole process
    group; a loader process that died of it made the main one fail with "DataLoader worker
    ... killed by signal: Terminated" (exit 1, no last checkpoint) instead of stopping as on
    Ctrl-C, and the main process shuts its loaders down itself.

    Args:
        worker_id: Worker index (unused).
    """
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a leftover one is killed at exit


def seed_worker(worker_id: int, niceness: int = 0) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM left to the main process
    (:func:`ignore_sigterm`), own augmentation random state, lower priority.

    Without reseeding every forked worker would start from the same albumentations generator
    state and produce the same augmentations. The seed is torch's per-worker seed, which follows
    ``lightning.seed_everything``. A positive ``niceness`` lowers the worker's scheduling
    priority, so that on a CPU-only machine loading fills the gaps between the training
    threads' work instead of pre-empting them. (OpenCV's thread count is deliberately not
    touched here: ``cv2.setNumThreads`` in a forked child can deadlock on a lock that a pool
    thread of the parent held at fork time.)

    Args:
        worker_id: Worker index (unused; the seed already includes it).
        niceness: Added to the worker process's nice value (POSIX only; 0 leaves it).
    """
    ignore_sigterm()
    if niceness > 0 and hasattr(os, "nice"):
        os.nice(niceness)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(info.seed)


class EpochSampler(DistributedSampler):
    """Training order that is a function of ``(seed, epoch)`` only, sharded over ranks.

    Each epoch's permutation comes from a generator seeded with ``(seed, epoch)``, never from
    process-global random state, so a run resumed from a checkpoint sees the same order as
    the uninterrupted run. It yields :class:`~segpipe.data.datasets.ItemKey` ``(index, epoch)``
    so the dataset can seed each item's augmentation from ``(seed, epoch, index)``, also in
    persistent DataLoader workers.

    Like :class:`~torch.utils.data.DistributedSampler` (which it subclasses, so Lightning does
    not replace it under DDP), each of ``num_replicas`` ranks takes every ``num_replicas``-th
    index, and the permutation is padded by repeating indices so all ranks step equally often.
    Lightning calls :meth:`set_epoch` before each epoch.

    Args:
        dataset: The data set (only its length is used).
        num_replicas: Number of ranks.
        rank: This rank.
        shuffle: Shuffle (else sequential order).
        seed: Seed of the permutations.
        drop_last: Drop the tail so that the data splits evenly, instead of padding.
        samples_per_epoch: Samples per epoch over all ranks (default: the data set's size).
            More than the data set: whole passes are concatenated, each its own permutation
            (seeded by ``(seed, epoch, pass)``), and every item carries its pass number
            (:attr:`ItemKey.draw`) so repeats are augmented differently; fewer: the first
            ones of the epoch's permutation.
    """

    def __init__(
        self,
        dataset: Any,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        samples_per_epoch: int | None = None,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
            drop_last=drop_last,
        )
        self.samples_per_epoch = None if samples_per_epoch is None else int(samples_per_epoch)
        if self.samples_per_epoch is not None:
            if self.samples_per_epoch < 1:
                raise ConfigError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
            per_rank = (self.samples_per_epoch // self.num_replicas if drop_last
                        else math.ceil(self.samples_per_epoch / self.num_replicas))
            self.num_samples = max(1, per_rank)
            self.total_size = self.num_samples * self.num_replicas
        self._resume: tuple[int, int] | None = None
        #: Epoch and number of leading items skipped by the latest :meth:`__iter__`.
        self.iter_epoch = 0
        self.skipped = 0

    def permutation(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch``, in order (before any resume skip).

        Args:
            epoch: Epoch.

        Returns:
            ``len(self)`` indices.
        """
        return [key.index for key in self.keys(epoch)]

    def keys(self, epoch: int) -> list[ItemKey]:
        """This rank's items of ``epoch`` (index, epoch, pass), in order (before any resume skip).

        Args:
            epoch: Epoch.

        Returns:
            ``len(self)`` keys.
        """
        n = len(self.dataset)
        keys: list[ItemKey] = []
        draw = 0
        while n and len(keys) < self.total_size:  # passes over the data, each its own order
            keys += [ItemKey(i, int(epoch), draw) for i in self._order(epoch, draw, n)]
            draw += 1
            if self.samples_per_epoch is None:
                break
        if self.samples_per_epoch is None and self.total_size > n:  # DistributedSampler's pad
            padding = self.total_size - n
            keys += (keys * math.ceil(padding / max(1, n)))[:padding]
        keys = keys[: self.total_size]
        return keys[self.rank : self.total_size : self.num_replicas]

    def _order(self, epoch: int, draw: int, n: int) -> list[int]:
        """One pass's order of ``range(n)``: a permutation seeded by ``(seed, epoch[, draw])``."""
        if not self.shuffle:
            return list(range(n))
        seed = stable_seed(self.seed, epoch, *([draw] if draw else []))
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()

    def resume(self, epoch: int, items: int) -> None:
        """Skip the first ``items`` indices of ``epoch`` the next time it is iterated.

        Called when training resumes from a mid-epoch checkpoint; ignored when the next
        iteration is of another epoch.

        Args:
            epoch: Epoch the checkpoint was saved in.
            items: Indices already consumed in that epoch.
        """
        self._resume = (int(epoch), max(0, int(items)))

    def __iter__(self) -> Iterator[ItemKey]:  # type: ignore[override]
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        self.iter_epoch, self.skipped = int(self.epoch), skip
        epoch = int(self.epoch)
        return iter(self.keys(epoch)[skip:])


class UnrepeatedSampler(DistributedSampler):
    """Evaluation order: rank ``r`` of ``R`` takes indices ``r, r + R, r + 2R, ...``.

    Unlike :class:`~torch.utils.data.DistributedSampler` it never pads uneven splits with
    repeated samples, so every val/test image is counted exactly once across ranks (ranks may
    get one batch more or less; torchmetrics and ``self.log(sync_dist=True)`` reduce at epoch
    end, which handles that).

    Args:
        dataset: The data set (only its length is used).
        num_replicas: Number of ranks.
        rank: This rank.
    """

    def __init__(self, dataset: Any, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:  # type: ignore[override]
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class SlotDataLoader(DataLoader):
    """DataLoader whose workers may send batches in shared slots
    (:class:`~segpipe.data.batchring.RingBatch`, see :mod:`segpipe.data.batchring`): each is
    turned back into its batch dict as it is taken. Takes the arguments of
    :class:`~torch.utils.data.DataLoader`.

    With ``restart_when_done`` (the data module sets it for validation during ``fit``) and
    persistent workers, the workers start the next pass as soon as a pass's batches run out,
    so that the next validation finds its first batches built during the training epoch
    instead of waiting for them. A pass over the same unshuffled, unaugmented data yields the
    same batches whenever it is loaded; the next ``iter`` takes the pass started ahead.
    """

    #: Start the next pass when one ends (persistent workers only).
    restart_when_done = False
    #: Asked when a pass runs out: whether another pass will come (the data module answers
    #: from the trainer's stopping conditions). None: one is assumed.
    next_pass_expected: Callable[[], bool] | None = None
    #: The next pass's iterator, started when a pass ran out.
    _ahead: Iterator[Any] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead is not self._iterator or getattr(ahead, "_shutdown", False):
            # none started, or its workers were shut down since (Lightning's teardown)
            ahead = super().__iter__()
        return _Materialized(ahead, self)

    def _pass_done(self) -> None:
        """Called when a pass's batches have run out."""
        if not (self.restart_when_done and self.persistent_workers and self.num_workers > 0):
            return
        if self.next_pass_expected is not None and not self.next_pass_expected():
            return
        self._ahead = super().__iter__()  # resets the workers' iterator: they start at once


class _Materialized:
    """A DataLoader iterator whose slot batches come out as batch dicts, and that tells its
    loader when the pass has run out (its last batch taken, or ``StopIteration``)."""

    def __init__(self, iterator: Iterator[Any], loader: SlotDataLoader | None = None) -> None:
        self.iterator = iterator
        self.loader = loader
        self.taken = 0
        self.done = False

    def __iter__(self) -> _Materialized:
        return self

    def __next__(self) -> Any:
        if self.done:  # the iterator may be loading the next pass already
            raise StopIteration
        try:
            batch = as_batch(next(self.iterator))
        except StopIteration:
            self._done()
            raise
        self.taken += 1
        if self.taken >= len(self):
            self._done()
        return batch

    def _done(self) -> None:
        self.done = True
        if self.loader is not None:
            self.loader._pass_done()

    def __len__(self) -> int:
        return len(self.iterator)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # _shutdown_workers and the like
        if name == "iterator":
            raise AttributeError(name)
        return getattr(self.iterator, name)


class ResumableDataLoader(DataLoader):
    """DataLoader that knows its position in the epoch, so training can resume mid-epoch.

    Lightning saves the ``state_dict`` of a loader that has one in every checkpoint and, when
    it resumes from a checkpoint saved in the middle of an epoch, passes it back to
    :meth:`load_state_dict`; the :class:`EpochSampler` then skips the batches already trained
    on. The underlying iterator (and so the sampler's permutation) is created at the first
    batch, after Lightning has set the sampler's epoch: Lightning creates the iterator of a
    resumed run before it calls ``set_epoch``.

    With loader workers, the next epoch starts loading as soon as this epoch's batches run
    out (:meth:`_start_next_epoch`), so that its first batches are ready when it begins instead
    of being built after the last step, the validation and the checkpoint: each epoch had
    waited for its first batch, which one worker builds alone (on a GPU the epochs of under a
    second waited 100-270 ms for batches, the first one's wait part of it). The next epoch's
    order and augmentation are functions of ``(seed, epoch, index)``, so its batches are the
    ones it would have had; an epoch that begins otherwise than foreseen (another epoch, a
    resume) starts afresh.

    Takes the arguments of :class:`~torch.utils.data.DataLoader`; ``sampler`` must be an
    :class:`EpochSampler` for :meth:`load_state_dict` and the early start to take effect.
    """

    _yielded = 0
    #: The next epoch's iterator, started when this epoch's batches ran out.
    _ahead: _Ahead | None = None
    #: Asked when an epoch's batches run out: whether another epoch will be trained (the data
    #: module answers from the trainer's stopping conditions). None: one is assumed.
    next_epoch_expected: Callable[[], bool] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._yielded = 0
        return _LazyIterator(self)

    def _base_iter(self) -> Iterator[Any]:
        ahead, self._ahead = self._ahead, None
        sampler = self.sampler
        if (ahead is not None and isinstance(sampler, EpochSampler) and sampler._resume is None
                and int(sampler.epoch) == ahead.epoch):
            sampler.iter_epoch, sampler.skipped = ahead.epoch, 0
            return ahead.iterator
        # Not the epoch foreseen: with persistent workers this resets the same iterator, whose
        # reset drops the batches loaded ahead; else the one started ahead is shut down with it.
        return super().__iter__()

    def _start_next_epoch(self, finished: Iterator[Any] | None = None) -> None:
        """Start the workers on the next epoch's first batches (``prefetch_factor`` per worker).

        Called when this epoch's batches have run out, with the iterator that yielded them.
        Nothing to gain without workers (the main process loads when asked) or without an
        :class:`EpochSampler` (whose next order is known now), nor when no next epoch is
        expected. :meth:`state_dict` still describes the epoch that ran out until the next one
        begins.
        """
        sampler = self.sampler
        if self.num_workers == 0 or not isinstance(sampler, EpochSampler):
            return
        if self.next_epoch_expected is not None and not self.next_epoch_expected():
            return
        epoch, position = int(sampler.epoch), (sampler.iter_epoch, sampler.skipped)
        shutdown = getattr(finished, "_shutdown_workers", None)
        if not self.persistent_workers and shutdown is not None:
            shutdown()  # its workers are done; the next epoch's start new ones
        sampler.set_epoch(epoch + 1)
        try:  # the sampler is read here: the workers get the first indices at once
            iterator = super().__iter__()
        finally:
            sampler.set_epoch(epoch)  # Lightning sets the next epoch when it begins
            sampler.iter_epoch, sampler.skipped = position
        self._ahead = _Ahead(epoch + 1, iterator)

    def state_dict(self) -> dict[str, int]:
        """Position in the epoch: ``{"epoch", "batches", "batch_size"}`` (batches already
        yielded, of that size)."""
        sampler = self.sampler
        batch_size = max(1, int(self.batch_size or 1))
        if not isinstance(sampler, EpochSampler):
            return {"epoch": 0, "batches": 0, "batch_size": batch_size}
        return {"epoch": sampler.iter_epoch,
                "batches": sampler.skipped // batch_size + self._yielded,
                "batch_size": batch_size}

    def load_state_dict(self, state_dict: Mapping[str, int]) -> None:
        """Skip the batches that ``state_dict`` says were trained on when that epoch resumes.

        Args:
            state_dict: From :meth:`state_dict`.

        Raises:
            ConfigError: The checkpoint is from the middle of an epoch trained with another
                ``data.batch_size`` (Lightning counts the epoch's batches in the saved size:
                the resumed epoch would skip samples never trained on, or train some twice).
        """
        if not isinstance(self.sampler, EpochSampler):
            return
        batch_size = max(1, int(self.batch_size or 1))
        batches = int(state_dict.get("batches", 0))
        saved = int(state_dict.get("batch_size", batch_size))
        per_epoch = (len(self.sampler) // saved if self.drop_last
                     else math.ceil(len(self.sampler) / saved))
        if saved != batch_size and 0 < batches < per_epoch:
            raise ConfigError(
                f"the checkpoint is from the middle of an epoch trained with data.batch_size "
                f"{saved} (after {batches} batches), and this run has {batch_size}: the epoch "
                f"would skip samples or train some twice. Resume with --data.batch_size {saved}, "
                "or from a checkpoint saved at an epoch's end")
        self.sampler.resume(int(state_dict.get("epoch", 0)), batches * batch_size)


class _Ahead(NamedTuple):
    """An iterator started before its epoch began (:meth:`ResumableDataLoader._start_next_epoch`)."""

    epoch: int
    iterator: Iterator[Any]


class _LazyIterator:
    """Creates the DataLoader iterator at the first ``next``, counts the batches, and starts
    the next epoch's loading when they run out: at the epoch's last batch (Lightning stops
    at the loader's length and never asks for more), or at ``StopIteration``."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.iterator: Iterator[Any] | None = None
        self.finished = False

    def __iter__(self) -> _LazyIterator:
        return self

    def __next__(self) -> Any:
        if self.finished:  # the base iterator may be loading the next epoch already
            raise StopIteration
        if self.iterator is None:
            self.iterator = self.loader._base_iter()
            self.length = len(self.loader)
        try:
            batch = as_batch(next(self.iterator))
        except StopIteration:
            self._finish()
            raise
        self.loader._yielded += 1
        if self.loader.state_dict()["batches"] >= self.length:
            self._finish()
        return batch

    def _finish(self) -> None:
        self.finished = True
        try:
            self.loader._start_next_epoch(self.iterator)
        except Exception:  # noqa: BLE001 - the next epoch's own start reports it
            self.loader._ahead = None
