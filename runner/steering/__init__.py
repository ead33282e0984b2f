"""Steering a batch: the jitted sampler (prefill and decode with a steering point per batch row) and the
judge-free steering metrics computed after it.

May import: `runner.nn`, `runner.model`, `runner.lm_stats`, `runner.program_cache`.
"""
