"""Measuring SAEs on a text set: the evaluation text (bundled, files, Hugging Face datasets), the forward passes
with the reconstruction spliced in or the site ablated, and the sparsity, fidelity and density metrics.

May import: `runner.nn`, `runner.model`, `runner.lm_stats`, `runner.config`, `runner.results`.
"""
