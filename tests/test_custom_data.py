"""Bring your own data module: --data accepts any LightningDataModule (class_path) that yields
segpipe's batch format; SegmentationDataModule stays the default."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset

from segpipe.cli import main
from segpipe.predict.checkpoint import load_predictor


class _Squares(Dataset):
    """Images with a bright square (class 1) on a dark background (class 0)."""

    def __init__(self, n: int, size: int = 32, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            y, x = torch.randint(0, size // 2, (2,), generator=gen).tolist()
            mask = torch.zeros(size, size, dtype=torch.int64)
            mask[y : y + size // 2, x : x + size // 2] = 1
            image = mask.float()[None].repeat(3, 1, 1) + 0.1 * torch.randn(3, size, size, generator=gen)
            self.items.append({"image": image, "mask": mask, "path": f"square_{i}"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class SquaresDataModule(L.LightningDataModule):
    """A user's own data module (no segpipe base class): segpipe's batch format only."""

    def __init__(self, n: int = 8, batch_size: int = 4, root: str = "data") -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size
        self.root = root  # where a real module would download to: need not exist yet
        self.class_names = ["background", "square"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Squares(self.n), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Squares(4, seed=1), batch_size=self.batch_size)

    test_dataloader = val_dataloader


def test_fit_and_test_with_a_class_path_data_module(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = [
        "--data=tests.test_custom_data.SquaresDataModule", "--data.init_args.n=8",
        f"--data.init_args.root={tmp_path / 'downloaded_later'}",  # not segpipe's root check
        "--model.net=segpipe.models.UNet", "--model.net.init_args.num_classes=2",
        "--model.net.init_args.base_channels=4", "--model.net.init_args.depth=2",
        f"--trainer.default_root_dir={run}", "--trainer.accelerator=cpu",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false",
    ]
    assert main(["fit", *common, "--trainer.max_epochs=2"]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    assert main(["test", *common, "--ckpt_path", str(ckpt)]) == 0
    _, cfg = load_predictor(ckpt)
    assert cfg.num_classes == 2 and cfg.class_names == ["background", "square"]


class TwoTestLoadersDataModule(SquaresDataModule):
    """Two test sets (say two scanners) as two loaders."""

    def test_dataloader(self) -> list[DataLoader]:  # type: ignore[override]
        return [DataLoader(_Squares(4, seed=2), batch_size=self.batch_size),
                DataLoader(_Squares(4, seed=3), batch_size=self.batch_size)]


def test_several_test_loaders_are_one_line(tmp_path: Path, capsys) -> None:
    # Lightning's 40-line traceback about dataloader_idx in test_step
    code = main(["test", "--data=tests.test_custom_data.TwoTestLoadersDataModule",
                 "--model.net=segpipe.models.UNet", "--model.net.init_args.num_classes=2",
                 "--model.net.init_args.base_channels=4", "--model.net.init_args.depth=2",
                 f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu",
                 "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and not any("Traceback" in line for line in err), err[-5:]
    assert "the data module gives several test_dataloaders; segpipe's task scores one" in err[-1]
