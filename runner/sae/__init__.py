"""Where SAEs come from and how they are stored: Gemma Scope `params.npz` files (validated reading, atomic
writing, synthetic arrays calibrated to a target L0) and the sources (Hugging Face, a local tree in the Gemma Scope
layout, synthetic SAEs fitted to the loaded model), registered per source class of the config.

May import: `runner.config`, `runner.gemma_scope`, `runner.model`, `runner.nn` (the layer an SAE loads into, and
activation capture for fitting synthetic SAEs), `runner.errors`, `runner.files`.
"""
