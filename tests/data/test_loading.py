"""Training order: EpochSampler's passes (``data.samples_per_epoch``), sharding and resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from segpipe.data import SegmentationDataModule
from segpipe.data.datasets import ItemKey, item_seed
from segpipe.data.loading import EpochSampler
from tests.data.synthetic import make_folder_dataset


def _sampler(n: int, **kw) -> EpochSampler:
    return EpochSampler(list(range(n)), **kw)


def test_one_pass_is_the_seeded_permutation() -> None:
    """Without samples_per_epoch the order is what it always was: one permutation per epoch."""
    seed, epoch = 3, 7
    torch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(torch_seed)).tolist()
    assert _sampler(10, seed=seed).permutation(epoch) == expected
    assert _sampler(10, seed=seed, samples_per_epoch=10).permutation(epoch) == expected
    assert all(k.draw == 0 for k in _sampler(10, seed=seed).keys(epoch))


def test_more_samples_than_images_come_in_whole_passes() -> None:
    sampler = _sampler(10, seed=0, samples_per_epoch=25)
    keys = sampler.keys(4)
    assert len(sampler) == len(keys) == 25
    assert sorted(k.index for k in keys[:10]) == list(range(10))  # pass 0: every image once
    assert sorted(k.index for k in keys[10:20]) == list(range(10))  # pass 1: again
    assert [k.draw for k in keys] == [0] * 10 + [1] * 10 + [2] * 5
    assert [k.index for k in keys[:10]] != [k.index for k in keys[10:20]]  # its own order
    counts = Counter(k.index for k in keys)
    assert set(counts.values()) <= {2, 3}
    assert keys == sampler.keys(4)  # a function of (seed, epoch)
    assert keys != sampler.keys(5)


def test_fewer_samples_than_images_take_the_head_of_the_permutation() -> None:
    full = _sampler(10, seed=1).permutation(2)
    assert _sampler(10, seed=1, samples_per_epoch=4).permutation(2) == full[:4]


def test_passes_are_sharded_over_ranks() -> None:
    ranks = [_sampler(10, seed=0, samples_per_epoch=25, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(s) for s in ranks] == [13, 13]  # 25 rounded up so both ranks step equally
    keys = [s.keys(0) for s in ranks]
    single = _sampler(10, seed=0, samples_per_epoch=26).keys(0)
    assert keys[0] == single[0::2] and keys[1] == single[1::2]
    dropped = _sampler(10, seed=0, samples_per_epoch=25, num_replicas=2, rank=0, drop_last=True)
    assert len(dropped) == 12


def test_resume_skips_into_a_later_pass() -> None:
    sampler = _sampler(6, seed=0, samples_per_epoch=15)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.resume(2, 8)
    assert list(sampler) == full[8:] and sampler.skipped == 8


def test_invalid_samples_per_epoch() -> None:
    with pytest.raises(ValueError, match="samples_per_epoch must be >= 1"):
        _sampler(4, samples_per_epoch=0)


def test_a_repeated_image_is_augmented_differently() -> None:
    """The pass number enters the augmentation seed; pass 0 keeps the seeds of before."""
    assert item_seed(0, 3, 5) == int(np.random.SeedSequence([0, 3, 5]).generate_state(1)[0])
    assert item_seed(0, 3, 5, draw=0) == item_seed(0, 3, 5)
    assert item_seed(0, 3, 5, draw=1) != item_seed(0, 3, 5)


def test_datamodule_epoch_length_follows_samples_per_epoch(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=5, n_val=2, n_test=0, size=(32, 32),
                               num_classes=2)
    dm = SegmentationDataModule(str(root), num_classes=2, batch_size=2, samples_per_epoch=12,
                                crop_size=16, num_workers=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 6
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 6 and all(b["image"].shape == (2, 3, 16, 16) for b in batches)
    paths = Counter(p for b in batches for p in b["path"])
    assert sum(paths.values()) == 12 and len(paths) == 5
    # The same image in two passes of one epoch gets two different crops.
    seen: dict[str, torch.Tensor] = {}
    differs = False
    for b in batches:
        for path, image in zip(b["path"], b["image"]):
            if path in seen:
                differs |= not torch.equal(seen[path], image)
            seen[path] = image
    assert differs
    assert isinstance(loader.sampler.keys(0)[0], ItemKey)
    with pytest.raises(ValueError, match=r"samples_per_epoch must be >= data.batch_size \(2\)"):
        SegmentationDataModule(str(root), num_classes=2, batch_size=2, samples_per_epoch=1)


# ------------------------------------------------------------------ uint8 batches
def test_uint8_batch_normalisation_matches_loading_time_normalisation() -> None:
    from segpipe.data.transforms import normalize_to_tensor, normalize_uint8_batch

    rng = np.random.default_rng(0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    images = rng.integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    expected = torch.stack([normalize_to_tensor(im, mean, std) for im in images])
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)  # channels-last memory, as collated
    out = normalize_uint8_batch(batch, mean, std)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 20, 24)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="3 channel"):
        normalize_uint8_batch(batch, [0.5], [0.2])


def _batches(root: Path, uint8: bool, masks: list[torch.dtype] | None = None,
             **kw) -> tuple[list[dict], list[torch.dtype]]:
    """The data module's train and val batches after ``on_after_batch_transfer``, and their
    image dtypes before it (with ``masks``, their mask dtypes before it are appended there)."""
    dm = SegmentationDataModule(str(root), num_classes=2, batch_size=3, eval_batch_size=3,
                                crop_size=16, num_workers=0, uint8_batches=uint8, **kw)
    dm.setup("fit")
    train = dm.train_dataloader()
    train.sampler.set_epoch(1)
    out = [*train, *dm.val_dataloader()]
    if masks is not None:
        masks.extend(b["mask"].dtype for b in out)
    return [dm.on_after_batch_transfer(dict(b), 0) for b in out], [b["image"].dtype for b in out]


def test_uint8_batches_reach_the_task_as_the_float_batches_do(tmp_path: Path) -> None:
    """8-bit images cross to the device as uint8 (a quarter of the bytes) and the data module
    normalises them there: the task sees the same batches as with loading-time normalisation."""
    root = make_folder_dataset(tmp_path / "ds", n_train=6, n_val=3, n_test=0, size=(24, 28),
                               num_classes=2)
    int64_masks: list[torch.dtype] = []
    uint8_masks: list[torch.dtype] = []
    floats, float_types = _batches(root, uint8=False, masks=int64_masks)
    uint8s, uint8_types = _batches(root, uint8=True, masks=uint8_masks)
    assert set(float_types) == {torch.float32} and set(uint8_types) == {torch.uint8}
    # masks cross as uint8 too (an eighth of int64's bytes), and reach the task as int64
    assert set(int64_masks) == {torch.int64} and set(uint8_masks) == {torch.uint8}
    assert len(floats) == len(uint8s)
    for a, b in zip(floats, uint8s):
        assert a["path"] == b["path"] and torch.equal(a["mask"], b["mask"])
        assert b["image"].dtype == torch.float32 and b["mask"].dtype == torch.int64
        torch.testing.assert_close(b["image"], a["image"], rtol=0, atol=1e-5)


def test_uint8_masks_only_where_the_ignore_index_fits(tmp_path: Path) -> None:
    """An ignore index outside 0-255 would pad uint8 masks with a wrapped value: they stay
    int64 then; a batch mixing uint8 and int64 masks is collated as int64, nothing truncated."""
    from segpipe.data.collate import PadCollate

    root = make_folder_dataset(tmp_path / "ds", n_train=6, n_val=3, n_test=0, size=(24, 28),
                               num_classes=2)
    masks: list[torch.dtype] = []
    _batches(root, uint8=True, masks=masks, ignore_index=-1)
    assert set(masks) == {torch.int64}
    small = {"image": torch.zeros(1, 4, 4), "mask": torch.ones(4, 4, dtype=torch.uint8)}
    large = {"image": torch.zeros(1, 4, 6), "mask": torch.full((4, 6), 300, dtype=torch.int64)}
    batch = PadCollate(ignore_index=-1)([small, large])
    assert batch["mask"].dtype == torch.int64
    assert batch["mask"][0, :, :4].eq(1).all() and batch["mask"][0, :, 4:].eq(-1).all()
    assert batch["mask"][1].eq(300).all()


def test_a_batch_mixing_8_bit_and_converted_images_is_normalised_while_loading(
        tmp_path: Path) -> None:
    """A grayscale file among RGB ones is converted (float32); the batch is then all float32."""
    from segpipe.data.io import write_image

    root = make_folder_dataset(tmp_path / "ds", n_train=3, n_val=2, n_test=0, size=(24, 28),
                               num_classes=2)  # one training batch of all three
    first = sorted((root / "train" / "images").iterdir())[0]
    gray = np.full((24, 28), 77, np.uint8)
    first.unlink()
    write_image(first.with_suffix(".png"), gray)
    floats, _ = _batches(root, uint8=False)
    mixed, types = _batches(root, uint8=True)
    assert torch.float32 in types  # the mixed training batch was normalised while loading
    for a, b in zip(floats, mixed):
        torch.testing.assert_close(b["image"], a["image"], rtol=0, atol=1e-5)


def test_fit_with_uint8_batches_trains_as_with_float_batches(tmp_path: Path) -> None:
    """Through Lightning: the data module's on_after_batch_transfer normalises the uint8 batches,
    so the task sees the same numbers (same seed: the same first losses, to float rounding)."""
    import lightning.pytorch as L

    from segpipe.lightning_cli import run_cli
    from tests.cli_args import TINY_UNET

    class FirstLosses(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.dtypes: set[torch.dtype] = set()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.dtypes.add(batch["image"].dtype)
            if trainer.current_epoch == 0:
                self.losses.append(float(outputs["loss"]))

    root = make_folder_dataset(tmp_path / "ds", n_train=8, n_val=2, n_test=0, size=(40, 40),
                               num_classes=3)
    seen = {}
    for uint8 in (False, True):
        probe = FirstLosses()
        args = [f"--data.root={root}", f"--trainer.default_root_dir={tmp_path / str(uint8)}",
                "--trainer.max_epochs=1", "--data.num_workers=0", "--trainer.precision=32-true",
                f"--data.uint8_batches={str(uint8).lower()}", *TINY_UNET]
        cli = run_cli(["fit", *args], callbacks=[probe])
        assert cli.datamodule.datasets["train"].uint8_images is uint8
        assert probe.dtypes == {torch.float32}  # the task always gets normalised float32
        seen[uint8] = probe.losses
    assert len(seen[True]) == 2
    assert seen[True] == pytest.approx(seen[False], rel=1e-4)


def test_a_mid_epoch_resume_with_another_batch_size_is_refused() -> None:
    """The position was saved in batches and multiplied by the new batch size, and Lightning
    counts the resumed epoch's batches in the saved size: samples never trained on in that
    epoch were skipped (or some trained twice)."""
    from segpipe.data.loading import ResumableDataLoader
    from segpipe.errors import ConfigError

    class Indices(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, key: ItemKey) -> int:
            return key.index

    def loader(batch_size: int) -> ResumableDataLoader:
        sampler = EpochSampler(Indices(), seed=0, shuffle=True)
        sampler.set_epoch(1)
        return ResumableDataLoader(Indices(), batch_size=batch_size, sampler=sampler,
                                   drop_last=True)

    first = loader(2)
    batches = iter(first)
    trained = [i for _ in range(3) for i in next(batches).tolist()]  # 3 batches of 2
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 3, "batch_size": 2}
    with pytest.raises(ConfigError, match=r"middle of an epoch trained with data.batch_size 2 "
                                          r"\(after 3 batches\), and this run has 4"):
        loader(4).load_state_dict(state)
    resumed = loader(2)
    resumed.load_state_dict(state)
    rest = [i for batch in resumed for i in batch.tolist()]
    assert trained + rest == _sampler(12, seed=0).permutation(1)  # each sample once, in order
    # at an epoch's end (all 6 batches), the next epoch may take another batch size
    loader(4).load_state_dict({"epoch": 1, "batches": 6, "batch_size": 2})
    loader(4).load_state_dict({"epoch": 1, "batches": 3})  # older checkpoints: no size saved


class _SigtermState(torch.utils.data.Dataset):
    """One item: whether SIGTERM is ignored in the process that loads it."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> bool:
        import signal

        return signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


