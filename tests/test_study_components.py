"""scripts/study_components.py: connected-component filters, and its scores on a fit's val."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segpipe.cli import main as cli_main
from tests.data.synthetic import make_lgg_like
from tests.scripts import load_script


def _script():
    return load_script("study_components")


def test_filters_keep_and_drop_the_right_components() -> None:
    study = _script()
    volume = np.zeros((3, 8, 8), bool)
    volume[0:2, 1:4, 1:4] = True  # 18 voxels over two slices: one 3-D component
    volume[2, 6, 6] = True  # 1 voxel, not touching it
    volume[1, 6, 0:2] = True  # 2 voxels
    assert study.largest(volume).sum() == 18 and not study.largest(volume)[2, 6, 6]
    assert study.at_least(volume, 2).sum() == 20 and study.at_least(volume, 19).sum() == 0
    empty = np.zeros_like(volume)
    assert not study.largest(empty).any()
    per_slice = study.filters([], [5])["2-D < 5"](volume)  # each slice's 9-pixel square stays
    assert per_slice.sum() == 18
    truth = volume.copy()
    truth[2, 6, 6] = False
    results = study.compare({"a": (volume, truth), "b": (empty, empty)},
                            study.filters([2], []))
    assert results["none"][0] == pytest.approx(2 * 20 / 41)  # "b" has no score: left out
    assert results["largest 3-D"][0] == pytest.approx(2 * 18 / 38)
    assert results["3-D < 2"][0] == pytest.approx(1.0)


def test_the_study_of_a_fits_val_cases(tmp_path: Path, capsys) -> None:
    root = make_lgg_like(tmp_path / "lgg", n_patients=6, slices_per_patient=3, val_patients=2)
    run = tmp_path / "run"
    assert cli_main([
        "fit", "--config", "configs/lgg_unet.yaml", f"--data.root={root}",
        f"--trainer.default_root_dir={run}", "--model.net.init_args.base_channels=4",
        "--model.net.init_args.depth=2", "--data.crop_size=32", "--data.num_workers=0",
        "--data.eval_resize=null", "--data.val_case_fraction=0.5", "--trainer.max_time=null",
        "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
        "--trainer.logger=false", "--trainer.accelerator=cpu"]) == 0
    capsys.readouterr()
    study = _script()
    ckpt = run / "checkpoints" / "last.ckpt"
    cases = study.predict_cases(ckpt, str(root), 1)
    assert len(cases) == 3  # half of the 6 patients
    assert all(p.shape == t.shape == (3, 32, 32) and p.dtype == t.dtype == bool
               for p, t in cases.values())
    assert any(t.any() for _, t in cases.values())  # the truth is read as class indices
    assert study.main(["--ckpt", str(ckpt), "--data-root", str(root), "--sizes-3d", "5",
                       "--sizes-2d", "5"]) == 0
    out = capsys.readouterr().out
    assert "3 val cases of" in out and "largest 3-D" in out and "2-D < 5" in out
    # a class the checkpoint does not have: it predicted every slice, then printed NaN
    with pytest.raises(SystemExit, match=r"--class-index 5: .* has the classes 0\.\.1"):
        study.predict_cases(ckpt, str(root), 5)
