"""The PNG plots a sweep's parent run carries (matplotlib, no pyplot global state).

- Steering sweeps: per layer, heatmaps of the main metrics (feature x scale, mean over prompts and seeds; every
  feature, over several pages when there are many) and the most and least steerable curves with 95% bands.
- SAE evaluation sweeps: the sparsity-fidelity frontier (`lm/delta_loss` against `sae/l0`, one curve per layer)
  and FVU and L0 against the layer (one line per width).
- Per SAE: the histogram of `log10(feature density + 1e-10)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runner.tracking.curves import (
    CONCEPT_METRIC,
    CONCEPT_TARGET,
    CURVE_METRICS,
    KL_METRIC,
    NLL_METRIC,
    rank_curves,
    scale_statistics,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

#: Features in one heatmap figure; a layer with more gets several pages.
FEATURES_PER_PAGE = 100
#: Curves in each half (most and least steerable) of a layer's steerability figure.
STEERABILITY_CURVES = 5
STEERABILITY_METRICS = (CONCEPT_METRIC, NLL_METRIC, KL_METRIC)
#: What a steering sweep's heatmaps show: the metrics its curve runs log per scale.
HEATMAP_METRICS = CURVE_METRICS
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


def write_steering_plots(frame: pd.DataFrame, summaries: Mapping[str, Mapping[str, float]], out_dir: Path,
                         metrics: Sequence[str] = HEATMAP_METRICS) -> list[Path]:
    """Writes a steering sweep's figures from its table of finished points (`records_frame`) and its curves'
    summaries (`runner.tracking.curves.summarize`, by curve key): the heatmaps of every layer (`write_heatmaps`)
    and its most and least steerable curves (`write_steerability`). Returns the files written."""
    if frame.empty or not {"layer", "feature", "scale", "curve_key"} <= set(frame.columns):
        return []
    written = write_heatmaps(frame, out_dir, metrics)
    for layer, of_layer in frame.groupby("layer", sort=True):
        keys = set(of_layer["curve_key"])
        written += write_steerability(of_layer, {key: value for key, value in summaries.items() if key in keys},
                                      out_dir / f"steerability_layer{layer}.png")
    return written


def write_heatmaps(frame: pd.DataFrame, out_dir: Path, metrics: Sequence[str] = HEATMAP_METRICS,
                   features_per_page: int = FEATURES_PER_PAGE) -> list[Path]:
    """Writes `heatmap_layer<L>_p<i>.png`: per layer, a panel per metric of its mean over prompts and seeds,
    features down (every feature, at most `features_per_page` to a figure) and scales across; each metric's colours span
    its range over the whole layer, so pages compare. Returns the files written."""
    metrics = [metric for metric in metrics if metric in frame.columns]
    if not metrics:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    means = frame.groupby(["layer", "feature", "scale"])[metrics].mean()
    scales = sorted(frame["scale"].unique())
    written = []
    for layer in sorted(frame["layer"].unique()):
        of_layer = means.loc[layer]
        features = sorted(of_layer.index.get_level_values("feature").unique())
        grids = {metric: of_layer[metric].unstack("scale").reindex(index=features, columns=scales).to_numpy()
                 for metric in metrics}
        pages = -(-len(features) // features_per_page)
        written += _draw_heatmap_pages(grids, features, scales, -(-len(features) // pages),  # pages alike
                                       f"layer {layer}: mean over prompts and seeds",
                                       out_dir / f"heatmap_layer{layer}_p{{}}.png")
    return written


#: The heatmap page layout, in inches.
_PANEL_WIDTH, _PANEL_GAP, _ROW_HEIGHT = 1.55, 0.2, 0.13
_LEFT, _RIGHT, _TOP, _BOTTOM, _COLORBAR = 0.6, 0.15, 1.05, 0.55, 0.09


def _draw_heatmap_pages(grids: Mapping[str, np.ndarray], features: Sequence[int], scales: Sequence[float],
                        rows: int, title: str, path_pattern: Path) -> list[Path]:
    """A layer's heatmap pages: a panel per metric (its colour bar above it), `rows` features down. One figure is
    drawn and its images and labels re-filled for every page (the last one padded with empty rows)."""
    import matplotlib as mpl

    height = _TOP + _ROW_HEIGHT * max(rows, 6) + _BOTTOM
    width = _LEFT + len(grids) * (_PANEL_WIDTH + _PANEL_GAP) - _PANEL_GAP + _RIGHT
    figure = _figure(width, height, constrained=False)
    ticks = list(range(0, len(scales), max(1, -(-len(scales) // 8))))
    images, first_panel = [], None
    for index, (metric, values) in enumerate(grids.items()):
        left = (_LEFT + index * (_PANEL_WIDTH + _PANEL_GAP)) / width
        panel = figure.add_axes((left, _BOTTOM / height, _PANEL_WIDTH / width,
                                 (height - _TOP - _BOTTOM) / height))
        bar = figure.add_axes((left, (height - _TOP + 0.3) / height, _PANEL_WIDTH / width, _COLORBAR / height))
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if high <= low:  # a constant metric: one colour, its value in the middle of the bar
            low, high = low - (abs(low) or 1.0) / 2, high + (abs(high) or 1.0) / 2
        image = panel.imshow(np.full((rows, len(scales)), np.nan), aspect="auto", interpolation="nearest",
                             cmap="viridis", norm=mpl.colors.Normalize(low, high))
        images.append((image, values))
        colorbar = figure.colorbar(image, cax=bar, orientation="horizontal")
        colorbar.ax.xaxis.set_ticks_position("top")
        colorbar.ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(3))
        colorbar.ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda value, _: f"{value:.3g}"))
        colorbar.ax.tick_params(labelsize=5.5, pad=1, length=2)
        bar.set_title(metric, fontsize=7, pad=9)
        panel.set_xticks(ticks, [f"{scales[i]:g}" for i in ticks], fontsize=6, rotation=90)
        panel.set_xlabel("scale", fontsize=6)
        if index == 0:  # tick objects are most of the drawing time: the feature labels are on the first panel only
            panel.set_yticks(range(rows))
            panel.tick_params(axis="y", labelsize=6, length=2)
            panel.set_ylabel("feature", fontsize=7)
            first_panel = panel
        else:
            panel.set_yticks([])
    heading = figure.suptitle(title, fontsize=9, y=1 - 0.08 / height, va="top")
    pages = -(-len(features) // rows)
    written = []
    for number in range(1, pages + 1):
        start = (number - 1) * rows
        page = list(features[start:start + rows])
        for image, values in images:
            filled = np.full((rows, len(scales)), np.nan)
            filled[: len(page)] = values[start:start + len(page)]
            image.set_data(filled)
        first_panel.set_yticklabels([str(feature) for feature in page] + [""] * (rows - len(page)))
        if pages > 1:
            heading.set_text(f"{title} (features {page[0]}-{page[-1]}, page {number} of {pages})")
        path = Path(str(path_pattern).format(number))
        figure.savefig(path, dpi=80)
        written.append(path)
    return written


def write_steerability(frame: pd.DataFrame, summaries: Mapping[str, Mapping[str, float]], path: Path,
                       count: int = STEERABILITY_CURVES, metrics: Sequence[str] = STEERABILITY_METRICS) -> list[Path]:
    """Writes one layer's most and least steerable curves (`rank_curves` of `summaries`, `count` of each) from its
    finished points: each of `metrics` against the scale, the mean over prompts and seeds with its 95% interval as
    a band. Returns the file written (none without curves)."""
    metrics = [metric for metric in metrics if metric in frame.columns]
    ranked = rank_curves(summaries)
    if not ranked or not metrics:
        return []
    groups = [("most steerable", ranked[:count]), ("least steerable", ranked[::-1][:count])]
    statistics = scale_statistics(frame[frame["curve_key"].isin(ranked[:count] + ranked[-count:])], metrics)
    features = dict(zip(frame["curve_key"], frame["feature"], strict=True))
    figure = _figure(3.4 * len(metrics), 5.6, constrained=False)
    grid = figure.subplots(2, len(metrics), squeeze=False)
    for row, (label, keys) in enumerate(groups):
        for column, metric in enumerate(metrics):
            axes = grid[row][column]
            for key in keys:
                of_curve = statistics.loc[key, metric]
                line = axes.plot(of_curve.index, of_curve["mean"], marker="o", markersize=2.5,
                                 label=f"f{features[key]}")[0]
                axes.fill_between(of_curve.index, of_curve["low"], of_curve["high"], alpha=0.18,
                                  color=line.get_color(), linewidth=0)
            if metric == CONCEPT_METRIC:
                axes.axhline(CONCEPT_TARGET, color="grey", linewidth=0.6, linestyle="--")
            axes.set_title(f"{label}: {metric}", fontsize=8)
            axes.tick_params(labelsize=6)
            axes.set_xlabel("scale", fontsize=7)
        grid[row][0].legend(fontsize=6)
    layer = frame["layer"].iloc[0]
    figure.suptitle(f"layer {layer}: mean over prompts and seeds, 95% interval of the mean", fontsize=9)
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.09, top=0.88, wspace=0.25, hspace=0.45)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=72)
    return [path]


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