@pytest.mark.parametrize("stage", ["train", "val"])
def test_loader_workers_leave_sigterm_to_the_main_process(tmp_path: Path, stage: str) -> None:
    """A scheduler signals the whole process group: a training loader process died of SIGTERM,
    and the fit failed with a traceback (exit 1, no last checkpoint) where it stops with 143
    when the main process alone is signalled (predict's loaders already ignored it)."""
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=0, size=(16, 16))
    dm = SegmentationDataModule(str(root), num_classes=3, num_workers=1, batch_size=2)
    dm.setup("fit")
    loader = dm.train_dataloader() if stage == "train" else dm.val_dataloader()
    probe = torch.utils.data.DataLoader(_SigtermState(), num_workers=1,
                                        worker_init_fn=loader.worker_init_fn)
    assert next(iter(probe)).item() is True


@pytest.mark.parametrize("proc", [True, False], ids=["linux", "no-proc"])
def test_a_leftover_loader_worker_does_not_hang_the_exit(proc: bool) -> None:
    """Loader processes ignore SIGTERM; multiprocessing ends the ones left running at exit
    (an iterator never shut down) with SIGTERM and waits for them: the process never ended
    (the test suite hung at its end). Without /proc (macOS) it still hung."""
    import subprocess
    import sys

    no_proc = (
        "import builtins, os\n"
        "_open, _isdir = builtins.open, os.path.isdir\n"
        "def _no_proc(path, *a, **k):\n"
        "    if str(path).startswith('/proc'):\n"
        "        raise FileNotFoundError(2, 'No such file or directory', str(path))\n"
        "    return _open(path, *a, **k)\n"
        "builtins.open = _no_proc\n"
        "os.path.isdir = lambda p: False if str(p) == '/proc' else _isdir(p)\n"
    )
    script = ("" if proc else no_proc) + (
        "import torch\n"
        "from segpipe.data.loading import ignore_sigterm\n"
        "loader = torch.utils.data.DataLoader(list(range(100)), num_workers=1,\n"
        "                                     worker_init_fn=ignore_sigterm)\n"
        "it = iter(loader)\n"
        "next(it)\n"
        "KEEP = [it]  # never shut down\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# ------------------------------------------------------------------ the next epoch loads early
class _Keys(torch.utils.data.Dataset):
    """Items that say which epoch and index they were loaded for."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key: ItemKey) -> torch.Tensor:
        return torch.tensor([key.epoch, key.index])


def _workers_loader(persistent: bool = True, expected: bool | None = None):
    from segpipe.data.loading import ResumableDataLoader

    sampler = EpochSampler(_Keys(), seed=3)
    loader = ResumableDataLoader(_Keys(), sampler=sampler, batch_size=3, drop_last=True,
                                 num_workers=2, persistent_workers=persistent)
    if expected is not None:
        loader.next_epoch_expected = lambda: expected
    return loader


def _epoch(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [row.tolist() for batch in loader for row in batch]


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-epoch-workers"])
def test_the_next_epoch_starts_loading_when_an_epoch_runs_out(monkeypatch, persistent) -> None:
    """Each epoch waited for its first batch, built by one worker after the last step, the
    validation and the checkpoint. Now the workers start on the next epoch when this one's
    batches run out, the loader still describes the epoch that ran out (a checkpoint written
    then resumes it as before), and the next epoch takes what they loaded: the same batches
    as loading it when it begins, without starting its iterator again."""
    from torch.utils.data import DataLoader

    starts = []
    base_iter = DataLoader.__iter__

    def counted(self):  # noqa: ANN001, ANN202
        starts.append(int(self.sampler.epoch))
        return base_iter(self)

    monkeypatch.setattr(DataLoader, "__iter__", counted)
    loader = _workers_loader(persistent)
    first = _epoch(loader, 0)
    assert loader._ahead is not None and loader._ahead.epoch == 1 and starts == [0, 1]
    assert loader.state_dict() == {"epoch": 0, "batches": 3, "batch_size": 3}
    assert loader.sampler.epoch == 0  # Lightning sets the next one when it begins
    second = _epoch(loader, 1)
    assert starts == [0, 1, 2]  # epoch 1 was not started again; epoch 2 is loading now
    assert loader.state_dict() == {"epoch": 1, "batches": 3, "batch_size": 3}

    plain = _workers_loader(persistent, expected=False)
    assert _epoch(plain, 0) == first and _epoch(plain, 1) == second
    assert plain._ahead is None
    assert {e for e, _ in second} == {1} and len(second) == 9
    assert [i for _, i in second] == plain.sampler.permutation(1)[:9]


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-epoch-workers"])
def test_an_epoch_not_foreseen_drops_what_was_loaded_ahead(persistent) -> None:
    """Loaded for epoch 1, begun as epoch 4 (or resumed mid-epoch): epoch 4's own batches,
    none of epoch 1's left in the workers' queues."""
    loader = _workers_loader(persistent)
    _epoch(loader, 0)
    assert loader._ahead is not None and loader._ahead.epoch == 1
    fourth = _epoch(loader, 4)
    assert {e for e, _ in fourth} == {4}
    assert [i for _, i in fourth] == loader.sampler.permutation(4)[:9]

    loader.sampler.set_epoch(5)
    batches = iter(loader)
    trained = [row[1] for row in next(batches).tolist()]
    state = loader.state_dict()
    list(batches)  # epoch 5 runs out: epoch 6 starts loading
    assert loader._ahead is not None and loader._ahead.epoch == 6
    loader.load_state_dict(state)  # a resume into epoch 5, after one batch
    loader.sampler.set_epoch(5)
    rest = [row[1] for batch in loader for row in batch.tolist()]
    assert trained + rest == loader.sampler.permutation(5)[:9]


def test_no_early_start_without_a_next_epoch_or_without_workers() -> None:
    loader = _workers_loader(expected=False)
    _epoch(loader, 0)
    assert loader._ahead is None
    from segpipe.data.loading import ResumableDataLoader

    main_process = ResumableDataLoader(_Keys(), sampler=EpochSampler(_Keys()), batch_size=5)
    _epoch(main_process, 0)
    assert main_process._ahead is None


def test_fit_with_workers_loads_each_next_epoch_early_and_trains_the_same(tmp_path: Path,
                                                                          monkeypatch) -> None:
    """Through Lightning, with 2 loader workers: each epoch but the first begins with the batches
    its workers loaded while the previous one ended, none is loaded for an epoch after the
    last, and the weights are those of loading each epoch when it begins."""
    import lightning.pytorch as L

    from tests.cli_args import fit_with_workers

    class Ahead(L.Callback):
        def __init__(self) -> None:
            self.at_start: list[int | None] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            ahead = trainer.train_dataloader._ahead
            self.at_start.append(None if ahead is None else ahead.epoch)

    root = make_folder_dataset(tmp_path / "ds", n_train=8, n_val=2, n_test=0, size=(40, 40),
                               num_classes=3)
    weights = {}
    for early in (True, False):
        if not early:
            monkeypatch.setattr(SegmentationDataModule, "_next_epoch_expected", lambda self: False)
        probe = Ahead()
        cli = fit_with_workers(root, tmp_path / str(early), 3, [probe])
        assert probe.at_start == ([None, 1, 2] if early else [None, None, None])
        assert cli.trainer.train_dataloader._ahead is None  # nothing for a 4th epoch
        weights[early] = cli.model.state_dict()
    for name, value in weights[True].items():
        assert torch.equal(value, weights[False][name]), name


def test_fit_starts_each_next_validation_when_one_ends_and_scores_the_same(tmp_path: Path,
                                                                          monkeypatch) -> None:
    """Through Lightning, with 2 persistent loader workers: each validation after the first
    begins with the pass its workers started when the previous one ended, none is started
    after the last one (nor after the sanity check), and every epoch's val loss equals that of
    loading each validation when it begins."""
    import lightning.pytorch as L

    from segpipe.data.loading import SlotDataLoader
    from tests.cli_args import fit_with_workers

    class Scores(L.Callback):
        def __init__(self) -> None:
            self.scores: list[float] = []

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                self.scores.append(float(trainer.callback_metrics["val/loss"]))

    adopted: list[bool] = []
    plain_iter = SlotDataLoader.__iter__

    def recording_iter(self):
        adopted.append(self._ahead is not None and self._ahead is self._iterator)
        return plain_iter(self)

    monkeypatch.setattr(SlotDataLoader, "__iter__", recording_iter)
    # 6 val images in batches of 4: the sanity check's 2 batches take the whole pass
    root = make_folder_dataset(tmp_path / "ds", n_train=8, n_val=6, n_test=0, size=(40, 40),
                               num_classes=3)
    runs = {}
    for early in (True, False):
        if not early:
            monkeypatch.setattr(SlotDataLoader, "_pass_done", lambda self: None)
        adopted.clear()
        probe = Scores()
        cli = fit_with_workers(root, tmp_path / str(early), 3, [probe])
        # the sanity check, then a validation per epoch
        assert adopted == ([False, False, True, True] if early else [False] * 4)
        assert cli.trainer.val_dataloaders._ahead is None  # nothing after the last one
        runs[early] = probe.scores
    assert len(runs[True]) == 3 and runs[True] == runs[False]


def test_a_pass_started_ahead_is_taken_once_and_never_after_its_workers_stopped() -> None:
    from segpipe.data.loading import SlotDataLoader

    data = torch.arange(10.0)
    loader = SlotDataLoader(data, batch_size=3, num_workers=2, persistent_workers=True)
    loader.restart_when_done = True
    expected = [b.tolist() for b in loader]
    assert loader._ahead is not None and loader._ahead is loader._iterator
    assert [b.tolist() for b in loader] == expected  # the pass started ahead
    loader.next_pass_expected = lambda: False
    assert [b.tolist() for b in loader] == expected and loader._ahead is None  # none wanted
    loader.next_pass_expected = None
    assert [b.tolist() for b in loader] == expected and loader._ahead is not None
    loader._iterator._shutdown_workers()  # as Lightning's teardown stops them
    loader._iterator = None
    assert [b.tolist() for b in loader] == expected  # a fresh pass, not the stopped one
    loader._iterator._shutdown_workers()
