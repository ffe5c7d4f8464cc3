"""`segpipe check-data` on clean and deliberately broken synthetic data (and on CamVid val)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segpipe.cli import main as cli_main
from segpipe.data import (
    DataCheckError,
    Problem,
    SegmentationDataModule,
    check_samples,
    class_pixel_counts,
    scan_folder,
)
from segpipe.data.checks import group_problems
from segpipe.data.io import read_image, read_mask, to_float, write_image, write_mask
from segpipe.data.doctor import main, median_frequency_weights, size_stats
from tests.data.synthetic import make_folder_dataset, make_pair, synthetic_mask_colors

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
    groups = json.loads(out_json.read_text())["problems"]  # one entry per cause, every file
    assert {(Path(f["path"]), g["kind"]) for g in groups for f in g["files"]} == set(expected.items())
    assert all(g["count"] == len(g["files"]) for g in groups)
    for path in expected:
        assert str(path) in out, f"{path} not named in the output"
    assert "Label values outside 0..2 and not ignore_index 255: 7 (in 1 mask(s))" in out
    assert "truncated or corrupt" in out
    # Counting still works on the usable masks.
    assert "class_weights: [" in out


def test_binary_masks_with_ignore_255_fail(tmp_path: Path, capsys) -> None:
    """0/255 masks with the folder config's ignore_index 255: every foreground pixel ignored.
    check-data said so as a warning and exited 0, and `fit` trained a model that never saw the
    foreground; both stop now, with the mapping that fixes it."""
    root = _folder(tmp_path / "ds", num_classes=2, mask_mode="binary")
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}")
    assert rc == 1
    assert "binary masks with values 0/255" in out
    assert "every foreground pixel would be ignored" in out
    assert "the training masks hold 0 and 255 only, and 255 is data.ignore_index" in out
    assert "set data.mask_values: {0: 0, 255: 1}" in out
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


def test_a_dropped_alpha_tagged_band_is_noted(tmp_path: Path, capsys) -> None:
    """RGB + near-infrared uint8 GeoTIFFs: GDAL tags the 4th band alpha, and a 3-channel
    model reads 3; the check says so, since that band may be data."""
    root = _folder(tmp_path / "ds", n_train=2, n_val=1, channels=4, image_ext=".tif")
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=3")
    assert "have a band tagged alpha that is not read" in out and "data.in_channels: 4" in out
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=3", "--data.in_channels=4")
    assert "tagged alpha" not in out


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
    capsys.readouterr()
    assert main(["--data.root", str(root), "--data.no_such_option=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # one line, not the 50-line usage
    assert len(err) == 1 and err[0].startswith("segpipe check-data: error: ") and "no_such_option" in err[0]
    assert main([f"--data.root={root}", "--data.num_classes=3",
                 f"--json={tmp_path / 'missing' / 'dir' / 'f.json'}"]) in (0, 1)  # folders made
    (tmp_path / "afile").write_text("x")
    assert main([f"--data.root={root}", "--data.num_classes=3",
                 f"--json={tmp_path / 'afile' / 'f.json'}"]) == 2
    assert "cannot write --json" in capsys.readouterr().err


def test_registered_in_the_cli(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds", n_train=2, n_val=1)
    assert cli_main(["check-data", f"--data.root={root}", "--data.num_classes=3"]) == 0
    assert "Data check of" in capsys.readouterr().out


def test_a_fit_command_line_runs_as_check_data(tmp_path: Path, capsys) -> None:
    """Its config files' other sections were ignored, but the same options on the command line
    were refused ("unrecognized arguments"): a fit command with its verb changed failed."""
    root = _folder(tmp_path / "ds", n_train=2, n_val=1)
    assert cli_main(["check-data", "--config", "configs/folder_unet.yaml", f"--data.root={root}",
                     "--data.num_classes=3", "--model.loss", "dice", "--trainer.max_epochs=3",
                     "--model.net.init_args.base_channels", "8", "--checkpoint.monitor",
                     "val/loss", "--seed_everything=1"]) == 0
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


# ------------------------------------------------------------------ one line per cause (issue 13)
def _section(out: str, title: str) -> list[str]:
    """Lines of a report section ("Hints:", "Warnings:", "ERRORS: ...") up to its blank line."""
    lines = out.splitlines()
    at = next((i for i, ln in enumerate(lines) if ln.startswith(title)), None)
    if at is None:
        return []
    end = next((i for i in range(at + 1, len(lines)) if not lines[i].strip()), len(lines))
    return lines[at:end]


def _no_timing(out: str) -> str:
    return re.sub(r"files in [0-9.]+ s", "files in T s", out)


def _four_band_tiles(root: Path, n_train: int, n_val: int) -> Path:
    """``n_train + n_val`` 4-band uint16 GeoTIFF tiles (reflectance-like) with 3-class masks."""
    rng = np.random.default_rng(3)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            image, labels = make_pair(rng, (16, 16), 3, channels=4, first_class=i + 1)
            write_image(root / split / "images" / f"tile_{i:03d}.tif",
                        image.astype(np.uint16) * 40)
            write_mask(root / split / "masks" / f"tile_{i:03d}.png", labels)
    return root


def test_thirty_four_band_tiles_give_one_grouped_line(tmp_path: Path, capsys) -> None:
    root = _four_band_tiles(tmp_path / "tiles", n_train=24, n_val=6)
    assert read_image(root / "train" / "images" / "tile_000.tif").shape[2] == 4  # not RGBA
    out_json = tmp_path / "findings.json"
    args = (f"--data.root={root}", "--data.num_classes=3", f"--json={out_json}")
    rc, out = _run(capsys, *args)
    assert rc == 1
    errors = _section(out, "ERRORS:")
    assert errors[0].startswith("ERRORS: 30 problem(s) in 30 file(s), 1 cause(s)"), out
    lines = [ln for ln in errors[1:] if "data.in_channels=3" in ln]
    assert len(lines) == 1, out  # every image checked (not a sample), one line for all 30
    line = lines[0]
    assert "[train, val] 30 images: 4 channels but data.in_channels=3 (" in line
    assert ", ... and 27 more) -> fix: set data.in_channels: 4, or pick 3 bands with " \
           "data.bands (e.g. data.bands: [1, 2, 3])" in line
    named = [p for p in sorted(root.glob("*/images/*.tif")) if str(p) in out]
    assert named == sorted((root / "train" / "images").glob("*.tif"))[:3]  # the first few only
    groups = json.loads(out_json.read_text())["problems"]
    assert len(groups) == 1 and groups[0]["kind"] == "channel_mismatch"
    assert groups[0]["count"] == 30 and groups[0]["splits"] == {"train": 24, "val": 6}
    assert {Path(f["path"]) for f in groups[0]["files"]} == set(root.glob("*/images/*.tif"))
    # Deterministic: the same report on a second run.
    assert _no_timing(_run(capsys, *args)[1]) == _no_timing(out)
    # The suggested fix works.
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=3", "--data.in_channels=4")
    assert rc == 0, out


def test_colour_masks_hint_is_the_full_pasteable_list(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds", n_train=12, n_val=0, num_classes=12, mask_mode="rgb")
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=3", "--splits=[train]",
                   "--data.val_fraction=0")
    assert rc == 1
    hints = _section(out, "Hints:")
    at = next(i for i, ln in enumerate(hints) if "masks are colour-coded" in ln)
    assert hints[at].endswith("to paste under `data:`:"), hints[at]
    block = [ln for ln in hints[at + 1:] if not ln.startswith("  - ")]
    assert block and all(ln.startswith("      ") for ln in block)
    colours_line = next(ln.strip() for ln in block if ln.strip().startswith("mask_colors:"))
    assert "..." not in colours_line
    table = yaml.safe_load(colours_line)["mask_colors"]
    assert len(table) == 12 and all(len(c) == 3 for c in table)
    assert sorted(table) == sorted(synthetic_mask_colors(12))
    pasted = yaml.safe_load("\n".join(block))
    assert pasted == {"mask_colors": table, "num_classes": 12}
    errors = _section(out, "ERRORS:")
    assert sum("masks: mask is a colour (RGB) image" in ln for ln in errors) == 1, errors
    # Pasting the lines makes the data pass (colours in the order shown: sorted).
    rc, out = _run(capsys, f"--data.root={root}", "--splits=[train]", "--data.val_fraction=0",
                   f"--data.mask_colors={table}", "--data.num_classes=12")
    assert rc == 0, out


def _jpeg_masks(root: Path, labels_of) -> list[Path]:
    """Replace every mask of ``root`` by a JPEG of ``labels_of(index)`` (quality 75)."""
    out = []
    for i, png in enumerate(sorted(root.glob("*/masks/*.png"))):
        jpg = png.with_suffix(".jpg")
        Image.fromarray(labels_of(i).astype(np.uint8)).save(jpg, quality=75)
        png.unlink()
        out.append(jpg)
    return out


def test_jpeg_index_masks_get_the_lossy_advice(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds", size=(32, 32))

    def sharp(i: int) -> np.ndarray:  # 0/2 stripes: JPEG ringing overshoots past class 2
        m = np.zeros((32, 32), np.uint8)
        m[:, 3 + i : 9 + i] = 2
        m[13:17, :] = 1
        m[21:27, 5:30] = 2
        return m

    jpegs = _jpeg_masks(root, sharp)
    assert max(int(read_mask(p).max()) for p in jpegs) > 2  # JPEG made up values
    out_json = tmp_path / "findings.json"
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=3", f"--json={out_json}")
    assert rc == 1
    hints = "\n".join(_section(out, "Hints:"))
    assert "num_classes" not in hints + "\n".join(_section(out, "ERRORS:")), out
    assert "in the JPEG masks are no class: JPEG compression is lossy" in hints
    assert "Save the masks as PNG (lossless) from the original labels" in hints
    errors = _section(out, "ERRORS:")
    bad = [ln for ln in errors[1:] if "label values [" in ln]
    assert len(bad) == 1, out
    assert "masks: label values [3" in bad[0] and "in JPEG masks: JPEG compression is lossy" \
        in bad[0] and "-> fix: save the masks as PNG" in bad[0]
    warnings = "\n".join(_section(out, "Warnings:"))
    assert f"{len(jpegs)} of {len(jpegs)} masks are JPEG files (" in warnings
    data = json.loads(out_json.read_text())
    assert data["jpeg_masks"]["count"] == len(jpegs)
    # fit's pre-flight error: the same grouped line, naming the files and the PNG fix.
    dm = SegmentationDataModule(root=str(root), num_classes=3, num_workers=0, batch_size=2)
    with pytest.raises(DataCheckError) as exc:
        dm.setup("fit")
    msg = str(exc.value)
    assert bad[0].removeprefix("  - ").split(" (")[0] in msg
    assert "save the masks as PNG" in msg and "num_classes" not in msg
    assert all(str(f) in msg for g in data["problems"] for f in map(lambda f: f["path"], g["files"]))


def test_jpeg_masks_in_range_still_warn(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds", size=(32, 32), n_train=6, n_val=3)

    def blocky(i: int) -> np.ndarray:  # constant 8×8 blocks: JPEG keeps the values in range
        m = np.zeros((32, 32), np.uint8)
        m[8:24, (i % 3) * 8 : (i % 3) * 8 + 16] = 1 + i % 2
        return m

    jpegs = _jpeg_masks(root, blocky)
    assert all(set(np.unique(read_mask(p)).tolist()) <= {0, 1, 2} for p in jpegs)
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=3")
    assert rc == 0, out  # nothing out of range: no error, but a warning on every JPEG mask
    warnings = _section(out, "Warnings:")
    line = next(ln for ln in warnings if "masks are JPEG files" in ln)
    assert line.startswith(f"  - {len(jpegs)} of {len(jpegs)} masks are JPEG files (")
    assert f", ... and {len(jpegs) - 3} more): JPEG compression is lossy" in line
    assert "save the masks as PNG" in line
    assert sum(str(p) in out for p in jpegs) == 3
    assert "(lossy)" in out  # the mask verdict says so too


def test_group_problems_factors_out_the_file() -> None:
    a, b, c = (Path(f"/d/{n}.png") for n in "abc")
    problems = [
        Problem(a, "train", "unreadable_image",
                "truncated or corrupt image data (image file is truncated (3 bytes not "
                "processed))", cause="truncated or corrupt image data"),
        Problem(b, "val", "unreadable_image",
                "truncated or corrupt image data (broken data stream)",
                cause="truncated or corrupt image data"),
        Problem(a, "train", "bad_labels", "label values [7] outside 0..2", values=(7,),
                cause="label values [{values}] outside 0..2"),
        Problem(c, "train", "bad_labels", "label values [4, 7] outside 0..2", values=(4, 7),
                cause="label values [{values}] outside 0..2"),
        Problem(c, "train", "missing_mask", "no mask"),
    ]
    groups = group_problems(problems)
    assert [(g.kind, g.count) for g in groups] == [
        ("unreadable_image", 2), ("bad_labels", 2), ("missing_mask", 1)]
    assert groups[0].line(1) == (
        "[train, val] 2 images: truncated or corrupt image data (/d/a.png, ... and 1 more) "
        "-> fix: re-export the file or remove it")
    assert groups[1].text == "label values [4, 7] outside 0..2"
    msg = str(DataCheckError(problems)).splitlines()
    assert msg[0] == "data check found 5 problem(s) in 3 file(s), 3 cause(s):"
    assert msg[1].startswith("  [train, val] 2 images: truncated or corrupt image data (/d/a.png,"
                             " /d/b.png) -> fix:")
    assert msg[3] == "  [train] 1 image: no mask (/d/c.png) -> fix: add the mask (same file " \
                     "name stem) or remove the image"
    assert len(msg) == 5


def test_check_samples_groups_truncated_files_and_sizes(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", n_train=6, n_val=0)
    imgs = sorted((root / "train" / "images").glob("*.png"))
    for p in imgs[:3]:  # truncated at different points: different decoder messages
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // (2 + imgs.index(p))])
    for p in sorted((root / "train" / "masks").glob("*.png"))[3:]:
        write_mask(p, np.zeros((12, 16), np.uint8))
    problems = check_samples(scan_folder(root), num_classes=3, decode_images=True)
    groups = group_problems(problems)
    assert [(g.kind, g.count) for g in groups] == [("unreadable_image", 3),
                                                  ("size_mismatch", 3)]
    assert groups[0].text == "truncated or corrupt image data"
    assert groups[1].text == "mask is 16×12 but image is 32×24 (W×H)"


def test_georeferenced_masks_off_their_images_grid_are_named(tmp_path: Path) -> None:
    """A mask rasterised over another extent or in another CRS has its image's size all the
    same: it passed check-data and fit trained on labels shifted off their pixels."""
    import rasterio
    from affine import Affine
    from rasterio.transform import from_origin

    root = tmp_path / "ds"
    for sub in ("images", "masks"):
        (root / "train" / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(path, array, crs, x0, y0, res=10.0):
        transform = (from_origin(x0, y0, res, res) if res > 0  # res < 0: rows flipped
                     else Affine(-res, 0, x0, 0, -res, y0))
        profile = dict(driver="GTiff", height=16, width=20, count=1, dtype="uint8", crs=crs,
                       transform=transform)
        with rasterio.open(path, "w", **profile) as ds:
            ds.write(array[None])

    cases = {  # name: the mask's (crs, x0, y0, res); the image is EPSG:32633 at (500000, 4600000)
        "aligned": ("EPSG:32633", 500000, 4600000, 10.0),
        "shifted": ("EPSG:32633", 500200, 4600030, 10.0),
        "other_crs": ("EPSG:32632", 500000, 4600000, 10.0),
        "coarser": ("EPSG:32633", 500000, 4600000, 20.0),
        "sub_pixel": ("EPSG:32633", 500000.05, 4600000, 10.0),  # rounding: fine
        "south_up": ("EPSG:32633", 500000, 4600000 - 160, -10.0),  # rows flipped
    }
    for name, (crs, x0, y0, res) in cases.items():
        write(root / "train" / "images" / f"{name}.tif",
              rng.integers(0, 255, (16, 20), dtype=np.uint8), "EPSG:32633", 500000, 4600000)
        write(root / "train" / "masks" / f"{name}.tif", rng.integers(0, 2, (16, 20), dtype=np.uint8),
              crs, x0, y0, res)
    write_image(root / "train" / "images" / "plain.tif", np.zeros((16, 20, 1), np.uint8))
    write_mask(root / "train" / "masks" / "plain.tif", np.zeros((16, 20), np.uint8))  # no georef
    # a PNG mask placed by a world file is georeferenced too: it passed, shifted
    write(root / "train" / "images" / "world.tif",
          rng.integers(0, 255, (16, 20), dtype=np.uint8), "EPSG:32633", 500000, 4600000)
    write_mask(root / "train" / "masks" / "world.png", rng.integers(0, 2, (16, 20), dtype=np.uint8))
    (root / "train" / "masks" / "world.pgw").write_text("10\n0\n0\n-10\n500205\n4600025\n")
    problems = check_samples(scan_folder(root), num_classes=2, decode_images=True)
    found = {p.path.stem: p.message for p in problems if p.kind == "grid_mismatch"}
    assert found == {
        "world": "mask is offset from its image by +20 columns and -3 rows (world.tif)",
        "shifted": "mask is offset from its image by +20 columns and -3 rows (shifted.tif)",
        "other_crs": "mask's CRS EPSG:32632 is not its image's EPSG:32633 (other_crs.tif)",
        "coarser": "mask's pixel size 20×20 (or rotation) is not its image's 10×10 (coarser.tif)",
        "south_up": "mask's grid is flipped or rotated against its image's (transforms (10.0, "
                    "0.0, 500000.0, 0.0, 10.0, 4599840.0) and (10.0, 0.0, 500000.0, 0.0, -10.0, "
                    "4600000.0)) (south_up.tif)",
    }
    assert all("gdalwarp" in p.fix for p in problems if p.kind == "grid_mismatch")
    # the printed line keeps the amount when the files of its cause share it
    lines = [g.line() for g in group_problems(problems) if g.kind == "grid_mismatch"]
    assert any("2 masks: mask is offset from its image by +20 columns and -3 rows (" in line
               for line in lines), lines


def test_lossless_masks_still_get_the_num_classes_advice(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds")
    labels = np.zeros((24, 32), np.uint8)
    labels[:8, :8] = 5
    write_mask(root / "train" / "masks" / "img_000.png", labels)
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=3")
    assert rc == 1 and "JPEG" not in out
    assert "values {5} are no class: set data.mask_values to map raw values to classes, " \
           "data.ignore_index to ignore one value, or raise data.num_classes" in out
    assert "[train] 1 mask: label values [5] outside 0..2 (" in out and "fix data.num_classes" in out


def test_colours_and_values_missing_from_the_table_are_warned_about(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds", num_classes=3, mask_mode="rgb")
    two = json.dumps(synthetic_mask_colors(3)[:2])  # class 2's colour left out of the table
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=2", "--data.ignore_index=255",
                   f"--data.mask_colors={two}")
    assert rc == 0  # usable as configured: a warning, not an error
    (line,) = [ln for ln in _section(out, "Warnings:") if "not in data.mask_colors" in ln]
    r, g, b = synthetic_mask_colors(3)[2]
    assert f"masks: mask colours [{r}, {g}, {b}] are not in data.mask_colors and are read as " \
           "ignore_index=255 (not learnt, not scored)" in line and "add it to the table" in line
    assert "OK: no errors found" in out

    index = _folder(tmp_path / "ix", num_classes=3)
    rc, out = _run(capsys, f"--data.root={index}", "--data.num_classes=2", "--data.ignore_index=2",
                   "--data.mask_values={0: 0, 1: 1}")
    assert rc == 0 and "not in data.mask_values" not in out  # 2 is the ignore value itself
    rc, out = _run(capsys, f"--data.root={index}", "--data.num_classes=2", "--data.ignore_index=255",
                   "--data.mask_values={0: 0, 1: 1}")
    assert rc == 0 and "mask values [2] are not in data.mask_values and are read as " \
                       "ignore_index=255" in out


def test_an_empty_val_split_is_an_error_as_in_fit(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path / "ds", n_val=0)
    (root / "val" / "images").mkdir(parents=True)
    (root / "val" / "masks").mkdir()
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=3")
    assert rc == 1
    (line,) = [ln for ln in _section(out, "ERRORS:") if "empty_split" not in ln and "folder" in ln]
    assert "[val] 1 folder: the split has no images" in line
    assert "or delete the empty folder so that data.val_fraction holds out part of train" in line
    (root / "val" / "images").rmdir()
    (root / "val" / "masks").rmdir()
    rc, out = _run(capsys, f"--data.root={root}", "--data.num_classes=3")
    assert rc == 0, out


def test_palette_masks_with_their_own_palettes_are_read_by_colour(tmp_path: Path, capsys) -> None:
    """Colour masks saved as palette PNGs (Image.convert("P", palette=ADAPTIVE), GIMP's indexed
    mode) order each file's palette differently: their indices were read as classes (96 % of
    the training pixels wrong, check-data "OK"), and data.mask_colors refused them."""
    from PIL import Image

    from segpipe.data import SegmentationDataModule

    root = _folder(tmp_path / "ds", mask_mode="rgb")
    colours = [tuple(c) for c in synthetic_mask_colors(3)]
    truth = {}
    for mask in sorted(root.rglob("masks/*.png")):
        rgb = np.asarray(Image.open(mask).convert("RGB"))
        truth[mask] = rgb
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=3).save(mask)
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3",
                   "--data.ignore_index=null")
    assert "palettes differ" in out and "set data.mask_colors" in out
    table = json.dumps([list(c) for c in colours])
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3",
                   "--data.ignore_index=null", f"--data.mask_colors={table}")
    assert rc == 0 and "palettes differ" not in out, out
    dm = SegmentationDataModule(str(root), num_classes=3, mask_colors=[list(c) for c in colours],
                                num_workers=0, crop_size=None, augment="none")
    dm.setup("fit")
    for i, sample in enumerate(dm.datasets["train"].samples):
        labels = dm.datasets["train"].load(i)[1]
        expected = np.zeros(labels.shape, np.int64)
        for k, c in enumerate(colours):
            expected[(truth[sample.mask] == c).all(axis=-1)] = k
        assert np.array_equal(labels, expected)


def test_one_training_image_and_no_val_fails_as_fit_does(tmp_path: Path, capsys) -> None:
    """check-data said OK where fit refused, and fit's fix ("set data.val_fraction > 0") was
    already the case: one image is too few to hold one out."""
    from segpipe.data import SegmentationDataModule
    from segpipe.data.datasets import DataSplitError

    root = _folder(tmp_path / "ds", n_train=1, n_val=0)
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3")
    assert rc == 1 and "there is no val split" in out and "too few for data.val_fraction" in out
    dm = SegmentationDataModule(str(root), num_classes=3, num_workers=0)
    with pytest.raises(DataSplitError, match="the train split has 1 image"):
        dm.setup("fit")


def test_a_split_by_case_is_reported_as_one(tmp_path: Path, capsys, caplog) -> None:
    """It logged a random val_fraction hold-out first (then thrown away) and the report said
    val was "held out from train (data.val_fraction=0.1, seed 0)"."""
    root = _folder(tmp_path / "ds", n_train=8, n_val=0)
    for i, image in enumerate(sorted((root / "train" / "images").glob("*.png"))):
        for folder in ("images", "masks"):
            f = root / "train" / folder / image.name
            f.rename(f.with_name(f"p{i % 4}_{f.name}"))
    with caplog.at_level("INFO"):
        rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3",
                       "--data.case_pattern=p(\\d)_", "--data.val_cases=['1']")
    assert rc == 0, out
    assert "train + val split by case (data.val_cases ['1'])" in out
    assert "holding out" not in caplog.text


def test_grey_beside_rgb_images_is_a_note_not_a_warning(tmp_path: Path, capsys) -> None:
    """Converted images were also warned about: "set data.in_channels so all are converted"."""
    from PIL import Image

    root = _folder(tmp_path / "ds")
    for image in sorted((root / "train" / "images").glob("*.png"))[:2]:
        Image.open(image).convert("L").save(image)
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3")
    assert rc == 0 and "converted to data.in_channels=3" in out, out
    assert "different channel counts" not in out


def test_one_colour_mask_among_index_masks_is_named_not_taken_for_the_data_set(
        tmp_path: Path, capsys) -> None:
    """One colour mask among index masks made the verdict "colour-coded" with a mask_colors
    table to paste, which would have broken every other mask."""
    from PIL import Image

    root = _folder(tmp_path / "ds", n_val=0)
    odd = sorted((root / "train" / "masks").glob("*.png"))[2]
    labels = np.asarray(Image.open(odd))
    Image.fromarray(np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)[labels]).save(odd)
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3",
                   "--splits=[train]", "--data.val_fraction=0")
    assert rc == 1  # the odd mask is still an error, named
    assert "-> class indices, values 0..2 (classes 0..2) (the sampled masks mix encodings: 5 with class indices, 1 colour (RGB))" in out
    assert (f"1 of the 6 sampled masks are colour images ({odd.name}) where most are "
            "single-channel") in out
    assert "masks are colour-coded" not in out and "mask_colors: [[" not in out
    assert f"mask is a colour (RGB) image but no colour table is configured ({odd})" in out


def test_band_statistics_say_the_configured_mean_is_used(tmp_path: Path, capsys) -> None:
    """The LGG config sets data.mean/std for its 8-bit RGB slices; check-data said the ImageNet
    default was used."""
    root = _folder(tmp_path / "ds")
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3",
                   "--data.mean=[0.25, 0.5, 0.75]", "--data.std=[0.1, 0.2, 0.3]")
    assert rc == 0, out
    assert ("data.mean / data.std are set in the config and used: [0.25, 0.5, 0.75] / "
            "[0.1, 0.2, 0.3]") in out
    assert "ImageNet default" not in out


def test_an_image_that_is_a_broken_link_is_named(tmp_path: Path, capsys) -> None:
    """A dangling link in images/ was never named: its mask was reported as having no image."""
    import os

    root = _folder(tmp_path / "ds", n_val=0)
    image = sorted((root / "train" / "images").glob("*.png"))[1]
    image.unlink()
    os.symlink(tmp_path / "moved.png", image)
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3",
                   "--splits=[train]", "--data.val_fraction=0")
    assert rc == 1
    assert (f"a link that leads to no file (to {tmp_path / 'moved.png'}: missing, or a loop "
            f"of links) ({image}) -> fix: point the link at the file, or remove it") in out
    assert "no matching image" not in out


def test_masks_that_mix_0_1_and_0_255_are_an_error(tmp_path: Path, capsys) -> None:
    """Two exports merged, 0/1 and 0/255: with ignore_index 255 the 0/255 masks' foreground was
    ignored in silence, and check-data said "OK: no errors found" (and fit trained)."""
    root = _folder(tmp_path / "ds", num_classes=2, n_train=6, n_val=2)
    binary = sorted(root.glob("*/masks/*.png"))[::2]
    for path in binary:
        labels = read_mask(path)
        assert labels.max() == 1
        write_mask(path, (labels * 255).astype(np.uint8))
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=2",
                   "--data.ignore_index=255")
    errors = _section(out, "ERRORS:")
    assert rc == 1 and f"{len(binary)} masks: the masks mix two encodings: {len(binary)} hold " \
        "only 0 and 255" in "\n".join(errors), out
    assert "data.mask_values: {0: 0, 1: 1, 255: 255}" in "\n".join(errors)
    assert "mix encodings: " in out and "{'indices'" not in out  # in words, not a dict
    with pytest.raises(DataCheckError, match="the masks mix two encodings"):
        SegmentationDataModule(root=str(root), num_classes=2, ignore_index=255).setup("fit")
    # 255 said to be void in them: no error
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=2",
                   "--data.ignore_index=255", "--data.mask_values={0: 0, 1: 1, 255: 255}")
    assert rc == 0, out
    # 255 used as void beside classes (VOC's borders): a mask of background and void is fine
    for path in sorted(root.glob("*/masks/*.png"))[1::2]:
        labels = read_mask(path)
        labels[0, :] = 255
        write_mask(path, labels)
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=2",
                   "--data.ignore_index=255")
    assert rc == 0 and "mix two encodings" not in out, out


def test_exif_turned_images_are_named_and_a_mask_of_the_stored_pixels_is_told_so(
        tmp_path: Path, capsys) -> None:
    """A mask drawn on the stored pixels of an EXIF-turned JPEG was 're-export the mask at the
    image's size' (the size every tool that ignores the tag shows), and a square one trained
    on turned labels with 'OK'."""
    root = _folder(tmp_path / "ds", size=(24, 32))
    images = sorted((root / "train" / "images").glob("*.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90° clockwise
    for image in images[:2]:
        Image.open(image).convert("RGB").save(image.with_suffix(".jpg"), exif=exif.tobytes())
        image.unlink()
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3")
    errors = "\n".join(_section(out, "ERRORS:"))
    assert rc == 1 and "2 masks: mask is 32×24 but image is 24×32 (W×H) as its EXIF orientation " \
        "turns it: the mask matches the stored, unturned pixels" in errors, out
    assert "exiftool -Orientation=1 -n FILE" in errors
    square = _folder(tmp_path / "sq", size=(32, 32))
    image = sorted((square / "train" / "images").glob("*.png"))[0]
    Image.open(image).convert("RGB").save(image.with_suffix(".jpg"), exif=exif.tobytes())
    image.unlink()
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={square}", "--data.num_classes=3")
    warnings = "\n".join(_section(out, "Warnings:"))
    assert rc == 0 and "1 image: EXIF orientation tags: the images are read turned" in warnings, out


def test_a_test_split_without_masks_is_a_warning_as_fit_trains(tmp_path: Path, capsys) -> None:
    """Images to predict in test/ without masks/: check-data said 'FAILED: fix the errors above
    before training' (exit 1) while fit trained."""
    import shutil

    root = _folder(tmp_path / "ds", n_test=2)
    shutil.rmtree(root / "test" / "masks")
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=3")
    warnings = "\n".join(_section(out, "Warnings:"))
    assert rc == 0 and "[test] 2 image(s) and no masks" in warnings and \
        "`segpipe test` refuses the split" in warnings, out


