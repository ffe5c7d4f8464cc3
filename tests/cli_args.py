"""Command-line overrides shared by the tests that run `segpipe fit`/`test` on synthetic data."""

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
