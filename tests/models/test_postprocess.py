"""models.postprocess: the largest component and the flip average, checked on pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.postprocess import flip_average, keep_largest_component


def test_largest_component_keeps_exactly_the_bigger_blob():
    mask = np.zeros((32, 32), np.uint8)
    mask[2:12, 2:12] = 1  # 100 px
    mask[20:25, 20:25] = 1  # 25 px
    kept = keep_largest_component(mask)
    assert kept.dtype == np.uint8
    expected = np.zeros_like(mask)
    expected[2:12, 2:12] = 1
    np.testing.assert_array_equal(kept, expected)


def test_pixels_touching_at_a_corner_are_one_component_and_empty_stays_empty():
    mask = np.zeros((8, 8), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # a diagonal line: one 8-connected component
    mask[6, 0] = True
    kept = keep_largest_component(mask)
    assert kept.dtype == bool and kept.sum() == 3 and not kept[6, 0]
    assert not keep_largest_component(np.zeros((8, 8), bool)).any()
    with pytest.raises(ValueError, match="mask must be"):
        keep_largest_component(np.zeros((1, 8, 8), bool))


def test_equal_components_keep_the_first_in_raster_order():
    mask = np.zeros((10, 10), np.uint8)
    mask[0:2, 6:8] = 1
    mask[5:7, 0:2] = 1
    kept = keep_largest_component(mask)
    assert kept[0:2, 6:8].all() and kept.sum() == 4


def test_flip_average_of_a_mirror_symmetric_map_is_the_map():
    x = torch.randn(2, 1, 5, 6)
    assert torch.equal(flip_average(x, x.flip(-1)), x)
    y = torch.randn(2, 1, 5, 6)
    torch.testing.assert_close(flip_average(x, y), (x + y.flip(-1)) / 2)
    with pytest.raises(ValueError, match="differ"):
        flip_average(x, y[:, :, :4])


def test_largest_component_equals_labelling_the_whole_image():
    # the function labels only the foreground's bounding box; labelling the whole image must keep the same pixels
    from scipy import ndimage

    rng = np.random.default_rng(3)
    for trial in range(60):
        mask = np.zeros((40, 48), np.uint8)
        for _ in range(rng.integers(1, 6)):
            y, x = rng.integers(0, 36), rng.integers(0, 44)
            mask[y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = 1
        labels, count = ndimage.label(mask, np.ones((3, 3), bool))
        sizes = np.bincount(labels.ravel())[1:]
        expected = (labels == 1 + int(np.argmax(sizes))).astype(np.uint8) if count > 1 else mask
        np.testing.assert_array_equal(keep_largest_component(mask), expected, err_msg=f"trial {trial}")
