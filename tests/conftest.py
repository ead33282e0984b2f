"""Shared fixtures: a synthetic tiny Gemma2 written once per session in the Kaggle layout, and its SAEs.

JAX gets 4 fake CPU devices so sharding can be tested; unsharded code runs on the first one.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import signal
import tempfile

import jax

# Tests of Ctrl-C send SIGINT as a user's terminal does. A shell that starts the suite in the background
# (`nohup ... &` without job control) makes every process ignore SIGINT, Python then installs no KeyboardInterrupt
# handler, and those tests would test nothing: the suite runs as from a terminal. Children inherit the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

jax.config.update("jax_num_cpu_devices", 4)
# Tests build the same programs (the tiny model in a handful of batch shapes) again and again: compile each once
# per session. What a test asserts about compilations counts traces, which the cache does not skip.
_COMPILATION_CACHE = tempfile.TemporaryDirectory(prefix="runner-tests-jax-cache-")  # removed at exit
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.name)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide runner cache directory (synthetic models and SAEs land here)."""
    return tmp_path_factory.mktemp("runner-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir: Path) -> Path:
    """The synthetic `tiny` model (seed 0) in the Kaggle/Flax layout."""
    from runner.model import synthetic

    return synthetic.write_synthetic_model(cache_dir / "tiny-model", "tiny", 0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path, cache_dir: Path):
    """The tiny model loaded through the `local` source, unsharded."""
    from runner.config.schema import LocalModelConfig
    from runner.model.loading import load_model

    return load_model(LocalModelConfig(path=tiny_model_dir), cache_dir=cache_dir)


@pytest.fixture(scope="session")
def tiny_sae_paths(tiny_model, cache_dir: Path) -> dict[int, Path]:
    """Calibrated synthetic SAEs (256 latents, target L0 16) for every layer of the tiny model."""
    from runner.sae.sources import write_synthetic_saes

    layers = range(tiny_model.architecture.num_layers)
    return write_synthetic_saes(tiny_model, layers, cache_dir / "tiny-saes", width=256, target_l0=16, seed=0)


@pytest.fixture(scope="session")
def tiny_saes(tiny_sae_paths: dict[int, Path]):
    """The tiny model's SAEs as Penzai layers, by layer."""
    from runner.sae.params import load_sae

    return {
        layer: load_sae(path, sae_id=f"tiny/{layer}", layer=layer, expected_d_in=64).sae
        for layer, path in tiny_sae_paths.items()
    }
