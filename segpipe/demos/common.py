"""What both demos share: their time budget as Lightning spells it, and the output folders
they rewrite (refused when they hold files the demo did not write)."""

from __future__ import annotations

import shutil
from pathlib import Path

from segpipe.fileio import TMP_PREFIX

__all__ = ["check_own", "clear_own", "max_time_string"]


def max_time_string(minutes: float) -> str:
    """Lightning's ``DD:HH:MM:SS`` for a budget in minutes (at least one second)."""
    seconds = max(1, round(minutes * 60))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    mins, secs = divmod(rest, 60)
    return f"{days:02d}:{hours:02d}:{mins:02d}:{secs:02d}"


def check_own(folder: Path, what: str, error: type[Exception]) -> None:
    """Refuse ``folder`` unless it holds only what an earlier run of the demo wrote there: PNG
    and JPEG files, ``segpipe predict``'s record of its settings, and a killed run's unfinished
    writes.

    Args:
        folder: The demo's output folder (need not exist).
        what: What the demo writes there, for the message.
        error: The exception class to raise.

    Raises:
        error: The folder holds other files.
    """
    from segpipe.predict.command import SETTINGS_FILE  # predict's record in its output folder

    if not folder.exists():
        return
    others = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in (".png", ".jpg")
              and not p.name.startswith(TMP_PREFIX) and p.name != SETTINGS_FILE]
    if others or not folder.is_dir():
        raise error(f"{folder} holds files the demo did not write ({others[0] if others else folder}); "
                    f"choose another --output (the demo rewrites its {what} there)")


def clear_own(folder: Path, what: str, error: type[Exception]) -> None:
    """Remove ``folder`` when :func:`check_own` finds only the demo's files in it, so a rerun's
    outputs are not mixed with stale ones."""
    check_own(folder, what, error)
    if folder.exists():
        shutil.rmtree(folder)
