"""Callbacks and checkpoint I/O.

The test-metrics and report writer the CLI always adds, a throughput meter, an EMA of the
weights, and :class:`SafeCheckpointIO`, the checkpoint reader/writer the CLI installs: atomic,
fsynced writes beside the target and ``weights_only`` reads that refuse pickled code with a
clear message.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.optim.swa_utils import AveragedModel

from segpipe.errors import (
    CHECKPOINT_READ_ERRORS,
    ConfigError,
    UnreadableCheckpointError,
    check_checkpoint_format,
)
from segpipe.fileio import AtomicFile, atomic_write_json, file_fingerprint, is_disk_full
from segpipe.stopping import ends_after_this_epoch

__all__ = [
    "CheckpointWriteError",
    "EMA",
    "LastCheckpoint",
    "PARTIAL_SUFFIX",
    "SafeCheckpointIO",
    "TestMetricsWriter",
    "Throughput",
    "SynchronisedSigterm",
    "UnsafeCheckpointError",
    "install_safe_checkpoint_io",
    "load_checkpoint_file",
    "weights_finite",
]

#: Suffix of checkpoints being written (``.segpipe-tmp-XXXX.partial``); never ``.ckpt``, so
#: ``--ckpt_path last`` and checkpoint globs cannot pick up an unfinished file.
PARTIAL_SUFFIX = ".partial"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds pickled Python objects that ``weights_only`` loading refuses.

    Args:
        path: The checkpoint.
        reason: torch's explanation (the first offending global is quoted from it).
    """

    #: The fix for fit/validate/test, which take ``--weights_only``.
    CLI_FIX = ("If you made this file yourself or otherwise trust it completely, rerun with "
               "--weights_only false (a full unpickle); otherwise do not use it.")

    def __init__(self, path: str | os.PathLike[str], reason: str, fix: str | None = None) -> None:
        self.path = str(path)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", reason)
        what = f" (first disallowed global: {found.group(1)})" if found else ""
        super().__init__(
            f"{self.path}: refusing to load this checkpoint: besides tensors and plain data it "
            f"contains pickled Python objects{what}, and unpickling them can run arbitrary "
            f"code. segpipe loads checkpoints with weights_only=True. {fix or self.CLI_FIX}"
        )


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, quota, permissions); the previous one is intact.

    Its message (``str``) is one line naming the checkpoint, the reason and the fix, without
    the ``[Errno N]`` prefix; ``errno`` keeps the code.
    """

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


def load_checkpoint_file(
    path: str | os.PathLike[str],
    map_location: Any = "cpu",
    weights_only: bool | None = True,
    mmap: bool = False,
) -> Any:
    """``torch.load`` a checkpoint, turning a refused unpickle into :class:`UnsafeCheckpointError`.

    Args:
        path: Checkpoint file.
        map_location: Passed to ``torch.load``.
        weights_only: ``True`` (default) refuses anything but tensors and plain containers;
            ``False`` is a full unpickle, only for trusted files.
        mmap: Map the tensors' storage instead of reading it (zip-format files; a legacy
            pickle is read in full): the structure, names and shapes cost no I/O of the data.

    Returns:
        The loaded object.

    Raises:
        UnsafeCheckpointError: When ``weights_only`` loading refuses the file.
        ConfigError: When the file is no PyTorch checkpoint at all (e.g. an image).
        UnreadableCheckpointError: When torch cannot load it (truncated or corrupt).
    """
    check_checkpoint_format(path)
    if mmap:
        import zipfile

        mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only,
                          **({"mmap": True} if mmap else {}))
    except pickle.UnpicklingError as exc:
        if weights_only is False:
            raise
        raise UnsafeCheckpointError(path, str(exc)) from exc
    except CHECKPOINT_READ_ERRORS as exc:
        if not (os.path.isfile(path) and os.access(path, os.R_OK)) or is_disk_full(exc):
            raise  # missing, unreadable for this user: the caller's or the OS's own message
        raise UnreadableCheckpointError(path, exc) from exc


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O with atomic local writes and guarded ``weights_only`` reads.

    Lightning's own ``_atomic_save`` writes through an fsspec transaction, which for local paths
    stages the file in the *system* temp folder (``tempfile.mkstemp()``) and then moves it with
    ``shutil.move``: when ``/tmp`` is another file system that move is a copy onto the final
    name, so a kill during it leaves a truncated ``last.ckpt``; and nothing is fsynced.
    Here the checkpoint goes through :class:`segpipe.fileio.AtomicFile`: ``torch.save`` streams
    it into ``.segpipe-tmp-XXXX.partial`` in the target folder with checked writes, the file is
    fsynced and renamed onto the final name with ``os.replace`` (atomic on POSIX and Windows),
    then the folder is fsynced; the file gets the usual mode (``0o666 & ~umask``). A killed
    process leaves either the old or the new file, never a torn one. Remote (fsspec) paths use
    Lightning's behaviour.

    A failed write (a full disk, quota, permissions; also when torch reports it as a
    ``RuntimeError`` from its zip writer) raises :class:`CheckpointWriteError` naming the
    checkpoint, with the temporary file deleted and the previous checkpoint as it was. Reads
    refuse pickled code with :class:`UnsafeCheckpointError`.

    With ``defer_removals`` (set by :class:`LastCheckpoint`), a checkpoint that
    ``ModelCheckpoint`` replaces (the former best) is deleted only by
    :meth:`remove_deferred`, once ``last.ckpt``, which records the new best, is written: deleted
    at once, a kill between the two left ``last.ckpt`` naming a deleted best, and the resumed
    folder had none.
    """

    def __init__(self) -> None:
        super().__init__()
        self.defer_removals = False
        self._deferred: list[str | os.PathLike[str]] = []

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Delete ``path`` now, or once :meth:`remove_deferred` is called (``defer_removals``)."""
        if self.defer_removals:
            self._deferred.append(path)
            return
        super().remove_checkpoint(path)

    def remove_deferred(self) -> None:
        """Delete the checkpoints whose removal was deferred."""
        pending, self._deferred = self._deferred, []
        for path in pending:
            super().remove_checkpoint(path)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
        storage_options: Any | None = None,
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Args:
            checkpoint: The checkpoint dict.
            path: Target file.
            storage_options: Not supported (as in ``TorchCheckpointIO``).

        Raises:
            CheckpointWriteError: The file could not be written (e.g. no space left).
        """
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        try:
            with AtomicFile(target, suffix=PARTIAL_SUFFIX) as out, out.open() as fh:
                torch.save(checkpoint, fh)
        except Exception as exc:
            error = _write_error(target, exc)
            if error is None:
                raise
            raise error from exc

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint (``weights_only`` as Lightning passes it; segpipe's CLI passes True).

        Raises:
            UnsafeCheckpointError: When ``weights_only`` loading refuses the file.
        """
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as exc:
            if weights_only is False:
                raise
            raise UnsafeCheckpointError(path, str(exc)) from exc


def weights_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite (one host synchronisation)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in module.parameters()]).all())


class LastCheckpoint(Checkpoint):
    """Keep ``last.ckpt`` current, so ``--ckpt_path last`` resumes where training stopped.

    Written at the end of every training epoch (after its validation), after validations
    inside an epoch and, with ``every_n_train_steps``, every N optimiser steps in between, so a
    crash loses at most one epoch (or N steps); and at the step where a SIGTERM stops the fit,
    and at the end of training. Resuming from a mid-epoch checkpoint continues the epoch with the
    next batch (the data module's training loader is resumable).

    Saves that are slow next to the epochs are spaced out: when the last save took more than
    :attr:`SLOW_SAVE_S` (a large model's weights and optimiser state, fsynced: 0.6 s for a
    U-Net base 64 on an H200 machine, whose epochs of 368 images took 0.4 s), the epoch-end
    and validation saves are skipped until training has run ``(1 - max_time_share) /
    max_time_share`` times that long since it (19 times for 5 %), so saving takes at most
    ``max_time_share`` of the run and a crash loses at most that much training. The last
    epoch, a stop (``trainer.should_stop``: a time budget, early stopping), ``max_steps`` and
    ``every_n_train_steps`` always save.

    segpipe's CLI uses it for ``checkpoint.save_last`` instead of Lightning's: since Lightning
    2.6, ``ModelCheckpoint(save_last=True, monitor=..., save_top_k=k)`` rewrites ``last.ckpt``
    only when it also saves a top-k checkpoint, i.e. when the monitored metric improved, so a
    resumed run would repeat every epoch since the best one. It is a
    :class:`~lightning.pytorch.callbacks.Checkpoint`, which Lightning runs after the other
    callbacks; added after the run's ``ModelCheckpoint``, it saves that callback's state
    (best path and score) as updated by the same validation.

    Args:
        dirpath: Checkpoint folder (the ``ModelCheckpoint``'s, so ``--ckpt_path last`` finds it).
        every_n_train_steps: Also save every N optimiser steps; None for epochs only.
        filename: File name without ``.ckpt``.
        save_weights_only: Save only the weights (not resumable).
        max_time_share: The share of training time that slow routine saves may take (see
            above); None saves at every epoch's end and validation, however long it takes.
    """

    #: A save that takes longer than this (seconds) is spaced out by ``max_time_share``.
    SLOW_SAVE_S = 0.1

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        every_n_train_steps: int | None = None,
        filename: str = "last",
        save_weights_only: bool = False,
        max_time_share: float | None = 0.05,
    ) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ConfigError(f"every_n_train_steps must be >= 1 or None, got {every_n_train_steps}")
        if max_time_share is not None and not 0 < max_time_share <= 1:
            raise ConfigError(f"max_time_share must be in (0, 1] or None, got {max_time_share}")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = every_n_train_steps
        self.filename = filename
        self.save_weights_only = save_weights_only
        self.max_time_share = max_time_share
        self._saved_step: int | None = None
        self._clock = time.monotonic  # tests give a fake one
        self._last_save_end: float | None = None
        self._last_save_cost = 0.0
        self.skipped = 0  # routine saves spaced out so far

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self.dirpath / f"{self.filename}.ckpt"

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING:
            return
        module = trainer.lightning_module
        check = getattr(module, "check_weights", None)  # never a diverged last.ckpt to resume
        if callable(check):
            check()  # segpipe's task: its message, once per step
        elif not weights_finite(module):
            raise ConfigError(f"training diverged by step {trainer.global_step}: some weights "
                              f"are NaN or infinite; {self.path} was not overwritten")
        start = self._clock()
        trainer.save_checkpoint(self.path, weights_only=self.save_weights_only)
        self._last_save_end = self._clock()
        self._last_save_cost = self._last_save_end - start
        self._saved_step = trainer.global_step
        io = trainer.strategy.checkpoint_io
        if isinstance(io, SafeCheckpointIO):
            io.remove_deferred()  # the former best, which last.ckpt no longer records

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Have the former best deleted only once ``last.ckpt`` stops recording it."""
        io = trainer.strategy.checkpoint_io
        if stage == "fit" and isinstance(io, SafeCheckpointIO):
            io.defer_removals = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, SafeCheckpointIO):
            io.defer_removals = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        n = self.every_n_train_steps
        step = trainer.global_step
        # SIGTERM (a requeue, a pre-emption): the fit stops at the end of this step, so keep it
        # (the steps since the last save were trained again after the requeue)
        stopping = bool(getattr(trainer, "received_sigterm", False))
        if step <= 0 or step == self._saved_step or (not stopping and (not n or step % n)):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch-end save follows; one from before the epoch's validation and
            # epoch-interval scheduler step would resume past them
        self._save(trainer)

    def _routine_save(self, trainer: L.Trainer) -> None:
        """Save at an epoch's end or a validation, unless slow saves are spaced out (see the
        class) and the run is not ending."""
        share, end = self.max_time_share, self._last_save_end
        spaced = (share is not None and end is not None
                  and self._last_save_cost > self.SLOW_SAVE_S
                  and self._clock() - end < self._last_save_cost * (1 - share) / share)
        if spaced and not ends_after_this_epoch(trainer):
            self.skipped += 1
            return
        self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A validation inside the epoch (val_check_interval < 1); the one at the epoch's end is
        # followed by on_train_epoch_end, where ModelCheckpoint picks the best first.
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._routine_save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._routine_save(trainer)  # after this epoch's validation and ModelCheckpoint's save

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A stop the epoch end did not see coming (a spaced-out save is never the last one).
        if self._saved_step != trainer.global_step:
            self._save(trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """A run resumed from a folder that was moved or copied (another machine, storage
        mounted elsewhere): rebase the best-checkpoint records onto the folder, where the files
        are. Lightning's ``ModelCheckpoint`` restores only the best path when its folder
        differs from the recorded one, so best tracking restarted and a worse model became
        ``best`` beside the real one. (Lightning runs every ``on_load_checkpoint`` before the
        callbacks' states are loaded.)"""
        from lightning.pytorch.callbacks import ModelCheckpoint

        states = checkpoint.get("callbacks") or {}
        for cb in trainer.checkpoint_callbacks:
            state = states.get(cb.state_key) if isinstance(cb, ModelCheckpoint) else None
            if not state or cb.dirpath is None or state.get("dirpath") in (None, cb.dirpath):
                continue
            here = Path(cb.dirpath)
            best = state.get("best_model_path")
            if not best or not (here / Path(best).name).is_file():
                continue  # the files are not here: leave Lightning's fresh start

            def rebased(path: Any) -> Any:
                return str(here / Path(path).name) if path else path

            state["dirpath"] = cb.dirpath
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                state[key] = rebased(state.get(key))
            state["best_k_models"] = {rebased(k): v for k, v in
                                      (state.get("best_k_models") or {}).items()
                                      if (here / Path(k).name).is_file()}


def install_safe_checkpoint_io(trainer: L.Trainer) -> bool:
    """Use :class:`SafeCheckpointIO` in ``trainer`` unless a custom checkpoint I/O is set.

    Args:
        trainer: The trainer (before ``fit``/``test``).

    Returns:
        Whether it was installed (False when the strategy brings its own I/O, e.g. a user plugin).
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = SafeCheckpointIO()
        return True
    return isinstance(strategy.checkpoint_io, SafeCheckpointIO)


class SynchronisedSigterm(L.Callback):
    """Stops a multi-process fit on SIGTERM at the same step in every process.

    Lightning (2.6) answers SIGTERM with a ``dist.broadcast`` run inside the signal handler,
    wherever the process was: in the middle of a gradient all-reduce or a checkpoint write, so
    its collectives and the other processes' never matched and a DDP fit hung until SIGKILL (a
    scheduler's pre-emption, ``timeout``, ``docker stop``). :meth:`install` replaces that handler
    with one that only notes the signal (and forwards it to the processes Lightning launched, as
    Lightning's does); at the end of every training step the processes agree whether any of
    them got one (one small all-reduce), and all of them then stop there together, as a
    single-process fit does (``SIGTERMException``; the command exits with 143). Validation and
    test runs, and single-process fits, keep Lightning's own checks, less the broadcast.
    """

    def __init__(self) -> None:
        self.pending = False

    def install(self, trainer: L.Trainer) -> None:
        """Put this callback's handler in the place of Lightning's (before ``fit``/``test``)."""
        connector = trainer._signal_connector

        def notify(signum: int, frame: Any) -> None:
            if not (connector.received_sigterm or self.pending):
                launcher = trainer.strategy.launcher
                if launcher is not None:  # the processes it started get it too
                    launcher.kill(signum)
            if trainer.world_size > 1 and trainer.state.fn == TrainerFn.FITTING:
                self.pending = True  # agreed on at the end of the step
            else:
                connector.received_sigterm = True

        connector._sigterm_notifier_fn = notify  # read when Lightning registers its handlers

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(
                self.pending, all=False):
            # every process: Lightning raises SIGTERMException at the end of this step
            trainer._signal_connector.received_sigterm = True


def _os_error(exc: BaseException) -> OSError | None:
    """The first ``OSError`` in ``exc``'s chain (torch wraps write errors in a RuntimeError)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        stack += [e.__context__, e.__cause__]
    return None


def _write_error(target: Path, exc: BaseException) -> CheckpointWriteError | None:
    """The one-line error for a failed checkpoint write; None when ``exc`` is not an I/O error."""
    os_error = _os_error(exc)
    if is_disk_full(exc):
        code = os_error.errno if os_error is not None and os_error.errno in (
            errno.ENOSPC, getattr(errno, "EDQUOT", None)) else errno.ENOSPC
        reason = os.strerror(code)
        fix = "free space there, or point checkpoint.dirpath at a disk with room"
    elif os_error is not None:
        code = os_error.errno
        reason = os_error.strerror or str(os_error)
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = ("make the folder writable, or set checkpoint.dirpath / "
                   "trainer.default_root_dir elsewhere")
        else:
            fix = "check the folder, or set checkpoint.dirpath elsewhere"
    else:
        return None  # e.g. an object torch cannot pickle: not about the disk
    previous = " The previous checkpoint there is intact." if target.exists() else ""
    return CheckpointWriteError(
        code, f"could not write checkpoint {target}: {reason}; {fix}.{previous}"
    )


def _provenance(trainer: L.Trainer) -> dict[str, Any]:
    """Which weights were scored, and on which split (so k-fold runs can be told apart)."""
    ckpt = getattr(trainer, "ckpt_path", None)
    out: dict[str, Any] = {"checkpoint": str(ckpt) if ckpt else "none (the weights in memory)"}
    if ckpt:
        try:  # so that `segpipe crossval` can tell when a later fit replaced the file
            out["checkpoint_file"] = {"path": str(Path(ckpt).resolve()),
                                      "fingerprint": file_fingerprint(ckpt)}
        except OSError:
            pass
    dm = getattr(trainer, "datamodule", None)
    scored = getattr(dm, "test_split", None)  # segpipe's data module: "test", or "val"
    if isinstance(scored, str):
        out["scored_split"] = scored
    spec = getattr(trainer.lightning_module, "spec", None)
    if spec is not None:  # predictions at this size, upsampled back to the native masks
        out["eval_resize"] = getattr(spec, "eval_resize", None)
    eval_batch = getattr(dm, "eval_batch_size", None)
    if isinstance(eval_batch, int):  # a Dice or Lovász term of the loss is a per-batch figure
        out["eval_batch_size"] = eval_batch
    case_split = getattr(dm, "case_split", None)  # segpipe's data module; None otherwise
    if case_split is not None:
        out["data_split"] = {"scored": scored, **case_split}
    return out


def _partial_split(trainer: L.Trainer, scored_images: int | None) -> dict[str, Any] | None:
    """How much of the split a test scored, when it scored part of it (``data.limit_samples``,
    ``trainer.limit_test_batches``): ``{"scored_images", "split_images", "limits"}``; None
    when it scored all of it, or the data module does not tell its split's size."""
    dm = getattr(trainer, "datamodule", None)
    sizes = getattr(dm, "split_sizes", None)
    split = getattr(dm, "test_split", None)
    total = sizes.get(split) if isinstance(sizes, dict) and isinstance(split, str) else None
    if not total or scored_images is None or scored_images >= total:
        return None
    limits: dict[str, Any] = {}
    hp = getattr(dm, "hparams", None)
    if hasattr(hp, "get") and hp.get("limit_samples") is not None:
        limits["data.limit_samples"] = hp.get("limit_samples")
    batches = getattr(trainer, "limit_test_batches", None)
    if batches is not None and not (isinstance(batches, float) and batches == 1.0):
        limits["trainer.limit_test_batches"] = batches
    return {"scored_images": int(scored_images), "split_images": int(total), "limits": limits}


class TestMetricsWriter(L.Callback):
    """After ``test``: write ``test_metrics.json``, a per-image CSV and the evaluation report.

    Files go to the run's log directory (``trainer.log_dir``): ``test_metrics.json`` (every metric,
    macro/micro labelled), ``test_per_image.csv`` (path, IoU, Dice, pixel accuracy per image), ``test_per_case.csv`` (when
    images belong to cases: Dice and IoU per case, pixels pooled over the case) and
    ``report.md`` with its plots and worst-image gallery (:func:`segpipe.report.write_report`,
    coloured with the data module's ``class_colors``). The paths are printed.

    Args:
        filename: Name of the JSON file.
        per_image_csv: Also write ``test_per_image.csv``.
        report: Also write ``report.md`` (and ``report_files/``) beside the JSON.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self, filename: str = "test_metrics.json", per_image_csv: bool = True, report: bool = True
    ) -> None:
        self.filename = filename
        self.per_image_csv = per_image_csv
        self.report = report
        self.last_path: Path | None = None
        self.last_report_path: Path | None = None

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Decided on rank 0 and broadcast under DDP: every rank must ask, only rank 0 writes.
        from segpipe.tracking import run_output_dir

        out_dir = run_output_dir(trainer)
        if trainer.is_global_zero:
            self._write(trainer, pl_module, out_dir)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, out_dir: Path) -> None:
        report = getattr(pl_module, "test_report", None)
        if not report:
            return
        from segpipe.report import write_per_case_csv, write_per_image_csv

        report = dict(report)
        report.update(_provenance(trainer))
        partial = _partial_split(trainer, report.get("num_images"))
        if partial is not None:  # figures of part of the split must not pass for the split's
            report["partial_split"] = partial
            given = ", ".join(f"{k} {v}" for k, v in partial["limits"].items())
            rank_zero_warn(
                f"this test scored {partial['scored_images']} of the "
                f"{partial['split_images']} images of its split"
                + (f" ({given})" if given else "") + ": its figures are those of part of "
                "the split (test_metrics.json records it as partial_split)")
        earlier = out_dir / self.filename
        if earlier.exists():  # e.g. --trainer.logger false: every test writes to one folder
            rank_zero_warn(f"replacing an earlier test's {self.filename}, report and CSVs in "
                           f"{out_dir} (with a logger, each test gets its own version_N folder)")
        per_image = report.pop("per_image", [])
        worst = report.pop("worst_images", None) or []
        csv_path: Path | None = None
        if self.per_image_csv and per_image:
            csv_path = write_per_image_csv(out_dir / "test_per_image.csv", per_image)
            report["per_image_csv"] = str(csv_path)
        else:
            (out_dir / "test_per_image.csv").unlink(missing_ok=True)
        if report.get("per_case"):
            case_csv = write_per_case_csv(out_dir / "test_per_case.csv", report["per_case"])
            report["per_case_csv"] = str(case_csv)
        else:  # an earlier test's, of other data, must not pass for this one's
            (out_dir / "test_per_case.csv").unlink(missing_ok=True)
        self.last_path = atomic_write_json(out_dir / self.filename, report)
        print("(the test metrics table pools the scored pixels of every image; mIoU and mDice "
              "are macro means over classes, micro_IoU and pixel_accuracy micro)")
        absent = [name for name, v in (report.get("IoU_per_class") or {}).items() if v is None]
        if absent:  # no row in the table: say why, so it does not look forgotten
            print(f"(no row for {', '.join(absent)}: absent from both the truth and the "
                  "predictions, so no score, and left out of mIoU and mDice)")
        per_case = report.get("per_case") or {}
        if per_case.get("num_cases") or per_case.get("num_cases_without_score"):
            def pct(v: Any) -> str:
                return "n/a" if v is None else f"{100 * float(v):.1f} %"

            dice = per_case.get("Dice_per_class_mean_over_cases") or {}
            counts = per_case.get("num_cases_per_class") or {}

            def fewer(name: str) -> str:  # a class absent from both in some cases
                n = counts.get(name)
                if n is None or n >= per_case["num_cases"] or dice.get(name) is None:
                    return ""
                return f" (over {n} case{'' if n == 1 else 's'})"

            unscored = int(per_case.get("num_cases_without_score") or 0)
            left_out = (f" ({unscored} more without a labelled pixel, left out)"
                        if unscored else "")
            print(f"Mean over {per_case['num_cases']} cases{left_out}: mDice "
                  f"{pct(per_case.get('mDice_mean_over_cases'))}, mIoU "
                  f"{pct(per_case.get('mIoU_mean_over_cases'))}; Dice per class: "
                  + ", ".join(f"{name} {pct(v)}{fewer(name)}" for name, v in dice.items()))
        print(f"Test metrics written to {self.last_path}")
        if self.report:
            self.last_report_path = self._write_report(
                trainer, {**report, "per_image": per_image, "worst_images": worst}, out_dir,
                Path(csv_path.name) if csv_path is not None else None,  # beside the report
            )
            if self.last_report_path is not None:
                print(f"Evaluation report written to {self.last_report_path}")
        if not self.report or self.last_report_path is None:
            # an earlier test's report in this folder must not pass for this one's
            self.last_report_path = None
            (out_dir / "report.md").unlink(missing_ok=True)

    @staticmethod
    def _write_report(
        trainer: L.Trainer, report: dict[str, Any], out_dir: Path, csv_path: Path | None
    ) -> Path | None:
        """The report is a convenience: a failure warns instead of losing the finished test."""
        from segpipe.data.io import read_image
        from segpipe.report import write_report

        # The model's data spec (what it was trained on), else what the data module states.
        spec = getattr(trainer.lightning_module, "spec", None)
        source = spec if spec is not None else getattr(trainer, "datamodule", None)
        colors = getattr(source, "class_colors", None)
        bands = getattr(source, "bands", None)
        reader = functools.partial(read_image, bands=bands) if bands else None
        try:
            return write_report(report, out_dir, class_colors=colors, image_reader=reader,
                                per_image_csv=csv_path)
        except Exception as exc:  # noqa: BLE001 - metrics are already safe on disk
            rank_zero_warn(
                f"could not write the evaluation report in {out_dir}: {type(exc).__name__}: "
                f"{exc}. test_metrics.json is complete; set metrics_writer.report=false to skip "
                "the report."
            )
            return None


class Throughput(L.Callback):
    """Measure training throughput (images/s) after a warm-up, and print it when fit ends.

    Args:
        warmup_steps: Training steps excluded from the measurement (allocator, oneDNN and loader
            warm-up); 0 measures from the first step's start.
    """

    def __init__(self, warmup_steps: int = 5) -> None:
        if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ConfigError(f"Throughput warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = int(warmup_steps)
        self.images = 0
        self.seconds = 0.0
        self._batches = 0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if self.warmup_steps == 0 and self._t0 is None:  # no warm-up: from the first step on
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        # Wall time between batch ends: includes data loading, forward, backward and the step.
        now = time.perf_counter()
        self._batches += 1
        if self._batches == self.warmup_steps:
            self._t0 = now
        elif self._t0 is not None:
            self.images += int(batch["image"].shape[0])
            self.seconds = now - self._t0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.images:
            print(f"Training throughput: {self.images_per_second:.2f} images/s "
                  f"({self.images} images after {self.warmup_steps} warm-up steps)")


#: Attributes of the task left out of the EMA's copy of it (callables, not weights).
_NOT_AVERAGED = ("optimizer_factory", "scheduler_factory")


class _EMAModel(AveragedModel):
    """An :class:`~torch.optim.swa_utils.AveragedModel` updated as an EMA with a host-side count.

    ``AveragedModel.update_parameters`` reads its device counter (``n_averaged == 0``,
    ``n_averaged > 0``) on every update: two device-to-host synchronisations per training step
    on a GPU. Here the count is mirrored in a Python int (read back from the buffer once, after
    a checkpoint is loaded) and the update is one ``_foreach_lerp_`` per dtype group with a
    Python-number weight, so a step queues its work and moves on.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool,
                 device: torch.device | None = None) -> None:
        super().__init__(model, device=device, use_buffers=True)
        self.decay, self.warmup = float(decay), bool(warmup)
        self._count: int | None = 0

    def current_decay(self, count: int) -> float:
        """The decay for the update after ``count`` averaged states (``count >= 1``)."""
        if not self.warmup:
            return self.decay
        # TensorFlow's ExponentialMovingAverage(num_updates): the average spans about the last
        # tenth of the steps so far until that reaches 1 / (1 - decay) steps.
        return min(self.decay, (1.0 + count) / (10.0 + count))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._count = None  # re-read n_averaged at the next update

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:  # type: ignore[override]
        if self._count is None:
            self._count = int(self.n_averaged)
        pairs = [
            (avg, cur.detach().to(avg.device, non_blocking=True))
            for avg, cur in zip(
                itertools.chain(self.module.parameters(), self.module.buffers()),
                itertools.chain(model.parameters(), model.buffers()),
                strict=True,
            )
        ]
        floats = [(a, c) for a, c in pairs if a.is_floating_point()]
        if self._count == 0 or not floats:
            torch._foreach_copy_([a for a, _ in pairs], [c for _, c in pairs])
        else:
            weight = 1.0 - self.current_decay(self._count)
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
            for a, c in pairs:  # counters (BatchNorm's num_batches_tracked) follow the model
                if not a.is_floating_point():
                    a.copy_(c)
        self._count += 1
        self.n_averaged.add_(1)


class EMA(WeightAveraging):
    """Exponential moving average of the weights, validated, checkpointed and predicted with.

    Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` does the bookkeeping:
    validation runs on the averaged weights (so ``best`` is selected on them), checkpoints
    hold them as ``state_dict`` (so ``segpipe test``/``predict`` use them with no option) and
    the raw weights as ``current_model_state`` (so ``--ckpt_path last`` resumes both), and the
    model ends training with them. This subclass changes the update: BatchNorm statistics are
    averaged with the weights, the count lives on the host (no device synchronisation per step;
    Lightning's ``EMAWeightAveraging`` reads its device counter twice per step), and with
    ``warmup`` the decay grows as ``(1 + n) / (10 + n)`` up to ``decay``, so the average is
    usable from the first validation instead of mixing in the random initial weights for the
    first ``1 / (1 - decay)`` steps.

    Use it from a config::

        trainer:
          callbacks:
            - class_path: segpipe.callbacks.EMA
              init_args: {decay: 0.999}

    Args:
        decay: Largest decay per optimiser step (the average spans about ``1 / (1 - decay)``
            steps once warmed up).
        warmup: Grow the decay from 0 as ``(1 + n) / (10 + n)`` (TensorFlow's ``num_updates``).
        device: Where the averaged copy lives (default: the model's device).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True,
                 device: str | None = None) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA decay must be in (0, 1), e.g. 0.999; got {decay}")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"EMA device {device!r}: CUDA is not available here; leave the "
                              "device out (the average lives beside the model) or use 'cpu'")
        super().__init__(device=device)
        self.decay, self.warmup = float(decay), bool(warmup)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            device = self._device or pl_module.device
            # The copy holds weights only: the optimiser and scheduler factories stay out of it
            # (under DDP, jsonargparse's hold a lock that cannot be copied).
            held = {name: pl_module.__dict__[name] for name in _NOT_AVERAGED
                    if name in pl_module.__dict__}
            for name in held:
                setattr(pl_module, name, None)
            try:
                self._average_model = _EMAModel(pl_module, self.decay, self.warmup, device=device)
            finally:
                for name, value in held.items():
                    setattr(pl_module, name, value)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._average_model is None:
            return  # test/validate: state_dict already holds the averaged weights to evaluate
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
