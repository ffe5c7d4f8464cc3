"""``segpipe predict`` under a Lightning ``Trainer`` (one CPU process): the runner's start-up,
its Ctrl-C outcome and what it leaves behind, with stand-ins for the engine's module and
writing callback."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from segpipe.predict.distributed import LightningRunner


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class _Module:
    """The hooks of a PredictModule; ``stop_at`` raises KeyboardInterrupt at that batch."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.device = None
        self.steps: list[int] = []

    def on_predict_start(self, inputs: Any, forward_context: Any) -> None:
        self.inputs = inputs

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx == self.stop_at:
            raise KeyboardInterrupt
        self.steps.append(batch_idx)
        return batch

    def on_predict_end(self) -> None:
        self.ended = True


class _Callback:
    """The hooks of a WritingCallback, recorded."""

    def __init__(self) -> None:
        self.written: list[Any] = []
        self.exceptions: list[BaseException] = []
        self.ended = False

    def on_predict_start(self, module: Any, is_global_zero: bool, world_size: int) -> None:
        self.start = (is_global_zero, world_size)

    def write_on_batch_end(self, prediction: Any) -> None:
        self.written.append(prediction)

    def on_predict_end(self, world_size: int) -> None:
        self.ended = True

    def on_exception(self, exception: BaseException) -> None:
        self.exceptions.append(exception)


def _loader(n: int) -> DataLoader:
    return DataLoader([torch.full((1,), float(i)) for i in range(n)], batch_size=1)


@pytest.fixture()
def sigint_kept():
    """Lightning ignores SIGINT from a Ctrl-C on; the test's handler is restored after."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def test_one_process_for_as_many_files_starts_quietly_and_restores_log_levels() -> None:
    """One file for one process is enough; Lightning's start-up chatter ("GPU available: ...")
    is held back and the levels of Lightning's loggers are as they were after."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    records = _Records()
    loggers[0].addHandler(records)
    loggers[1].addHandler(records)
    try:
        for lg in loggers:
            lg.setLevel(logging.INFO)
        runner = LightningRunner("cpu", 1, "auto", "32-true", num_files=1)
        assert runner.rank == 0 and runner.trainer.world_size == 1
        assert [lg.level for lg in loggers] == [logging.INFO, logging.INFO]
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(records)
            lg.setLevel(level)
    assert not [m for m in records.messages if "available" in m], records.messages


def test_a_finished_run_writes_every_batch_and_leaves_no_lightning_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch reaches the writer, the run ends as finished (not interrupted), and nothing
    (no lightning_logs, no checkpoints) is left in the working folder."""
    monkeypatch.chdir(tmp_path)
    runner = LightningRunner("cpu", 1, "auto", "32-true", num_files=3)
    module, callback = _Module(), _Callback()
    assert runner.run(module, callback, _loader(3)) is False
    assert module.steps == [0, 1, 2] and len(callback.written) == 3
    assert callback.start == (True, 1) and callback.ended and not callback.exceptions
    assert not list(tmp_path.iterdir())


def test_ctrl_c_under_lightning_is_reported_as_an_interruption(sigint_kept) -> None:
    """Ctrl-C in the middle: Lightning's graceful shutdown (its sys.exit(1)) is reported as an
    interrupted run, and the writer is told, to count the files finished before it."""
    runner = LightningRunner("cpu", 1, "auto", "32-true", num_files=3)
    module, callback = _Module(stop_at=1), _Callback()
    assert runner.run(module, callback, _loader(3)) is True
    assert module.steps == [0] and len(callback.written) == 1
    assert len(callback.exceptions) == 1
    assert isinstance(callback.exceptions[0], KeyboardInterrupt)


def test_an_exit_that_is_not_an_interruption_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SystemExit from within the run that no Ctrl-C caused is not taken for one."""
    runner = LightningRunner("cpu", 1, "auto", "32-true", num_files=1)

    def exits(*args: Any, **kwargs: Any) -> None:
        raise SystemExit(3)

    monkeypatch.setattr(runner.trainer, "predict", exits)
    with pytest.raises(SystemExit) as exc:
        runner.run(_Module(), _Callback(), _loader(1))
    assert exc.value.code == 3
