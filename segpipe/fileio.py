"""Atomic file output: write to a temporary name in the target folder, rename when complete.

Every file segpipe writes for keeps (checkpoints, predictions, reports, exports, downloads) goes
through :class:`AtomicFile`, directly or through the helpers built on it:

* :func:`atomic_path` hands a temporary path to a library that writes by name (GDAL,
  ``torch.onnx.export``, ...);
* :func:`atomic_open` hands it a binary file object (``torch.save``, ``onnx.save``, ...);
* :func:`atomic_write_bytes`, :func:`atomic_write_text` and :func:`atomic_write_json` write data.

The guarantees:

* **Beside the target.** The temporary file (``.segpipe-tmp-XXXX<suffix>``, see
  :data:`TMP_PREFIX`) lives in the target's folder, so the final ``os.replace`` is an atomic
  rename on the same file system, never a copy.
* **Complete or absent.** The file is fsynced before the rename and the folder after it (best
  effort), so after a crash or a power cut the target is the old file or the new one, never a
  torn one. On *any* error (a short write, ``ENOSPC``, ``EDQUOT``, an error raised by the library,
  Ctrl-C) the temporary file is deleted and the error propagates: nothing partial ever appears
  under the final name, and an existing file there is left untouched.
* **Checked writes.** Bytes are written with :func:`write_all`, which loops over ``os.write``
  and treats a write that makes no progress as a full disk. (Libraries that write from C, such as
  Pillow's encoders, may ignore the count a short ``write()`` returns on a nearly full disk; write
  their output to memory first and hand the bytes over.)
* **Usual permissions.** The temporary file is created with ``os.open(..., 0o666)``, so the
  kernel applies the umask (and a folder's default ACL) exactly as for a plain ``open()``: the
  final file gets ``0o666 & ~umask`` (0644 under umask 022), not ``mkstemp``'s 0600. Nothing
  changes the process-wide umask, so this is safe with threads.
* **A clear error for a full disk.** Running out of space (or quota) raises
  :class:`DiskFullError`, an ``OSError`` with ``errno.ENOSPC`` (or ``EDQUOT``) whose message names
  the target and says what to do. :func:`is_disk_full` recognises a full disk anywhere in an
  exception's chain, including torch's ``RuntimeError`` from its zip writer.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import RawIOBase
from pathlib import Path
from typing import IO, Any

__all__ = [
    "LOW_SPACE_BYTES",
    "TMP_PREFIX",
    "AtomicFile",
    "DiskFullError",
    "OutputDirError",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "disk_full_error",
    "file_fingerprint",
    "fsync_dir",
    "is_stale_temporary",
    "is_disk_full",
    "low_on_space",
    "make_temp_dir",
    "own_temporary_prefix",
    "write_all",
    "write_file_bytes",
]

#: Prefix of in-progress files; anything starting with it is an unfinished write.
TMP_PREFIX = ".segpipe-tmp-"

#: Free space below which a write error without an errno (GDAL's) is taken for a full disk.
LOW_SPACE_BYTES = 4 * 2**20

_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None
)
#: What full-disk errors say when they carry no errno.
_FULL_TEXT = {"no space left on device": errno.ENOSPC}
if hasattr(errno, "EDQUOT"):
    _FULL_TEXT["disk quota exceeded"] = errno.EDQUOT
#: torch's zip writer (``inline_container.cc``) when a write fails; it reports no errno.
_TORCH_WRITE_TEXT = ("unexpected pos", "file write failed")

_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class DiskFullError(OSError):
    """No space left on the device (or the disk quota is exceeded) while writing a file.

    Raised by the atomic writers after the temporary file was deleted: nothing partial is left
    under the target's name, and a file that was there before is untouched (by the atomic
    writers; the in-place writers delete their partial file).

    Args:
        path: The file that could not be written.
        code: ``errno.ENOSPC`` (default) or ``errno.EDQUOT``.

    Attributes:
        path: The file that could not be written.
    """

    def __init__(self, path: str | os.PathLike[str], code: int = errno.ENOSPC) -> None:
        self.path = Path(path)
        quota = code != errno.ENOSPC and code == getattr(errno, "EDQUOT", None)
        what = "disk quota exceeded" if quota else "no space left on the device"
        folder = self.path.parent
        super().__init__(
            code,
            f"{what} while writing {self.path}; nothing partial was left under that name. Free "
            f"some space in {folder} (or write to another disk) and run again.",
        )

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self.path), self.errno))


#: Bytes at a file's end that :func:`file_fingerprint` hashes.
_FINGERPRINT_TAIL = 1 << 20


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap identity of a file's contents: its size and the SHA-256 of its last MiB.

    A checkpoint is a zip archive (``torch.save``) whose central directory, at its end, holds
    the CRC-32 of every tensor it stores, so that a checkpoint rewritten with other weights
    differs there, whatever its size; a smaller file is hashed whole. It reads 1 MiB however
    large the file is, and stays the same when the file is copied (unlike its mtime).

    Raises:
        OSError: The file cannot be read.
    """
    import hashlib

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - _FINGERPRINT_TAIL))
        digest = hashlib.sha256(f.read()).hexdigest()
    return f"{size}:{digest}"


