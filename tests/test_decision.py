"""model.positive_threshold: labels of two-class models, the same in validation, test,
``segpipe predict`` (images and rasters by windows), the Python Segmenter and ONNX exports
(``segpipe crossval`` refuses folds labelled otherwise: tests/test_crossval_audit.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

from segpipe.cli import main as cli_main
from segpipe.data.io import write_image
from segpipe.decision import check_positive_threshold, decide, decision_description
from segpipe.errors import ConfigError
from segpipe.predict.api import Segmenter
from segpipe.predict.checkpoint import CheckpointError, save_predict_checkpoint
from segpipe.tasks import SegmentationTask
from tests.predict.conftest import make_ckpt, noise_image
from tests.predict.test_command import FAST, write_geotiff
from tests.tasks.test_segmentation import ArgmaxData, PixelNet, _trainer

TWO = {"class_path": "tests.predict.nets.PointwiseNet",
       "init_args": {"in_channels": 3, "num_classes": 2, "seed": 3}}


# ------------------------------------------------------------------ the rule itself
def test_decide_is_the_arg_max_at_a_half_and_moves_with_the_threshold() -> None:
    probs = torch.rand(4, 2, 9, 7, generator=torch.Generator().manual_seed(0)).softmax(1)
    logits = probs.log()
    assert torch.equal(decide(logits), probs.argmax(1))
    assert torch.equal(decide(probs, 0.5), probs.argmax(1))
    for t in (0.2, 0.35, 0.8):
        assert torch.equal(decide(probs, t), (probs[:, 1] > t).long())
    # weighted sums (a sliding window's blend) decide as their probabilities do
    weights = torch.rand(4, 1, 9, 7, generator=torch.Generator().manual_seed(1)) + 0.1
    assert torch.equal(decide(probs * weights, 0.35), decide(probs, 0.35))
    assert torch.equal(decide(probs[0] * 3.0, 0.35, dim=0), decide(probs, 0.35)[0])
    assert decide(probs, 0.3).dtype == torch.int64
    with pytest.raises(ValueError, match="needs scores of 2 classes, got 3"):
        decide(torch.rand(1, 3, 2, 2), 0.4)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, float("nan"), True, "0.3"])
def test_a_threshold_outside_zero_to_one_is_refused_with_its_meaning(value) -> None:
    with pytest.raises(ValueError, match=r"strictly between 0 and 1 \(0.5 is the arg-max\)"):
        check_positive_threshold(value, 2)


def test_a_threshold_for_more_than_two_classes_says_to_leave_it_unset() -> None:
    with pytest.raises(ValueError, match="applies to two-class models.*has 3 classes.*leave "
                                         "model.positive_threshold unset"):
        check_positive_threshold(0.3, 3)
    assert check_positive_threshold(None, 3) is None
    assert check_positive_threshold(0.35, 2) == 0.35
    assert decision_description(0.35, ["bg", "tumour"]).startswith(
        "tumour (class 1) where its probability > 0.35")


# ------------------------------------------------------------------ the task
def test_the_task_refuses_a_threshold_for_a_multi_class_model() -> None:
    with pytest.raises(ConfigError, match="has 3 classes.*leave model.positive_threshold unset"):
        SegmentationTask(PixelNet(), positive_threshold=0.3)
    assert SegmentationTask(PixelNet()).threshold_sweep is None  # two classes only


def _confusion(task: SegmentationTask, images: torch.Tensor, masks: torch.Tensor,
               threshold: float | None) -> list[list[int]]:
    with torch.no_grad():
        probs = task(images).softmax(1)
    preds = decide(probs, threshold)
    counts = torch.bincount((masks * 2 + preds).flatten(), minlength=4)
    return counts.reshape(2, 2).tolist()  # rows: truth, columns: prediction


@pytest.mark.parametrize("tta", [False, True])
def test_validation_and_test_score_the_thresholded_labels(tta: bool) -> None:
    torch.manual_seed(0)
    data = ArgmaxData(n=8, classes=2)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    net = PixelNet(in_channels=2, num_classes=2)
    reports = {}
    for threshold in (None, 0.2):
        task = SegmentationTask(net, positive_threshold=threshold, test_tta=tta).eval()
        _trainer().test(task, loader, verbose=False)
        reports[threshold] = task.test_report
        if not tta:  # hflip views of a 1x1 network are the plain view
            assert task.test_report["confusion_matrix"] == _confusion(
                task, data.images, data.masks, threshold)
        val = _trainer().validate(task, loader, verbose=False)[0]
        assert val["val/mIoU"] == pytest.approx(task.test_report["mIoU"], abs=1e-6)
    assert reports[0.2]["confusion_matrix"] != reports[None]["confusion_matrix"]
    for threshold, report in reports.items():  # the sweep holds the test's own figures
        sweep = report["threshold_sweep"]
        i = sweep["thresholds"].index(0.5 if threshold is None else threshold)
        assert sweep["Dice_pooled"][i] == pytest.approx(report["Dice_per_class"]["class_1"])
        assert sweep["pixel_accuracy"][i] == pytest.approx(report["pixel_accuracy"])
        assert sweep["Dice_mean_over_cases"] is None  # images in no case
    assert "decision" not in reports[None]  # the arg-max: as test files before the option
    assert reports[0.2]["decision"].startswith("class_1 (class 1) where its probability > 0.2")


# ------------------------------------------------------------------ prediction
@pytest.fixture(scope="module")
def low_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-class pointwise model saved with model.positive_threshold 0.3."""
    return save_predict_checkpoint(tmp_path_factory.mktemp("ckpt") / "low.ckpt", net=TWO,
                                   data={"num_classes": 2, "class_names": ["bg", "fg"]},
                                   positive_threshold=0.3)


