"""The Penzai layers runner inserts into Gemma2: where SAEs read (`res`, `mlp`, `att` sites), steering sites,
and the layers that capture or replace activations for measurement.

May import: `runner.sae` (the SAE layer), `runner.model.architecture` (types only), Penzai.
"""