def _full_errno(exc: BaseException | None) -> int | None:
    """``ENOSPC``/``EDQUOT`` when ``exc`` or an exception in its chain says the disk is full."""
    seen: set[int] = set()
    stack = [exc]
    other_os_error = torch_write = False
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        code = getattr(e, "errno", None) if isinstance(e, OSError) else None
        if code in _FULL_ERRNOS:
            return code
        if isinstance(code, int):
            other_os_error = True
        try:
            text = str(e).lower()
        except Exception:  # noqa: BLE001 - a broken __str__ says nothing about the disk
            text = ""
        for marker, full in _FULL_TEXT.items():
            if marker in text:
                return full
        torch_write = torch_write or any(marker in text for marker in _TORCH_WRITE_TEXT)
        stack += [e.__cause__, e.__context__]
    # torch's zip writer fails with "unexpected pos ..." / "file write failed" and no errno; a full
    # disk is by far the commonest cause, unless the chain names another OS error.
    return errno.ENOSPC if torch_write and not other_os_error else None


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or any exception in its ``__cause__``/``__context__`` chain) is a full disk.

    Recognises ``ENOSPC`` and ``EDQUOT`` ``OSError``\\ s (:class:`DiskFullError` included), their
    messages in exceptions that carry no errno, and torch's ``RuntimeError`` from its zip writer
    (``unexpected pos`` / ``file write failed``) when no other OS error explains it.

    Args:
        exc: The exception (None gives False).

    Returns:
        True for a full disk or exceeded quota.
    """
    return _full_errno(exc) is not None


def low_on_space(path: str | os.PathLike[str], min_free: int = LOW_SPACE_BYTES) -> bool:
    """Whether the file system holding ``path`` has less than ``min_free`` bytes available.

    For write errors that carry no errno (GDAL reports ``Write error at scanline N``): with almost
    no space left, a full disk is the likely cause.

    Args:
        path: A file or folder (need not exist; its nearest existing parent is used).
        min_free: Threshold in bytes.

    Returns:
        True when the space available to this user is below ``min_free``; False when unknown.
    """
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < min_free
    except OSError:
        return False


def write_all(fd: int, data: Any) -> int:
    """Write all of ``data`` to the file descriptor ``fd``, checking every ``os.write``'s count.

    A short write is continued where it stopped; a write that makes no progress (the file system
    accepts no more bytes) raises, so a truncated file can never pass for a complete one.

    Args:
        fd: An open file descriptor.
        data: Bytes or any C-contiguous buffer.

    Returns:
        The number of bytes written (all of them).

    Raises:
        OSError: From ``os.write`` (``ENOSPC``, ``EDQUOT``, ``EIO``...), or ``ENOSPC`` when a write
            returned 0.
    """
    view = memoryview(data).cast("B")
    total = len(view)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write: the file system accepted no more bytes")
        view = view[n:]
    return total


class _CheckedFile(RawIOBase):
    """A write-only binary file on a descriptor whose writes go through :func:`write_all`.

    It deliberately has no ``fileno()``: a library given it must write through ``write()``, so
    every byte count is checked (C code writing to the descriptor directly could ignore a short
    write).
    """

    def __init__(self, fd: int, name: Path) -> None:
        super().__init__()
        self._fd: int | None = fd
        self.name = str(name)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        if self._fd is None:
            raise ValueError("write to a closed file")
        return write_all(self._fd, data)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        try:
            super().close()
        finally:
            if fd is not None:
                os.close(fd)


def _open_checked(path: Path, append: bool = False) -> IO[bytes]:
    flags = os.O_WRONLY | os.O_CREAT | _BINARY | _CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o666)  # the kernel applies the umask, as for open()
    return _CheckedFile(fd, path)  # type: ignore[return-value]


def write_file_bytes(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` to ``path`` with checked writes, in place (no temporary file, no fsync).

    For writers whose caller manages atomicity (the path is usually an :class:`AtomicFile`'s
    temporary file). The file is created with the mode a plain ``open()`` gives, or truncated.
    On error the partial file is deleted and the error propagates.

    Args:
        path: The file.
        data: Bytes or any C-contiguous buffer.

    Returns:
        ``path`` as a Path.

    Raises:
        OSError: The write failed (``ENOSPC``, ``EDQUOT``, a write that made no progress...).
    """
    p = Path(path)
    try:
        with _open_checked(p) as fh:
            fh.write(data)
    except BaseException:
        p.unlink(missing_ok=True)
        raise
    return p


