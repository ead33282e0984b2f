"""The experiment file: its schema, loading (YAML and `--set` overrides), one-line messages and where it may write.

`schema` holds the pydantic models (the `model`, `sae` and `sae_eval.text` sections are unions discriminated by
`source`); `loading.load_experiment` reads a file into a validated, frozen `ExperimentConfig`, which is what every
later stage reads; `messages` turns a validation error into one line; `locations` checks the tracking store a sweep
writes to. Pure Python (pydantic, PyYAML): no JAX, Ray or MLflow. May import: `runner.errors`,
`runner.gemma_scope` (the Gemma Scope registry: releases, widths, L0 folders).
"""
