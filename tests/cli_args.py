"""Command-line overrides shared by the tests that run `segpipe fit`/`test` on synthetic data,
and a fit of the tiny U-Net with loader workers."""

#: A tiny U-Net (3 classes, base 8, depth 2) on 32-pixel crops, CPU, quiet output.
TINY_UNET = [
    "--model.net.class_path=segpipe.models.UNet",
    "--model.net.init_args.base_channels=8",
    "--model.net.init_args.depth=2",
    "--data.num_classes=3",
    "--data.batch_size=4",
    "--data.crop_size=32",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def fit_with_workers(root: object, run_dir: object, epochs: int, callbacks: list,
                     *extra: str) -> object:
    """`segpipe fit` of :data:`TINY_UNET` on ``root`` for ``epochs`` epochs, with 2 loader
    workers and fp32 (equal weights across runs), into ``run_dir``; returns the CLI."""
    from segpipe.lightning_cli import run_cli

    return run_cli(["fit", f"--data.root={root}", f"--trainer.max_epochs={epochs}",
                    f"--trainer.default_root_dir={run_dir}", "--data.num_workers=2",
                    "--trainer.precision=32-true", *TINY_UNET, *extra], callbacks=callbacks)


def printed_config(config: str, root: object, capsys: object) -> dict:
    """What `segpipe fit --config configs/CONFIG.yaml --data.root ROOT --print_config` prints,
    parsed; it must exit 0 (the network is not built, so nothing is downloaded)."""
    import pytest
    import yaml

    from segpipe.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", f"configs/{config}.yaml", f"--data.root={root}", "--print_config"])
    assert exc.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)
