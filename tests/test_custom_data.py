"""Bring your own data module: --data accepts any LightningDataModule (class_path) that yields
segpipe's batch format; SegmentationDataModule stays the default."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import pytest
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


def _own_module(data: str, root: Path, num_classes: int = 2) -> list[str]:
    """Options for ``data`` (a data module's class path) with a tiny U-Net, on CPU, quiet."""
    return [f"--data={data}", "--model.net=segpipe.models.UNet",
            f"--model.net.init_args.num_classes={num_classes}",
            "--model.net.init_args.base_channels=4", "--model.net.init_args.depth=2",
            f"--trainer.default_root_dir={root}", "--trainer.accelerator=cpu",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false"]


def test_fit_and_test_with_a_class_path_data_module(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = [*_own_module("tests.test_custom_data.SquaresDataModule", run),
              "--data.init_args.n=8",
              f"--data.init_args.root={tmp_path / 'downloaded_later'}"]  # not segpipe's check
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
    code = main(["test", *_own_module("tests.test_custom_data.TwoTestLoadersDataModule",
                                      tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and not any("Traceback" in line for line in err), err[-5:]
    assert "the data module gives several test_dataloaders; segpipe's task scores one" in err[-1]


class _Reshaped(Dataset):
    """_Squares items changed as a user's first data module gets them wrong."""

    def __init__(self, variant: str, n: int, seed: int = 0) -> None:
        self.base, self.variant = _Squares(n, seed=seed), variant

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):  # noqa: ANN204 - the point is the wrong type
        item = dict(self.base[i])
        image, mask = item["image"], item["mask"]
        return {
            "tuple": lambda: (image, mask),
            "label_key": lambda: {"image": image, "label": mask},
            "uint8_mask": lambda: {"image": image, "mask": mask.to(torch.uint8)},
            "float_mask": lambda: {"image": image, "mask": mask.float()},
            "mask_channel": lambda: {"image": image, "mask": mask[None]},
            "beyond": lambda: {"image": image, "mask": mask * 5},
            "uint8_image": lambda: {"image": (image * 100).clamp(0, 255).to(torch.uint8),
                                    "mask": mask},
            "channels_last": lambda: {"image": image.permute(1, 2, 0).contiguous(),
                                      "mask": mask},
        }[self.variant]()


class WrongBatchesDataModule(SquaresDataModule):
    """SquaresDataModule whose batches break the format as ``variant`` says."""

    def __init__(self, variant: str = "tuple", n: int = 8, batch_size: int = 4,
                 root: str = "data") -> None:
        super().__init__(n, batch_size, root)
        self.variant = variant

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Reshaped(self.variant, self.n), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Reshaped(self.variant, 4, seed=1), batch_size=self.batch_size)


_WRONG = {
    "tuple": "got a list of 2; return {\"image\": image, \"mask\": mask}",
    "label_key": "no 'mask' key (keys: 'image', 'label'); name the image 'image' and the "
                 "labels 'mask'",
    "float_mask": "mask is torch.float32; give class indices: mask.long()",
    "mask_channel": "mask of shape (4, 1, 32, 32); drop the channel: mask[:, 0]",
    "beyond": "mask labels [5] are no class of 0..1; map them",
    "uint8_image": "image is torch.uint8; give float32 images",
    "channels_last": "image of shape (4, 32, 32, 3), 32 channels, where the network takes 3; put "
                     "the channels before the rows: image.permute(0, 3, 1, 2)",
}


@pytest.mark.parametrize("variant", [*_WRONG, "uint8_mask"])
def test_batches_not_in_segpipes_format_are_one_line(variant: str, tmp_path: Path,
                                                       capsys) -> None:
    """Each of these was a 50-100-line traceback from inside the loss or the network."""
    rc = main(["fit", *_own_module("tests.test_custom_data.WrongBatchesDataModule",
                                   tmp_path / "run"),
               f"--data.init_args.variant={variant}", "--trainer.max_epochs=1"])
    err = capsys.readouterr().err
    if variant == "uint8_mask":  # integer masks of another dtype are taken as int64
        assert rc == 0, err[-2000:]
        return
    lines = [ln for ln in err.splitlines() if ln.startswith("segpipe: error:")]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(
        "segpipe: error: the data module tests.test_custom_data.WrongBatchesDataModule gives "
        "val batches that are not segpipe's {\"image\": float (N, C, H, W), \"mask\": int64 "
        "(N, H, W)}: "), lines[0]
    assert _WRONG[variant] in lines[0], lines[0]


def test_class_names_of_another_count_name_the_module(tmp_path: Path, capsys) -> None:
    """It said "data.class_names has 2 names for num_classes=3", options the user never set."""
    rc = main(["fit", *_own_module("tests.test_custom_data.SquaresDataModule", tmp_path / "run",
                                   num_classes=3), "--trainer.max_epochs=1"])
    err = capsys.readouterr().err
    assert rc == 2 and (
        "segpipe: error: the data module tests.test_custom_data.SquaresDataModule names 2 "
        "classes (its class_names: ['background', 'square']) but the network predicts 3; set "
        "the network's num_classes (e.g. --model.net.init_args.num_classes 2)") in err, err
