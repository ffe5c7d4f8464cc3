"""segpipe.demos.mri on a tiny synthetic template: labels, splits, the slices written, and how
the demo treats its training's outcome (no real training: ``segpipe fit``/``test`` are faked)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.demos import main as demo_main
from segpipe.demos import mri


def _volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, z) = (60, 50, 20) uint8 T1/GM/WM volumes: every slice has a 50x45 block of tissue
    (>= 2000 pixels), except slice 3, which has only 10x10."""
    rng = np.random.default_rng(0)
    t1 = rng.integers(30, 255, size=(60, 50, 20), dtype=np.uint8)
    t1[:5] = 0  # background rows
    gm = np.zeros_like(t1)
    wm = np.zeros_like(t1)
    gm[5:55, 2:25] = 200
    wm[5:55, 25:47] = 220
    for v in (gm, wm):
        v[:, :, 3] = 0
    gm[20:30, 20:30, 3] = 200
    return t1, gm, wm


@pytest.fixture()
def template(monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vols = _volumes()
    monkeypatch.setattr(mri, "_template_volumes", lambda: vols)
    return vols


def test_slice_labels_thresholds() -> None:
    """T1 above 20 is inside the head; a tissue is labelled where it reaches 128 (50 %), the
    more probable one winning and grey matter taking ties."""
    t1 = np.array([[20, 21, 200, 200, 200, 200, 200]], dtype=np.uint8)
    gm = np.array([[0, 0, 127, 128, 130, 128, 100]], dtype=np.uint8)
    wm = np.array([[0, 0, 127, 0, 130, 129, 128]], dtype=np.uint8)
    assert mri.slice_labels(t1, gm, wm).tolist() == [[0, 1, 1, 2, 2, 3, 3]]


def test_split_of_holds_val_and_test_apart() -> None:
    """Per block of 10 slices: 0-5 train, 7 val, 9 test; 6 and 8 unused, so no val/test slice
    touches a training slice."""
    assert [mri.split_of(z) for z in range(10)] == ["train"] * 6 + [None, "val", None, "test"]
    assert mri.split_of(17) == "val" and mri.split_of(129) == "test" and mri.split_of(125) == "train"


def test_make_mri_dataset_writes_rotated_slices_and_labels(tmp_path: Path, template) -> None:  # noqa: ANN001
    """Slices with little brain are skipped; each written slice is the axial slice turned
    anterior-up, with its labels; the cap limits slices per split."""
    t1, gm, wm = template
    counts = mri.make_mri_dataset(tmp_path / "d")
    assert counts == {"train": 11, "val": 2, "test": 2}  # z 0-5, 10-15 less z=3; 7, 17; 9, 19
    assert not (tmp_path / "d" / "train" / "images" / "slice_003.png").exists()
    assert sorted(p.name for p in (tmp_path / "d" / "val" / "images").iterdir()) == [
        "slice_007.png", "slice_017.png"]
    img = np.asarray(Image.open(tmp_path / "d" / "test" / "images" / "slice_009.png"))
    mask = np.asarray(Image.open(tmp_path / "d" / "test" / "masks" / "slice_009.png"))
    want = np.rot90(t1[:, :, 9])
    assert img.shape == want.shape == (50, 60) and np.array_equal(img, want)
    assert np.array_equal(mask, mri.slice_labels(want, np.rot90(gm[:, :, 9]), np.rot90(wm[:, :, 9])))
    capped = mri.make_mri_dataset(tmp_path / "c", max_per_split=1)
    assert capped == {"train": 1, "val": 1, "test": 1}
    assert len(list((tmp_path / "c" / "train" / "images").iterdir())) == 1


def test_sigterm_during_training_exits_143(tmp_path: Path, template, monkeypatch,  # noqa: ANN001
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A SIGTERM'd training is a stop (exit 143, said so), not "training failed"."""
    from segpipe import cli

    monkeypatch.setattr(cli, "main", lambda argv: 143 if argv[0] == "fit" else 0)
    assert demo_main(["mri", "--output", str(tmp_path / "out"), "--smoke"]) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM before it finished" in err and "training failed" not in err


def test_an_earlier_runs_checkpoint_is_not_evaluated(tmp_path: Path, template, monkeypatch,  # noqa: ANN001
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """When training wrote no checkpoint, a stale one from an earlier run is not scored as if
    it were this run's."""
    from segpipe import cli

    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    stale = tmp_path / "out" / "run" / "checkpoints" / "last.ckpt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert demo_main(["mri", "--output", str(tmp_path / "out"), "--smoke"]) == 1
    assert "training wrote no checkpoint" in capsys.readouterr().err
    assert [c[0] for c in calls] == ["fit"]


def test_the_newest_best_checkpoint_is_evaluated(tmp_path: Path, template, monkeypatch) -> None:  # noqa: ANN001
    """Of several best-*.ckpt, the one written last (the best so far) is evaluated."""
    from segpipe import cli

    ckpts = tmp_path / "out" / "run" / "checkpoints"
    calls: list[list[str]] = []

    def fake(argv: list[str]) -> int:
        calls.append(argv)
        if argv[0] == "fit":
            ckpts.mkdir(parents=True)
            now = time.time()
            for name, t in (("best-a.ckpt", now + 20), ("best-b.ckpt", now + 10)):
                (ckpts / name).write_bytes(b"x")
                os.utime(ckpts / name, (t, t))
            return 0
        return 1  # evaluation "fails": the demo stops there

    monkeypatch.setattr(cli, "main", fake)
    assert demo_main(["mri", "--output", str(tmp_path / "out"), "--smoke"]) == 1
    assert calls[1][0] == "test" and f"--ckpt_path={ckpts / 'best-a.ckpt'}" in calls[1]
