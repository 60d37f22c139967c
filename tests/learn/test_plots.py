"""zk0.learn.plots: PNGs with labeled axes, every round ticked, named series, NaN gaps, atomic writes."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from zk0.learn.plots import Panel, as_values, integer_ticks, interval_chart, line_chart, panel_chart


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_line_chart_writes_a_png_with_labels_legend_and_every_round_ticked(tmp_path):
    path = tmp_path / "loss.png"
    series = {"arm1": [2.0, 1.5, math.nan, 1.1, 1.0], "node 7": [None, 1.8, 1.6, 1.4, 1.3]}
    fig = line_chart(path, [0, 1, 2, 3, 4], series, title="Client training loss", xlabel="round", ylabel="policy loss")
    with Image.open(path) as image:
        assert image.format == "PNG" and 600 <= image.width <= 1200 and 300 <= image.height <= 900
    (ax,) = fig.axes
    assert _legend(ax) == ["arm1", "node 7"]
    assert (ax.get_xlabel(), ax.get_ylabel(), fig.get_suptitle()) == ("round", "policy loss", "Client training loss")
    assert list(ax.get_xticks()) == [0, 1, 2, 3, 4]
    assert np.isnan(ax.get_lines()[0].get_ydata()[2])  # a gap, not a zero
    assert not plt.get_fignums()  # closed once saved
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temporary file left


def test_many_rounds_get_integer_ticks_and_panels_keep_their_own_units(tmp_path):
    rounds = list(range(1, 61))
    fig = panel_chart(tmp_path / "lr_mu.png", rounds,
                      [Panel({"learning rate": [1e-4 * 0.97**r for r in rounds]}, "learning rate", yformat=".1e"),
                       Panel({"proximal mu": [0.01 * 0.98**r for r in rounds]}, "FedProx mu", logy=True)],
                      title="Schedule", xlabel="round")
    top, bottom = fig.axes
    assert (_legend(top), _legend(bottom)) == (["learning rate"], ["proximal mu"])
    assert (top.get_ylabel(), bottom.get_ylabel(), bottom.get_xlabel()) == ("learning rate", "FedProx mu", "round")
    assert bottom.get_yscale() == "log"
    assert all(float(t).is_integer() for t in bottom.get_xticks())
    assert top.yaxis.get_major_formatter()(1e-4, 0) == "1.0e-04"  # real units, not a scaled series
    assert Image.open(tmp_path / "lr_mu.png").height > Image.open(tmp_path / "lr_mu.png").width / 2


@pytest.mark.parametrize(("x", "ticks"), [([0, 1, 2], [0, 1, 2]), ([3, 1, 1, 2], [1, 2, 3]),
                                          (list(range(30)), list(range(30))), (list(range(31)), None)])
def test_integer_ticks(x, ticks):
    assert integer_ticks(x) == ticks


def test_as_values_turns_missing_into_gaps_and_lengths_must_match(tmp_path):
    assert np.isnan(as_values([1.0, None, 2.0])).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="series 'a' has 2 values for 3 x values"):
        line_chart(tmp_path / "x.png", [1, 2, 3], {"a": [1.0, 2.0]}, title="t", xlabel="round", ylabel="loss")
    assert not plt.get_fignums()


def test_interval_chart_draws_points_with_error_bars_per_group_and_series(tmp_path):
    path = tmp_path / "success.png"
    series = {"candidate v3": [(0.7, 0.4, 0.89), (None, 0.0, 1.0), (0.35, 0.18, 0.57)],
              "active v2": [(0.5, 0.24, 0.76), (0.0, 0.0, 0.28), (0.25, 0.11, 0.47)]}
    fig = interval_chart(path, ["pick", "push", "all"], series, title="validation", ylabel="success rate",
                         labels={"candidate v3": ["7/10", "0/0", "7/20"], "active v2": ["5/10", "0/10", "5/20"]})
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600
    (ax,) = fig.axes
    assert _legend(ax) == ["candidate v3", "active v2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["pick", "push", "all"]
    assert ax.get_ylim()[0] < 0.0 and ax.get_ylim()[1] > 1.0  # points on 0 and 1 are not cut off
    assert sorted(t.get_text() for t in ax.texts) == ["0/10", "5/10", "5/20", "7/10", "7/20"]  # None: no label
    assert fig.get_suptitle() == "validation" and not plt.get_fignums()
    with pytest.raises(ValueError, match="2 estimates for 3 groups"):
        interval_chart(tmp_path / "x.png", ["a", "b", "c"], {"s": [(0.1, 0, 0.2)] * 2}, title="t", ylabel="y")
    assert [p.name for p in tmp_path.iterdir()] == ["success.png"]
