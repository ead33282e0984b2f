"""The steering report: `report.html` on a steering sweep's parent run, and `runner report FILE` locally.

For the chosen features (or the most steerable curves), a grid of generations per curve: the sweep's scales
across, its prompts (and seeds) down, the unsteered generation of the same prompt and seed beside each row, and in
every cell the point's concept rate, NLL and KL. Each curve has its summaries and its Neuronpedia link. One
self-contained HTML file (no scripts, fonts or images from the network), rendered from
`runner/data/report.html.j2` with jinja2, which the MLflow artifact viewer shows as a page.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from runner.errors import ConfigError
from runner.tracking import curves
from runner.tracking.layout import TAG_LOGIT_LENS
from runner.tracking.records import PointRecord

#: Curves in a report when no feature is chosen: the most steerable.
REPORT_TOP = 6
#: Rows of a curve's grid at most (prompts x seeds, in the sweep's order); the rest are counted, not shown.
MAX_ROWS = 24
TEMPLATE = Path(__file__).resolve().parents[1] / "data" / "report.html.j2"
#: The metrics each cell shows, with their labels.
CELL_METRICS = ((curves.CONCEPT_METRIC, "concept"), (curves.NLL_METRIC, "NLL"), (curves.KL_METRIC, "KL"))
_SUMMARY_LABELS = (
    (curves.SCALE_AT_TARGET, f"smallest scale with concept rate >= {curves.CONCEPT_TARGET:g}"),
    (curves.NLL_AT_TARGET, "NLL there"),
    (curves.KL_AT_TARGET, "KL there"),
    (curves.MAX_CONCEPT, "largest concept rate"),
    (curves.SCALE_AT_MAX_CONCEPT, "at scale"),
)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One generation of the grid: its text and the metrics it shows."""

    text: str
    metrics: tuple[tuple[str, str], ...]
    concept_rate: float


@dataclasses.dataclass(frozen=True)
class Row:
    """A prompt and seed: the unsteered generation and one cell per scale (None where the point did not finish)."""

    prompt_index: int
    prompt: str
    seed: int
    baseline: Cell | None
    cells: tuple[Cell | None, ...]


@dataclasses.dataclass(frozen=True)
class Section:
    """One curve of the report."""

    anchor: str
    layer: int
    feature: int
    mode: str
    positions: str
    neuronpedia_url: str | None
    logit_lens_tokens: tuple[str, ...]
    summary: tuple[tuple[str, str], ...]
    scales: tuple[str, ...]
    rows: tuple[Row, ...]
    rows_left_out: int


def write_report(path: Path, records: Iterable[PointRecord], *, sweep_id: str, features: Sequence[int] = (),
                 top: int = REPORT_TOP) -> Path:
    """Writes the report of a steering sweep's finished `records` to `path` (see the module docstring): the curves
    of `features` (at every layer they were steered at), or else the `top` most steerable curves
    (`runner.tracking.curves.rank_curves`). Returns `path`.

    Raises:
      ConfigError: A chosen feature is not steered in the sweep.
    """
    finished = [record for record in records if record.status == "FINISHED"]
    by_curve: dict[str, list[PointRecord]] = {}
    for record in finished:
        by_curve.setdefault(record.curve_key, []).append(record)
    summaries = {key: curves.summarize(curves.scale_means(members)) for key, members in by_curve.items()}
    if features:
        steered = sorted({record.params["feature"] for record in finished})
        missing = [feature for feature in features if feature not in steered]
        if missing:
            raise ConfigError(f"--feature: {missing[0]} is not a feature of this sweep with a finished point "
                              f"(allowed: {', '.join(map(str, steered[:20]))}{', ...' if len(steered) > 20 else ''})")
        chosen = sorted(by_curve, key=lambda key: (list(features).index(by_curve[key][0].params["feature"])
                                                   if by_curve[key][0].params["feature"] in features else math.inf,
                                                   by_curve[key][0].params["layer"]))
        chosen = [key for key in chosen if by_curve[key][0].params["feature"] in features]
        how = f"the chosen feature{'s' if len(features) > 1 else ''} {', '.join(map(str, features))}"
    else:
        chosen = curves.rank_curves(summaries)[:top]
        how = (f"the {len(chosen)} most steerable of {len(by_curve)} curves (smallest scale reaching a mean "
               f"concept rate of {curves.CONCEPT_TARGET:g}, then the largest concept rate)")
    baselines = {(r.params["prompt_index"], r.params["seed"]): r for r in finished
                 if r.params["mode"] == "add" and r.params["scale"] == 0.0}
    sections = [_section(by_curve[key], summaries[key], baselines) for key in chosen]
    import jinja2

    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                                     lstrip_blocks=True)
    template = environment.from_string(TEMPLATE.read_text(encoding="utf-8"))
    first = finished[0].params if finished else {}
    page = template.render(sweep_id=sweep_id, model=first.get("model"), points=len(finished),
                           curves=len(by_curve), how=how, sections=sections, target=f"{curves.CONCEPT_TARGET:g}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _section(records: list[PointRecord], summary: dict[str, float],
             baselines: dict[tuple[int, int], PointRecord]) -> Section:
    first = records[0]
    params = first.params
    is_baseline_scale = params["mode"] == "add"
    scales = sorted({record.params["scale"] for record in records
                     if not (is_baseline_scale and record.params["scale"] == 0.0)}, key=lambda s: (abs(s), s))
    by_row: dict[tuple[int, int], dict[float, PointRecord]] = {}
    prompts: dict[int, str] = {}
    for record in records:
        index, seed = record.params["prompt_index"], record.params["seed"]
        by_row.setdefault((index, seed), {})[record.params["scale"]] = record
        prompts[index] = record.prompt
    keys = sorted(by_row)
    # The curve's own scale-0 point is its baseline (with the feature's metrics there); the unsteered generation
    # of another curve of the sweep is the same text, shown without metrics.
    rows = tuple(
        Row(index, prompts[index], seed,
            _cell(by_row[(index, seed)].get(0.0)) if is_baseline_scale and 0.0 in by_row[(index, seed)]
            else _cell(baselines.get((index, seed)), with_metrics=False),
            tuple(_cell(by_row[(index, seed)].get(scale)) for scale in scales))
        for index, seed in keys[:MAX_ROWS]
    )
    lens = next((record.tags[TAG_LOGIT_LENS] for record in records if TAG_LOGIT_LENS in record.tags), "[]")
    try:
        tokens = tuple(str(token) for token in json.loads(lens))
    except ValueError:
        tokens = ()
    return Section(
        anchor=f"curve-{first.curve_key}", layer=params["layer"], feature=params["feature"], mode=params["mode"],
        positions=params["positions"], neuronpedia_url=first.neuronpedia_url, logit_lens_tokens=tokens,
        summary=tuple((label, _number(summary[name])) for name, label in _SUMMARY_LABELS if name in summary)
        or (("concept rate", "not measured"),),
        scales=tuple(f"{scale:g}" for scale in scales), rows=rows, rows_left_out=max(0, len(keys) - MAX_ROWS),
    )


def _cell(record: PointRecord | None, *, with_metrics: bool = True) -> Cell | None:
    if record is None:
        return None
    shown = tuple((label, _number(record.metrics[name])) for name, label in CELL_METRICS
                  if name in record.metrics and with_metrics)
    rate = record.metrics.get(curves.CONCEPT_METRIC, 0.0)
    return Cell(record.text or "", shown, rate if math.isfinite(rate) else 0.0)


def _number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)