def test_check_data_on_a_data_module_of_ones_own_says_what_it_checks(tmp_path: Path,
                                                                     capsys) -> None:
    """It said 'the following arguments are required: data.root' for a config that trains."""
    config = tmp_path / "own.yaml"
    config.write_text("data:\n  class_path: tests.test_custom_data.SquaresDataModule\n"
                      "  init_args: {batch_size: 4}\n")
    for args in (["--config", str(config)], ["--data", "tests.test_custom_data.SquaresDataModule"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "data: tests.test_custom_data.SquaresDataModule is a data module of your own: " \
            "check-data checks the folders of segpipe's data module" in err, err


def test_a_class_beyond_num_classes_in_jpeg_masks_is_not_called_noise(tmp_path: Path,
                                                                      capsys) -> None:
    """Value 2 filled 8-11 % of every JPEG mask (a third class) and was called compression
    noise, 'not classes to add or map'."""
    def blocks(i: int) -> np.ndarray:
        labels = np.zeros((32, 32), np.uint8)
        labels[:16, :16] = 1
        labels[16:, 16:] = 2  # a class the config does not have
        return labels

    root = _folder(tmp_path / "ds", size=(32, 32))
    _jpeg_masks(root, blocks)
    rc, out = _run(capsys, "--config", CONFIG, f"--data.root={root}", "--data.num_classes=2")
    assert rc == 1 and "in the JPEG masks cover 5 % of a mask or more: a class beyond data.num_classes=2?" in out
    errors = "\n".join(_section(out, "ERRORS:"))
    assert "some on 5 % of a mask or more: a class beyond data.num_classes" in errors, out
    assert "so these are compression noise" not in errors
