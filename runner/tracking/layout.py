"""The names of a sweep's MLflow layout: the tags that tie parent and child runs together and the artifacts the
parent run carries. `runner runs` and `runner export` read back what the tracker writes under these names."""

from __future__ import annotations

TAG_PARENT = "mlflow.parentRunId"
TAG_SWEEP_ID = "sweep_id"
TAG_POINT_KEY = "point_key"
TAG_ROLE = "runner.role"
TAG_WORKER = "runner.worker"
TAG_ATTEMPT = "runner.attempt"
TAG_ERROR = "runner.error"
TAG_NEURONPEDIA = "neuronpedia_url"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
TAG_LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"

CONFIG_ARTIFACT = "config/experiment.yaml"
#: The parent run's table of a steering sweep (one row per point) and of an SAE evaluation sweep (one per SAE).
TABLE_ARTIFACT = "generations.json"
SAE_TABLE_ARTIFACT = "sae_metrics.json"
PLOTS_DIR = "plots"
