"""segpipe.data.collate.PadCollate: batches it refuses, with a message that says what to do."""

from __future__ import annotations

import pytest
import torch

from segpipe.data import PadCollate


def test_images_of_different_channel_counts_are_refused_with_the_fix() -> None:
    """A batch mixing 3- and 4-channel images (RGB beside RGBA files) names the counts and the
    option that converts them, rather than failing on a tensor shape."""
    items = [
        {"image": torch.ones(3, 4, 4), "mask": torch.ones(4, 4, dtype=torch.int64), "path": "a"},
        {"image": torch.ones(4, 4, 4), "mask": torch.ones(4, 4, dtype=torch.int64), "path": "b"},
    ]
    with pytest.raises(ValueError, match=r"different channel counts \[3, 4\] \(a, b\); set "
                                         r"data.in_channels"):
        PadCollate(255)(items)
