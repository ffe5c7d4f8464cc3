"""The one atomic writer: file modes, fsync before rename, short writes and full disks.

A full disk is simulated without a small file system: ``os.write`` (which every checked write
goes through) is patched to stop accepting bytes, and GDAL is tested against a real write limit
(``RLIMIT_FSIZE``) in a subprocess.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from segpipe.callbacks import CheckpointWriteError, SafeCheckpointIO
from segpipe.data.io import write_image, write_label_png
from segpipe.fileio import (
    TMP_PREFIX,
    AtomicFile,
    DiskFullError,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    disk_full_error,
    is_disk_full,
    write_all,
)

_real_write = os.write


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TMP_PREFIX)]


@pytest.fixture
def umask() -> Iterator[Any]:
    """Set the umask for one test (``umask(0o027)``) and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def disk_full_after(monkeypatch: pytest.MonkeyPatch, budget: int, *, short: bool = False) -> None:
    """Let ``os.write`` accept ``budget`` more bytes, then fail like a full disk.

    Args:
        budget: Bytes still accepted.
        short: Report the full disk like a nearly full file system does: a short write (fewer
            bytes, no errno), then writes of 0 bytes. Otherwise ``ENOSPC``.
    """
    left = {"n": budget}

    def write(fd: int, data: Any) -> int:
        n = min(len(data), left["n"])
        if n == 0 and not short:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left["n"] -= n
        return _real_write(fd, bytes(memoryview(data)[:n])) if n else 0

    monkeypatch.setattr(os, "write", write)


# ------------------------------------------------------------------ modes and durability
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_get_the_mode_open_gives(mask: int, mode: int, umask: Any, tmp_path: Path) -> None:
    umask(mask)
    written = [
        atomic_write_text(tmp_path / "a.txt", "text\n"),
        atomic_write_json(tmp_path / "b.json", {"x": 1}),
        atomic_write_bytes(tmp_path / "c.bin", b"\0" * 10),
    ]
    with atomic_path(tmp_path / "d.png") as tmp:
        write_label_png(tmp, np.zeros((4, 4), np.uint8))
    with atomic_path(tmp_path / "e.tif") as tmp:
        write_image(tmp, np.zeros((4, 4, 2), np.uint16))  # GDAL deletes and recreates it
    with atomic_open(tmp_path / "f.pt") as fh:
        torch.save({"w": torch.ones(2)}, fh)
    SafeCheckpointIO().save_checkpoint({"w": torch.ones(2)}, tmp_path / "g.ckpt")
    written += [tmp_path / n for n in ("d.png", "e.tif", "f.pt", "g.ckpt")]
    with open(tmp_path / "plain", "w") as fh:  # the reference
        fh.write("x")
    assert (tmp_path / "plain").stat().st_mode & 0o777 == mode
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {
        p.name: oct(mode) for p in written}
    assert not temporaries(tmp_path)


def test_fsync_before_rename_then_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_bytes(tmp_path / "x.bin", b"data")
    if sys.platform.startswith("linux"):
        assert events == ["fsync file", "replace", "fsync dir"]
    else:
        assert events.index("replace") > 0
    assert (tmp_path / "x.bin").read_bytes() == b"data"


