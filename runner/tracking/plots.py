"""The PNG plots a sweep's parent run carries (matplotlib, no pyplot global state).

- Steering sweeps: one figure per feature, every metric (mean over prompts and seeds) against the scale, one line
  per layer.
- SAE evaluation sweeps: the sparsity-fidelity frontier (`lm/delta_loss` against `sae/l0`, one curve per layer)
  and FVU and L0 against the layer (one line per width).
- Per SAE: the histogram of `log10(feature density + 1e-10)`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

_log = logging.getLogger(__name__)

#: More features than this get no per-feature plot (each PNG costs ~0.2 s); the table still has every row.
MAX_FEATURE_PLOTS = 100
#: What a steering sweep's per-feature figure shows (every metric is in the table and on the child runs).
FEATURE_PLOT_METRICS = (
    "steer/feature_activation",
    "steer/concept_rate",
    "steer/logit_lens_mass",
    "steer/l0",
    "steer/nll",
    "steer/kl_steered_base",
    "gen/distinct_2",
    "gen/num_tokens",
)
FRONTIER_PLOT = "sae_frontier.png"
BY_LAYER_PLOT = "sae_by_layer.png"


def _figure(width: float, height: float, *, constrained: bool = True) -> Figure:
    from matplotlib.figure import Figure  # imported on first use: the driver's start-up does not pay for it

    return Figure(figsize=(width, height), layout="constrained" if constrained else None)


def warm_up() -> None:
    """Imports matplotlib and loads its font by drawing a small figure, so that the first real figure does not pay
    for it (the tracking thread calls this while the workers start)."""
    import io

    figure = _figure(1, 1, constrained=False)
    figure.add_subplot().set_title("warm-up", fontsize=8)
    figure.savefig(io.BytesIO(), format="png", dpi=20)


def write_feature_plots(
    frame: pd.DataFrame, out_dir: Path, metrics: Sequence[str] = FEATURE_PLOT_METRICS
) -> list[Path]:
    """Writes `feature_<i>.png` per feature of a steering sweep's table: each of `metrics` that the table has
    (mean over prompts and seeds) against scale, one line per layer. Returns the files written.

    One figure is drawn and its lines re-filled for every feature, which halves the time matplotlib takes.
    """
    metrics = [metric for metric in metrics if metric in frame.columns]
    if not metrics or frame.empty or not {"feature", "layer", "scale"} <= set(frame.columns):
        return []
    features = sorted(frame["feature"].unique())
    if len(features) > MAX_FEATURE_PLOTS:
        _log.warning("plotting the first %d of %d features", MAX_FEATURE_PLOTS, len(features))
    layers = sorted(frame["layer"].unique())
    means = frame.groupby(["feature", "layer", "scale"])[metrics].mean().sort_index()
    from matplotlib.ticker import MaxNLocator

    columns = min(4, len(metrics))
    rows = -(-len(metrics) // columns)
    figure = _figure(3.2 * columns, 2.6 * rows, constrained=False)  # a fixed layout: 10x faster to save
    grid = figure.subplots(rows, columns, sharex=True, squeeze=False).flat
    scales = sorted(frame["scale"].unique())
    panels = []
    # Tick labels are most of matplotlib's drawing time: the x axis is shared (labels on the bottom row only) and
    # ticked at the sweep's scales, the y axis gets at most 5 ticks.
    for index, (metric, axes) in enumerate(zip(metrics, grid, strict=False)):
        lines = {layer: axes.plot([], [], marker="o", markersize=3, label=f"layer {layer}")[0] for layer in layers}
        axes.set_title(metric, fontsize=8)
        axes.tick_params(labelsize=7)
        axes.yaxis.set_major_locator(MaxNLocator(5))
        if len(scales) <= 8:
            axes.set_xticks(scales)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(8))
        if index >= len(metrics) - columns:
            axes.set_xlabel("scale", fontsize=7)
            axes.xaxis.set_tick_params(labelbottom=True)
        panels.append((metric, axes, lines))
    for axes in grid:  # cells of the last row left over
        axes.set_visible(False)
    panels[-1][1].legend(fontsize=6)
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.1, top=0.88, wspace=0.3, hspace=0.45)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for feature in features[:MAX_FEATURE_PLOTS]:
        of_feature = means.loc[feature]
        for metric, axes, lines in panels:
            for layer, line in lines.items():
                series = of_feature[metric].loc[layer] if layer in of_feature.index.get_level_values(0) else None
                line.set_data(*((series.index, series.values) if series is not None else ([], [])))
            axes.relim()
            axes.autoscale_view()
        figure.suptitle(f"feature {feature}", fontsize=10)
        path = out_dir / f"feature_{feature}.png"
        figure.savefig(path, dpi=72)
        written.append(path)
    return written


def write_sae_eval_plots(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Writes the SAE evaluation sweep's plots from its table (one row per SAE with `layer`, `width`, `sae/l0`,
    `sae/fvu`, `lm/delta_loss`): the frontier and the by-layer figure. Returns the files written."""
    needed = {"layer", "width", "sae/l0", "sae/fvu", "lm/delta_loss"}
    if frame.empty or not needed <= set(frame.columns):
        return []
    out_dir.mkdir(parents=True, exist_ok=True)

    frontier = _figure(6, 4.5)
    axes = frontier.add_subplot()
    for layer, group in frame.sort_values("sae/l0").groupby("layer"):
        axes.plot(group["sae/l0"], group["lm/delta_loss"], marker="o", label=f"layer {layer}")
    axes.set_xscale("log")
    axes.set_xlabel("L0 (mean active latents per token)")
    axes.set_ylabel("delta LM loss (nats/token)")
    axes.set_title("sparsity-fidelity frontier")
    axes.legend(fontsize=7, ncols=2 if frame["layer"].nunique() > 8 else 1)
    frontier_path = out_dir / FRONTIER_PLOT
    frontier.savefig(frontier_path, dpi=80)

    by_layer = _figure(10, 4)
    for index, (metric, label) in enumerate((("sae/fvu", "FVU"), ("sae/l0", "L0"))):
        axes = by_layer.add_subplot(1, 2, index + 1)
        grouping = ["width", "l0_target"] if "l0_target" in frame.columns else ["width"]
        for key, group in frame.sort_values("layer").groupby(grouping):
            name = " ".join(str(part) for part in (key if isinstance(key, tuple) else (key,)))
            axes.plot(group["layer"], group[metric], marker="o", label=name)
        axes.set_xlabel("layer")
        axes.set_title(f"{label} by layer", fontsize=10)
        axes.legend(fontsize=7)
    by_layer_path = out_dir / BY_LAYER_PLOT
    by_layer.savefig(by_layer_path, dpi=80)
    return [frontier_path, by_layer_path]


def write_density_histogram(
    counts: np.ndarray, edges: np.ndarray, path: Path, *, title: str, dead: int
) -> Path:
    """Writes a histogram of `log10(density + 1e-10)` (precomputed `counts` over `edges`) as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = _figure(6, 3.5)
    axes = figure.add_subplot()
    axes.stairs(counts, edges, fill=True)
    axes.set_xlim(float(edges[0]), float(edges[-1]))
    axes.set_xlabel("log10(feature density + 1e-10)")
    axes.set_ylabel("latents")
    axes.set_title(f"{title} ({dead} dead)", fontsize=10)
    figure.savefig(path, dpi=80)
    return path
