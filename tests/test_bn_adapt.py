"""`segpipe test --model.bn_adapt` and `segpipe predict --bn_adapt`: the test images'
BatchNorm statistics blended in, the same masks from both commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.cli import main
from tests.cli_args import TINY_UNET
from tests.data.synthetic import make_folder_dataset

COMMON = [*TINY_UNET, "--data.num_workers=0", "--trainer.precision=32-true",
          "--data.eval_batch_size=2"]


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory):
    """A tiny U-Net fitted on the folder data, whose test images are then darkened (another
    camera's exposure)."""
    tmp = tmp_path_factory.mktemp("bn")
    root = make_folder_dataset(tmp / "ds", n_train=6, n_val=2, n_test=5, size=(40, 48))
    run = tmp / "run"
    main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={root}",
          f"--trainer.default_root_dir={run}", "--trainer.max_epochs=15", *COMMON])
    for p in (root / "test" / "images").glob("*.png"):
        dark = (np.asarray(Image.open(p)).astype(np.float32) * 0.4).astype(np.uint8)
        Image.fromarray(dark).save(p)
    return root, run


def _test(root: Path, run: Path, capsys, *extra: str) -> dict:
    capsys.readouterr()
    main(["test", "--config", "configs/folder_unet.yaml", f"--data.root={root}",
          f"--trainer.default_root_dir={run}", "--ckpt_path=last", *COMMON, *extra])
    out = capsys.readouterr().out
    return json.loads(Path(out.split("Test metrics written to ")[1].split()[0]).read_text())


def _predicted_confusion(root: Path, run: Path, out: Path, *extra: str) -> np.ndarray:
    assert main(["predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--input",
                 str(root / "test" / "images"), "--output", str(out), "--format", "mask",
                 "--no_progress", "--num_workers", "0", "--accelerator", "cpu", "--precision",
                 "32-true", "--batch_size", "2", *extra]) == 0
    cm = np.zeros((3, 3), np.int64)
    for mask_file in sorted((root / "test" / "masks").glob("*.png")):
        truth = np.asarray(Image.open(mask_file)).astype(np.int64)
        pred = np.asarray(Image.open(out / mask_file.name)).astype(np.int64)
        valid = truth != 255
        cm += np.bincount(truth[valid] * 3 + pred[valid], minlength=9).reshape(3, 3)
    return cm


def test_test_and_predict_adapt_alike_and_say_so(shifted_run, tmp_path, capsys):
    root, run = shifted_run
    plain = _test(root, run, capsys)
    assert plain["batchnorm_statistics"] == "training's (plain)"
    adapted = _test(root, run, capsys, "--model.bn_adapt=0.5")
    assert adapted["batchnorm_statistics"] == (
        "0.5 x the test images' statistics + 0.5 x training's, estimated on 5 image(s) or "
        "tile(s) in "
        "10 BatchNorm layer(s)")
    assert adapted["confusion_matrix"] != plain["confusion_matrix"]  # the statistics moved
    md = (run / "lightning_logs").glob("version_*/report.md")
    assert any("BatchNorm statistics: 0.5 x the test images'" in p.read_text() for p in md)

    # predict: the same masks as each test scored, from the checkpoint alone.
    cm = _predicted_confusion(root, run, tmp_path / "adapted", "--bn_adapt", "0.5")
    assert np.array_equal(cm, np.asarray(adapted["confusion_matrix"]))
    assert "BatchNorm statistics: 0.5 x the input images' statistics" in capsys.readouterr().out
    assert np.array_equal(_predicted_confusion(root, run, tmp_path / "plain"),
                          np.asarray(plain["confusion_matrix"]))

    # A resumed predict (outputs of some files exist) estimates on every input all the same.
    (tmp_path / "adapted" / "img_000.png").unlink()
    cm = _predicted_confusion(root, run, tmp_path / "adapted", "--bn_adapt", "0.5")
    assert np.array_equal(cm, np.asarray(adapted["confusion_matrix"]))