def _fsync_file(path: Path) -> None:
    """fsync a file by name (Windows needs a writable handle for it)."""
    fd = os.open(path, (os.O_RDWR if os.name == "nt" else os.O_RDONLY) | _BINARY | _CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, getattr(errno, "ENOTSUP", None)):
            raise  # EIO/ENOSPC here means the data did not reach the disk
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make renames in ``folder`` durable (POSIX); a no-op where folders cannot be opened/synced."""
    try:
        fd = os.open(folder, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """8 hex digits naming this machine in temporary names (folders may be shared)."""
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux's ``/proc/PID/stat``), or
    None where that cannot be read: with the PID it names one process, where a PID alone is
    reused (by a restarted container's fresh PID namespace at once)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        return int(data[data.rindex(b")") + 2:].split()[19])  # field 22; the name may hold ")"
    except (OSError, ValueError, IndexError):
        return None


def own_temporary_prefix(prefix: str = TMP_PREFIX) -> str:
    """``<prefix><host>.<pid>.<start>-`` (``<prefix><host>.<pid>-`` where the process's start
    time cannot be read): how this process's temporary names begin."""
    start = _start_ticks(os.getpid())
    return f"{prefix}{_host_tag()}.{os.getpid()}{'' if start is None else f'.{start}'}-"


def _temp_name(prefix: str, suffix: str) -> str:
    """``<prefix><host>.<pid>.<start>-<random><suffix>``: the writer is in the name, so that a
    later command can tell an interrupted write from another live process's
    (:func:`is_stale_temporary`)."""
    return f"{own_temporary_prefix(prefix)}{secrets.token_hex(6)}{suffix}"


_OWNER = re.compile(r"^" + re.escape(TMP_PREFIX) + r"([0-9a-f]{8})\.(\d+)(?:\.(\d+))?-")

STALE_AFTER_S = 3600.0
"""A temporary file of unknown writer left unchanged this long is taken for an interrupted
write (a live writer keeps touching its file)."""


