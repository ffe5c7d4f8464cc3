"""segpipe.data.spec: defaults, checks and the round trips through checkpoints."""

from __future__ import annotations

import pytest

from segpipe.data.spec import (
    DataSpec,
    check_ignore_index,
    default_class_colors,
    default_mean_std,
    reads_leading_bands,
    recorded_spec,
    spec_from_legacy,
)
from segpipe.errors import ConfigError


def test_default_colours_are_the_pascal_voc_palette() -> None:
    """Class 0 black, 1 dark red, 2 green, 3 olive, 4 navy, ... (the VOC colour map)."""
    assert default_class_colors(6) == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0],
                                       [0, 0, 128], [128, 0, 128]]
    assert len({tuple(c) for c in default_class_colors(256)}) == 256


def test_default_statistics_for_other_than_three_channels() -> None:
    """Non-RGB inputs without measured statistics normalise with 0.5 / 0.25 per channel."""
    assert default_mean_std(4) == ([0.5] * 4, [0.25] * 4)
    spec = DataSpec.create(2, in_channels=1).resolved()
    assert (spec.mean, spec.std, spec.stats_source) == ([0.5], [0.25], "default")


def test_a_mean_without_a_std_takes_the_default_std() -> None:
    """Giving only one of mean/std keeps it and fills the other with the default."""
    spec = DataSpec.create(2, in_channels=1, mean=[0.3])
    assert (spec.mean, spec.std, spec.stats_source) == ([0.3], [0.25], "config")
    spec = DataSpec.create(2, std=[0.1, 0.2, 0.3])
    assert spec.mean == [0.485, 0.456, 0.406] and spec.std == [0.1, 0.2, 0.3]


def test_negative_std_and_unknown_symmetries_are_refused() -> None:
    with pytest.raises(ConfigError, match="data.std values must be > 0"):
        DataSpec.create(2, in_channels=1, mean=[0.5], std=[-0.2])
    with pytest.raises(ConfigError, match="data.symmetries must be among"):
        DataSpec.create(2, symmetries=["hflip", "transpose"])


def test_a_legacy_checkpoint_without_data_hyperparameters_has_unknown_symmetries() -> None:
    """With no data module hyperparameters the training flips are not known (None), so TTA
    falls back to its own default rather than claiming horizontal flips."""
    spec = spec_from_legacy({"num_classes": 2}, None)
    assert spec is not None and spec.symmetries is None


def test_leading_bands_are_the_files_first_bands_in_order() -> None:
    assert reads_leading_bands([1, 2, 3]) and reads_leading_bands([1])
    assert not reads_leading_bands([2, 3]) and not reads_leading_bands([0, 1, 2])
    assert not reads_leading_bands([2, 1]) and not reads_leading_bands(None)
    assert not reads_leading_bands([])


def test_a_saved_spec_keeps_its_recorded_symmetries() -> None:
    """Only a spec saved without symmetries takes them from the data module's flips."""
    hp = {"data_spec": {**DataSpec.create(2, symmetries=["hflip"]).to_dict()}}
    dm = {"augment": "default", "hflip": True, "vflip": True, "rotate90": True}
    assert recorded_spec(hp, dm)["symmetries"] == ["hflip"]
    assert recorded_spec({}, dm) == {}


def test_the_suggested_mapping_shifts_the_classes_above_the_ignored_one() -> None:
    """With the user's own mask table, the fix maps the ignored class to 255 and moves each
    class above it down by one, so the others become 0..C-2."""
    with pytest.raises(ConfigError, match=r"data.mask_values '\{0: 0, 128: 255, 255: 1\}'"):
        check_ignore_index(3, 1, mask_values={0: 0, 128: 1, 255: 2})
