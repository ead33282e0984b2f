"""Gemma Scope JumpReLU SAEs: the Penzai layer, the `params.npz` files, where an SAE comes from (Hugging Face,
a local tree, synthetic) and the Gemma Scope registry (`gemma_scope.json`: releases, widths, L0 folders).

May import: `runner.config`, `runner.errors`, `runner.files`, `runner.model` (a synthetic SAE is fitted to a model).
"""
