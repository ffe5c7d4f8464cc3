"""End-to-end CLI: `segpipe fit` then `segpipe test` (then `predict`) on synthetic data made by code."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from segpipe.cli import main
from segpipe.lightning_cli import resolve_checkpoint_alias
from tests.cli_args import TINY_UNET
from tests.data.synthetic import make_folder_dataset

TINY = [*TINY_UNET, "--data.num_workers=0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "ds", num_classes=3, size=(48, 40))


@pytest.fixture(scope="module")
def fitted(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    main(
        ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
         f"--trainer.default_root_dir={run}", "--trainer.max_epochs=3", *TINY]
    )
    return run


def test_fit_writes_checkpoints_and_config(fitted):
    ckpts = sorted(p.name for p in (fitted / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(n.startswith("best-epoch") for n in ckpts)
    configs = list(fitted.rglob("config.yaml"))
    assert configs, "LightningCLI saves the config with each run"
    saved = yaml.safe_load(configs[0].read_text())
    assert saved["seed_everything"] == 0 and saved["data"]["init_args"]["num_classes"] == 3
    assert saved["data"]["class_path"] == "segpipe.data.SegmentationDataModule"  # the default
    import torch

    hp = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    spec = hp["data_spec"]  # linked from the data section, the one place classes are stated
    assert spec["num_classes"] == 3 and spec["ignore_index"] == 255
    assert hp["net"]["init_args"]["num_classes"] == 3 and hp["net"]["init_args"]["in_channels"] == 3
    assert spec["mean"] == [0.485, 0.456, 0.406] and spec["stats_source"] == "default"  # 8-bit RGB
    assert hp["net"]["class_path"] == "segpipe.models.UNet"  # enough to rebuild from the checkpoint


def test_test_writes_labelled_metrics(fitted, dataset, capsys, monkeypatch):
    # `--ckpt_path best` in a new process: the best-* file recorded by the fit run, named by a
    # run folder relative to the working directory (as the configs' runs/... are).
    config = Path(__file__).resolve().parents[1] / "configs" / "folder_unet.yaml"
    monkeypatch.chdir(fitted.parent)
    main(
        ["test", "--config", str(config), f"--data.root={dataset}",
         f"--trainer.default_root_dir={fitted.name}", "--ckpt_path=best", *TINY]
    )
    out = capsys.readouterr().out
    path = Path(out.split("Test metrics written to ")[1].split()[0])
    metrics = json.loads(path.read_text())
    assert set(metrics["IoU_per_class"]) == {"class_0", "class_1", "class_2"}
    for key in ("mIoU", "micro_IoU", "pixel_accuracy", "mDice"):
        assert 0.0 <= metrics[key] <= 1.0
    assert "macro" in metrics["definitions"]["mIoU"]
    cm = metrics["confusion_matrix"]
    assert len(cm) == 3 and all(len(r) == 3 for r in cm)
    assert metrics["num_images"] == 4  # make_folder_dataset's default test split
    logged = float(out.split("test/loss")[1].split()[0])  # the console table's figure
    assert metrics["loss"] == pytest.approx(logged, rel=1e-5)  # it was in no file
    assert metrics["test_time_augmentation"] == "none (plain predictions)"
    assert (path.parent / "test_per_image.csv").exists()
    # The evaluation report beside the metrics, with the same (macro/micro labelled) numbers.
    report_path = Path(out.split("Evaluation report written to ")[1].split()[0])
    assert report_path == path.with_name("report.md")
    md = report_path.read_text(encoding="utf-8")
    assert f"| mIoU | macro (mean over classes) | {metrics['mIoU']:.4f} |" in md
    assert f"| micro_IoU | micro (pooled pixels) | {metrics['micro_IoU']:.4f} |" in md
    assert "[test_per_image.csv](test_per_image.csv)" in md
    files = report_path.parent / "report_files"
    assert (files / "confusion_matrix.png").exists() and (files / "per_class_iou.png").exists()
    gallery = sorted(files.glob("worst_*.png"))
    assert 1 <= len(gallery) <= 4 and all(f"report_files/{p.name}" in md for p in gallery)
    assert "could not read" not in md


def test_evaluation_options_are_this_runs_not_the_checkpoints(fitted, dataset, capsys):
    # The checkpoint's hyperparameters say test_tta=False and num_worst_images=4 (the fit run's);
    # restoring them over the command line silently scored plain predictions.
    main(
        ["test", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
         f"--trainer.default_root_dir={fitted}", "--ckpt_path=best", *TINY,
         "--model.test_tta=true", "--model.num_worst_images=1"]
    )
    out = capsys.readouterr().out
    path = Path(out.split("Test metrics written to ")[1].split()[0])
    metrics = json.loads(path.read_text())
    # folder_unet trains with horizontal flips only: the identity and the flip.
    assert metrics["test_time_augmentation"] == (
        "mean of 2 view(s) over the training symmetries (hflip)")
    assert len(list((path.parent / "report_files").glob("worst_*.png"))) == 1
    md = path.with_name("report.md").read_text(encoding="utf-8")
    assert "test-time augmentation: mean of 2 view(s)" in md


def test_a_test_that_reads_masks_otherwise_than_training_is_warned_about(fitted, dataset):
    """A model trained with data.mask_values {0: 0, 255: 1}, tested without it, scored every
    foreground pixel as ignored, with no word: the checkpoint now records how masks were read."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["test", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                     f"--trainer.default_root_dir={fitted}", "--ckpt_path=best", *TINY,
                     "--data.mask_values={0: 0, 1: 1, 2: 2}"]) == 0
    said = [str(w.message) for w in caught if "read into other labels" in str(w.message)]
    assert said == [
        "the checkpoint was trained with data.mask_values=null but this run has "
        "data.mask_values={0: 0, 1: 1, 2: 2}: its masks are read into other labels than in "
        "training (0/255 masks without the mapping score every 255 as ignored or as class 255);"
        " to score as trained, pass --data.mask_values 'null' or the run's config.yaml"], said


def test_a_test_labels_classes_and_tta_views_as_the_checkpoint_trained(dataset, tmp_path, capsys):
    # Names given otherwise at test time relabelled every per-class figure, and the TTA views
    # came from the test's data options (vflip off: 2 views) while predict --tta used 4.
    common = ["--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
              f"--trainer.default_root_dir={tmp_path}", *TINY]
    assert main(["fit", *common, "--trainer.max_epochs=1", "--data.vflip=true",
                 "--data.class_names=[bg, red, green]"]) == 0
    capsys.readouterr()
    figures = []
    for names in ("[bg, red, green]", "[bg, green, red]"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["test", *common, "--ckpt_path=last", "--model.test_tta=true",
                         f"--data.class_names={names}"]) == 0
        relabel = [w for w in caught if "labelled with the checkpoint's names" in str(w.message)]
        assert len(relabel) == (names != "[bg, red, green]")
        out = capsys.readouterr().out
        metrics = json.loads(Path(out.split("Test metrics written to ")[1].split()[0]).read_text())
        assert metrics["test_time_augmentation"] == (
            "mean of 4 view(s) over the training symmetries (hflip, vflip)")
        figures.append(metrics["IoU_per_class"])
    assert list(figures[1]) == ["bg", "red", "green"] and figures[1] == figures[0]


@pytest.mark.parametrize("workers", [0, 1])  # in a loader process torch re-raises it
def test_a_bad_file_met_in_training_without_the_data_check_is_one_line(workers, tmp_path, capsys):
    import numpy as np

    from segpipe.data.io import write_mask

    root = make_folder_dataset(tmp_path / "ds", num_classes=3, size=(48, 40))
    bad = sorted((root / "train" / "masks").iterdir())[0]
    write_mask(bad, np.full((48, 40), 7, dtype=np.uint8))  # no such class
    code = main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={root}",
                 f"--trainer.default_root_dir={tmp_path / 'run'}", *TINY,
                 "--data.check_data=false", "--trainer.max_epochs=1",
                 f"--data.num_workers={workers}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and not any("Traceback" in line for line in err), err[-5:]
    assert str(bad) in err[-1] and "label values [7] outside 0..2" in err[-1]


def test_a_net_option_the_data_section_sets_is_refused_from_a_config_too(dataset, tmp_path, capsys):
    config = tmp_path / "net.yaml"
    config.write_text("model:\n  net:\n    init_args:\n      num_classes: 7\n")
    code = main(["fit", "--config", "configs/folder_unet.yaml", "--config", str(config),
                 f"--data.root={dataset}", f"--trainer.default_root_dir={tmp_path}", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and f"model.net.init_args.num_classes=7 (in {config})" in err[-1], err
    # the same value as the data's is no conflict
    assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={tmp_path}", *TINY, "--trainer.fast_dev_run=true",
                 "--model.net.init_args.num_classes=3"]) == 0


