"""The names of a sweep's MLflow layout: the tags that tie parent and child runs together and the artifacts the
runs carry. `runner runs`, `runner export` and `runner report` read back what the tracker writes under these names.

A steering sweep: the parent run holds every point's record (`points/<batch>.json`, one file per logged job) and
one child run per steering curve (one layer, feature, mode and positions across the sweep's scales, aggregated
over prompts and seeds). An SAE evaluation sweep: one child run per SAE.
"""

from __future__ import annotations

TAG_PARENT = "mlflow.parentRunId"
TAG_SWEEP_ID = "sweep_id"
TAG_POINT_KEY = "point_key"
TAG_CURVE_KEY = "curve_key"
#: "sweep" (the parent), "curve" (a steering curve's child run) or "point" (an SAE's child run).
TAG_ROLE = "runner.role"
#: On the parent: the sweep's kind, "steering" or "sae_eval" (which layout its children follow).
TAG_KIND = "runner.kind"
TAG_WORKER = "runner.worker"
TAG_ATTEMPT = "runner.attempt"
TAG_ERROR = "runner.error"
#: On a curve run: a digest of the point records it summarises; a run whose digest differs is stale.
TAG_CURVE_DIGEST = "runner.curve_digest"
TAG_NEURONPEDIA = "neuronpedia_url"
TAG_LOGIT_LENS = "logit_lens_tokens"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
TAG_LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"

CONFIG_ARTIFACT = "config/experiment.yaml"
#: The parent's folder of point records: one JSON file per logged batch of a steering sweep.
POINTS_DIR = "points"
#: The parent's table of a steering sweep: one row per finished point, as Parquet (`mlflow.load_table` reads it;
#: the UI's table view, which stalls on thousands of JSON rows, does not show it).
TABLE_ARTIFACT = "generations.parquet"
#: The parent's table of an SAE evaluation: one row per SAE.
SAE_TABLE_ARTIFACT = "sae_metrics.json"
#: The parent's table of a steering sweep's curves (one row per curve: its summary metrics and run id).
CURVES_TABLE_ARTIFACT = "curves.json"
#: A curve run's table of its points (params, metrics, text, token ids).
CURVE_POINTS_ARTIFACT = "points.json"
REPORT_ARTIFACT = "report.html"
PLOTS_DIR = "plots"
