"""Pictures: the threshold-relative heat map scale, and the notebooks' image grid."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cgdiff.viz import heatmap, image_grid, overlay  # noqa: E402


def test_heatmap_scale_is_relative_to_the_threshold_not_the_image():
    low = heatmap(np.full((4, 4), 0.5), threshold=1.0)
    also_low = heatmap(np.array([[0.5, 0.5], [0.5, 0.5]]), threshold=1.0)
    assert (low[0, 0] == also_low[0, 0]).all()
    assert not (heatmap(np.full((4, 4), 2.0), threshold=1.0)[0, 0] == low[0, 0]).all()
    out = overlay(np.zeros((8, 8, 3), np.uint8), np.pad(np.ones((4, 4)) * 3, 2), threshold=1.0)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8


def test_image_grid_lays_out_rows_with_titles_and_labels():
    import matplotlib.pyplot as plt

    rgb = np.zeros((8, 8, 3), np.uint8)
    fig = image_grid([[rgb, np.eye(8) > 0], [np.random.rand(8, 8)]], titles=["a", "b"], row_labels=["one", "two"],
                     suptitle="grid")
    axes = fig.axes
    assert len(axes) == 4 and axes[0].get_title() == "a" and axes[1].get_title() == "b"
    assert axes[0].get_ylabel() == "one" and axes[2].get_ylabel() == "two" and not axes[3].axison
    plt.close(fig)
    fig = image_grid([[np.full((4, 4), 0.1), np.full((4, 4), 0.2)]], grey_range=(0.0, 1.0))
    assert [ax.images[0].get_clim() for ax in fig.axes] == [(0.0, 1.0), (0.0, 1.0)]
    plt.close(fig)
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([])
