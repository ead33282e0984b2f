"""Running jobs: the workers that hold a model and its SAEs, and the executors that feed them (this process,
one Ray actor per host, or a gang of actors per multi-host slice), with failures classified into fault types
and one policy acting on them.

May import: `runner.plan`, `runner.steering`, `runner.sae_eval`, `runner.model`, `runner.sae`, `runner.results`,
`runner.program_cache`, `runner.config`, `runner.errors`, `runner.files`, `runner.redaction`. Never
`runner.tracking`: workers do not
log.
"""
