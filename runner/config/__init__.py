"""The experiment file: its schema, loading (YAML and `--set` overrides), one-line messages and where it may write.

`schema` holds the pydantic models (the `model`, `sae` and `sae_eval.text` sections are unions discriminated by
`source`); `loading.load_experiment` reads a file into a validated, frozen `ExperimentConfig`, which is what every
later stage reads; `messages` turns a validation error into one line; `locations` checks the tracking store a sweep
writes to; `tpu_slices` checks a multi-host TPU slice with Ray's own TPU functions. Pure Python (pydantic, PyYAML):
no JAX or MLflow, and of Ray only its TPU tables, imported by `tpu_slices` for a config that names a slice topology.
May import: `runner.errors`, `runner.gemma_scope` (the Gemma Scope registry: releases, widths, L0 folders).
"""
