"""Gemma2 in Penzai: the architecture from checkpoint shapes, checkpoint sources and loading, the Hugging Face
format, synthetic checkpoints and the tokenizer.

May import: `runner.config` (the model section), `runner.errors`, `runner.files`.
"""
