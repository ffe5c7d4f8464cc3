"""configs/camvid_lite0.yaml and lgg_lite0.yaml: an ImageNet EfficientNet-Lite0 encoder, and
``segpipe test`` scoring the mean prediction over five sizes and the trained flip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from segpipe.cli import main
from tests.cli_args import printed_config
from tests.data.synthetic import make_camvid_like, make_lgg_like

#: Each config's test-time scales, as its comments and the README quote them.
SCALES = {"camvid_lite0": [0.5, 0.75, 1.0, 1.25, 1.5], "lgg_lite0": [0.75, 0.875, 1.0, 1.125, 1.25]}


@pytest.mark.parametrize("config", sorted(SCALES))
def test_the_lite0_configs_parse_without_downloading(config, tmp_path, hub_offline, capsys) -> None:
    cfg = printed_config(config, tmp_path, capsys)
    net = cfg["model"]["net"]
    assert net["class_path"] == "segpipe.models.SmpModel"
    assert net["init_args"]["encoder_name"] == "tu-tf_efficientnet_lite0"
    assert net["init_args"]["encoder_weights"] == "imagenet"
    # CamVid's encoder trains at 0.3 x the learning rate (+0.3 to +0.7 mIoU points against 0.1 in
    # two seeds), LGG's at 0.1 (0.3 was level)
    assert cfg["model"]["encoder_lr_mult"] == {"camvid_lite0": 0.3, "lgg_lite0": 0.1}[config]
    # CamVid's AdamW decays at 0.05 (+0.8 and +1.1 mIoU points against 1e-4 in two seeds), LGG's
    # at 1e-4 (0.05 was level)
    assert cfg["model"]["optimizer"]["init_args"]["weight_decay"] == {
        "camvid_lite0": 0.05, "lgg_lite0": 0.0001}[config]
    # CamVid trains its last quarter on cross-entropy plus Lovász-softmax (+0.7 mIoU points with
    # the views in two seeds); LGG keeps its ce+dice throughout
    assert (cfg["model"]["late_loss"], cfg["model"]["late_loss_start"]) == {
        "camvid_lite0": ("ce+lovasz", 0.75), "lgg_lite0": (None, 0.75)}[config]
    assert cfg["model"]["test_tta"] is True and cfg["model"]["test_tta_scales"] == SCALES[config]
    assert cfg["trainer"]["max_time"] == "00:00:30:00" and cfg["trainer"]["max_epochs"] is None
    if config == "camvid_lite0":  # TensorFlow's EfficientNets take pixels in [-1, 1]
        assert cfg["data"]["init_args"]["mean"] == [0.5] * 3 == cfg["data"]["init_args"]["std"]
    assert not any(hub_offline.iterdir())  # nothing fetched


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    """A Lite0 encoder file as scripts/convert_efficientnet_weights.py writes one (timm's names,
    no classifier head), with weights drawn under another seed than any fit's."""
    import timm

    torch.manual_seed(1234)
    state = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(("conv_head.", "bn2.", "classifier."))}
    path = tmp_path_factory.mktemp("weights") / "lite0.pth"
    torch.save(state, path)
    return path


def _data_args(config: str) -> list[str]:
    if config == "camvid_lite0":
        return ["--data.num_classes=3", "--data.class_names=null", "--data.class_colors=null",
                "--model.class_weights=null", "--data.val_cases=null", "--data.eval_resize=[36, 48]",
                "--data.crop_size=32", "--data.scale=[1.0, 1.0]"]
    return ["--data.val_case_fraction=0.5", "--data.eval_resize=[32, 32]", "--data.crop_size=32",
            "--data.scale=[1.0, 1.0]"]


@pytest.mark.parametrize("config", sorted(SCALES))
def test_a_lite0_config_trains_from_the_weight_file_and_tests_over_sizes_and_the_flip(
    config, tmp_path, hub_offline, encoder_file, capsys
) -> None:
    if config == "camvid_lite0":
        root = make_camvid_like(tmp_path / "camvid", n_train=4, n_val=2, num_classes=3, void_index=11)
    else:
        root = make_lgg_like(tmp_path / "lgg", n_patients=4, slices_per_patient=2, val_patients=2)
    run = tmp_path / "run"
    args = ["--config", f"configs/{config}.yaml", f"--data.root={root}",
            f"--trainer.default_root_dir={run}", f"--model.net.init_args.encoder_weights={encoder_file}",
            *_data_args(config), "--data.num_workers=0", "--data.batch_size=2",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
            "--trainer.precision=32-true", "--trainer.logger=false"]
    assert main(["fit", *args, "--trainer.max_time=null", "--trainer.max_epochs=1"]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    # the encoder started from the file: one epoch at 0.1 or 0.3 x the learning rate moves each
    # weight by about 2e-4 or 6e-4 a step, a fresh initialisation differs from the file's by far more
    trained = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    stem = next(v for k, v in trained.items() if k.endswith("encoder.model.conv_stem.weight"))
    source = torch.load(encoder_file, weights_only=True)["conv_stem.weight"]
    assert (stem - source).abs().max() < 0.01 < (source - source.roll(1, 0)).abs().max()
    capsys.readouterr()
    assert main(["test", *args, "--ckpt_path", "last"]) == 0
    tested = json.loads(next(run.rglob("test_metrics.json")).read_text())
    scales = ", ".join(f"{s:g}" for s in SCALES[config])
    assert tested["test_time_augmentation"].startswith(
        "mean of 2 view(s) over the training symmetries (hflip) at 5 scales "
        f"({scales} x data.eval_resize")
    assert 0 <= tested["mIoU"] <= 1