def test_ckpt_path_aliases_resolve_to_the_run_files(fitted, tmp_path):
    ckpt_dir = fitted / "checkpoints"
    (best,) = ckpt_dir.glob("best-*.ckpt")
    assert resolve_checkpoint_alias("best", ckpt_dir) == str(best)
    assert resolve_checkpoint_alias("last", ckpt_dir) == str(ckpt_dir / "last.ckpt")
    # A run folder moved elsewhere: last.ckpt's recorded path is stale, the file name still fits.
    moved = tmp_path / "moved"
    shutil.copytree(ckpt_dir, moved)
    assert resolve_checkpoint_alias("best", moved) == str(moved / best.name)
    (moved / "last.ckpt").unlink()  # no record at all: the newest other checkpoint
    assert resolve_checkpoint_alias("best", moved) == str(moved / best.name)
    older, newer = moved / "best-epoch=0.ckpt", moved / "best-epoch=7.ckpt"
    for age, path in ((300, older), (100, newer)):
        shutil.copy(moved / best.name, path)
        os.utime(path, (time.time() - age, time.time() - age))
    os.utime(moved / best.name, (time.time() - 200, time.time() - 200))
    assert resolve_checkpoint_alias("best", moved) == str(newer)
    for alias in ("best", "last"):
        with pytest.raises(FileNotFoundError, match=f"--ckpt_path {alias}: no {alias} checkpoint in"):
            resolve_checkpoint_alias(alias, tmp_path)
    code = main(["test", "--config", "configs/folder_unet.yaml", "--data.root=unused",
                 f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=best", *TINY])
    assert code == 2  # one clear line, no traceback


@pytest.mark.parametrize("test_options, predict_options", [
    ([], []),
    (["--model.test_tta=true", "--model.test_tta_scales=[0.5, 1, 1.5]"],
     ["--tta", "--tta_scales", "0.5", "1", "1.5"]),
])
def test_eval_resize_scores_every_mask_at_its_own_size_as_predict_writes_it(
        tmp_path, capsys, test_options, predict_options):
    """With data.eval_resize the network sees resized images, `segpipe test` scores the
    upsampled predictions against the masks at their native (here differing) sizes, and those
    are exactly the masks `segpipe predict` writes; with multi-scale TTA too (each view
    resized from the native image, in padded batches of two sizes)."""
    import numpy as np
    from PIL import Image

    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=3, size=(48, 40))
    other = make_folder_dataset(tmp_path / "other", n_train=0, n_val=0, n_test=2, size=(36, 56),
                                seed=1)
    for kind in ("images", "masks"):
        for p in (other / "test" / kind).iterdir():
            shutil.copy(p, root / "test" / kind / f"z{p.name}")
    run = tmp_path / "run"
    common = [f"--data.root={root}", f"--trainer.default_root_dir={run}", *TINY,
              "--data.eval_resize=[24, 28]", "--data.eval_batch_size=5",
              "--trainer.precision=32-true"]
    main(["fit", "--config", "configs/folder_unet.yaml", "--trainer.max_epochs=2", *common])
    capsys.readouterr()
    main(["test", "--config", "configs/folder_unet.yaml", "--ckpt_path=last", *common,
          *test_options])
    out = capsys.readouterr().out
    metrics = json.loads(Path(out.split("Test metrics written to ")[1].split()[0]).read_text())
    if test_options:
        assert metrics["test_time_augmentation"] == (
            "mean of 2 view(s) over the training symmetries (hflip) at 3 scales (0.5, 1, 1.5 x "
            "data.eval_resize 24x28, each resized from the native image)")
    pred_dir = tmp_path / "pred"
    assert main(["predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--input",
                 str(root / "test" / "images"), "--output", str(pred_dir), "--format", "mask",
                 "--no_progress", "--num_workers", "0", "--accelerator", "cpu",
                 "--precision", "32-true", *predict_options]) == 0
    cm = np.zeros((3, 3), np.int64)
    for mask_file in sorted((root / "test" / "masks").glob("*.png")):
        truth = np.asarray(Image.open(mask_file)).astype(np.int64)
        pred = np.asarray(Image.open(pred_dir / mask_file.name)).astype(np.int64)
        assert pred.shape == truth.shape  # 48x40 and 36x56, from 24x28 network inputs
        valid = truth != 255
        cm += np.bincount(truth[valid] * 3 + pred[valid], minlength=9).reshape(3, 3)
    assert cm.sum() == 3 * 48 * 40 + 2 * 36 * 56  # every native pixel scored, no padding
    assert np.array_equal(np.asarray(metrics["confusion_matrix"]), cm)


def test_a_checkpoint_of_other_classes_is_one_line(fitted, dataset, tmp_path, capsys):
    # 3 classes in training; the data's labels 0..2 also pass a 4-class check, so the
    # checkpoint is what does not fit.
    code = main(["test", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={tmp_path}", "--ckpt_path",
                 str(fitted / "checkpoints" / "last.ckpt"), *TINY, "--data.num_classes=4"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and not any("Traceback" in line for line in err)
    assert err[-1].startswith("segpipe: error: the checkpoint was trained with num_classes=3 but "
                              "this run has data.num_classes=4;")


def test_a_class_weighted_checkpoint_of_other_classes_is_the_same_line(dataset, tmp_path, capsys):
    """Its class_weights, merged with this run's data, were refused as "class_weights has 3
    values but there are 4 classes", which no option given fixes."""
    run = tmp_path / "run"
    assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={run}", *TINY, "--trainer.max_epochs=1",
                 "--trainer.limit_train_batches=1", "--model.class_weights=[1, 1, 2]"]) == 0
    capsys.readouterr()
    for command in ("test", "validate"):
        code = main([command, "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                     "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), *TINY,
                     "--data.num_classes=4", f"--trainer.default_root_dir={tmp_path / command}"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and err[-1].startswith(
            "segpipe: error: the checkpoint was trained with num_classes=3 but this run has "
            "data.num_classes=4;"), err[-1]


def test_a_home_folder_in_path_options_is_expanded(dataset, tmp_path, monkeypatch):
    """'~' in a config file or --option=~/x (no shell expands it there) made a folder named
    '~' in the current folder, so --ckpt_path last started the run over and best was not
    found; predict and export took it as a relative path too."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    args = ["--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            "--trainer.default_root_dir=~/run", *TINY]
    assert main(["fit", *args, "--trainer.max_epochs=1"]) == 0
    assert (home / "run" / "checkpoints" / "last.ckpt").is_file() and not Path("~").exists()
    assert main(["fit", *args, "--trainer.max_epochs=2", "--ckpt_path=last"]) == 0
    assert not (home / "run" / "checkpoints" / "earlier-1").exists()  # resumed, not set aside
    assert main(["test", *args, "--ckpt_path=best"]) == 0
    assert main(["predict", "--ckpt_path=~/run/checkpoints/last.ckpt",
                 f"--input={dataset / 'test' / 'images'}", "--output=~/masks", "--no_progress",
                 "--accelerator=cpu"]) == 0
    assert len(list((home / "masks").glob("*.png"))) == len(list((dataset / "test" / "images").iterdir()))
    from segpipe import Segmenter

    seg = Segmenter.from_checkpoint("~/run/checkpoints/last.ckpt", device="cpu")
    assert seg.predict(str(dataset / "test" / "images" / "img_000.png")).ndim == 2
    assert not Path("~").exists()


def test_a_new_fit_in_a_run_folder_sets_the_earlier_checkpoints_aside(dataset, tmp_path):
    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={tmp_path}", *TINY]
    ckpt_dir = tmp_path / "checkpoints"
    assert main([*args, "--trainer.max_epochs=2"]) == 0
    first = {p.name: p.read_bytes() for p in ckpt_dir.glob("*.ckpt")}
    assert "last.ckpt" in first and any(n.startswith("best-") for n in first)
    # A new fit stopped by a bad option value leaves them where they are (resumable).
    assert main([*args, "--trainer.max_epochs=1", "--model.ohem_fraction=2"]) == 2
    assert {p.name for p in ckpt_dir.glob("*.ckpt")} == set(first)
    assert not (ckpt_dir / "earlier-1").exists()
    # A new run (not a resumed one), fine-tuned from the earlier run's last checkpoint there.
    assert main([*args, "--trainer.max_epochs=1", f"--model.init_from={ckpt_dir / 'last.ckpt'}"]) == 0
    kept = ckpt_dir / "earlier-1"
    saved = yaml.safe_load(next(tmp_path.rglob("version_1/config.yaml")).read_text())
    assert saved["model"]["init_from"] == str(kept / "last.ckpt")  # it moved with the others
    assert {p.name: p.read_bytes() for p in kept.glob("*.ckpt")} == first  # whole, unchanged
    assert resolve_checkpoint_alias("best", ckpt_dir).startswith(str(ckpt_dir / "best-epoch000"))
    import torch

    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["epoch"] == 0
    assert torch.load(kept / "last.ckpt", weights_only=False)["epoch"] == 1
    # Resuming keeps the run's own checkpoints where they are.
    assert main([*args, "--trainer.max_epochs=2", "--ckpt_path=last"]) == 0
    assert not (ckpt_dir / "earlier-2").exists()
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["epoch"] == 1
    # A smoke test writes no checkpoint, so it moves none (the next --ckpt_path last restarted).
    assert main([*args, "--trainer.fast_dev_run=true"]) == 0
    assert (ckpt_dir / "last.ckpt").is_file() and not (ckpt_dir / "earlier-2").exists()
    # Resuming the earlier run as first advised overwrote this run's last.ckpt: refused, with
    # the option that continues it in its own folder, which then works.
    current = (ckpt_dir / "last.ckpt").read_bytes()
    assert main([*args, "--trainer.max_epochs=3", f"--ckpt_path={kept / 'last.ckpt'}"]) == 2
    assert (ckpt_dir / "last.ckpt").read_bytes() == current
    assert main([*args, "--trainer.max_epochs=3", f"--ckpt_path={kept / 'last.ckpt'}",
                 f"--checkpoint.dirpath={kept}"]) == 0
    assert (ckpt_dir / "last.ckpt").read_bytes() == current
    assert torch.load(kept / "last.ckpt", weights_only=False)["epoch"] == 2


class RecordedBestOnDisk(Callback):
    """Each time ModelCheckpoint has a former best removed (where a kill may land before
    last.ckpt is rewritten): whether the best that the last.ckpt on disk records is there."""

    seen: list[bool] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        import torch

        io = trainer.strategy.checkpoint_io
        remove = io.remove_checkpoint

        def removed_then_look(path) -> None:
            remove(path)
            last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
            states = torch.load(last, weights_only=False)["callbacks"]
            best = next(v["best_model_path"] for k, v in states.items()
                        if k.startswith("ModelCheckpoint"))
            self.seen.append(Path(best).is_file())

        io.remove_checkpoint = removed_then_look


def test_the_former_best_is_deleted_only_once_last_ckpt_stops_naming_it(dataset, tmp_path):
    """Lightning deleted the former best before last.ckpt was rewritten: a kill between the two
    left last.ckpt naming a deleted best, and after the resume the folder had none."""
    RecordedBestOnDisk.seen = []
    assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={tmp_path}", *TINY, "--trainer.max_epochs=3",
                 "--checkpoint.monitor=step", "--checkpoint.mode=max",  # a new best each epoch
                 "--trainer.callbacks+=tests.test_cli.RecordedBestOnDisk"]) == 0
    assert RecordedBestOnDisk.seen == [True, True], RecordedBestOnDisk.seen
    assert len(list((tmp_path / "checkpoints").glob("best-*.ckpt"))) == 1  # then deleted


def test_resuming_sets_aside_a_best_checkpoint_the_killed_run_wrote_after_last(
    dataset, tmp_path, caplog
):
    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={tmp_path}", *TINY]
    ckpt_dir = tmp_path / "checkpoints"
    assert main([*args, "--trainer.max_epochs=2"]) == 0
    recorded = resolve_checkpoint_alias("best", ckpt_dir)
    # Killed after writing the next epoch's best, before last.ckpt: last.ckpt does not name it.
    orphan = ckpt_dir / "best-epoch002-val_mIoU0.9999.ckpt"
    shutil.copyfile(ckpt_dir / "last.ckpt", orphan)
    later = (ckpt_dir / "last.ckpt").stat().st_mtime + 5
    os.utime(orphan, (later, later))
    with caplog.at_level(logging.INFO):
        assert main([*args, "--trainer.max_epochs=3", "--ckpt_path=last"]) == 0
    assert not orphan.exists() and (ckpt_dir / "earlier-1" / orphan.name).is_file()  # kept
    assert f"{orphan.name} in {ckpt_dir} was written after last.ckpt" in caplog.text
    assert [p.name for p in ckpt_dir.glob("best-*.ckpt")] == [Path(resolve_checkpoint_alias(
        "best", ckpt_dir)).name]  # the resumed run's one best
    assert Path(recorded).parent == ckpt_dir


def test_scoring_images_the_checkpoint_trained_on_is_refused(tmp_path, capsys):
    data = make_folder_dataset(tmp_path / "ds", n_train=10, n_val=0, n_test=0, num_classes=3,
                               size=(40, 48))
    args = ["--config", "configs/folder_unet.yaml", f"--trainer.default_root_dir={tmp_path / 'run'}",
            *TINY, "--data.val_fraction=0.3"]
    assert main(["fit", *args, f"--data.root={data}", "--trainer.max_epochs=1"]) == 0
    # The same settings draw the same held-out images: scored.
    assert main(["test", *args, f"--data.root={data}", "--ckpt_path=last"]) == 0
    # The data root moved: its files are still recognised (path relative to the root + size).
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    capsys.readouterr()
    versions = sorted((tmp_path / "run" / "lightning_logs").iterdir())
    code = main(["test", *args, f"--data.root={moved}", "--ckpt_path=last", "--data.seed=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("segpipe: error: the checkpoint trained on ")
    # the refused test left a version_N holding its config.yaml alone
    assert sorted((tmp_path / "run" / "lightning_logs").iterdir()) == versions
    assert "images this val split scores" in err[-1] and str(moved) in err[-1]
    assert "It was trained with data.seed=0; now data.seed=3: give the settings" in err[-1]
    # Another data set that names its files alike is not mistaken for the training data.
    other = make_folder_dataset(tmp_path / "other", n_train=10, n_val=0, n_test=0, num_classes=3,
                                size=(44, 52), seed=7)
    assert main(["test", *args, f"--data.root={other}", "--ckpt_path",
                 str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--data.seed=3"]) == 0


def test_resuming_where_there_is_no_checkpoint_says_it_starts_anew(dataset, tmp_path, caplog,
                                                                   recwarn):
    with caplog.at_level("INFO"):
        assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                     f"--trainer.default_root_dir={tmp_path}", *TINY, "--trainer.max_epochs=1",
                     "--ckpt_path=last"]) == 0
    assert f"--ckpt_path last: no {tmp_path / 'checkpoints' / 'last.ckpt'} yet, so this fit " \
           "starts a new run" in caplog.text
    assert not [w for w in recwarn if "save_last=True" in str(w.message)]  # Lightning's hint
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_unfinished_writes_of_a_killed_test_are_cleaned_up(fitted, dataset, tmp_path):
    import os
    import time

    from segpipe.fileio import TMP_PREFIX

    logs = fitted / "lightning_logs" / "version_0"
    stale, fresh = logs / f"{TMP_PREFIX}old.json", logs / f"{TMP_PREFIX}new.json"
    for path in (stale, fresh):
        path.write_text("{")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert main(["test", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={fitted}", "--ckpt_path=last", *TINY]) == 0
    assert not stale.exists() and fresh.exists()  # a live process's may be an hour younger
    fresh.unlink()


def test_resume_from_last(fitted, dataset):
    main(
        ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
         f"--trainer.default_root_dir={fitted}", "--trainer.max_epochs=4", "--ckpt_path=last", *TINY]
    )
    import torch

    ckpt = torch.load(fitted / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["epoch"] == 3  # continued the 3-epoch run for one more epoch, not from scratch


def test_console_script_and_print_config(tmp_path):
    exe = Path(sys.executable).with_name("segpipe")
    res = subprocess.run(
        [str(exe), "fit", "--config", "configs/camvid_unet.yaml", "--print_config"],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    data = cfg["data"]["init_args"]
    assert data["layout"] == "camvid" and data["ignore_index"] == 11
    assert cfg["trainer"]["precision"] in {"bf16-mixed", "32-true", "16-mixed"}


@pytest.mark.parametrize(
    "config", ["camvid_unet", "camvid_fcn8s", "lgg_unet", "isbi_unet", "folder_unet"]
)
def test_every_shipped_config_parses(config):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", f"configs/{config}.yaml", "--print_config"])
    assert exc.value.code == 0


def test_isbi_config_tests_over_the_training_scales_and_symmetries(tmp_path, capsys):
    """isbi_unet.yaml's `segpipe test` averages the training's rescaling range (0.8-1.25), each
    size with the eight flips and rotations it trains with (0.18-0.60 point less val pixel
    error on eight checkpoints of four runs)."""
    from tests.cli_args import printed_config

    cfg = printed_config("isbi_unet", tmp_path, capsys)
    data = cfg["data"]["init_args"]
    assert cfg["model"]["test_tta"] is True
    scales = cfg["model"]["test_tta_scales"]
    assert scales == [0.8, 0.9, 1.0, 1.1, 1.25]
    assert [min(scales), max(scales)] == data["scale"] and data["eval_resize"] is None
    assert data["vflip"] is True and data["rotate90"] is True  # the eight views' symmetries


@pytest.mark.parametrize("config", ["camvid_unet", "camvid_fcn8s"])
def test_camvid_configs_test_over_the_training_scales_and_flip(config, tmp_path, capsys):
    """The CamVid U-Net and FCN-8s configs' `segpipe test` averages five sizes spanning the
    training's rescaling relative to the evaluation size, each with the horizontal flip it trains
    with (+1.6 to +2.1 mIoU points on four checkpoints of two runs of each)."""
    from tests.cli_args import printed_config

    cfg = printed_config(config, tmp_path, capsys)
    data = cfg["data"]["init_args"]
    assert cfg["model"]["test_tta"] is True
    scales = cfg["model"]["test_tta_scales"]
    assert scales == [0.5, 0.75, 1.0, 1.25, 1.5]
    # CamVid's frames are 480x360; no eval_resize: the evaluation size is the frame's own.
    eval_fraction = data["eval_resize"][0] / 360 if data["eval_resize"] else 1.0
    assert [min(scales) * eval_fraction, max(scales) * eval_fraction] == data["scale"]
    assert data["vflip"] is False and data["rotate90"] is False  # the flip alone: 2 views a size


def test_top_level_help_is_one_usage_with_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.count("usage:") == 1
    for name in ("fit", "validate", "test", "predict", "export", "check-data", "crossval", "demo"):
        assert f"\n  {name} " in out
    assert main([]) == 2
    assert main(["fti"]) == 2 and "did you mean `segpipe fit`" in capsys.readouterr().err


def test_fit_help_is_readable_and_names_segpipes_networks(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 1000  # was 2,365 lines, most of them nn.Module subclasses
    flat = " ".join(out.split())
    assert "segpipe.models.UNet, segpipe.models.FCN, segpipe.models.SmpModel" in flat
    assert "``" not in out  # no RST markup
    assert "\n  --optimizer" not in out and "--model.optimizer" in out  # one way to set it


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--data.rot", "/tmp"], "Option 'rot' is not accepted"),  # no abbreviation
        (["--model.net.init_args.depht", "3"], "Option 'depht' is not accepted; did you mean 'depth'?"),
        (["--trainer.max_epoch", "3"], "did you mean --trainer.max_epochs?"),
        # a misspelt name with more after it had no suggestion
        (["--model.optimzer.init_args.lr", "0.1"], "did you mean --model.optimizer.init_args.lr?"),
        (["--model.optimizer.init_args.weightdecay", "0.1"], "did you mean 'weight_decay'?"),
        # a case named 010 read as the octal number 8: "Got value: 8", a value never typed
        (["--data.val_cases", "[010]"], "quote them, e.g. --data.val_cases \"['010']\""),
        # a factory function: "got an unexpected keyword argument 'linked_targets'"
        (["--model.net", "torchvision.models.segmentation.fcn_resnet50"],
         "give an nn.Module class; a function that builds the network"),
    ],
)
def test_command_line_mistakes_are_one_line(extra, words, tmp_path, capsys):
    code = main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={tmp_path}", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize(
    "extra, words",
    [
        # the task, the network, the data module (jsonargparse wraps its error), the schedule
        (["--model.ohem_fraction=2"], "model.ohem_fraction is the fraction of pixels kept"),
        (["--model.net.init_args.depth=0"], "UNet depth must be an int in [1, 8], got 0."),
        (["--data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
        (["--data.bands=[0, 1, 2]"], "data.bands are numbered from 1, as GDAL numbers a file's "
                                     "bands; got [0, 1, 2]"),
        (["--data.mask_values={0:0, 1:1}"], "data.mask_values {'0:0': None, 61: None} has keys "
                                            "without values: YAML needs a space after each colon"),
        (["--model.lr_scheduler=segpipe.tasks.schedules.DeadlineCosineLR",
          "--model.lr_scheduler.init_args.eta_min_ratio=3"], "eta_min_ratio must be in [0, 1]"),
        (["--data.val_fraction=null"], "data.val_fraction cannot be null; give a value (its "
                                      "default is 0.1)"),
        (["--data.batch_size=null"], "data.batch_size cannot be null"),
        (["--model.class_weights=[0, 0, 0]"], "model.class_weights must be finite numbers >= 0"),
        # a linked option: the reason, without the link's arguments
        (["--data.class_names=[a, b]"], "data.class_names has 2 names for num_classes=3"),
        # a 4-pixel crop for a depth-2 U-Net: one pixel at the bottom, batch 1: BatchNorm fails
        (["--data.crop_size=4", "--data.batch_size=1"], "BatchNorm cannot train on one value"),
        # these were tracebacks (exit 1): torch's, Lightning's and segpipe's own checks
        (["--model.optimizer.init_args.lr=-1"], "model.optimizer: Invalid learning rate: -1.0"),
        (["--model.lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau",
          "--model.scheduler_interval=step"], "set --model.scheduler_interval epoch"),
        (["--trainer.devices=0"], "is not a valid input using cpu accelerator"),
        (["--trainer.max_time=30 minutes"], "is not a valid duration"),
        (["--model.net=tests.predict.nets.PointwiseNet", "--model.freeze_encoder_epochs=1"],
         "model.freeze_encoder_epochs needs to know which part of the network is the encoder"),
        (["--ckpt_path=nothere.ckpt"], "--ckpt_path nothere.ckpt does not exist"),
        (["--ckpt_path=best"], "fit --ckpt_path best: a fit resumes a run from its last state"),
        # a diverged run exited 0 with a NaN model saved as best-epoch000-mIoU0.2912.ckpt
        (["--model.optimizer.init_args.lr=1e6"], "training diverged in epoch 0"),
        # (torch's unfused AdamW on float16 weights; the fused one, segpipe's default, updates
        # them in float32 and trained this tiny network without overflowing)
        (["--trainer.precision=16-true", "--model.optimizer.init_args.fused=false"],
         "--trainer.precision 16-true keeps the weights"),
        # DeepLabV3's BatchNorm after the image pooling at batch size 1: torch's traceback
        (["--model.net=segpipe.models.SmpModel", "--model.net.init_args.arch=deeplabv3plus",
          "--model.net.init_args.encoder_name=resnet18", "--model.net.init_args.encoder_weights=null",
          "--model.net.init_args.encoder_depth=3", "--data.batch_size=1"],
         "use data.batch_size 2 or more"),
        # torch's "Tried to step 4 times" in the middle of the run
        (["--model.lr_scheduler=torch.optim.lr_scheduler.OneCycleLR",
          "--model.lr_scheduler.init_args.max_lr=0.01", "--model.lr_scheduler.init_args.total_steps=1",
          "--model.scheduler_interval=step"], "OneCycleLR has total_steps=1 but this run takes"),
        # torch.compile's own check came at the first step, as a traceback
        (["--model.compile={mode: fastest}"], "mode 'fastest' is not one of torch.compile's"),
        (["--model.compile={fullgrahp: true}"], "torch.compile takes no fullgrahp"),
        # the network's linked options were dropped silently: a 3-class head trained
        (["--model.net.init_args.num_classes", "5"], "model.net.init_args.num_classes=5 (in the "
         "command line) is set from data.num_classes, which is 3: the CLI links it"),
        (["--model.net.init_args.in_channels=1"], "give --data.in_channels 1"),
        # a single-logit binary head was told to give --data.num_classes 1, which is refused
        (["--model.net.init_args.num_classes=1"], "a binary task is data.num_classes 2"),
    ],
)
def test_option_values_segpipe_cannot_use_are_one_line(extra, words, dataset, tmp_path, capsys):
    code = main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1", *TINY, *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and err[-1].startswith("segpipe")  # "segpipe: error" or "segpipe fit: error"
    assert words in err[-1] and not any("Traceback" in line for line in err)
    assert "compute_fn" not in err[-1] and len(err[-1]) < 400
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before training


def test_the_yaml_colon_hint_is_for_number_pairs_only(dataset, tmp_path, capsys):
    """A non-numeric key is not a missing space: jsonargparse's own reason stands."""
    assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={tmp_path}", *TINY, "--data.mask_values={a: 1}"]) == 2
    err = capsys.readouterr().err
    assert "invalid literal for int() with base 10: 'a'" in err and "YAML needs" not in err


def test_a_missing_checkpoint_file_in_test_is_one_line(dataset, tmp_path, capsys):
    code = main(["test", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={tmp_path}", *TINY, "--ckpt_path", str(tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and f"--ckpt_path {tmp_path} is a folder; give a .ckpt file" in err[-1]


@pytest.mark.parametrize("command", ["test", "fit"])
def test_a_truncated_checkpoint_is_one_line(fitted, dataset, tmp_path, capsys, command):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((fitted / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    option = "--model.init_from" if command == "fit" else "--ckpt_path"
    for opt in {option, "--ckpt_path"}:
        code = main([command, "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                     f"--trainer.default_root_dir={tmp_path / 'run'}", *TINY, opt, str(cut)])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and f"{cut}: not a readable checkpoint, truncated or corrupt" in err[-1]
        assert "best-*.ckpt" in err[-1] and err[-1].count("not a readable") == 1


def test_a_fit_stopped_by_sigterm_does_not_exit_0(monkeypatch, capsys):
    """SLURM, Kubernetes and `timeout` stop jobs with SIGTERM; Lightning's SIGTERMException is a
    SystemExit without a code, so a half-trained run exited 0 and `fit && test` went on."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import segpipe.lightning_cli

    def stopped(args):
        raise SIGTERMException

    monkeypatch.setattr(segpipe.lightning_cli, "run_cli", stopped)
    assert main(["fit", "--config", "configs/folder_unet.yaml"]) == 143
    assert "stopped by SIGTERM before it finished" in capsys.readouterr().err


class SigtermAt(Callback):
    """Notes a SIGTERM at the end of step ``step``, as Lightning's handler does."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer._signal_connector.received_sigterm = True


def test_a_fit_stopped_by_sigterm_keeps_the_step_it_stopped_at(dataset, tmp_path, capsys):
    """A requeued job trained again every step since the last epoch end: last.ckpt was not
    written where SIGTERM stopped the fit, though the grace period is there for it."""
    import torch

    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={tmp_path}", *TINY, "--trainer.max_epochs=3"]
    assert main([*args, "--trainer.callbacks+=tests.test_cli.SigtermAt",
                 "--trainer.callbacks.init_args.step=3"]) == 143
    assert "last.ckpt is intact: resume with --ckpt_path last" in capsys.readouterr().err
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 3, state["global_step"]  # epochs of 2 steps: mid-epoch 1
    assert main([*args, "--ckpt_path=last"]) == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2


def test_ctrl_c_exits_130_and_says_so_and_other_exits_pass_through(monkeypatch, capsys):
    """Lightning shuts down after Ctrl-C and exits with 1, as after a crash, without a word of
    what was kept."""
    from segpipe import lightning_cli

    def interrupted(args):
        lightning_cli._InterruptRecorder().on_exception(None, None, KeyboardInterrupt())
        raise SystemExit(1)

    monkeypatch.setattr(lightning_cli, "_FIT_RECORD", {})
    monkeypatch.setattr(lightning_cli, "run_cli", interrupted)
    assert main(["test", "--config", "configs/folder_unet.yaml"]) == 130
    assert "segpipe test: stopped by Ctrl-C (SIGINT) before it finished" in capsys.readouterr().err

    def crashed(args):
        raise SystemExit(1)

    monkeypatch.setattr(lightning_cli, "_FIT_RECORD", {})
    monkeypatch.setattr(lightning_cli, "run_cli", crashed)
    with pytest.raises(SystemExit):
        main(["test", "--config", "configs/folder_unet.yaml"])


def test_a_stopped_fit_says_what_it_kept(tmp_path, monkeypatch):
    """It said "the last checkpoint written is intact" before writing any (and after moving an
    earlier run's to earlier-K)."""
    import time

    from segpipe import lightning_cli
    from segpipe.lightning_cli import interrupted_fit_line

    monkeypatch.setattr(lightning_cli, "_FIT_RECORD", {})  # as before any fit

    assert "nothing was trained or written" in interrupted_fit_line()
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "last.ckpt").write_bytes(b"an earlier run's")
    old = time.time() - 60
    os.utime(ckpts / "last.ckpt", (old, old))
    lightning_cli._FIT_RECORD.update(started=True, resumed=False,
                                     before={ckpts: lightning_cli._mtime(ckpts / "last.ckpt")})
    assert "no checkpoint of this run was written yet" in interrupted_fit_line()
    lightning_cli._FIT_RECORD["resumed"] = True
    assert "the checkpoint it resumed from is intact" in interrupted_fit_line()
    (ckpts / "last.ckpt").write_bytes(b"this run's")
    future = time.time() - 30  # a file server's clock behind ours: written all the same
    os.utime(ckpts / "last.ckpt", (future, future))
    assert interrupted_fit_line() == f"{ckpts / 'last.ckpt'} is intact: resume with --ckpt_path last"


def test_missing_data_root_is_one_line(tmp_path, capsys):
    code = main(["fit", "--config", "configs/camvid_unet.yaml",
                 f"--data.root={tmp_path / 'nope'}", f"--trainer.default_root_dir={tmp_path}"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1
    assert err[0].startswith("segpipe: error: data root") and "Set --data.root" in err[0]


_LIGHT_START = """
import sys
import segpipe.cli, segpipe.data
for argv in (["--help"], ["predict", "--help"], ["export", "--help"], ["demo", "--help"],
             ["crossval", "--help"],
             ["predict", "--no-such-option"]):
    try:
        segpipe.cli.main(argv)
    except SystemExit:
        pass
heavy = ("torch", "lightning", "jsonargparse", "albumentations", "rasterio",
         "segmentation_models_pytorch", "timm", "matplotlib")
print("HEAVY:" + ",".join(m for m in heavy if m in sys.modules))
"""


def test_commands_import_only_what_they_use():
    """`segpipe --help`, `predict --help`, a usage error and `import segpipe.data` load neither
    torch nor Lightning (a command imports what it runs: seconds on a cold start)."""
    res = subprocess.run([sys.executable, "-c", _LIGHT_START], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    heavy = [ln for ln in res.stdout.splitlines() if ln.startswith("HEAVY:")]
    assert heavy == ["HEAVY:"], heavy


def test_resuming_needs_no_encoder_weights_file(dataset, tmp_path):
    """The checkpoint's weights replace the encoder's: a resumed fit does not read the file."""
    import torch

    from segpipe.models import SmpModel

    weights = tmp_path / "enc.pth"
    torch.save(SmpModel("unet", "resnet18", in_channels=3, num_classes=3).encoder.state_dict(),
               weights)
    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={tmp_path / 'run'}", *TINY,
            "--model.net=segpipe.models.SmpModel", "--model.net.init_args.arch=unet",
            "--model.net.init_args.encoder_name=resnet18",
            f"--model.net.init_args.encoder_weights={weights}"]
    assert main([*args, "--trainer.max_epochs=1"]) == 0
    weights.rename(tmp_path / "moved.pth")
    assert main([*args, "--trainer.max_epochs=2", "--ckpt_path=last"]) == 0


def test_smp_architecture_arguments_come_from_the_config_and_rebuild_for_predict(
        dataset, tmp_path, capsys):
    """decoder_attention_type, decoder_channels, ... (SmpModel's **kwargs) were refused by the
    command line and YAML ('Option ... is not accepted'); smp_kwargs takes them."""
    from segpipe import Segmenter

    base = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={tmp_path / 'run'}", *TINY, "--trainer.max_epochs=1",
            "--model.net=segpipe.models.SmpModel", "--model.net.init_args.encoder_name=resnet18",
            "--model.net.init_args.encoder_depth=3"]
    assert main([*base, "--model.net.init_args.smp_kwargs",
                 "{decoder_attention_type: scse, decoder_channels: [64, 32, 16]}"]) == 0
    seg = Segmenter.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", device="cpu")
    decoder = seg.task.net.model.decoder
    assert "SCSE" in repr(decoder) and decoder.blocks[-1].conv2[0].out_channels == 16
    # a name smp's U-Net does not take is one line naming the arch's arguments
    assert main([*base, "--model.net.init_args.smp_kwargs", "{decoder_atention_type: scse}"]) == 2
    err = capsys.readouterr().err
    assert "takes no argument(s) ['decoder_atention_type']" in err and "Traceback" not in err
    # given as an init_arg of its own, the error names smp_kwargs
    assert main([*base, "--model.net.init_args.decoder_attention_type=scse"]) == 2
    assert "smp_kwargs" in capsys.readouterr().err
    # ... but not for an argument SmpModel refuses there too: it had sent aux_params there
    assert main([*base, "--model.net.init_args.aux_params={classes: 2}"]) == 2
    err = capsys.readouterr().err
    assert "no auxiliary classification head" in err and "smp_kwargs" not in err
    assert main([*base, "--model.net.init_args.classes=3"]) == 2
    assert "SmpModel takes num_classes" in capsys.readouterr().err


def test_limit_batches_1_is_one_batch_as_lightning_means_it(dataset, tmp_path):
    """Lightning types limit_*_batches float | int, so jsonargparse read 1 as 1.0: every batch
    (a float is a fraction), not the one batch an int means."""
    import torch

    config = tmp_path / "limits.yaml"
    config.write_text("trainer:\n  limit_val_batches: 1\n")
    for name, extra in (("one", ["--trainer.limit_train_batches=1"]),
                        ("one_spaced", ["--trainer.limit_train_batches", "1"]),
                        ("yaml", ["--config", str(config)]),
                        ("all", ["--trainer.limit_train_batches=1.0"])):
        run = tmp_path / name
        assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                     f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1", *TINY,
                     *extra]) == 0
        steps = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
        train = len(list((dataset / "train" / "images").iterdir()))
        expected = 1 if name in ("one", "one_spaced") else -(-train // 4)  # batch size 4
        assert steps == expected, (name, steps)


def test_a_second_fit_into_a_folder_another_fit_writes_is_refused(dataset, tmp_path, capsys):
    """Two fits in one folder (a job started twice, a requeued job whose old process still
    runs): the second moved the live run's checkpoints aside and both kept writing last.ckpt."""
    from segpipe.fileio import TMP_PREFIX, _host_tag

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = ckpt_dir / f"{TMP_PREFIX}{_host_tag()}.{other.pid}-abc-fit.lock"
        lock.write_text(f"{other.pid}\n")
        args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1", *TINY]
        assert main(args) == 2
        assert "another segpipe fit" in capsys.readouterr().err
        assert list(ckpt_dir.glob(f"{TMP_PREFIX}*")) == [lock]  # the refused fit's own is gone
    finally:
        other.kill()
        other.wait()
    assert main(args) == 0  # its writer is gone: a stale lock
    assert not list(ckpt_dir.glob(f"{TMP_PREFIX}*"))  # and this fit's own is removed
    # Another machine's lock (a shared folder): live while it is touched (a fit refreshes it
    # every minute), stale after five minutes unchanged, whatever the process ids.
    import time

    remote = ckpt_dir / f"{TMP_PREFIX}00000000.{os.getpid()}-abc-fit.lock"
    remote.write_text("node7 4242\n")
    capsys.readouterr()
    assert main(args) == 2
    assert "another segpipe fit (process 4242 on node7)" in capsys.readouterr().err
    old = time.time() - 301
    os.utime(remote, (old, old))
    assert main(args) == 0 and not remote.exists()


def test_a_fit_takes_its_lock_before_it_looks_for_others(dataset, tmp_path, monkeypatch):
    """Looking first and locking after let two fits started at the same moment both pass:
    each must already hold its lock when it looks, so that each sees the other's."""
    from segpipe.fileio import TMP_PREFIX
    from segpipe.lightning_cli import _FitLock

    held = []
    original = _FitLock._other_fit

    def looking(self):
        held.append(sorted(p.name for p in self.ckpt_dir.glob(f"{TMP_PREFIX}*{self.SUFFIX}")))
        return original(self)

    monkeypatch.setattr(_FitLock, "_other_fit", looking)
    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1", *TINY]
    assert main(args) == 0
    assert len(held) == 1 and len(held[0]) == 1  # its own lock, there while it looked


def test_a_fit_lock_is_touched_while_it_validates(tmp_path, monkeypatch):
    """It was touched at training steps only: a validation longer than five minutes let a fit
    on another machine sharing the folder take the live lock as stale."""
    from segpipe.lightning_cli import _FitLock

    lock = _FitLock(tmp_path)
    lock.path = tmp_path / "x-fit.lock"
    lock.path.write_text("node 1\n")
    old = 1_000_000_000
    os.utime(lock.path, (old, old))
    monkeypatch.setattr(lock, "_touched", -_FitLock.REFRESH_S - 1.0)
    lock.on_validation_batch_end(None, None, None, None, 0)
    assert lock.path.stat().st_mtime > old + 1


def test_a_test_of_a_checkpoint_trained_on_some_bands_needs_data_bands(tmp_path, capsys):
    """Without data.bands, test read the files' own bands, and the data check's fix suggested
    the first ones, which scored the model on the wrong bands (mIoU 0.11 against 0.96)."""
    root = make_folder_dataset(tmp_path / "ds", n_train=4, n_val=2, n_test=2, size=(32, 32),
                               channels=5, image_ext=".tif")
    args = ["--config", "configs/folder_unet.yaml", f"--data.root={root}",
            f"--trainer.default_root_dir={tmp_path / 'run'}", "--data.num_classes=3",
            "--data.in_channels=3", *TINY]
    assert main(["fit", *args, "--data.bands=[1, 3, 5]", "--trainer.max_epochs=1"]) == 0
    capsys.readouterr()
    assert main(["test", *args, "--ckpt_path=last"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "segpipe: error: the checkpoint was trained on bands [1, 3, 5] of its files "
        "(data.bands), but this test gives no data.bands: pass --data.bands '[1, 3, 5]' (or, "
        "for files whose bands lie otherwise, the bands of these files that hold the same "
        "data), or the run's config.yaml")
    assert main(["test", *args, "--ckpt_path=last", "--data.bands=[1, 3, 5]"]) == 0
    # The files' own first bands, given explicitly in training: reading them all is the same.
    three = make_folder_dataset(tmp_path / "three", n_train=4, n_val=2, n_test=2, size=(32, 32))
    own = ["--config", "configs/folder_unet.yaml", f"--data.root={three}",
           f"--trainer.default_root_dir={tmp_path / 'own'}", "--data.num_classes=3", *TINY]
    assert main(["fit", *own, "--data.bands=[1, 2, 3]", "--trainer.max_epochs=1"]) == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trained with data.bands")  # nothing to say
        assert main(["test", *own, "--ckpt_path=last"]) == 0


def test_lightnings_cloud_tips_are_not_printed(dataset, tmp_path, caplog):
    """"💡 Tip: For seamless cloud logging ... try installing litlogger" on every command."""
    caplog.set_level(logging.INFO)
    assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1", *TINY]) == 0
    assert "Tip:" not in caplog.text and "GPU available" in caplog.text  # other lines stay


def test_a_resumed_fit_names_the_settings_the_checkpoint_replaces(dataset, tmp_path):
    """The checkpoint's settings win on resume, by its path as by `last`, and never in silence."""
    import torch

    run = tmp_path / "run"
    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={run}", *TINY]
    assert main([*args, "--trainer.max_epochs=1"]) == 0
    last = run / "checkpoints" / "last.ckpt"
    for epochs, ckpt_path in ((2, str(last)), (3, "last")):
        with pytest.warns(UserWarning) as caught:
            assert main([*args, f"--trainer.max_epochs={epochs}", "--model.ohem_fraction=0.5",
                         "--model.compile=false", f"--ckpt_path={ckpt_path}"]) == 0
        said = [str(w.message) for w in caught if "checkpoint's settings" in str(w.message)]
        assert len(said) == 1 and "model.ohem_fraction null (given: 0.5)" in said[0], said
        assert f"--model.init_from {last}" in said[0] and "compile" not in said[0]
        saved = torch.load(last, weights_only=False, map_location="cpu")
        assert saved["epoch"] == epochs - 1 and saved["hyper_parameters"]["ohem_fraction"] is None


def test_a_network_setting_the_command_does_not_give_is_not_called_given(dataset, tmp_path):
    """A run trained with dropout 0.2, resumed and tested with its plain config, was told it
    gave dropout 0.0 (UNet's default) on every restart."""
    run = tmp_path / "run"
    args = ["--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={run}", *TINY]
    assert main(["fit", *args, "--trainer.max_epochs=1", "--model.net.init_args.dropout=0.2"]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", *args, "--trainer.max_epochs=2", "--ckpt_path=last"]) == 0
        assert main(["test", *args, "--ckpt_path=last"]) == 0
    assert not [str(w.message) for w in caught if "checkpoint's settings" in str(w.message)]
    with pytest.warns(UserWarning) as caught:
        assert main(["test", *args, "--ckpt_path=last", "--model.net.init_args.dropout=0.1"]) == 0
    said = [str(w.message) for w in caught if "checkpoint's settings" in str(w.message)]
    assert len(said) == 1 and "model.net.init_args.dropout 0.2 (given: 0.1)" in said[0], said


def test_segpipes_own_warnings_are_one_line_without_its_source():
    from segpipe import lightning_cli

    ours = lightning_cli._format_warning("the masks are odd", UserWarning,
                                         lightning_cli.__file__, 12, "x = 1")
    assert ours == "segpipe: warning: the masks are odd\n"
    theirs = lightning_cli._format_warning("deprecated", DeprecationWarning, "/lib/other.py", 3)
    assert "/lib/other.py:3" in theirs and "deprecated" in theirs


def test_a_bad_init_from_stops_the_fit_before_earlier_checkpoints_move(dataset, tmp_path, capsys):
    import torch

    run = tmp_path / "run"
    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1", *TINY]
    assert main(args) == 0
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(7, 5, 3, 3)}, other)
    for init, words in ((tmp_path / "missing.ckpt", "no such file"),
                        (other, "no tensor of the checkpoint fits the network")):
        assert main([*args, f"--model.init_from={init}"]) == 2
        err = capsys.readouterr().err
        assert f"model.init_from: {init}" in err and words in err, err
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert not list((run / "checkpoints").glob("earlier-*")), "moved before the check"
    good = run / "checkpoints" / "last.ckpt"
    assert main([*args, f"--model.init_from={good}"]) == 0  # moved with the others, then read
    assert (run / "checkpoints" / "earlier-1" / "last.ckpt").is_file()


def test_ckpt_path_before_the_runs_config_still_resumes(dataset, tmp_path):
    """A saved config.yaml holds ckpt_path: null; given after --ckpt_path it must not win."""
    import torch

    run = tmp_path / "run"
    args = ["--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={run}", *TINY]
    assert main(["fit", *args, "--trainer.max_epochs=1"]) == 0
    saved = run / "lightning_logs" / "version_0" / "config.yaml"
    saved = saved if saved.is_file() else next(run.rglob("config.yaml"))
    assert "ckpt_path: null" in saved.read_text()
    last = run / "checkpoints" / "last.ckpt"
    assert main(["fit", f"--ckpt_path={last}", "--config", str(saved),
                 "--trainer.max_epochs=2"]) == 0
    assert torch.load(last, weights_only=False, map_location="cpu")["epoch"] == 1  # resumed
    assert not list((run / "checkpoints").glob("earlier-*")), "a new run set the old one aside"


def test_a_fit_that_fails_before_training_leaves_no_empty_run_folder(dataset, tmp_path, capsys):
    run = tmp_path / "runs" / "new"
    code = main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={run}", *TINY,
                 "--model.net=segpipe.models.SmpModel", "--model.net.init_args.arch=unet",
                 "--model.net.init_args.encoder_name=resnet18",
                 f"--model.net.init_args.encoder_weights={tmp_path / 'missing.pth'}"])
    assert code == 2 and "missing.pth" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    kept = tmp_path / "kept"
    (kept / "checkpoints").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={kept}", *TINY, "--model.net=segpipe.models.SmpModel",
                 "--model.net.init_args.arch=unet", "--model.net.init_args.encoder_name=resnet18",
                 f"--model.net.init_args.encoder_weights={tmp_path / 'missing.pth'}"]) == 2
    assert (kept / "checkpoints").is_dir() and (kept / "notes.txt").is_file()  # not made by it


def test_a_test_of_part_of_the_split_says_so(fitted, dataset, tmp_path):
    """data.limit_samples 2 scored 2 of 4 test images without a word, and test_metrics.json and
    the report read like the whole split's."""
    ckpt = next((fitted / "checkpoints").glob("best-*.ckpt"))
    out = tmp_path / "t"
    with pytest.warns(UserWarning, match=r"this test scored 2 of the 4 images of its split "
                      r"\(data.limit_samples 2\)"):
        assert main(["test", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                     f"--trainer.default_root_dir={out}", f"--ckpt_path={ckpt}", *TINY,
                     "--trainer.logger=false", "--data.limit_samples=2"]) == 0
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["partial_split"] == {"scored_images": 2, "split_images": 4,
                                        "limits": {"data.limit_samples": 2}}
    assert "part of the split only**: 2 of its 4 images" in (out / "report.md").read_text()
    # the whole split: no such record
    assert main(["test", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={out}", f"--ckpt_path={ckpt}", *TINY,
                 "--trainer.logger=false"]) == 0
    assert "partial_split" not in json.loads((out / "test_metrics.json").read_text())


def test_validate_says_it_ignores_the_test_only_options(fitted, dataset, tmp_path):
    """validate --model.test_tta true printed the plain figures without a word."""
    ckpt = next((fitted / "checkpoints").glob("best-*.ckpt"))
    with pytest.warns(UserWarning, match=r"--model.test_tta True applies to segpipe test only"):
        assert main(["validate", "--config", "configs/folder_unet.yaml",
                     f"--data.root={dataset}", f"--trainer.default_root_dir={tmp_path}",
                     f"--ckpt_path={ckpt}", *TINY, "--trainer.logger=false",
                     "--model.test_tta=true"]) == 0


def test_test_with_a_checkpoint_but_no_config_names_the_runs_config(dataset, fitted, capsys):
    """`segpipe test --ckpt_path X` without --config said only 'arguments are required:
    test.model.net', which the checkpoint then overrides anyway."""
    ckpt = next((fitted / "checkpoints").glob("best-*.ckpt"))
    code = main(["test", f"--ckpt_path={ckpt}", f"--data.root={dataset}", "--data.num_classes=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "the network and the data settings come from the config the model was trained with" \
        in err
    # the fit's config: written before the checkpoint (other tests' configs come after it)
    written = ckpt.stat().st_mtime
    configs = sorted(fitted.glob("config.yaml")) + sorted(
        (p for p in fitted.glob("*/version_*/config.yaml") if p.stat().st_mtime <= written),
        key=lambda p: p.stat().st_mtime)[-1:]
    assert configs and f"--config {configs[0]}" in err
    # and with it, the test runs
    assert main(["test", "--config", str(configs[0]), f"--ckpt_path={ckpt}",
                 f"--data.root={dataset}", "--trainer.logger=false"]) == 0


def test_scoring_without_a_checkpoint_says_the_weights_are_untrained(dataset, tmp_path):
    """`segpipe test --config C` after a fit scored a freshly built network and exited 0 with
    nothing on the console to say so (the report said "checkpoint: none")."""
    common = ["--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
              f"--trainer.default_root_dir={tmp_path}", *TINY]
    with pytest.warns(UserWarning, match="validate without --ckpt_path scores the network as the "
                                         "config builds it, with untrained weights"):
        assert main(["validate", *common]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        try:
            main(["validate", *common, "--model.init_from=missing.ckpt"])
        except UserWarning as exc:
            assert "untrained weights" not in str(exc)


def test_an_option_typed_before_a_config_that_sets_it_is_named(dataset, tmp_path):
    """jsonargparse applies options and config files in their order: `--trainer.max_epochs 1
    --config my.yaml` trained for the file's epochs, into the file's run folder, in silence."""
    config = tmp_path / "my.yaml"
    config.write_text(f"trainer:\n  max_epochs: 1\n  default_root_dir: {tmp_path / 'mine'}\n")
    with pytest.warns(UserWarning) as seen:
        assert main(["validate", "--trainer.max_epochs", "3", "--data.batch_size=2",
                     f"--trainer.default_root_dir={tmp_path / 'typed'}",
                     "--config", "configs/folder_unet.yaml", "--config", str(config),
                     f"--data.root={dataset}", *TINY]) == 0
    lines = {str(w.message) for w in seen if "comes before --config" in str(w.message)}
    tail = ("which sets it too, so the file's value is used (an option overrides only the "
            "config files given before it): put --config first")
    assert lines == {
        f"--trainer.max_epochs comes before --config {config}, {tail}",
        f"--trainer.default_root_dir comes before --config {config}, {tail}",
        f"--data.batch_size comes before --config configs/folder_unet.yaml, {tail}",
    }, lines


def test_an_option_before_a_config_in_its_short_form_or_before_its_class(dataset, tmp_path,
                                                                         capsys):
    """`--model.optimizer.lr 0.5 --config adamw.yaml` (whose file writes init_args.lr) was
    dropped without the warning the long form got; `--model.net.init_args.X` before the
    config that chooses the network failed on a class_path 'torch.nn.Module' never written."""
    from segpipe.lightning_cli import _overridden_by_a_later_config

    adamw = tmp_path / "adamw.yaml"
    adamw.write_text("model:\n  optimizer:\n    class_path: torch.optim.AdamW\n"
                     "    init_args: {lr: 0.003}\n")
    assert _overridden_by_a_later_config(
        ["--model.optimizer.lr", "0.5", "--config", str(adamw)]) == [
            ("--model.optimizer.lr", str(adamw))]
    assert _overridden_by_a_later_config(["--config", str(adamw), "--model.optimizer.lr", "1"]) \
        == []
    assert main(["fit", "--model.net.init_args.base_channels", "8", "--config",
                 "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=1"]) == 2
    assert ("--model.net.init_args.base_channels comes before the --config that chooses "
            "model.net, so it had no network to apply to: put --config first") \
        in capsys.readouterr().err


def test_version_and_python_dash_m(capsys):
    from segpipe import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"segpipe {__version__}"
    res = subprocess.run([sys.executable, "-m", "segpipe", "--version"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0 and res.stdout.strip() == f"segpipe {__version__}", res.stderr


def test_output_piped_into_a_reader_that_stops_ends_quietly():
    """`segpipe crossval ... | head` ended in a BrokenPipeError traceback."""
    res = subprocess.Popen([sys.executable, "-m", "segpipe", "--help"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    res.stdout.close()  # the reader is gone before anything is written
    err = res.stderr.read().decode()
    res.stderr.close()
    assert res.wait() == 141 and err == "", err  # 128 + SIGPIPE, as cat and grep end


def test_the_shipped_configs_serve_a_folder_without_them(tmp_path, monkeypatch, capsys):
    """A pip install has no configs/ folder: `--config configs/folder_unet.yaml` (as the README
    writes it) failed with "File does not exist". The configs travel in the package, and the
    wheel's package data names them."""
    from segpipe.configs import FOLDER, names, resolve

    repo = Path(__file__).resolve().parents[1]
    assert (repo / "configs").resolve() == FOLDER and "camvid_unet.yaml" in names()
    assert '"segpipe.configs" = ["*.yaml"]' in (repo / "pyproject.toml").read_text()
    monkeypatch.chdir(tmp_path)
    assert resolve("configs/folder_unet.yaml") == str(FOLDER / "folder_unet.yaml")
    assert resolve("folder_unet.yaml") == str(FOLDER / "folder_unet.yaml")
    assert resolve("mine/folder_unet.yaml") is None and resolve("configs/other.yaml") is None
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "folder_unet.yaml").write_text("trainer: {}\n")
    assert resolve("configs/folder_unet.yaml") is None  # the user's own file wins
    (tmp_path / "configs" / "folder_unet.yaml").unlink()
    code = main(["check-data", "--config", "configs/folder_unet.yaml",
                 f"--data.root={tmp_path / 'nothing'}"])
    err = capsys.readouterr().err
    assert "using the one shipped with segpipe" in err and "config file" not in err, err
    assert code == 2 and "nothing" in err  # it went on to the data root


def test_a_fit_stopped_by_the_data_check_leaves_no_log_version(tmp_path, capsys):
    """Lightning opens the TensorBoard event file before the data module's setup: a fit that
    the data check stopped left version_N holding that header alone, and the next run of the
    folder became version_N+1."""
    import numpy as np
    from PIL import Image

    data = make_folder_dataset(tmp_path / "ds", num_classes=3, size=(48, 40))
    run = tmp_path / "run"
    common = ["--config", "configs/folder_unet.yaml", f"--data.root={data}",
              f"--trainer.default_root_dir={run}", *TINY, "--trainer.max_epochs=1"]
    assert main(["fit", *common]) == 0  # an earlier run: version_0 with its logs
    good = next((data / "train" / "masks").iterdir())
    keep = good.read_bytes()
    Image.fromarray(np.full((40, 48), 9, np.uint8)).save(good)  # class 9 of 3
    assert main(["fit", *common]) == 2
    assert "9" in capsys.readouterr().err
    versions = sorted(p.name for p in (run / "lightning_logs").iterdir())
    assert versions == ["version_0"], versions
    assert list((run / "lightning_logs" / "version_0").glob("events.out.tfevents.*"))
    good.write_bytes(keep)


def test_setting_aside_a_run_without_last_ckpt_gives_no_resume_command(tmp_path, caplog):
    """A run killed before its first last.ckpt left a best only; the message told to resume from
    the earlier-1/last.ckpt that was not there."""
    from segpipe.lightning_cli import set_aside_earlier_checkpoints

    caplog.set_level(logging.INFO)
    (tmp_path / "best-epoch000-mIoU0.0151.ckpt").write_bytes(b"x")
    dest = set_aside_earlier_checkpoints(tmp_path)
    assert "that run left no last.ckpt to resume; its weights can start a new run: " \
        f"--model.init_from {dest / 'best-epoch000-mIoU0.0151.ckpt'}" in caplog.text
    assert "--ckpt_path" not in caplog.text
    (tmp_path / "last.ckpt").write_bytes(b"x")
    dest = set_aside_earlier_checkpoints(tmp_path)
    assert f"to resume that run instead: --ckpt_path {dest / 'last.ckpt'}" in caplog.text


def test_a_monitor_gets_the_direction_of_its_metric(tmp_path, dataset, capsys):
    """`--checkpoint.monitor val/loss` kept mode max (best = the largest loss); torch's
    ReduceLROnPlateau (mode min) on val/mIoU cut the learning rate at every improvement, and
    Lightning's own ReduceLROnPlateau(monitor=...) was ignored; a misspelt monitor was found
    after the first epoch, which was lost."""
    from jsonargparse import Namespace

    from segpipe.lightning_cli import _checkpoint_mode
    from segpipe.tasks.segmentation import _plateau_mode

    ck = Namespace(monitor="val/loss", mode="max")
    _checkpoint_mode(ck, ["--checkpoint.monitor", "val/loss"])
    assert ck.mode == "min"
    ck = Namespace(monitor="val/loss", mode="max")
    with pytest.warns(UserWarning, match="keeps the checkpoint whose val/loss is the largest"):
        _checkpoint_mode(ck, ["--checkpoint.monitor", "val/loss", "--checkpoint.mode", "max"])
    assert ck.mode == "max"  # given: said, not changed
    ck = Namespace(monitor="val/Dice_mean_over_cases/tumour", mode="max")
    _checkpoint_mode(ck, [])
    assert ck.mode == "max"
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    with pytest.warns(UserWarning, match="watches val/mIoU, which is larger when the model is"):
        _plateau_mode(plateau, "val/mIoU")
    for score in (0.2, 0.3, 0.4):  # improving: the rate stays
        plateau.step(score)
    assert opt.param_groups[0]["lr"] == 1.0
    plateau.step(0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    # a monitor validation does not log: refused after the sanity check, before any epoch
    run = tmp_path / "run"
    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1", *TINY]
    assert main([*args, "--checkpoint.monitor", "val/miou"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.monitor val/miou is not a metric validation logs; did you mean val/mIoU?" \
        in err
    assert not (run / "checkpoints" / "last.ckpt").exists()
    assert main([*args, "--model.lr_scheduler", "lightning.pytorch.cli.ReduceLROnPlateau",
                 "--model.lr_scheduler.monitor", "val/dice",
                 "--model.scheduler_interval", "epoch"]) == 2
    assert "model.lr_scheduler.monitor val/dice is not a metric validation logs" in \
        capsys.readouterr().err


def test_max_steps_inside_an_epoch_validates_before_it_stops(tmp_path, dataset, capsys):
    """Lightning stopped at trainer.max_steps without validating: no val score, no best
    checkpoint, and `test --ckpt_path best` said "Train first"."""
    args = ["--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={tmp_path}", *TINY]
    assert main(["fit", *args, "--trainer.max_steps=1", "--trainer.max_epochs=null",
                 "--trainer.check_val_every_n_epoch=5"]) == 0
    best = list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and "epoch000" in best[0].name
    assert torch.load(best[0], weights_only=False)["global_step"] == 1
    capsys.readouterr()
    assert main(["test", *args, "--ckpt_path=best"]) == 0


def test_gpu_device_selections_on_a_cpu_and_a_begun_option_name(dataset, tmp_path, capsys):
    """`--trainer.devices -1` on a CPU ended in Lightning's TypeError traceback;
    `--trainer.max_ep` was taken for --trainer.max_steps."""
    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu", *TINY]
    assert main([*args, "--trainer.devices=-1"]) == 2
    err = capsys.readouterr().err
    assert "--trainer.devices on a CPU is a number of processes" in err and "Traceback" not in err
    assert main([*args, "--trainer.max_ep=1"]) == 2
    assert "did you mean --trainer.max_epochs?" in capsys.readouterr().err
    if not torch.cuda.is_available():  # a GPU asked for where there is none: the fix too
        gpu = [a for a in args if a != "--trainer.accelerator=cpu"]
        assert main([*gpu, "--trainer.accelerator=gpu"]) == 2
        assert "give --trainer.accelerator cpu, or auto" in capsys.readouterr().err


def test_seed_everything_true_draws_a_seed(dataset, tmp_path, monkeypatch):
    """Lightning seeded 0 for `--seed_everything true`, which its help calls a random seed."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    seeds = []
    for run in ("a", "b"):
        assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                     f"--trainer.default_root_dir={tmp_path / run}", "--trainer.fast_dev_run=1",
                     "--seed_everything=true", *TINY]) == 0
        seeds.append(int(os.environ.pop("PL_GLOBAL_SEED")))
    assert seeds[0] != seeds[1]


def test_config_file_mistakes_name_their_file(dataset, tmp_path, capsys):
    """A YAML error said "<unicode string>" and an unknown key got no suggestion, which left
    the user to guess among several --config files."""
    typo, broken = tmp_path / "typo.yaml", tmp_path / "broken.yaml"
    typo.write_text("trainer:\n  max_epoch: 1\n")
    broken.write_text("trainer:\n  max_epochs: 1\n bad: : x\n")
    base = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}"]
    assert main([*base, "--config", str(typo)]) == 2
    assert (f"does not accept option 'trainer.max_epoch' (set in {typo}); did you mean "
            "trainer.max_epochs?") in capsys.readouterr().err
    assert main([*base, "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"in {broken}, line 3" in err and "<unicode string>" not in err


def test_a_fit_that_nothing_ends_is_named():
    """`--trainer.max_time null` with the shipped configs' max_epochs null trained 1000
    epochs with no word from segpipe."""
    from jsonargparse import Namespace

    from segpipe.lightning_cli import _check_bounded

    with pytest.warns(UserWarning, match="no trainer.max_time, max_epochs or max_steps ends"):
        _check_bounded(Namespace(max_time=None, max_epochs=None, max_steps=-1, fast_dev_run=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_bounded(Namespace(max_time=None, max_epochs=None, max_steps=10, fast_dev_run=False))
        _check_bounded(Namespace(max_time="00:00:01:00", max_epochs=None, max_steps=-1,
                                 fast_dev_run=False))
