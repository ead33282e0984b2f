"""The experiment file: its schema, loading (YAML and `--set` overrides) and one-line messages.

Data flows from here: a validated, frozen `ExperimentConfig` is what every later stage reads. Pure Python (pydantic,
PyYAML): no JAX, Ray or MLflow. May import: `runner.errors`, `runner.sae.gemma_scope` (release names and widths).
"""
