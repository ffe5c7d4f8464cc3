"""scripts/study_components.py: connectivity, per-slice filters, pooled Dice, slice order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.scripts import load_script


def _script():
    return load_script("study_components")


def test_components_are_face_connected() -> None:
    """Voxels that touch only along an edge or a corner are separate components."""
    study = _script()
    volume = np.zeros((2, 4, 4), bool)
    volume[0, 0, 0] = volume[0, 1, 1] = True  # diagonal in a slice
    volume[1, 3, 3] = True  # corner to corner with [0, 2, 2]
    volume[0, 2, 2] = True
    assert not study.at_least(volume, 2).any()
    volume[0, 0, 1] = True  # now [0,0,0]-[0,0,1]-[0,1,1] touch by faces
    assert study.at_least(volume, 2).sum() == 3


def test_the_2d_filter_sizes_each_slice_alone() -> None:
    """``2-D < k`` removes a component small in every slice even when its 3-D extent is
    large; ``3-D < k`` keeps it."""
    study = _script()
    volume = np.zeros((4, 6, 6), bool)
    volume[:, 2, 2:5] = True  # 3 pixels a slice, 12 voxels in all
    named = study.filters([5], [5])
    assert named["3-D < 5"](volume).sum() == 12
    assert not named["2-D < 5"](volume).any()


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_pooled_dice_counts_the_filtered_prediction() -> None:
    """The pooled Dice is 2 |kept & truth| / (|kept| + |truth|) over every case's voxels."""
    study = _script()
    pred = np.zeros((1, 6, 6), bool)
    pred[0, :2, :2] = True  # 4 right
    pred[0, 5, 5] = True  # 1 wrong, removed by the filter
    truth = np.zeros_like(pred)
    truth[0, :2, :3] = True  # 6 true
    other = np.zeros_like(pred)
    results = study.compare({"a": (pred, truth), "b": (other, other)}, study.filters([2], []))
    assert results["none"][1] == pytest.approx(2 * 4 / (5 + 6))
    assert results["3-D < 2"][1] == pytest.approx(2 * 4 / (4 + 6))
    assert np.isnan(study.compare({"b": (other, other)}, study.filters([], []))["none"][1])


def test_slices_stack_in_natural_order() -> None:
    """``case_2`` comes before ``case_10`` (numbers compared as numbers, not as text)."""
    study = _script()
    names = ["TCGA_1_10.tif", "TCGA_1_2.tif", "TCGA_1_1.tif"]
    ordered = sorted((Path(n) for n in names), key=study._natural)
    assert [p.name for p in ordered] == ["TCGA_1_1.tif", "TCGA_1_2.tif", "TCGA_1_10.tif"]