def is_stale_temporary(path: str | os.PathLike[str], stale_after: float = STALE_AFTER_S) -> bool:
    """Whether a ``TMP_PREFIX`` file is an interrupted write that may be deleted.

    Its writer is named in it (:func:`_temp_name`): a process of this machine that no longer
    runs left it (or one that started at another time than the writer: its PID was reused, as
    a restarted container's fresh PID namespace does at once); another live process's (a
    second ``predict`` or ``fit`` on the same folder) is kept. Files of another machine, or
    named before writers were (or on a system where a process cannot be probed with signal 0),
    are stale once unchanged for ``stale_after`` seconds.

    Args:
        path: A file whose name starts with :data:`TMP_PREFIX`.
        stale_after: Age (since the last write) from which a file of unknown writer is stale.

    Returns:
        True when it may be deleted.
    """
    owner = _OWNER.match(Path(path).name)
    if owner is not None and owner.group(1) == _host_tag() and os.name == "posix":
        pid = int(owner.group(2))
        if pid == os.getpid():  # this process's, or one before a restart that reused its PID
            started, now = owner.group(3), _start_ticks(pid)
            return started is not None and now is not None and now != int(started)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # another user's live process
            return False
        started = owner.group(3)
        now = _start_ticks(pid) if started is not None else None
        return now is not None and now != int(started)  # the PID names another process now
    try:
        return time.time() - os.stat(path).st_mtime >= stale_after
    except OSError:
        return False


