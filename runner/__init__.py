"""runner: SAE steering and SAE evaluation sweeps on Gemma2 (JAX + Penzai), tracked in MLflow."""

__version__ = "0.1.0"