# ------------------------------------------------------------------ short writes
def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def half(fd: int, data: Any) -> int:  # writes half (at least one byte), returns the count
        n = max(1, len(data) // 2)
        calls.append(n)
        return _real_write(fd, bytes(memoryview(data)[:n]))

    monkeypatch.setattr(os, "write", half)
    payload = bytes(range(256)) * 40
    atomic_write_bytes(tmp_path / "x.bin", payload)
    monkeypatch.undo()
    assert (tmp_path / "x.bin").read_bytes() == payload and len(calls) > 5


def test_a_write_without_progress_is_a_full_disk(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.bin"
    target.write_bytes(b"the previous version")

    def half(fd: int, data: Any) -> int:  # half of what is asked (rounded down): ends with 0
        return _real_write(fd, bytes(memoryview(data)[: len(data) // 2])) if len(data) > 1 else 0

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(DiskFullError) as info:
        atomic_write_bytes(target, b"x" * 1000)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.path == target
    assert str(target) in str(info.value) and "Free some space" in str(info.value)
    assert target.read_bytes() == b"the previous version"
    assert not temporaries(tmp_path)


def test_write_all_raises_on_zero_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        monkeypatch.setattr(os, "write", lambda fd, data: 0)
        with pytest.raises(OSError) as info:
            write_all(fd, b"abc")
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


# ------------------------------------------------------------------ full disks, per writer
@pytest.mark.parametrize("short", [False, True], ids=["ENOSPC", "short-write"])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_full_disk_during_a_pillow_save_leaves_nothing(
    suffix: str, short: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow's encoder would ignore a short write on the descriptor; here it never sees one."""
    target = tmp_path / f"out{suffix}"
    good = np.full((40, 60, 3), 7, np.uint8)
    with atomic_path(target) as tmp:
        write_image(tmp, good)
    before = target.read_bytes()
    disk_full_after(monkeypatch, 8192 // 4, short=short)
    with pytest.raises(DiskFullError) as info:
        with atomic_path(target) as tmp:
            write_image(tmp, np.random.default_rng(0).integers(0, 255, (200, 300, 3), np.uint8))
    monkeypatch.undo()
    assert info.value.path == target
    assert target.read_bytes() == before and not temporaries(tmp_path)


def test_full_disk_during_torch_save_leaves_nothing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.pt"
    with atomic_open(target) as fh:
        torch.save({"step": 1}, fh)
    disk_full_after(monkeypatch, 3000)  # torch's real zip writer fails mid-file
    with pytest.raises(DiskFullError) as info:
        with atomic_open(target) as fh:
            torch.save({"step": 2, "w": torch.zeros(10_000)}, fh)
    monkeypatch.undo()
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's "unexpected pos ..."
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_full_disk_during_a_checkpoint_is_checkpoint_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = SafeCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    disk_full_after(monkeypatch, 5000)
    with pytest.raises(CheckpointWriteError) as info:
        io.save_checkpoint({"step": 2, "w": torch.zeros(20_000)}, target)
    monkeypatch.undo()
    text = str(info.value)
    assert text.startswith(f"could not write checkpoint {target}: No space left on device")
    assert "previous checkpoint there is intact" in text and "\n" not in text
    assert info.value.errno == errno.ENOSPC
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_errors_in_the_block_remove_the_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    target.write_text("old")
    for exc in (ValueError("bad"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_path(target) as tmp:
                tmp.write_text("half")
                raise exc
    assert target.read_text() == "old" and not temporaries(tmp_path)
    out = AtomicFile(tmp_path / "y.txt")
    out.write_bytes(b"never committed")
    out.discard()
    out.discard()  # idempotent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_enospc_from_fsync_or_create_is_a_full_disk(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Delayed allocation: the error may only come with fsync."""
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFullError):
        atomic_write_bytes(tmp_path / "x", b"data")
    monkeypatch.undo()
    assert not list(tmp_path.iterdir())

    real_open = os.open

    def full_open(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_CREAT:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", full_open)
    with pytest.raises(DiskFullError, match="disk quota exceeded") as info:
        atomic_write_bytes(tmp_path / "x", b"data")
    assert info.value.errno == errno.EDQUOT


# ------------------------------------------------------------------ recognising a full disk
def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - the implicit __context__ is the point
    except BaseException as exc:
        return exc


def test_is_disk_full_reads_the_whole_chain() -> None:
    enospc = OSError(errno.ENOSPC, "No space left on device")
    torch_error = RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert is_disk_full(enospc) and is_disk_full(DiskFullError("x"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(_chained(torch_error, enospc))
    assert is_disk_full(torch_error)  # torch's writer, no errno: most likely a full disk
    assert is_disk_full(
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert is_disk_full(ValueError("could not save: [Errno 28] No space left on device"))
    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = enospc
    assert is_disk_full(wrapped)
    assert not is_disk_full(_chained(torch_error, OSError(errno.EFBIG, "File too large")))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("CUDA out of memory")) and not is_disk_full(None)
    assert disk_full_error(KeyboardInterrupt(), "x") is None
    full = disk_full_error(_chained(torch_error, enospc), "/a/b.ckpt")
    assert isinstance(full, DiskFullError) and full.path == Path("/a/b.ckpt")


def test_disk_full_error_pickles() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(DiskFullError("/x/y.png", errno.EDQUOT)))
    assert err.path == Path("/x/y.png") and err.errno == errno.EDQUOT and "/x/y.png" in str(err)


def test_a_live_writers_temporary_file_is_not_stale(tmp_path: Path) -> None:
    """A second `predict` into the same folder deleted a live run's temporary file (and a
    `fit`'s checkpoint being written), failing that run's output after its compute."""
    import subprocess
    import time

    from segpipe.fileio import STALE_AFTER_S, TMP_PREFIX, _host_tag, _temp_name, is_stale_temporary

    mine = tmp_path / _temp_name(TMP_PREFIX, ".png")
    mine.write_bytes(b"x")
    assert not is_stale_temporary(mine)  # this process is alive
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = tmp_path / f"{TMP_PREFIX}{_host_tag()}.{child.pid}-abc.png"
    dead.write_bytes(b"x")
    assert is_stale_temporary(dead)  # its writer is gone
    unknown = tmp_path / f"{TMP_PREFIX}0123abcd.png"  # another machine's, or an old name
    unknown.write_bytes(b"x")
    assert not is_stale_temporary(unknown)
    old = time.time() - STALE_AFTER_S - 1
    os.utime(unknown, (old, old))
    assert is_stale_temporary(unknown)


def test_a_temporary_file_whose_pid_names_another_process_now_is_stale(tmp_path: Path) -> None:
    """A fit killed in a container left its lock and a partial checkpoint; restarted in a fresh
    PID namespace, the same PID belonged to another live process, and the lock refused every
    restart ("another segpipe fit (process 2 ...) is writing checkpoints")."""
    from segpipe.fileio import TMP_PREFIX, _host_tag, _start_ticks, is_stale_temporary

    parent = os.getppid()  # alive, and not the writer
    started = _start_ticks(parent)
    if started is None:  # pragma: no cover - no /proc (not Linux)
        pytest.skip("process start times are read from /proc")
    reused = tmp_path / f"{TMP_PREFIX}{_host_tag()}.{parent}.{started + 1}-abc-fit.lock"
    reused.write_bytes(b"x")
    assert is_stale_temporary(reused)
    live = tmp_path / f"{TMP_PREFIX}{_host_tag()}.{parent}.{started}-abc-fit.lock"
    live.write_bytes(b"x")
    assert not is_stale_temporary(live)
    older = tmp_path / f"{TMP_PREFIX}{_host_tag()}.{parent}-abc-fit.lock"  # before start times
    older.write_bytes(b"x")
    assert not is_stale_temporary(older)


def test_an_output_folder_that_cannot_be_made_names_what_stops_it(tmp_path, monkeypatch):
    """A missing folder under a read-only mount: 'fix the permissions of ro/sub/deeper', a
    folder that does not exist, for a cause that is no permission."""
    from segpipe.fileio import OutputDirError, check_output_dir

    target = tmp_path / "sub" / "deeper"

    def refuse(code):
        def mkdir(self, *args, **kwargs):
            raise OSError(code, os.strerror(code), str(self))
        return mkdir

    monkeypatch.setattr(Path, "mkdir", refuse(errno.EROFS))
    with pytest.raises(OutputDirError) as exc:
        check_output_dir(target, "predictions", "output")
    assert "Read-only file system" in str(exc.value)
    assert "set --output to a folder on a disk that is mounted writable" in str(exc.value)
    monkeypatch.setattr(Path, "mkdir", refuse(errno.EACCES))
    with pytest.raises(OutputDirError) as exc:
        check_output_dir(target, "predictions", "output")
    assert str(exc.value).endswith(f"or fix the permissions of {tmp_path}.")


def test_a_full_disk_under_an_output_folder_is_not_called_a_permission_problem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import tempfile

    from segpipe.fileio import OutputDirError, check_output_dir

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(OutputDirError) as info:
        check_output_dir(tmp_path / "c", "the CamVid download", "cache")
    assert "No space left on device; free some space there, or set --cache to a folder on a " \
        "disk with room" in str(info.value) and "permissions" not in str(info.value)
