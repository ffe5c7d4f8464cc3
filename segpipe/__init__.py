"""segpipe: semantic segmentation from a folder of images and masks to a trained model,
honest metrics and exported masks."""

__version__ = "0.1.0"

__all__ = ["__version__"]
