"""segpipe.demos.common: the demos' time budget string and the output folders they may rewrite."""

from __future__ import annotations

from pathlib import Path

import pytest

from segpipe.demos.common import check_own, clear_own, max_time_string
from segpipe.fileio import TMP_PREFIX


class _Refused(Exception):
    pass


def test_a_tiny_budget_is_at_least_one_second() -> None:
    """A budget that rounds to 0 s would stop Lightning at once; it is one second instead."""
    assert max_time_string(0.001) == "00:00:00:01"
    assert max_time_string(0) == "00:00:00:01"


def test_the_budget_is_rounded_to_the_nearest_second() -> None:
    """4.1 minutes is 246 s (4.1 * 60 is 245.99999... in floating point), not 245 s."""
    assert max_time_string(4.1) == "00:00:04:06"
    assert max_time_string(2 / 60 - 1e-9) == "00:00:00:02"


def test_the_demos_own_files_and_unfinished_writes_are_accepted_and_cleared(tmp_path: Path) -> None:
    """Masks (any case of .png/.jpg) and a killed run's temporary files are the demo's: the
    folder is accepted and cleared for the rerun."""
    folder = tmp_path / "predictions"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "a_overlay.jpg", "B.PNG", "C_overlay.JPG", f"{TMP_PREFIX}x.png.part",
                 f"sub/{TMP_PREFIX}y"):
        (folder / name).write_bytes(b"x")
    check_own(folder, "predictions", _Refused)
    clear_own(folder, "predictions", _Refused)
    assert not folder.exists()
    clear_own(folder, "predictions", _Refused)  # a missing folder is fine


def test_a_folder_with_the_users_files_is_refused_and_kept(tmp_path: Path) -> None:
    """clear_own never deletes a folder holding files the demo did not write."""
    folder = tmp_path / "predictions"
    (folder / "deep").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"x")
    (folder / "deep" / "notes.txt").write_text("keep")
    with pytest.raises(_Refused, match="holds files the demo did not write.*notes.txt"):
        clear_own(folder, "predictions", _Refused)
    assert (folder / "deep" / "notes.txt").read_text() == "keep" and (folder / "a.png").exists()


def test_a_file_where_the_folder_goes_is_refused(tmp_path: Path) -> None:
    """A file at the folder's path is refused with the demo's error (and kept), not deleted or
    left to fail later."""
    target = tmp_path / "predictions"
    target.write_text("mine")
    with pytest.raises(_Refused, match="choose another --output"):
        check_own(target, "predictions", _Refused)
    with pytest.raises(_Refused):
        clear_own(target, "predictions", _Refused)
    assert target.read_text() == "mine"
