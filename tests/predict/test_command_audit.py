"""`segpipe predict` end to end: settings records after failures, unlistable folders (found by a
mutation audit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segpipe.data.io import write_image
from tests.predict.conftest import noise_image
from tests.predict.test_command import run


def test_an_overwrite_run_with_a_failed_file_is_not_taken_for_complete(
        tmp_path: Path, pointwise_ckpt: Path, caplog, capsys) -> None:
    """An input replaced by a broken file keeps the output the older settings made; an
    --overwrite run with new settings that fails it has not remade every output, so its record
    must keep saying so (a plain rerun then warns), as after an interrupted one."""
    src, out = tmp_path / "in", tmp_path / "out"
    for i in range(2):
        write_image(src / f"im{i}.png", noise_image(16, 16, seed=i))
    assert run(pointwise_ckpt, src, out) == 0
    (src / "im1.png").write_bytes(b"")  # broken since: its old output stays
    assert run(pointwise_ckpt, src, out, "--overwrite", "--tile", "32") == 1
    assert "1 written, 0 skipped (already done), 1 failed" in capsys.readouterr().out
    record = json.loads((out / ".segpipe-predict.json").read_text())
    assert record["tile"] == 32 and record.get("replacing_older_outputs") is True
    with caplog.at_level("WARNING", logger="segpipe.predict.command"):
        assert run(pointwise_ckpt, src, out, "--tile", "32") == 1
    assert "an --overwrite run with these settings was stopped before it had remade" in caplog.text


def test_a_folder_that_cannot_be_listed_fails_the_run(
        tmp_path: Path, pointwise_ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Its images are not predicted, so the run must not end as complete (exit 0). Root
    lists any folder, so the listing error is made as os.scandir raises it."""
    import os

    src, out = tmp_path / "in", tmp_path / "out"
    write_image(src / "a.png", noise_image(16, 16))
    write_image(src / "locked" / "b.png", noise_image(16, 16))
    real = os.scandir

    def scandir(path=".", *args, **kwargs):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    assert run(pointwise_ckpt, src, out) == 1
    text = capsys.readouterr().out
    assert "1 written, 0 skipped (already done), 1 failed" in text
    assert f"{src / 'locked'}: the folder cannot be listed (Permission denied)" in text
