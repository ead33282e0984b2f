"""The only planner: config -> checked points -> jobs, with the memory a batch needs.

`prepare` resolves and checks everything a sweep needs (checkpoint layout, SAE files, ranges, prompt lengths)
before anything runs; `points` is the pure expansion and packing. No model weights are loaded here.
May import: `runner.config`, `runner.model` (architecture, checkpoint metadata, tokenizer), `runner.sae` (files),
`runner.sae_eval.text_sets`, `runner.errors`.
"""
