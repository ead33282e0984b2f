"""MLflow: the sweep's parent and child runs, the tracking thread with retries and its spool, plots, and what
`runner runs` / `runner export` read back.

The driver is the only writer. May import: `runner.plan` (points), `runner.results`, `runner.config`,
`runner.errors`, `runner.files`, `runner.redaction`. Never JAX.
"""
