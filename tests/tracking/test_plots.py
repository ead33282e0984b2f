"""A steering sweep's figures: heatmaps of every feature, over pages when there are many, and the most and least
steerable curves."""

import numpy as np
import pandas as pd
from matplotlib.image import imread

from runner.tracking import plots


def points_table(features: int, layers=(1,), scales=(0.0, 10.0, 20.0)) -> pd.DataFrame:
    rows = [{"curve_key": f"L{layer}f{feature}", "layer": layer, "feature": feature, "scale": scale, "seed": seed,
             "steer/concept_rate": min(1.0, scale * feature / 1000 + seed / 100), "steer/nll": 1 + scale / 10}
            for layer in layers for feature in range(features) for scale in scales for seed in (0, 1)]
    return pd.DataFrame(rows)


def test_every_feature_is_in_a_heatmap_page(tmp_path) -> None:
    frame = points_table(250, layers=(1, 3))
    written = plots.write_heatmaps(frame, tmp_path, metrics=["steer/concept_rate", "steer/nll", "not/logged"])
    assert [path.name for path in written] == [f"heatmap_layer{layer}_p{page}.png" for layer in (1, 3)
                                               for page in (1, 2, 3)], "250 features: 3 pages of at most 100"
    heights = {imread(path).shape[0] for path in written}
    assert len(heights) == 1, "pages of one size (84 features each, the last padded)"
    assert plots.write_heatmaps(points_table(30), tmp_path / "one", metrics=["steer/nll"])[0].name == \
        "heatmap_layer1_p1.png"


def test_the_steerability_figure_has_the_most_and_least_steerable_curves(tmp_path) -> None:
    frame = points_table(12)
    summaries = {f"L1f{feature}": {"curve/max_concept_rate": float(feature)} for feature in range(12)}
    (path,) = plots.write_steerability(frame, summaries, tmp_path / "steerability.png")
    image = imread(path)
    assert image.shape[0] > 300 and np.ptp(image) > 0
    assert plots.write_steerability(frame, {}, tmp_path / "none.png") == []
