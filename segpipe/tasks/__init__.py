"""Lightning tasks: losses, metrics and optimisation around plain networks."""

from segpipe.tasks.segmentation import SegmentationTask, pad_to_multiple

__all__ = ["SegmentationTask", "pad_to_multiple"]