def _create_temp(folder: Path, suffix: str, create: bool = True) -> Path:
    """A new empty file ``TMP_PREFIX<random><suffix>`` in ``folder`` (mode as for ``open()``).

    With ``create=False`` only an unused name (48 random bits) is picked.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY | _CLOEXEC
    for _ in range(100):
        path = folder / _temp_name(TMP_PREFIX, suffix)
        if not create:
            if not os.path.lexists(path):
                return path
            continue
        try:
            fd = os.open(path, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return path
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(folder))


def make_temp_dir(folder: str | os.PathLike[str], prefix: str = TMP_PREFIX) -> Path:
    """Create a new folder ``<prefix><random>`` in ``folder``, with the mode ``mkdir`` gives.

    Unlike ``tempfile.mkdtemp`` (always 0700), the umask applies, so a folder renamed into place
    when complete is as readable as any other.

    Args:
        folder: Parent folder (created if missing).
        prefix: Name prefix.

    Returns:
        The new folder.
    """
    parent = Path(folder)
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        path = parent / _temp_name(prefix, "")
        try:
            path.mkdir(0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no free temporary folder name", str(parent))


def disk_full_error(
    exc: BaseException, path: str | os.PathLike[str]
) -> DiskFullError | None:
    """A :class:`DiskFullError` naming ``path`` when ``exc`` is a full disk (:func:`is_disk_full`).

    Args:
        exc: The exception raised while writing ``path``.
        path: The file being written (its final name, for the message).

    Returns:
        ``exc`` itself when it is already a DiskFullError for ``path``, a new one (raise it
        ``from exc``) for any other full-disk error, None when ``exc`` is not about the disk
        (including ``KeyboardInterrupt`` and ``SystemExit``).
    """
    if not isinstance(exc, Exception):
        return None
    code = _full_errno(exc)
    if code is None:
        return None
    target = Path(path)
    if isinstance(exc, DiskFullError) and exc.path == target:
        return exc
    return DiskFullError(target, code)


class AtomicFile:
    """One atomic write: a temporary file beside ``path``, renamed onto it by :meth:`commit`.

    Use as a context manager (commit when the block succeeds, :meth:`discard` when it raises) or
    call :meth:`commit`/:meth:`discard` yourself, e.g. to commit several files together. Write
    the temporary file :attr:`path` by name, through :meth:`open`, or with :meth:`write_bytes`.
    A full disk (at any step, including the fsync) raises :class:`DiskFullError` naming
    ``path``; any other error propagates unchanged. Either way the temporary file is gone.

    Args:
        path: The target file (its folder is created).
        suffix: Suffix of the temporary file (default: the target's, so libraries that pick the
            format by extension work).
        temp: Use this file as the temporary file instead of a new random one (e.g. a resumable
            ``<name>.part`` download); it is not created, only renamed by :meth:`commit` or
            deleted by :meth:`discard`.
        create: Create the (empty) temporary file now, which reserves its name. False only
            picks an unused random name and leaves creating the file to the writer, so that a
            temporary file exists only while its bytes are written (a writer that encodes in
            memory first, a library that creates its file itself).

    Attributes:
        target: The final file.
        path: The temporary file.

    Raises:
        DiskFullError: No room to create the temporary file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        suffix: str | None = None,
        temp: str | os.PathLike[str] | None = None,
        create: bool = True,
    ) -> None:
        self.target = Path(path)
        self._state = "open"
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            if temp is not None:
                self.path = Path(temp)
            else:
                self.path = _create_temp(
                    self.target.parent, self.target.suffix if suffix is None else suffix, create
                )
        except Exception as exc:
            full = disk_full_error(exc, self.target)
            if full is None:
                raise
            raise full from exc

    @property
    def done(self) -> bool:
        """Whether the write was committed or discarded."""
        return self._state != "open"

    def open(self, append: bool = False) -> IO[bytes]:
        """The temporary file as a write-only binary file (truncated unless ``append``).

        Every ``write()`` is checked (:func:`write_all`). The object has no ``fileno()``, so
        libraries cannot bypass the check by writing to the descriptor.

        Args:
            append: Keep the existing content and write after it (resuming).

        Returns:
            A binary file object; close it before :meth:`commit`.
        """
        return _open_checked(self.path, append=append)

    def write_bytes(self, data: Any) -> None:
        """Replace the temporary file's content with ``data`` (checked writes)."""
        with self.open() as fh:
            fh.write(data)

    def commit(self) -> Path:
        """fsync the temporary file, rename it onto the target, fsync the folder.

        Returns:
            The target.

        Raises:
            DiskFullError: The data could not be flushed for lack of space (the temporary file is
                deleted, the target untouched).
            OSError: Any other failure (likewise).
        """
        if self._state != "open":
            raise ValueError(f"{self.target}: this atomic write was already {self._state}")
        try:
            _fsync_file(self.path)
            os.replace(self.path, self.target)
        except BaseException as exc:
            self.discard()
            full = disk_full_error(exc, self.target)
            if full is None:
                raise
            raise full from exc
        self._state = "committed"
        fsync_dir(self.target.parent)
        return self.target

    def discard(self) -> None:
        """Delete the temporary file (idempotent; nothing happens after :meth:`commit`)."""
        if self._state != "open":
            return
        self._state = "discarded"
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. the folder vanished: nothing is left under the target's name either way

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            self.commit()
            return False
        self.discard()
        full = disk_full_error(exc, self.target)
        if full is not None and full is not exc:
            raise full from exc
        return False


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    For libraries that write a file by name (GDAL, ``torch.onnx.export``...). The temporary file
    exists (empty) and keeps ``path``'s suffix so libraries that pick a format by extension
    work. On error the temporary file is removed and the exception propagates (a full disk as
    :class:`DiskFullError`).

    Args:
        path: The target file.
        suffix: Suffix of the temporary file (default: the target's).

    Yields:
        The temporary file's path.
    """
    with AtomicFile(path, suffix=suffix) as out:
        yield out.path


@contextmanager
def atomic_open(path: str | os.PathLike[str], *, suffix: str | None = None) -> Iterator[IO[bytes]]:
    """Yield a binary file object writing a temporary file beside ``path``; commit on success.

    For libraries that write to a file object (``torch.save``, ``onnx.save``...). Every write is
    checked (see :meth:`AtomicFile.open`). On error the temporary file is removed and the
    exception propagates (a full disk as :class:`DiskFullError`, also when it surfaces as
    torch's ``RuntimeError``).

    Args:
        path: The target file.
        suffix: Suffix of the temporary file (default: the target's).

    Yields:
        The open file (closed before the commit).
    """
    with AtomicFile(path, suffix=suffix) as out:
        with out.open() as fh:
            yield fh


def atomic_write_bytes(
    path: str | os.PathLike[str], data: Any, *, suffix: str | None = None
) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    Args:
        path: The target file.
        data: Bytes or any C-contiguous buffer.
        suffix: Suffix of the temporary file (default: the target's).

    Returns:
        ``path`` as a Path.

    Raises:
        DiskFullError: No space (or quota) left; ``path`` is untouched.
    """
    with AtomicFile(path, suffix=suffix) as out:
        out.write_bytes(data)
    return out.target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as the platform's, as text mode does) atomically.

    Returns:
        ``path`` as a Path.
    """
    if os.linesep != "\n":
        text = text.replace("\n", os.linesep)
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically and return the path."""
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


# ------------------------------------------------------------------ output folders
class OutputDirError(RuntimeError):
    """An output folder cannot be created or written, or lacks room for the checkpoints."""


def _blocking_file(path: Path) -> Path | None:
    """The first component of ``path`` that exists but is not a folder, if any."""
    for parent in [*reversed(path.parents), path]:
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_output_dir(
    path: str | os.PathLike[str], what: str, option: str, need_bytes: int = 0
) -> Path:
    """Make sure segpipe can write into ``path`` before any work starts.

    Creates the folder, writes and deletes a probe file (``os.access`` is not enough: it says
    yes to root on read-only mounts) and, with ``need_bytes``, checks the free space.

    Args:
        path: Folder.
        what: What goes there, for the message (e.g. ``"checkpoints"``).
        option: The option that sets it, for the message (e.g. ``"checkpoint.dirpath"``).
        need_bytes: Free space required.

    Returns:
        The folder.

    Raises:
        OutputDirError: Naming the folder, the reason and the fix.
    """
    folder = Path(path).expanduser()
    fix = f"set --{option} to a folder you can write to, or fix the permissions of {folder}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        try:
            blocker = _blocking_file(folder)
        except OSError:  # a folder above that cannot be entered
            blocker = None
        if blocker is not None:
            reason = f"{blocker} is a file, not a folder"
            fix = f"set --{option} to a folder you can write to, or move that file away"
        else:
            reason = exc.strerror or str(exc)
            # The folder does not exist: name the one that stopped its creation.
            parent = None
            for candidate in folder.parents:
                try:
                    if candidate.is_dir():
                        parent = candidate
                        break
                except OSError:  # one that cannot be entered, a name too long
                    continue
            if exc.errno == errno.EROFS:
                fix = f"set --{option} to a folder on a disk that is mounted writable"
            elif parent is not None:
                fix = (f"set --{option} to a folder you can write to, or fix the permissions "
                       f"of {parent}")
        raise OutputDirError(f"{folder}: cannot create the folder for {what}: {reason}; {fix}.") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".probe", dir=folder)
        try:
            os.write(fd, b"segpipe")
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        if is_disk_full(exc):  # not a matter of permissions
            fix = f"free some space there, or set --{option} to a folder on a disk with room"
        raise OutputDirError(
            f"{folder}: cannot write {what} there: {exc.strerror or exc}; {fix}."
        ) from exc
    if need_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < need_bytes:
            raise OutputDirError(
                f"{folder}: only {free / 2**20:.1f} MiB free, but writing {what} needs about "
                f"{need_bytes / 2**20:.1f} MiB (a new checkpoint is written beside the old one "
                f"before replacing it); free some space or set --{option} to a disk with room."
            )
    return folder
