"""Training you can watch: TensorBoard + CSV by default, learning rate, val images, test figures;
another logger (MLflow, offline) through --trainer.logger."""

from __future__ import annotations

from pathlib import Path

import pytest

from segpipe.cli import main
from tests.cli_args import TINY_UNET
from tests.data.synthetic import make_folder_dataset

TINY = [*TINY_UNET, "--data.num_workers=0", "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("data") / "ds", num_classes=3, size=(48, 40))


def _events(folder: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc.Tags()


def test_default_run_logs_tensorboard_and_csv_in_one_folder(dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    common = ["--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
              f"--trainer.default_root_dir={run}", *TINY]
    assert main(["fit", *common]) == 0
    version = run / "lightning_logs" / "version_0"
    assert (version / "metrics.csv").is_file() and list(version.glob("events.out.tfevents.*"))
    tags = _events(version)
    assert "val/mIoU" in tags["scalars"] and "train/loss_epoch" in tags["scalars"]
    assert any(t.startswith("lr-") for t in tags["scalars"])  # the learning rate
    assert "val/images" in tags["images"]  # image | truth | prediction rows
    assert main(["test", *common, "--ckpt_path", "last"]) == 0
    tested = run / "lightning_logs" / "version_1"
    assert (tested / "test_metrics.json").is_file()
    images = _events(tested)["images"]
    assert "test/confusion_matrix" in images and "test/per_class_iou" in images


def test_mlflow_logger_offline(dataset: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local folder, no server
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    config = Path("configs/folder_unet.yaml").resolve()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert main(["fit", "--config", str(config), f"--data.root={dataset}",
                 f"--trainer.default_root_dir={tmp_path / 'run'}", *TINY,
                 "--trainer.logger=lightning.pytorch.loggers.MLFlowLogger",
                 f"--trainer.logger.tracking_uri={uri}",
                 "--trainer.logger.experiment_name=segpipe-test"]) == 0
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("segpipe-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert {"val/mIoU", "train/loss_epoch"} <= set(run.data.metrics)
    assert any(k.startswith("lr-") for k in run.data.metrics)
    assert list((tmp_path / "mlruns").rglob("val_images_*.png"))  # val pictures as artifacts
    # the run's own files in its own folder, not in the store every run shares
    assert (tmp_path / "run" / "mlflow" / run.info.run_id / "config.yaml").is_file()
    assert not (tmp_path / "mlruns" / "config.yaml").exists()
    # no lookup of mlflow's telemetry server (config.mlflow-telemetry.io) from an offline run
    import os

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert run.info.run_name.startswith("fit-")  # not mlflow's seeded random name
    assert not list((tmp_path / "cwd").iterdir())  # not even MLflow's unused ./mlruns


def test_logger_set_up_problems_are_one_line(dataset: Path, tmp_path: Path, capsys,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={tmp_path / 'run'}", *TINY,
            "--trainer.logger=lightning.pytorch.loggers.MLFlowLogger"]
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    assert main([*args, f"--trainer.logger.tracking_uri={uri}"]) == 2
    assert "needs MLFLOW_ALLOW_FILE_STORE=true" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "afile").write_text("x")
    assert main([*args, f"--trainer.logger.tracking_uri=file:{tmp_path / 'afile' / 'mlruns'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "afile is a file, not a folder" in err[-1] and "tracking_uri" in err[-1]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main([*args, f"--trainer.logger.tracking_uri={uri}"]) == 2
    assert "needs the mlflow package: pip install 'segpipe[tracking]'" in capsys.readouterr().err


def test_class_names_mlflow_cannot_log_are_one_line(dataset: Path, tmp_path: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow keeps [A-Za-z0-9_/. -] of a metric name: a class named in another script became
    val/Dice/, refused at the first validation (a traceback, the epoch lost), and names alike
    but for such characters merged into one metric."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    args = ["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
            f"--trainer.default_root_dir={tmp_path / 'run'}", *TINY,
            "--trainer.logger=lightning.pytorch.loggers.MLFlowLogger",
            f"--trainer.logger.tracking_uri={(tmp_path / 'mlruns').as_uri()}"]
    assert main([*args, "--data.class_names=[背景, 植物, 建物]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("segpipe: error: data.class_names: '背景' has no character MLflow "
                              "keeps in a metric name")
    assert main([*args, "--data.class_names=[bg, car, car?]"]) == 2
    assert "'car?' logs under the same metric name as 'car' ('car')" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists() or not list(
        (tmp_path / "run" / "checkpoints").iterdir())


def test_a_reserved_version_is_not_given_twice(tmp_path) -> None:
    """Two `segpipe test` runs of one run folder started together both took version_N (the
    first free one), and one wrote its results over the other's."""
    from segpipe.tracking import next_version

    assert next_version(tmp_path) == 0  # a look only
    assert next_version(tmp_path, reserve=True) == 0
    assert next_version(tmp_path, reserve=True) == 1
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0",
                                                                               "version_1"]


def test_val_pictures_at_most_one_a_minute_and_the_last_one(dataset: Path, tmp_path: Path) -> None:
    """One picture per validation (about 3 MB for 480×360 frames) grew a 30-minute run's
    TensorBoard file by hundreds of MB; now one a minute at most, and the last validation's
    at the end of training."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={run}", *TINY, "--trainer.max_epochs=4"]) == 0
    acc = EventAccumulator(str(run / "lightning_logs" / "version_0"),
                           size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Images("val/images")]
    validations = [e.step for e in acc.Scalars("val/mIoU")]
    # Lightning logs epoch-end scalars at global_step - 1, the pictures at global_step
    assert len(validations) == 4 and steps == [validations[0] + 1, validations[-1] + 1]
    # configured, it replaces the default one (they had both logged)
    every = ('--trainer.callbacks+={"class_path": "segpipe.tracking.ValidationImages", '
             '"init_args": {"min_interval": 0, "num_images": 1}}')
    assert main(["fit", "--config", "configs/folder_unet.yaml", f"--data.root={dataset}",
                 f"--trainer.default_root_dir={tmp_path / 'every'}", *TINY,
                 "--trainer.max_epochs=3", every]) == 0
    acc = EventAccumulator(str(tmp_path / "every" / "lightning_logs" / "version_0"),
                           size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Images("val/images")) == 3
