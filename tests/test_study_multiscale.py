"""scripts/study_multiscale.py: multi-scale inference scored on a fit's val split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from segpipe.cli import main as cli_main
from tests.data.synthetic import make_camvid_like
from tests.scripts import load_script


def _script():
    return load_script("study_multiscale")


def test_view_sets_confusion_and_iou() -> None:
    study = _script()
    sets = study.combinations([0.5, 1.0, 1.25], tta=True)
    assert sets["1"] == [(1.0, False)]
    assert sets["1 + TTA"] == [(1.0, True)]
    assert sets["all: 0.5 1 1.25 + TTA"] == [(0.5, True), (1.0, True), (1.25, True)]
    assert sets["all: 0.5 1 1.25"] == [(0.5, False), (1.0, False), (1.25, False)]
    assert sets["middle: 1 1.25"] == [(1.0, False), (1.25, False)]
    assert list(study.combinations([1.0], tta=False)) == ["1"]  # no set of one scale twice
    assert study.scaled_size((180, 240), 0.75) == (135, 180)
    assert study.scaled_size((3, 3), 0.1) == (1, 1)
    truth = np.array([[0, 0, 1, 2], [1, 1, 2, 9]])  # 9: ignored
    pred = np.array([[0, 1, 1, 2], [1, 0, 0, 0]])
    cm = study.confusion(pred, truth, 3, ignore_index=9)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]
    iou = study.iou_per_class(cm)
    np.testing.assert_allclose(iou, [1 / 4, 2 / 4, 1 / 2])
    assert np.isnan(study.iou_per_class(np.zeros((2, 2), np.int64))).all()
    # Dice per case, then the mean over the cases that score each class
    other = np.array([[4, 0, 0], [0, 0, 0], [0, 0, 0]])  # class 0 only: no Dice for 1 and 2
    dice = study.dice_mean_over_cases({"a": cm, "b": other})
    np.testing.assert_allclose(dice, [(2 / 5 + 1) / 2, 4 / 6, 2 / 3])


def test_the_study_of_a_fits_val_split(tmp_path: Path, capsys) -> None:
    root = make_camvid_like(tmp_path / "camvid", n_train=4, n_val=3, num_classes=3, void_index=11)
    run = tmp_path / "run"
    common = ["--config", "configs/camvid_unet.yaml", f"--data.root={root}",
              f"--trainer.default_root_dir={run}", "--model.net.init_args.base_channels=4",
              "--model.net.init_args.depth=2", "--data.num_classes=3", "--data.class_names=null",
              "--data.class_colors=null", "--model.class_weights=null", "--data.val_cases=null",
              "--data.eval_resize=[18, 24]", "--data.num_workers=0",
              "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
              "--trainer.precision=32-true"]
    assert cli_main(["fit", *common, "--data.crop_size=16", "--trainer.max_time=null",
                     "--trainer.max_epochs=1", "--trainer.logger=false"]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    assert cli_main(["test", *common, f"--ckpt_path={ckpt}", "--model.test_tta=false",
                     "--model.test_tta_scales=null"]) == 0  # the plain view (the config has five)
    tested = json.loads(next(run.rglob("test_metrics.json")).read_text())
    capsys.readouterr()
    study = _script()
    matrices, names, sizes = study.study(ckpt, str(root), [0.5, 1.0], tta=True)
    assert len(names) == 3 and set(matrices) == {"0.5", "0.5 + TTA", "1", "1 + TTA",
                                                 "all: 0.5 1", "all: 0.5 1 + TTA"}
    labelled = 3 * 36 * 48 - 3 * 4 * 48  # void rows at the bottom of each val frame
    assert all(list(by_case) == ["0001TP"] and by_case["0001TP"].shape == (3, 3)
               and by_case["0001TP"].sum() == labelled for by_case in matrices.values())
    # the scale-1 view is what segpipe test scores
    mean_iou = np.nanmean(study.iou_per_class(matrices["1"]["0001TP"]))
    assert mean_iou == pytest.approx(tested["mIoU"], abs=1e-4)
    assert "evaluation size (18, 24) x scale" in sizes
    assert "scales 0.5-1.5 here" in sizes  # the config's 0.25-0.75 of frames scored at half size
    assert study.main(["--ckpt", str(ckpt), "--data-root", str(root), "--scales", "1", "0.75",
                       "--no-tta", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "all: 0.75 1" in out and "+ TTA" not in out
    # the printed figures of the plain view are segpipe test's
    assert study.main(["--ckpt", str(ckpt), "--data-root", str(root), "--scales", "1",
                       "--no-tta"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("1 "))
    figures = [float(v) for v in row.split()[1:4]]
    expected = [100 * tested[k] for k in ("mIoU", "micro_IoU", "pixel_accuracy")]
    assert figures == pytest.approx(expected, abs=0.006)
    with pytest.raises(SystemExit):
        study.main(["--ckpt", str(ckpt), "--data-root", str(root), "--scales", "0"])
