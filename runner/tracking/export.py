"""A sweep's finished points as a table (one row per FINISHED child run), for `runner export`.

Params, tags and metrics come from one paged run search; the generated text from the sweep's `generations.json`
table when the parent has one, else from each run's `generation.json` artifact.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mlflow import MlflowClient
from mlflow.entities import Run

from runner.config.schema import ExperimentConfig
from runner.errors import RunnerError
from runner.files import atomic_path
from runner.plan import points as plan
from runner.tracking.layout import TABLE_ARTIFACT, TAG_PARENT, TAG_POINT_KEY, TAG_WORKER
from runner.tracking.search import search_all, sweep_status

if TYPE_CHECKING:
    import pandas as pd

ExportFormat = Literal["csv", "parquet"]
EXPORT_FORMATS: tuple[str, ...] = ("csv", "parquet")

#: Params in the order points log them; they lead the table, metrics follow (after the prompt and text of a
#: steering point).
_PARAM_ORDER = {"steering": plan.SteeringPoint.PARAM_NAMES, "sae_eval": plan.SAEEvalPoint.PARAM_NAMES}
_SORT_BY = {"steering": ["prompt_index", "layer", "feature", "scale", "seed"],
            "sae_eval": ["layer", "site", "width", "l0_target"]}


def finished_points_frame(config: ExperimentConfig) -> pd.DataFrame:
    """One row per FINISHED point of the config's sweep: point_key, run_id, params, (steering: prompt, text),
    worker, metrics; sorted like the sweep (steering: prompt, layer, feature, scale, seed; SAE evaluation: layer,
    site, width, l0).

    Raises:
      RunnerError: The sweep has no runs in `config.tracking.uri`.
    """
    import pandas as pd

    uri, sweep_id = config.tracking.uri, plan.sweep_id(config)
    status = sweep_status(uri, config.tracking.experiment, sweep_id)
    if status["parent_run_id"] is None:
        raise RunnerError(f"sweep {sweep_id} of {config.name!r} has no runs in {uri}; run it first")
    client = MlflowClient(tracking_uri=uri)
    runs = search_all(client, status["experiment_id"],
                      f"tags.`{TAG_PARENT}` = '{status['parent_run_id']}' AND attributes.status = 'FINISHED'")
    texts = _texts_from_sweep_table(client, status["parent_run_id"]) if config.kind == "steering" else {}
    with tempfile.TemporaryDirectory(prefix="runner-export-") as tmp:
        rows = [_row(client, run, config, texts, Path(tmp)) for run in runs if TAG_POINT_KEY in run.data.tags]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    sort_by = [c for c in _SORT_BY[config.kind] if c in frame.columns]
    return frame.sort_values(sort_by, kind="stable").reset_index(drop=True)


def write_frame(frame: pd.DataFrame, path: Path, file_format: ExportFormat) -> Path:
    """Writes the table as CSV or Parquet (no index), whole or not at all (`runner.files.atomic_path`); returns
    `path`.

    The CSV is RFC 4180: UTF-8, CRLF between records, every text field quoted (quotes doubled), so that any CSV
    reader reads back every row once and every text byte for byte, whatever it holds (CR, LF, NUL, quotes,
    separators). Numbers are unquoted and written in full precision.
    """
    with atomic_path(Path(path), suffix=f".{file_format}") as temporary:
        if file_format == "csv":
            frame.to_csv(temporary, index=False, encoding="utf-8", lineterminator="\r\n",
                         quoting=csv.QUOTE_NONNUMERIC)
        else:
            frame.to_parquet(temporary, index=False)
    return Path(path)


def default_export_path(config: ExperimentConfig, file_format: ExportFormat) -> Path:
    """`<name>-<sweep id prefix>.<format>` in the working directory."""
    return Path(f"{config.name}-{plan.sweep_id(config)[:8]}.{file_format}")


def parse_param(value: str) -> int | float | str | None:
    """An MLflow param string back to its value: "None" -> None, then int, then float, else the string."""
    if value == "None":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _row(client: MlflowClient, run: Run, config: ExperimentConfig, texts: dict[str, str], tmp: Path) -> dict[str, Any]:
    key = run.data.tags[TAG_POINT_KEY]
    names = _PARAM_ORDER[config.kind]
    params = {name: parse_param(run.data.params[name]) for name in names if name in run.data.params}
    if config.kind == "sae_eval":
        params["l0_target"] = run.data.params.get("l0_target")  # "canonical" or a number, kept as written
        point = {}
    else:
        prompt_index = params.get("prompt_index")
        in_range = isinstance(prompt_index, int) and prompt_index < len(config.prompts)
        text = texts.get(key)
        if text is None:
            path = client.download_artifacts(run.info.run_id, "generation.json", str(tmp))
            text = json.loads(Path(path).read_text(encoding="utf-8"))["text"]
        point = {"prompt": config.prompts[prompt_index] if in_range else None, "text": text}
    return {
        "point_key": key,
        "run_id": run.info.run_id,
        **params,
        **point,
        "worker": run.data.tags.get(TAG_WORKER),
        **dict(sorted(run.data.metrics.items())),
    }


def _texts_from_sweep_table(client: MlflowClient, parent_run_id: str) -> dict[str, str]:
    """point_key -> text from the parent's generations table (empty when the sweep never closed)."""
    import pandas as pd

    if TABLE_ARTIFACT not in {artifact.path for artifact in client.list_artifacts(parent_run_id)}:
        return {}
    with tempfile.TemporaryDirectory(prefix="runner-export-") as tmp:
        table = pd.read_json(client.download_artifacts(parent_run_id, TABLE_ARTIFACT, tmp), orient="split",
                             dtype={"point_key": str, "text": str})
    if not {"point_key", "text"} <= set(table.columns):
        return {}
    return dict(zip(table["point_key"], table["text"], strict=True))

