"""Errors shared across segpipe's layers (no third-party imports)."""

from __future__ import annotations

import os

__all__ = ["BatchFormatError", "ConfigError", "MissingExtraError", "TrainingDivergedError", "UnreadableCheckpointError",
           "check_checkpoint_format", "looks_like_checkpoint"]


class ConfigError(ValueError):
    """An option (config, command line or constructor argument) has a value segpipe cannot use.

    The message names the option, what it accepts and what was given. ``segpipe fit|validate|test``
    print it as one ``segpipe: error: ...`` line instead of a traceback. A subclass of
    :class:`ValueError`, so callers in Python that catch that keep working.
    """


class BatchFormatError(ConfigError):
    """A batch from the data (a data module of the user's) that is not segpipe's
    ``{"image": float (N, C, H, W), "mask": int64 (N, H, W)}``: the message names the data
    module, what it gave and the change to make (one line, not a traceback from a loss)."""


class TrainingDivergedError(ConfigError):
    """The training loss or weights became NaN or infinite: the run stops before a checkpoint of
    them is written (the message names the epoch and the usual causes)."""


class MissingExtraError(ImportError):
    """An optional package a feature needs is not installed; the message gives the install
    command (``segpipe`` commands print it as one line, exit code 2). An :class:`ImportError`,
    so Python callers can catch it as one (never a ``SystemExit``)."""


class UnreadableCheckpointError(ConfigError):
    """A checkpoint file that is there and readable, but that torch cannot load: truncated (a
    copy, a download or a write that did not finish) or corrupt. One line naming the file,
    torch's reason and what to use instead."""

    def __init__(self, path: str | os.PathLike[str], exc: BaseException) -> None:
        reason = (str(exc).strip().splitlines() or [""])[0]
        super().__init__(
            f"{os.fspath(path)}: not a readable checkpoint, truncated or corrupt "
            f"({type(exc).__name__}: {reason}); use another one (the run's best-*.ckpt, or "
            "the last.ckpt of checkpoints/earlier-K), or copy it again if it was copied")


#: What ``torch.load`` raises for a truncated or corrupt file (zip reader, unpickler, storage).
CHECKPOINT_READ_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, EOFError, OSError,
                                                           ValueError)


def _head(path: str | os.PathLike[str]) -> bytes | None:
    """The first 4 bytes of ``path`` (None when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4)
    except OSError:
        return None


def _checkpoint_head(head: bytes) -> bool:
    """Whether a file starting with ``head`` is torch's zip format or a legacy pickle."""
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def looks_like_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts as a PyTorch checkpoint does (False when it cannot be read)."""
    head = _head(path)
    return head is not None and _checkpoint_head(head)


def check_checkpoint_format(path: str | os.PathLike[str]) -> None:
    """Raise :class:`ConfigError` when ``path`` is neither torch's zip format nor a legacy
    pickle: an image or a YAML file given as a checkpoint, which ``torch.load`` would report as
    a ``weights_only`` failure and advise unpickling in full. A missing or unreadable file is
    left to the caller's own error."""
    head = _head(path)
    if head is not None and not _checkpoint_head(head):
        raise ConfigError(f"{os.fspath(path)} is not a PyTorch checkpoint (it starts with "
                          f"{head!r}; a checkpoint written by `segpipe fit` is a zip archive, "
                          "e.g. RUN/checkpoints/last.ckpt)")
