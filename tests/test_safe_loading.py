"""Safe loading: ``--ckpt_path`` checkpoints are read with ``weights_only=True``.

A checkpoint carrying a pickled object (which a full unpickle would *execute*) is refused with a
message naming the file and the opt-in; a normal resume works with ``weights_only=True``.
"""

from __future__ import annotations

import pathlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from segpipe.callbacks import SafeCheckpointIO, UnsafeCheckpointError, load_checkpoint_file
from segpipe.cli import main
from tests.cli_args import TINY_UNET
from tests.data.synthetic import make_folder_dataset

TINY = [
    "--config", "configs/folder_unet.yaml",
    *TINY_UNET,
    "--data.num_workers=0",
    "--trainer.precision=32-true",
    "--trainer.num_sanity_val_steps=0",
]


class Payload:
    """Unpickling this *runs* ``Path(marker).touch()``: stands in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("safe")
    data = make_folder_dataset(base / "ds", n_train=8, n_val=2, n_test=2, num_classes=3,
                               size=(32, 32))
    root = base / "run"
    assert main(["fit", *TINY, f"--data.root={data}", f"--trainer.default_root_dir={root}",
                 "--trainer.max_epochs=1"]) == 0
    return data, root


def _evil_copy(src: Path, dst: Path, marker: Path) -> Path:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["payload"] = Payload(marker)
    torch.save(ckpt, dst)
    return dst


def test_weights_only_is_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    for sub in ("fit", "validate", "test"):
        with pytest.raises(SystemExit):
            main([sub, "--config", "configs/folder_unet.yaml", "--print_config"])
        assert yaml.safe_load(capsys.readouterr().out)["weights_only"] is True


def test_resume_loads_with_weights_only(run: tuple[Path, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data, root = run
    calls: list[Any] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    assert main(["fit", *TINY, f"--data.root={data}", f"--trainer.default_root_dir={root}",
                 "--trainer.max_epochs=2", "--ckpt_path=last"]) == 0
    monkeypatch.undo()
    assert calls and all(w is True for w in calls), calls
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 4  # resumed, one more epoch of 2 steps


@pytest.mark.parametrize("how", ["fit-file", "test-file", "fit-last"])
def test_pickled_object_in_hparams_is_refused(how: str, run: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data, root = run
    marker = tmp_path / "code-ran"
    sub, _, where = how.partition("-")
    if where == "last":  # resolved by Lightning, read by SafeCheckpointIO during fit
        out = tmp_path / "run"
        (out / "checkpoints").mkdir(parents=True)
        evil = _evil_copy(root / "checkpoints" / "last.ckpt", out / "checkpoints" / "last.ckpt",
                          marker)
        ckpt_arg = "last"
    else:  # an explicit file: LightningCLI reads its hyperparameters first
        out = tmp_path / "run"
        evil = _evil_copy(root / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt", marker)
        ckpt_arg = str(evil)
    rc = main([sub, *TINY, f"--data.root={data}", f"--trainer.default_root_dir={out}",
               "--trainer.max_epochs=3", f"--ckpt_path={ckpt_arg}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert not marker.exists(), "the pickled payload must never run"
    assert f"{evil}: refusing to load this checkpoint" in err
    assert "disallowed global: getattr" in err and "--weights_only false" in err, err
    assert "Traceback" not in err


def test_predict_and_export_refuse_it_with_their_own_fix(
    run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, root = run
    marker = tmp_path / "code-ran"
    evil = _evil_copy(root / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt", marker)
    (tmp_path / "in").mkdir()
    for argv in (["predict", "--ckpt_path", str(evil), "--input", str(tmp_path / "in"),
                  "--output", str(tmp_path / "out")],
                 ["export", "--ckpt_path", str(evil), "--output", str(tmp_path / "m.onnx")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{evil}: refusing to load this checkpoint" in err and "getattr" in err, err
        assert "torch.load(path, weights_only=False)" in err and "\x1b[" not in err
    assert not marker.exists()


def test_loaders_refuse_and_full_unpickle_is_opt_in(run: tuple[Path, Path], tmp_path: Path) -> None:
    _, root = run
    marker = tmp_path / "code-ran"
    evil = _evil_copy(root / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        load_checkpoint_file(evil)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        SafeCheckpointIO().load_checkpoint(evil, weights_only=True)
    assert not marker.exists()
    load_checkpoint_file(evil, weights_only=False)  # trusted-file escape hatch: a full unpickle
    assert marker.exists()