def _between(proba: np.ndarray, low: float, high: float) -> np.ndarray:
    return (proba[1] > low) & (proba[1] <= high)


def test_segmenter_and_predict_label_with_the_checkpoints_threshold(
        tmp_path: Path, low_ckpt: Path) -> None:
    image = noise_image(45, 70, seed=4)
    seg = Segmenter.from_checkpoint(low_ckpt, device="cpu", precision="32-true")
    assert seg.config.positive_threshold == 0.3
    proba = seg.predict_proba(image)
    assert _between(proba, 0.3, 0.5).mean() > 0.05  # pixels whose label the threshold changes
    labels = seg.predict(image)
    np.testing.assert_array_equal(labels, (proba[1] > 0.3).astype(np.uint8))
    arg_max = Segmenter.from_checkpoint(low_ckpt, device="cpu", precision="32-true",
                                        positive_threshold=0.5).predict(image)
    np.testing.assert_array_equal(arg_max, proba.argmax(0))
    src = tmp_path / "in"
    write_image(src / "a.png", image)
    write_geotiff(src / "scene.tif", np.moveaxis(image, -1, 0).copy())
    for extra, want in (((), labels), (("--positive_threshold", "0.5"), arg_max)):
        out = tmp_path / f"out{len(extra)}"
        assert cli_main(["predict", "--ckpt_path", str(low_ckpt), "--input", str(src),
                         "--output", str(out), *FAST, *extra]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(out / "a.png")), want)
        with rasterio.open(out / "scene.tif") as ds:  # a raster: blended windows' labels
            np.testing.assert_array_equal(ds.read(1), want)
        record = json.loads((out / ".segpipe-predict.json").read_text())
        assert record.get("positive_threshold") == (0.5 if extra else 0.3)


def test_a_threshold_given_to_a_multi_class_model_is_a_usage_error(tmp_path: Path,
                                                                    capsys) -> None:
    three = make_ckpt(tmp_path / "three.ckpt", "tests.predict.nets.PointwiseNet",
                      {"in_channels": 3, "num_classes": 3})
    write_image(tmp_path / "in" / "a.png", noise_image(8, 8))
    code = cli_main(["predict", "--ckpt_path", str(three), "--input",
                     str(tmp_path / "in"), "--output", str(tmp_path / "out"), *FAST,
                     "--positive_threshold", "0.3"])
    assert code == 2
    assert "--positive_threshold applies to two-class models" in capsys.readouterr().err


def test_a_checkpoint_with_an_impossible_threshold_is_named(tmp_path: Path,
                                                            low_ckpt: Path) -> None:
    ckpt = torch.load(low_ckpt, weights_only=False)
    ckpt["hyper_parameters"]["positive_threshold"] = 1.5
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"bad.ckpt: model.positive_threshold .* got 1.5"):
        Segmenter.from_checkpoint(bad, device="cpu")


def test_an_onnx_export_keeps_the_threshold(tmp_path: Path, low_ckpt: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from segpipe.predict.onnx import export_onnx

    model, side = export_onnx(low_ckpt, tmp_path / "m.onnx")
    meta = json.loads(side.read_text())
    assert meta["positive_threshold"] == 0.3 and "> 0.3" in meta["labels"]
    image = noise_image(40, 50, seed=5)
    seg = Segmenter.from_onnx(model)
    proba = seg.predict_proba(image)
    np.testing.assert_array_equal(seg.predict(image), (proba[1] > 0.3).astype(np.uint8))
    meta["positive_threshold"] = 2
    side.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="positive_threshold .* got 2; export the model"):
        Segmenter.from_onnx(model)
