"""The atomic writer and output folders: guarantees the other tests leave unchecked
(found by a mutation audit)."""

from __future__ import annotations

import os
from pathlib import Path

from segpipe.fileio import TMP_PREFIX, atomic_write_bytes, check_output_dir, file_fingerprint


def test_a_commit_renames_a_new_file_and_never_writes_into_the_old_one(tmp_path: Path) -> None:
    """A target written in place (copy, not rename) is torn by a crash mid-copy; a reader
    holding the old file (here: a hard link to it) would see it change under it."""
    target = tmp_path / "x.bin"
    target.write_bytes(b"old version")
    os.link(target, tmp_path / "reader")
    atomic_write_bytes(target, b"new version, longer")
    assert target.read_bytes() == b"new version, longer"
    assert (tmp_path / "reader").read_bytes() == b"old version"
    assert not (tmp_path / "reader").samefile(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reader", "x.bin"]


def test_checking_an_output_folder_leaves_nothing_in_it(tmp_path: Path) -> None:
    """The probe file must not stay (a rerun would find a stray hidden file per run)."""
    folder = check_output_dir(tmp_path / "out", "predictions", "output")
    check_output_dir(folder, "predictions", "output")
    assert list(folder.iterdir()) == []
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_a_fingerprint_sees_a_change_at_the_end_of_a_large_file(tmp_path: Path) -> None:
    """A zip checkpoint's CRCs are at its end; hashing the head missed retrained weights."""
    data = bytearray(os.urandom(3 * 2**20))
    path = tmp_path / "model.ckpt"
    path.write_bytes(bytes(data))
    before = file_fingerprint(path)
    data[-10] ^= 0xFF  # same size, other end
    path.write_bytes(bytes(data))
    assert file_fingerprint(path) != before


def test_an_in_place_write_that_fails_deletes_its_partial_file(tmp_path: Path, monkeypatch) -> None:
    """``write_file_bytes`` (what ``write_image``/``write_label_png`` write PNGs with, in
    place when called directly) must not leave a truncated file that looks like an image."""
    import errno

    import numpy as np
    import pytest

    from segpipe.data.io import write_image
    from segpipe.fileio import write_file_bytes

    real = os.write

    def full(fd: int, data) -> int:  # 100 bytes fit, then the disk is full
        if os.fstat(fd).st_size >= 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, bytes(memoryview(data)[:100]))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as info:
        write_file_bytes(tmp_path / "x.bin", b"y" * 1000)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        write_image(tmp_path / "x.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                                          np.uint8))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
