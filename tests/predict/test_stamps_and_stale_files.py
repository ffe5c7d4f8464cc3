"""What predict's outputs and temporary files say about where they come from, when inputs change
or vanish while they are predicted, and after a restart that reuses a process ID."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segpipe.fileio import TMP_PREFIX, _host_tag, _start_ticks, is_stale_temporary


def test_an_earlier_process_with_this_processs_pid_left_a_stale_file(tmp_path: Path) -> None:
    """A fit (or predict) killed in a container whose restart gives the new process the same
    PID (PID 1 as an entrypoint): the old lock / temporary file names this PID with another
    start time, and is stale; it was taken for this live process's own."""
    started = _start_ticks(os.getpid())
    if started is None:  # pragma: no cover - no /proc (not Linux)
        pytest.skip("process start times are read from /proc")
    earlier = tmp_path / f"{TMP_PREFIX}{_host_tag()}.{os.getpid()}.{started - 1}-abc-fit.lock"
    earlier.write_bytes(b"x")
    assert is_stale_temporary(earlier)


def _touch_input_before_writing(monkeypatch: pytest.MonkeyPatch, change) -> None:
    """Run ``change(input path)`` after the input was read and predicted, before its outputs
    are written (a sync job replacing files, a mount dropping, a user moving inputs away)."""
    from segpipe.predict import engine

    real = engine.WritingCallback._write

    def write(self, res):
        change(Path(res.path))
        return real(self, res)

    monkeypatch.setattr(engine.WritingCallback, "_write", write)


def test_an_output_written_after_its_input_vanished_is_still_known_as_ours(
        tmp_path: Path, pointwise_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from segpipe.data.io import write_image
    from tests.predict.test_command import run

    src, out = tmp_path / "in", tmp_path / "out"
    write_image(src / "a.png", np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8))
    keep = (src / "a.png").read_bytes()
    _touch_input_before_writing(monkeypatch, lambda p: p.unlink())
    assert run(pointwise_ckpt, src, out) == 0
    monkeypatch.undo()
    (src / "a.png").write_bytes(keep)  # back (the mount is up again)
    assert run(pointwise_ckpt, src, out, "--overwrite") == 0  # had been refused: not segpipe's


def test_an_input_replaced_while_predicted_is_predicted_again(
        tmp_path: Path, pointwise_ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import numpy as np
    from PIL import Image

    from segpipe.data.io import write_image
    from tests.predict.test_command import run

    src, out = tmp_path / "in", tmp_path / "out"
    write_image(src / "a.png", np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8))
    _touch_input_before_writing(
        monkeypatch, lambda p: write_image(p, np.zeros((20, 24, 3), np.uint8)))
    assert run(pointwise_ckpt, src, out) == 0
    monkeypatch.undo()
    assert run(pointwise_ckpt, src, out) == 0
    assert Image.open(out / "a.png").size == Image.open(src / "a.png").size  # kept: 16×16