def test_the_estimate_leaves_persistent_loader_workers_their_test_pass(shifted_run, capsys):
    """With loader workers (persistent: segpipe's default on any GPU machine) the estimate's
    pass took Lightning's iterator: the test scored no image, wrote no metrics, exited 0."""
    root, run = shifted_run
    alone = _test(root, run, capsys, "--model.bn_adapt=0.5")
    workers = _test(root, run, capsys, "--model.bn_adapt=0.5", "--data.num_workers=1")
    assert workers["num_images"] == alone["num_images"] == 5
    assert workers["confusion_matrix"] == alone["confusion_matrix"]


def test_out_of_range_weights_are_one_line_errors(shifted_run, tmp_path, capsys):
    root, run = shifted_run
    code = main(["predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--input",
                 str(root / "test" / "images"), "--output", str(tmp_path), "--bn_adapt", "1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--bn_adapt is the weight" in err[0]
    code = main(["test", "--config", "configs/folder_unet.yaml", f"--data.root={root}",
                 f"--trainer.default_root_dir={run}", "--ckpt_path=last", *COMMON,
                 "--model.bn_adapt=1.5"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1
    assert err[0].startswith("segpipe: error: model.bn_adapt is the weight")


def test_onnx_models_cannot_adapt(tmp_path):
    from segpipe.predict.command import PredictUsageError, predict

    with pytest.raises(PredictUsageError, match="ONNX export has folded"):
        predict(tmp_path / "model.onnx", tmp_path, tmp_path / "out", bn_adapt=0.5)


def test_python_test_puts_the_training_statistics_back(shifted_run):
    import lightning.pytorch as L
    import torch

    from segpipe.data import SegmentationDataModule
    from segpipe.tasks import SegmentationTask

    root, run = shifted_run
    task = SegmentationTask.load_from_checkpoint(run / "checkpoints" / "last.ckpt",
                                                 bn_adapt=0.5, weights_only=False)
    before = {k: v.clone() for k, v in task.state_dict().items() if "running" in k}
    dm = SegmentationDataModule(str(root), num_classes=3, ignore_index=255, batch_size=2,
                                num_workers=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.test(task, datamodule=dm, verbose=False)
    assert task.test_report["batchnorm_statistics"].startswith("0.5 x the test images'")
    after = {k: v for k, v in task.state_dict().items() if "running" in k}
    assert before and all(torch.equal(before[k], after[k]) for k in before)


def test_adapted_multiscale_views_agree_in_test_and_predict(tmp_path, capsys):
    """With eval_resize and multi-scale views the images come at their native size; the
    statistics are still those of the plain view (the images at eval_resize), in both commands."""
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=3, size=(40, 48))
    run = tmp_path / "run"
    resize = ["--data.eval_resize=[20, 24]"]
    main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={root}",
          f"--trainer.default_root_dir={run}", "--trainer.max_epochs=15", *COMMON, *resize])
    for p in (root / "test" / "images").glob("*.png"):
        dark = (np.asarray(Image.open(p)).astype(np.float32) * 0.4).astype(np.uint8)
        Image.fromarray(dark).save(p)
    scales = ["--model.test_tta_scales=[0.5, 1, 1.5]", *resize]
    adapted = _test(root, run, capsys, "--model.bn_adapt=0.5", *scales)
    assert "at 3 scales" in adapted["test_time_augmentation"]
    cm = _predicted_confusion(root, run, tmp_path / "adapted", "--bn_adapt", "0.5",
                              "--tta_scales", "0.5", "1", "1.5")
    assert np.array_equal(cm, np.asarray(adapted["confusion_matrix"]))
    plain = _test(root, run, capsys, *scales)  # the statistics moved the predictions
    assert plain["confusion_matrix"] != adapted["confusion_matrix"]
