"""scripts/analyse_errors.py: wrong pixels binned by distance to the true border, threshold sweep."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.predict.conftest import make_ckpt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from analyse_errors import border_distance  # noqa: E402


def test_border_distance_is_one_next_to_another_class() -> None:
    truth = np.zeros((5, 6), dtype=np.int64)
    truth[:, 3:] = 1
    d = border_distance(truth)
    assert d[:, 2].tolist() == [1.0] * 5 and d[:, 3].tolist() == [1.0] * 5
    assert d[:, 0].tolist() == pytest.approx([3.0] * 5) and d[:, 5].tolist() == pytest.approx([3.0] * 5)
    assert np.isinf(border_distance(np.zeros((3, 3), dtype=np.int64))).all()


def test_border_distance_ignores_unlabelled_pixels() -> None:
    truth = np.zeros((5, 8), dtype=np.int64)
    truth[:, 6:] = 1
    truth[:, 2] = 255  # an unlabelled line: no border of its own
    d = border_distance(truth, ignore_index=255)
    assert d[:, 1].tolist() == pytest.approx([5.0] * 5)  # 5 px from class 1, not beside 255
    assert np.isinf(d[:, 2]).all()
    assert border_distance(truth)[:, 1].tolist() == [1.0] * 5  # 255 as a class: a border
    assert np.isinf(border_distance(np.array([[0, 255], [0, 0]]), 255)).all()


def test_script_takes_the_checkpoints_ignore_index(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "t.ckpt", "tests.predict.nets.ThresholdNet",
                     {"in_channels": 1, "num_classes": 2}, mean=[0.0], std=[1.0],
                     ignore_index=255)
    images, masks = tmp_path / "image", tmp_path / "label"
    images.mkdir()
    masks.mkdir()
    img = np.full((8, 8), 191, dtype=np.uint8)  # predicted: class 1 everywhere
    truth = np.ones((8, 8), dtype=np.uint8)
    truth[:, :2] = 255  # unlabelled: not scored
    truth[0, 7] = 0  # one wrong pixel of 48 scored
    Image.fromarray(img).save(images / "a.png")
    Image.fromarray(truth).save(masks / "a.png")
    res = subprocess.run(
        [sys.executable, "scripts/analyse_errors.py", "--ckpt", str(ckpt), "--images", str(images),
         "--masks", str(masks)], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ignore index: 255 (the checkpoint's)" in res.stdout, res.stdout
    assert "all: pixel error 2.08 % over 48 pixels" in res.stdout, res.stdout


def test_script_bins_a_one_column_shift_and_a_far_error(tmp_path: Path) -> None:
    # ThresholdNet: class 0 where the (0..1-scaled) value is under 0.5, class 1 above.
    ckpt = make_ckpt(tmp_path / "t.ckpt", "tests.predict.nets.ThresholdNet",
                     {"in_channels": 1, "num_classes": 2}, mean=[0.0], std=[1.0],
                     class_names=["membrane", "cell"])
    images, masks = tmp_path / "image", tmp_path / "label"
    images.mkdir()
    masks.mkdir()
    img = np.full((16, 16), 191, dtype=np.uint8)  # predicted: cell ...
    img[:, :9] = 64  # ... except columns 0-8 and
    img[:2, 14:] = 64  # a 2x2 block far from any border
    truth = np.full((16, 16), 255, dtype=np.uint8)
    truth[:, :8] = 0  # true membrane: columns 0-7 (the prediction's border is one column off)
    Image.fromarray(img).save(images / "20.png")
    Image.fromarray(truth).save(masks / "20.png")
    Image.fromarray(img).save(images / "21.png")  # left out by --stems
    Image.fromarray(np.zeros_like(truth)).save(masks / "21.png")
    res = subprocess.run(
        [sys.executable, "scripts/analyse_errors.py", "--ckpt", str(ckpt), "--images", str(images),
         "--masks", str(masks), "--mask-values", "0:0,255:1", "--stems", "20", "--positive", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    # 16 pixels of column 8 + 4 of the block are wrong: 20 of 256 = 7.81 %.
    assert "20.png: pixel error 7.81 %" in out and "21.png" not in out, out
    assert "all: pixel error 7.81 % over 256 pixels" in out, out
    assert "by distance to the true border: 1 px 80 %, 2 px 0 %, 3 px 0 %, farther 20 %" in out, out
    assert "membrane predicted on 57.8 % of the pixels, true on 50.0 %" in out, out  # 148 / 256
    sweep = re.search(r"probability >= t: (.*)", out).group(1)
    assert sweep.count("7.81 %") == 9, out  # the net is certain: no threshold changes anything


def test_script_names_the_folders_when_nothing_pairs(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "t.ckpt", "tests.predict.nets.ThresholdNet",
                     {"in_channels": 1, "num_classes": 2}, mean=[0.0], std=[1.0])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "a" / "x.png")
    res = subprocess.run(
        [sys.executable, "scripts/analyse_errors.py", "--ckpt", str(ckpt), "--images",
         str(tmp_path / "a"), "--masks", str(tmp_path / "b")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode != 0
    assert f"no image in {tmp_path / 'a'} has a mask of the same stem in {tmp_path / 'b'}" in res.stderr


def test_script_names_a_missing_folder(tmp_path: Path) -> None:
    ckpt = make_ckpt(tmp_path / "t.ckpt", "tests.predict.nets.ThresholdNet",
                     {"in_channels": 1, "num_classes": 2}, mean=[0.0], std=[1.0])
    (tmp_path / "a").mkdir()
    res = subprocess.run(
        [sys.executable, "scripts/analyse_errors.py", "--ckpt", str(ckpt), "--images",
         str(tmp_path / "a"), "--masks", str(tmp_path / "nope")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode != 0
    assert f"{tmp_path / 'nope'}: not a folder" in res.stderr, res.stderr


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/analyse_errors.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_script_takes_the_checkpoints_mask_values_and_refuses_values_beyond(
        tmp_path: Path) -> None:
    """ISBI's 0/255 labels scored as they are printed "pixel error 100.00 %" beside "21.54 %
    at 0.5", exit 0; bad arguments were tracebacks or nonsense."""
    import torch

    ckpt = make_ckpt(tmp_path / "t.ckpt", "tests.predict.nets.ThresholdNet",
                     {"in_channels": 1, "num_classes": 2}, mean=[0.0], std=[1.0])
    raw = torch.load(ckpt, weights_only=False)
    raw["datamodule_hyper_parameters"] = {"mask_values": {"0": 0, "255": 1}}
    torch.save(raw, ckpt)
    images, masks = tmp_path / "image", tmp_path / "label"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.full((8, 8), 191, dtype=np.uint8)).save(images / "a.png")  # class 1
    truth = np.full((8, 8), 255, dtype=np.uint8)
    truth[0, :4] = 0  # 4 wrong pixels of 64
    Image.fromarray(truth).save(masks / "a.png")
    common = ["--ckpt", str(ckpt), "--images", str(images), "--masks", str(masks)]
    res = _run_script(*common)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "mask values: {0: 0, 255: 1} (the checkpoint's)" in res.stdout
    assert "all: pixel error 6.25 % over 64 pixels" in res.stdout, res.stdout
    res = _run_script(*common, "--mask-values", "0:0,255:255")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "label values [255] are no class of the checkpoint's 0..1" in res.stderr
    for args, said in ((["--positive", "2"], "--positive 2: the checkpoint's classes are 0"),
                       (["--mask-values", "0:0,255:x"], "--mask-values must look like"),
                       (["--stems", "a", "b"], "--stems b: no image of that stem"),
                       (["--ckpt", str(tmp_path / "nope.ckpt")], "nope.ckpt not found")):
        res = _run_script(*common, *args)
        assert res.returncode == 1 and said in res.stderr and "Traceback" not in res.stderr, \
            res.stderr[-2000:]
