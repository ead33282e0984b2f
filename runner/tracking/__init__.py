"""MLflow: the sweep's parent run and its child runs (a steering sweep: every point's record on the parent and a run
per steering curve, `curve_runs`; an SAE evaluation: a run per SAE, `point_runs`), the tracking thread with retries
and its spool, plots, the steering report, and what `runner runs` / `runner export` / `runner report` read back.

`store.SweepTracker` opens and closes a sweep; `records` are the point records, `curves` the aggregation over
prompts and seeds, `clients` the MLflow clients (parallel requests to a server, one writer to sqlite), `layout`
the names of tags and artifacts. The driver is the only writer. May import: `runner.plan` (points),
`runner.results`, `runner.stats`, `runner.config`, `runner.errors`, `runner.files`, `runner.redaction`. Never JAX.
"""
