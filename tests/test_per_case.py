"""Per-case metrics: LGG patients (layout default) and data.case_pattern for folders."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from segpipe.cli import main
from segpipe.data import SegmentationDataModule
from segpipe.metrics import case_scores
from tests.cli_args import TINY_UNET
from tests.data.synthetic import make_folder_dataset, make_lgg_like


def test_case_scores_pool_pixels_then_average_cases() -> None:
    # case a: tumour 1 tp, 1 fn; case b: tumour 9 tp, 0 errors
    a = torch.tensor([[10, 0], [1, 1]])
    b = torch.tensor([[10, 0], [0, 9]])
    out = case_scores({"a": a, "b": b}, {"a": 2, "b": 1}, ["bg", "tumour"])
    tumour_a, tumour_b = 2 * 1 / (2 * 1 + 1), 1.0
    assert out["Dice_per_class_mean_over_cases"]["tumour"] == pytest.approx((tumour_a + tumour_b) / 2)
    rows = {r["case"]: r for r in out["cases"]}
    assert rows["a"]["Dice_per_class"]["tumour"] == pytest.approx(tumour_a)
    assert rows["a"]["num_images"] == 2 and out["num_cases"] == 2
    assert out["num_cases_per_class"] == {"bg": 2, "tumour": 2}
    empty = case_scores({"c": torch.tensor([[5, 0], [0, 0]])}, {"c": 1}, ["bg", "tumour"])
    assert empty["Dice_per_class_mean_over_cases"]["tumour"] is None  # absent: no score
    assert empty["num_cases_per_class"] == {"bg": 1, "tumour": 0}
    # a case without a labelled pixel (every pixel ignored) has a row but no score: the
    # means were over 2 cases and labelled 3
    none = case_scores({"a": a, "b": b, "z": torch.zeros(2, 2, dtype=torch.long)},
                       {"a": 2, "b": 1, "z": 1}, ["bg", "tumour"])
    assert none["num_cases"] == 2 and none["num_cases_without_score"] == 1
    assert len(none["cases"]) == 3 and none["mDice_mean_over_cases"] == out["mDice_mean_over_cases"]


def test_per_case_report_says_what_each_mean_covers(tmp_path: Path) -> None:
    """A class's mean over cases could cover 1 of 3 cases, images in no case were dropped
    unannounced, and the CSV wrote missing values as a dash (text to pandas)."""
    from segpipe.report import write_per_case_csv, write_report

    cms = {"p1": torch.tensor([[10, 0], [1, 1]]), "p2": torch.tensor([[8, 0], [0, 0]])}
    per_case = case_scores(cms, {"p1": 2, "p2": 1}, ["bg", "tumour"])
    per_case["images_without_case"] = 1
    report = {"mIoU": 0.5, "mDice": 0.6, "micro_IoU": 0.9, "pixel_accuracy": 0.95,
              "IoU_per_class": {"bg": 0.9, "tumour": 0.3}, "Dice_per_class": {"bg": 0.95,
              "tumour": 0.5}, "class_names": ["bg", "tumour"], "ignore_index": None,
              "num_images": 4, "per_case": per_case}
    md = write_report(report, tmp_path).read_text(encoding="utf-8")
    assert "| tumour | 66.67 % | 50.00 % | 1 |" in md  # the mean covers case p1 only
    assert "| bg | " in md and "| 2 |" in md
    assert "**1** image(s) belong to no case" in md
    assert "left out of that class's mean" in md
    mdice = per_case["mDice_mean_over_cases"]
    assert f"Mean over cases of each case's mDice: {100 * mdice:.2f} %" in md
    rows = list(csv.DictReader(write_per_case_csv(tmp_path / "c.csv", per_case).open()))
    assert rows[1]["case"] == "p2" and rows[1]["Dice/tumour"] == ""
    assert float(rows[0]["Dice/tumour"]) == pytest.approx(2 / 3)


def test_case_pattern_names_cases(tmp_path: Path, caplog) -> None:
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=4, n_test=0, size=(16, 16))
    dm = SegmentationDataModule(str(root), num_classes=3, case_pattern=r"img_00(?P<case>[0-1])")
    with caplog.at_level(logging.WARNING, logger="segpipe.data.datamodule"):
        dm.setup("validate")
    assert [s.case for s in dm.splits["val"]] == ["0", "1", None, None]
    # Images the pattern finds no case in were left out of the per-case figures unannounced.
    assert ("finds no case in 2 of the 4 val images (e.g. 'val/images/img_002.png', the path "
            "under data.root it is searched in)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segpipe.data.datamodule"):
        SegmentationDataModule(str(root), num_classes=3, case_pattern=r"patient(\d+)").setup(
            "validate")
    assert "finds no case in any val images" in caplog.text
    assert "the val split gets no per-case figures" in caplog.text
    item = dm.datasets["val"][2]
    assert item["case"] == ""  # no case: left out of per-case scores
    # a group that matches the empty string finds no case either (it went unannounced, and the
    # report then said the images belong to no case)
    caplog.clear()
    empty = SegmentationDataModule(str(root), num_classes=3, case_pattern=r"img_00([01]?)")
    with caplog.at_level(logging.WARNING, logger="segpipe.data.datamodule"):
        empty.setup("validate")
    assert [s.case for s in empty.splits["val"]] == ["0", "1", None, None]
    assert "finds no case in 2 of the 4 val images" in caplog.text
    with pytest.raises(ValueError, match="case_pattern"):
        SegmentationDataModule(str(root), num_classes=3, case_pattern="(")


def test_lgg_test_reports_per_patient(tmp_path: Path, capsys) -> None:
    root = make_lgg_like(tmp_path / "lgg", n_patients=4, slices_per_patient=2, val_patients=2)
    run = tmp_path / "run"
    args = ["--config", "configs/lgg_unet.yaml", f"--data.root={root}",
            f"--trainer.default_root_dir={run}", *TINY_UNET, "--data.num_classes=2",
            "--data.crop_size=32", "--data.num_workers=0", "--trainer.logger=false",
            "--data.val_case_fraction=0.5"]  # 2 of the 4 patients
    assert main(["fit", *args, "--trainer.max_epochs=1"]) == 0
    capsys.readouterr()
    assert main(["test", *args, "--ckpt_path", "last"]) == 0
    metrics = json.loads(next(run.rglob("test_metrics.json")).read_text())
    per_case = metrics["per_case"]
    # the headline figure of medical readers on the console too, not in the files only
    out = capsys.readouterr().out
    mdice = per_case["mDice_mean_over_cases"]
    assert f"Mean over 2 cases: mDice {100 * mdice:.1f} %" in out
    # a class absent from both truth and prediction in a case: its mean is over fewer cases
    tumour, n = (per_case["Dice_per_class_mean_over_cases"]["abnormality"],
                 per_case["num_cases_per_class"]["abnormality"])
    said = "" if tumour is None or n == 2 else f" (over {n} case{'' if n == 1 else 's'})"
    assert f"abnormality {'n/a' if tumour is None else f'{100 * tumour:.1f} %'}{said}\n" in out
    assert "mIoU and mDice are macro means over classes" in out
    assert per_case["num_cases"] == 2 and len(per_case["cases"]) == 2
    assert {r["num_images"] for r in per_case["cases"]} == {2}
    assert set(per_case["Dice_per_class_mean_over_cases"]) == {"background", "abnormality"}
    rows = list(csv.DictReader(Path(metrics["per_case_csv"]).open()))
    assert len(rows) == 2 and "Dice/abnormality" in rows[0]
    report = next(run.rglob("report.md")).read_text()
    assert "## Per case" in report and "mean over cases" in report
    assert "[test_per_case.csv](test_per_case.csv)" in report


def test_best_checkpoint_selected_on_the_val_mean_over_patients(tmp_path: Path) -> None:
    """The figure medical readers compare (mean tumour Dice over patients) is logged in
    validation too, so checkpoint.monitor can select on it; the file name says which."""
    root = make_lgg_like(tmp_path / "lgg", n_patients=4, slices_per_patient=2, val_patients=2)
    run = tmp_path / "run"
    monitor = "val/Dice_mean_over_cases/abnormality"
    args = ["--config", "configs/lgg_unet.yaml", f"--data.root={root}",
            f"--trainer.default_root_dir={run}", *TINY_UNET, "--data.num_classes=2",
            "--data.crop_size=32", "--data.num_workers=0", "--data.val_case_fraction=0.5",
            "--trainer.max_time=null", "--trainer.max_epochs=4",
            "--trainer.check_val_every_n_epoch=1", f"--checkpoint.monitor={monitor}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={run}"]
    assert main(["fit", *args]) == 0
    rows = [r for r in csv.DictReader(next(run.rglob("metrics.csv")).open()) if r.get(monitor)]
    assert len(rows) == 4 and all(r["val/mDice_mean_over_cases"] for r in rows)
    scores = [float(r[monitor]) for r in rows]
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    epoch = max(range(4), key=lambda e: (scores[e], -e))  # the first epoch of the maximum
    assert best.name.startswith(f"best-epoch{epoch:03d}-Dice_mean_over_cases-abnormality")
    assert best.name.endswith(f"{scores[epoch]:.4f}.ckpt")


def test_val_cases_hold_whole_sequences_out(tmp_path: Path) -> None:
    from tests.data.synthetic import make_camvid_like

    root = make_camvid_like(tmp_path / "camvid")
    probe = SegmentationDataModule(str(root), layout="camvid", num_classes=11, ignore_index=11)
    cases = sorted({s.case for split in ("train", "val") for s in probe.splits[split]})
    assert cases and all("_" not in c for c in cases)  # the sequence prefix
    held = cases[0]
    dm = SegmentationDataModule(str(root), layout="camvid", num_classes=11, ignore_index=11,
                                val_cases=[held])
    assert {s.case for s in dm.splits["val"]} == {held}
    assert held not in {s.case for s in dm.splits["train"]}
    n_all = len(probe.splits["train"]) + len(probe.splits["val"])
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == n_all
    with pytest.raises(ValueError, match="not found"):
        SegmentationDataModule(str(root), layout="camvid", num_classes=11,
                               val_cases=["nope"]).splits


def test_val_case_fraction_splits_lgg_by_patient(tmp_path: Path) -> None:
    root = make_lgg_like(tmp_path / "lgg", n_patients=8, slices_per_patient=2, val_patients=1)
    dm = SegmentationDataModule(str(root), layout="lgg", num_classes=2,
                                mask_values={0: 0, 255: 1}, val_case_fraction=0.25)
    val = {s.case for s in dm.splits["val"]}
    assert len(val) == 2 and not val & {s.case for s in dm.splits["train"]}


def test_folds_partition_the_cases_and_fold_0_is_the_default_split(tmp_path: Path,
                                                                   caplog) -> None:
    root = make_lgg_like(tmp_path / "lgg", n_patients=11, slices_per_patient=1, val_patients=1)

    def val_cases(**kw) -> set[str]:
        dm = SegmentationDataModule(str(root), layout="lgg", num_classes=2,
                                    mask_values={0: 0, 255: 1}, val_case_fraction=0.25, **kw)
        val = {s.case for s in dm.splits["val"]}
        assert val and not val & {s.case for s in dm.splits["train"]}
        assert len(dm.splits["val"]) + len(dm.splits["train"]) == 11
        return val

    with caplog.at_level(logging.INFO):
        folds = [val_cases(fold=k) for k in range(4)]
    assert "val split by case (fold 3 of 4): 2 of 11 cases (2 images) for val, 9 images" in caplog.text
    assert folds[0] == val_cases()  # fold 0 is what val_case_fraction alone gives
    assert [len(f) for f in folds] == [3, 3, 3, 2]  # round(0.25 * 11) = 3, then 8 in 3
    assert len(set.union(*folds)) == sum(len(f) for f in folds) == 11  # each case in one fold
    assert folds[1] != val_cases(fold=1, seed=1)  # the data seed draws the order


def test_fold_arguments_are_checked(tmp_path: Path) -> None:
    root = make_lgg_like(tmp_path / "lgg", n_patients=3, slices_per_patient=1, val_patients=1)
    kw = dict(layout="lgg", num_classes=2, mask_values={0: 0, 255: 1})
    with pytest.raises(ValueError, match="1/K"):
        SegmentationDataModule(str(root), fold=0, **kw)  # no val_case_fraction
    with pytest.raises(ValueError, match="1/K"):
        SegmentationDataModule(str(root), val_case_fraction=0.3, fold=0, **kw)
    with pytest.raises(ValueError, match=r"0\.\.4"):
        SegmentationDataModule(str(root), val_case_fraction=0.2, fold=5, **kw)
    # 3 patients cannot fill 5 folds: one for fold 0, two left for the other four
    with pytest.raises(ValueError, match="fold 4 of 5 has no cases"):
        SegmentationDataModule(str(root), val_case_fraction=0.2, fold=4, **kw).splits
