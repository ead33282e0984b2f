"""The only planner: config -> checked points -> jobs, with the memory a batch needs.

`prepare.plan_sweep` builds a sweep's plan from what is known (`facts`): everything, resolved, for `runner run`
(`prepare_sweep`, which also refuses what cannot run: checkpoint layout, SAE files, ranges, prompt lengths,
before anything runs), or what is known without a download for `runner validate` (`outline`). `points` is the
pure expansion and packing, `memory` the estimates, `search` the scale search's rounds (pure: a function of the
samples recorded, so a resumed driver replays them). No model weights are loaded here.
May import: `runner.stats`, `runner.config`, `runner.model` (architecture, checkpoint metadata, tokenizer),
`runner.sae` (files), `runner.nn.sites` (site widths), `runner.sae_eval.text_sets`, `runner.steering` (its
batch-shape buckets), `runner.errors`.
"""
