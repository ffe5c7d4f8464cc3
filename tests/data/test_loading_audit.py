"""Training/evaluation order behaviour found untested by a mutation audit: resume bookkeeping,
sharding without samples_per_epoch, evaluation sharding and per-worker seeds."""

from __future__ import annotations

import types

import pytest
import torch

from segpipe.data.datasets import ItemKey
from segpipe.data.loading import EpochSampler, ResumableDataLoader, UnrepeatedSampler


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: ItemKey) -> int:
        return key.index


def _loader(n: int = 12, batch_size: int = 2, epoch: int = 1) -> ResumableDataLoader:
    sampler = EpochSampler(_Indices(n), seed=0, shuffle=True)
    sampler.set_epoch(epoch)
    return ResumableDataLoader(_Indices(n), batch_size=batch_size, sampler=sampler,
                               drop_last=True)


def test_a_resume_saved_for_one_epoch_does_not_skip_into_another() -> None:
    """A mid-epoch position of epoch 2 is not applied when the next iteration is of
    epoch 3 (it trains the whole of epoch 3)."""
    sampler = EpochSampler(list(range(10)), seed=0)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.resume(2, 4)
    sampler.set_epoch(3)
    assert list(sampler) == full and sampler.skipped == 0


def test_a_twice_resumed_epoch_reports_its_whole_position() -> None:
    """After resuming mid-epoch, the loader's saved position counts the skipped batches plus
    the ones it yielded since, so a checkpoint of a resumed run resumes at the right batch."""
    first = _loader()
    it = iter(first)
    for _ in range(2):
        next(it)
    resumed = _loader()
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    next(it)
    assert resumed.state_dict() == {"epoch": 1, "batches": 3, "batch_size": 2}
    again = _loader()
    again.load_state_dict(resumed.state_dict())
    rest = [i for batch in again for i in batch.tolist()]
    assert rest == EpochSampler(list(range(12)), seed=0).permutation(1)[6:]


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (5, 4)])
def test_ranks_share_every_training_index_and_step_equally(n: int, world: int) -> None:
    """Without samples_per_epoch each rank gets ceil(n / world) indices and together they
    cover every index (the shortfall padded with repeats, as DistributedSampler does)."""
    ranks = [EpochSampler(list(range(n)), num_replicas=world, rank=r, seed=0)
             for r in range(world)]
    per_rank = [s.permutation(0) for s in ranks]
    assert all(len(p) == -(-n // world) == len(s) for p, s in zip(per_rank, ranks))
    assert set().union(*map(set, per_rank)) == set(range(n))


@pytest.mark.parametrize("n,world", [(10, 3), (2, 2), (7, 4)])
def test_evaluation_ranks_score_each_image_exactly_once(n: int, world: int) -> None:
    """The evaluation sampler gives every index to exactly one rank, no repeats."""
    seen = [i for r in range(world)
            for i in UnrepeatedSampler(list(range(n)), num_replicas=world, rank=r)]
    assert sorted(seen) == list(range(n))
    assert sum(len(UnrepeatedSampler(list(range(n)), num_replicas=world, rank=r))
               for r in range(world)) == n


def test_each_loader_worker_reseeds_its_dataset_with_its_own_seed(monkeypatch) -> None:
    """seed_worker reseeds the worker's dataset copy with torch's per-worker seed, so two
    workers do not draw the same augmentations."""
    import segpipe.data.loading as loading

    got = []
    dataset = types.SimpleNamespace(reseed=got.append)
    monkeypatch.setattr(loading, "ignore_sigterm", lambda *a: None)
    for worker, seed in ((0, 1234), (1, 98765)):
        monkeypatch.setattr(loading, "get_worker_info",
                            lambda s=seed: types.SimpleNamespace(seed=s, dataset=dataset))
        loading.seed_worker(worker)
    assert got == [1234, 98765]
