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

_log = logging.getLogger(__name__)

#: More features than this get no per-feature plot (each PNG costs ~0.1 s); the table still has every row.
MAX_FEATURE_PLOTS = 100
FRONTIER_PLOT = "sae_frontier.png"
BY_LAYER_PLOT = "sae_by_layer.png"


def _figure(width: float, height: float):  # noqa: ANN202 - matplotlib's Figure, imported lazily
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _numeric_columns(frame: pd.DataFrame, exclude: Sequence[str]) -> list[str]:
    return [c for c in frame.columns if c not in exclude and frame[c].dtype.kind in "fiu"]


def write_feature_plots(frame: pd.DataFrame, out_dir: Path, exclude: Sequence[str]) -> list[Path]:
    """Writes `feature_<i>.png` per feature of a steering sweep's table: each numeric column not in `exclude`
    (mean over prompts and seeds) against scale, one line per layer. Returns the files written."""
    metrics = _numeric_columns(frame, exclude)
    if not metrics or frame.empty or not {"feature", "layer", "scale"} <= set(frame.columns):
        return []
    features = sorted(frame["feature"].unique())
    if len(features) > MAX_FEATURE_PLOTS:
        _log.warning("plotting the first %d of %d features", MAX_FEATURE_PLOTS, len(features))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for feature in features[:MAX_FEATURE_PLOTS]:
        means = frame[frame["feature"] == feature].groupby(["layer", "scale"])[metrics].mean().reset_index()
        columns = min(3, len(metrics))
        rows = -(-len(metrics) // columns)
        figure = _figure(4 * columns, 3 * rows)
        for index, metric in enumerate(metrics):
            axes = figure.add_subplot(rows, columns, index + 1)
            for layer, group in means.groupby("layer"):
                axes.plot(group["scale"], group[metric], marker="o", label=f"layer {layer}")
            axes.set_xlabel("scale")
            axes.set_title(metric, fontsize=9)
            axes.legend(fontsize=7)
        figure.suptitle(f"feature {feature}")
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
