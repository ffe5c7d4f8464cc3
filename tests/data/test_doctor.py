"""`segpipe check-data` on clean and deliberately broken synthetic data (and on CamVid val)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from segpipe.cli import main as cli_main
from segpipe.data import check_samples, class_pixel_counts, scan_folder
from segpipe.data.io import read_image, to_float, write_image, write_mask
from segpipe.data.doctor import main, median_frequency_weights, size_stats
from tests.data.synthetic import make_folder_dataset

CONFIG = "configs/folder_unet.yaml"  # ignore_index 255; its trainer/model sections are ignored


def _folder(root: Path, **kw) -> Path:
    args = dict(n_train=6, n_val=3, n_test=0, size=(24, 32), num_classes=3, seed=1)
    args.update(kw)
    return make_folder_dataset(root, **args)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main([*args, "--workers=2"])
    return rc, capsys.readouterr().out


def test_clean_data_passes_and_suggests_weights(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds")
    out_json = tmp_path / "findings.json"
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3",
                   f"--json={out_json}")
    assert rc == 0, out
    assert "OK: no errors found" in out
    assert "class indices, values 0..2" in out
    line = next(ln.strip() for ln in out.splitlines() if ln.strip().startswith("class_weights: ["))
    weights = [float(v) for v in line.split("[")[1].rstrip("]").split(",")]
    assert len(weights) == 3 and weights[0] < 1.0 < max(weights)  # background is frequent
    assert re.search(r"train\s+24\s+24\s+24\s+32\s+32\s+32\s+1\s+24×32 \(6\)", out), out
    data = json.loads(out_json.read_text())
    assert data["ok"] is True and data["errors"] == 0
    assert data["splits"]["train"]["images"] == 6 and data["splits"]["val"]["images"] == 3
    assert data["splits"]["train"]["sizes"]["distinct"] == 1
    assert data["splits"]["train"]["sizes"]["height"] == {"min": 24, "median": 24, "max": 24}
    assert [round(w, 4) for w in data["class_weights"]] == weights
    assert abs(sum(data["class_frequency"]["train"]) - 1.0) < 1e-9
    # 8-bit RGB: band statistics shown, but the ImageNet default is kept (nothing to paste).
    assert "Band statistics (train, 6 of 6 images" in out
    assert "the ImageNet default mean/std is used" in out and "\n    mean: [" not in out
    assert data["band_stats"]["needed"] is False and data["band_stats"]["yaml"] is None
    assert data["band_stats"]["dtypes"] == ["uint8"] and data["band_stats"]["scale"] == 255.0


def test_broken_data_names_every_broken_file(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds")
    missing = root / "train" / "masks" / "img_001.png"
    missing.unlink()  # image without mask
    orphan = write_mask(root / "train" / "masks" / "extra_999.png", np.zeros((24, 32), np.uint8))
    truncated = root / "train" / "images" / "img_002.png"
    truncated.write_bytes(truncated.read_bytes()[:60])  # header intact, pixel data cut
    truncated_mask = root / "val" / "masks" / "img_002.png"
    truncated_mask.write_bytes(truncated_mask.read_bytes()[:50])
    mismatch = write_mask(root / "train" / "masks" / "img_003.png", np.zeros((20, 32), np.uint8))
    labels = np.zeros((24, 32), np.uint8)
    labels[:4, :4] = 7  # class 7 of 3 (and not the ignore index 255)
    out_of_range = write_mask(root / "val" / "masks" / "img_001.png", labels)
    out_json = tmp_path / "findings.json"
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3",
                   f"--json={out_json}")
    assert rc == 1
    assert "FAILED" in out
    expected = {
        root / "train" / "images" / "img_001.png": "missing_mask",
        orphan: "orphan_mask",
        truncated: "unreadable_image",
        truncated_mask: "unreadable_mask",
        mismatch: "size_mismatch",
        out_of_range: "bad_labels",
    }
    problems = json.loads(out_json.read_text())["problems"]
    assert {(Path(p["path"]), p["kind"]) for p in problems} == set(expected.items())
    for path in expected:
        assert str(path) in out, f"{path} not named in the output"
    assert "Label values outside 0..2 and not ignore_index 255: 7 (in 1 mask(s))" in out
    assert "truncated or corrupt" in out
    # Counting still works on the usable masks.
    assert "class_weights: [" in out


def test_binary_masks_with_ignore_255_warn(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds", num_classes=2, mask_mode="binary")
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}")
    assert rc == 0  # valid (255 is the ignore index) but surely wrong:
    assert "binary masks with values 0/255" in out
    assert "every foreground pixel would be ignored" in out
    assert "class_1 have no training pixel" in out
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}",
                   "--data.mask_values={0: 0, 255: 1}", "--data.ignore_index=null")
    assert rc == 0 and "Warnings" not in out and "mapped by data.mask_values" in out


def test_colour_masks_without_table_fail_with_hint(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds", mask_mode="rgb", n_val=0)
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3",
                   "--splits=[train]", "--data.val_fraction=0")
    assert rc == 1
    assert "colour-coded RGB masks" in out and "set data.mask_colors" in out
    assert "[128, 0, 0]" in out


def test_channel_mismatch_and_split_selection(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds", n_train=2, n_val=2, channels=5, image_ext=".tif")
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=3", "--splits=[val]",
                   "--decode_images=false")
    assert rc == 1 and "channel_mismatch" in out and "data.in_channels=3" in out
    assert "train split not checked: no class weights suggested" in out
    assert "train split not checked: no band statistics" in out and "Band statistics" not in out
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=3", "--data.bands=[1, 2, 3]")
    assert rc == 0, out


def test_multiband_uint16_suggests_band_statistics(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds", channels=5, image_ext=".tif")
    levels = np.array([300, 800, 1500, 4000, 2500])
    train = sorted((root / "train" / "images").glob("*.tif"))
    for path in sorted(root.glob("*/images/*.tif")):  # reflectance-like uint16, 0..10000
        img = read_image(path).astype(np.int64) * 20 + levels
        write_image(path, np.clip(img, 0, 10000).astype(np.uint16))
    out_json = tmp_path / "findings.json"
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=3", "--data.in_channels=4",
                   "--data.bands=[1, 2, 3, 4]", f"--json={out_json}")
    assert rc == 0, out
    stats = json.loads(out_json.read_text())["band_stats"]
    pixels = np.concatenate([to_float(read_image(p, [1, 2, 3, 4])).reshape(-1, 4) for p in train])
    np.testing.assert_allclose(stats["mean"], pixels.astype(np.float64).mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], pixels.astype(np.float64).std(axis=0), rtol=1e-9)
    assert stats["needed"] is True and stats["dtypes"] == ["uint16"] and stats["num_images"] == 6
    raw = np.concatenate([read_image(p, [1, 2, 3, 4]).reshape(-1, 4) for p in train])
    assert stats["raw"]["min"] == raw.min(axis=0).tolist()  # raw uint16 units
    assert stats["raw"]["max"] == raw.max(axis=0).tolist()
    assert "Band statistics (train, 6 of 6 images" in out and "uint16" in out
    assert "Paste under `data:` in the config" in out
    lines = out.splitlines()
    at = next(i for i, ln in enumerate(lines) if "Paste under `data:`" in ln)
    assert [ln.strip() for ln in lines[at + 1 : at + 3]] == stats["yaml"]
    assert stats["yaml"][0].startswith("mean: [0.0")  # /65535 leaves 0.0x values


def test_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err
    assert main(["--config", CONFIG, f"--data.root={tmp_path / 'absent'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    root = _folder(tmp_path / "ds", n_train=2, n_val=1)
    assert main([f"--data.root={root}", "--data.num_classes=3", "--splits=[test]"]) == 2
    assert "no split(s) ['test']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--data.root", str(root), "--data.no_such_option=1"])
    assert exc.value.code == 2


def test_registered_in_the_cli(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds", n_train=2, n_val=1)
    assert cli_main(["check-data", f"--data.root={root}", "--data.num_classes=3"]) == 0
    assert "Data check of" in capsys.readouterr().out


def test_median_frequency_weights_by_hand() -> None:
    # 3 images; class 2 only in the last one, class 1 in none.
    counts = np.array([[90, 0, 0], [50, 0, 0], [60, 0, 40]])
    w = median_frequency_weights(counts)
    freq0, freq2 = 200 / 240, 40 / 100  # class 2: pixels over its one image only
    med = np.median([freq0, freq2])
    assert w[1] is None
    assert w[0] == pytest.approx(med / freq0) and w[2] == pytest.approx(med / freq2)
    assert median_frequency_weights(np.zeros((2, 2))) == [None, None]


def test_per_image_pixel_counts_and_bad_values(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", n_train=3, n_val=0)
    scan = scan_folder(root)
    rows = class_pixel_counts(scan["train"], 3, per_image=True)
    assert rows.shape == (3, 3) and rows.sum() == 3 * 24 * 32
    assert np.array_equal(rows.sum(axis=0), class_pixel_counts(scan["train"], 3))
    problems = check_samples(scan, num_classes=2)
    assert problems and {(p.kind, p.values) for p in problems} == {("bad_labels", (2,))}


def test_size_stats() -> None:
    st = size_stats([(10, 20), (10, 20), (30, 5)])
    assert st["height"] == {"min": 10, "median": 10, "max": 30}
    assert st["width"] == {"min": 5, "median": 20, "max": 20}
    assert st["distinct"] == 2 and st["most_common"][0] == [10, 20, 2]
    assert size_stats([]) == {}


@pytest.mark.realdata
def test_camvid_val_real_data(data_dir: Path, capsys) -> None:
    t0 = time.perf_counter()
    rc = main(["--config", "configs/camvid_unet.yaml", f"--data.root={data_dir / 'camvid'}",
               "--splits=[val]"])
    seconds = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"^\s*val\s+101\s+101\s+0\s+0\s+0\s", out, re.M), out
    assert "class indices, values 0..11 (classes 0..10 + ignore index 11)" in out
    assert "360×480 (101)" in out
    assert seconds < 20, f"check-data on CamVid val took {seconds:.1f} s"
