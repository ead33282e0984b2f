"""The Penzai layers runner defines: the JumpReLU SAE, where SAEs read Gemma2 (`res`, `mlp`, `att` sites),
steering sites, and the layers that capture or replace activations for measurement.

May import: `runner.model.architecture` (types only), Penzai, JAX.
"""
