"""`runner` on bad input: one clear line on stderr, a non-zero exit, and nothing left RUNNING in MLflow."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from runner.cli import app
from runner.sae.params import random_sae_arrays, write_params_npz


def experiment(tmp_path: Path, model_dir: Path, sae_root: Path, **changes) -> Path:
    """A small valid experiment on the tiny model with a local SAE tree; `changes` patch top-level sections."""
    config = {
        "name": "bad-input",
        "model": {"source": "local", "path": str(model_dir)},
        "sae": {"source": "local", "path": str(sae_root), "width": "16k", "l0": "canonical"},
        "prompts": ["The most iconic structure on Earth is"],
        "steering": {"layers": [1], "features": [3], "scales": [0, 10]},
        "sampling": {"max_new_tokens": 4},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    for section, value in changes.items():
        config[section] = {**config[section], **value} if isinstance(value, dict) else value
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(autouse=True)
def in_the_output_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`runner run` writes only under its working directory: run it where the test's database lives."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture()
def sae_root(tmp_path: Path) -> Path:
    """A local Gemma Scope-style tree with a valid 64-wide SAE for layers 0-3 (labelled width 16k)."""
    for layer in range(4):
        arrays = random_sae_arrays(64, 256, seed=layer)
        arrays["threshold"] = np.full(256, 0.5, np.float32)
        write_params_npz(arrays, tmp_path / "saes" / f"layer_{layer}" / "width_16k" / "average_l0_20" / "params.npz")
    return tmp_path / "saes"


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr


def assert_one_line_error(tmp_path: Path, code: int, stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    database = tmp_path / "mlflow.db"
    if database.exists():
        with sqlite3.connect(database) as connection:
            running = connection.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]
        assert running == 0


def test_unknown_yaml_key(tmp_path, tiny_model_dir, sae_root) -> None:
    path = experiment(tmp_path, tiny_model_dir, sae_root, steering={"colour": "blue"})
    assert_one_line_error(tmp_path, *run_cli("run", str(path)), str(path), "steering.colour")


def test_missing_checkpoint_directory(tmp_path, sae_root) -> None:
    path = experiment(tmp_path, tmp_path / "no-such-model", sae_root)
    assert_one_line_error(tmp_path, *run_cli("run", str(path)), "no-such-model")


def test_malformed_checkpoint_directory(tmp_path, sae_root) -> None:
    broken = tmp_path / "broken-model"
    (broken / "gemma2-2b").mkdir(parents=True)
    (broken / "tokenizer.model").write_bytes(b"")
    (broken / "gemma2-2b" / "_METADATA").write_text("{not json")
    path = experiment(tmp_path, broken, sae_root)
    assert_one_line_error(tmp_path, *run_cli("run", str(path)), "broken-model")


def test_sae_width_mismatch(tmp_path, tiny_model_dir, sae_root) -> None:
    folder = sae_root / "layer_1" / "width_16k" / "average_l0_20"
    write_params_npz(random_sae_arrays(32, 128, seed=0), folder / "params.npz")
    path = experiment(tmp_path, tiny_model_dir, sae_root)
    assert_one_line_error(tmp_path, *run_cli("run", str(path)), "d_in is 32", "width is 64")


def test_feature_index_out_of_range(tmp_path, tiny_model_dir, sae_root) -> None:
    path = experiment(tmp_path, tiny_model_dir, sae_root, steering={"features": [3, 256]})
    assert_one_line_error(tmp_path, *run_cli("run", str(path)), "steering.features", "[256]", "0..255")


def test_layer_out_of_range(tmp_path, tiny_model_dir, sae_root) -> None:
    path = experiment(tmp_path, tiny_model_dir, sae_root, steering={"layers": [4]})
    assert_one_line_error(tmp_path, *run_cli("run", str(path)), "steering.layers", "[4]", "0..3")


def test_non_finite_sae_values(tmp_path, tiny_model_dir, sae_root) -> None:
    file = sae_root / "layer_1" / "width_16k" / "average_l0_20" / "params.npz"
    arrays = dict(np.load(file))
    arrays["W_dec"][5, 5] = np.nan
    write_params_npz(arrays, file)
    path = experiment(tmp_path, tiny_model_dir, sae_root)
    assert_one_line_error(tmp_path, *run_cli("run", str(path)), "W_dec", "non-finite")


def test_npz_with_pickled_objects(tmp_path, tiny_model_dir, sae_root) -> None:
    file = sae_root / "layer_1" / "width_16k" / "average_l0_20" / "params.npz"
    arrays = dict(np.load(file))
    arrays["b_dec"] = np.array([object()], dtype=object)
    np.savez(file, **arrays)
    path = experiment(tmp_path, tiny_model_dir, sae_root)
    assert_one_line_error(tmp_path, *run_cli("run", str(path)), "pickled")


def test_a_tracking_database_outside_the_working_directory(tmp_path, tiny_model_dir, sae_root) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}-outside.db"
    path = experiment(tmp_path, tiny_model_dir, sae_root, tracking={"uri": f"sqlite:///{outside}"})
    assert_one_line_error(tmp_path, *run_cli("run", str(path)), "tracking.uri", "outside the output directory")
    assert not outside.exists()


def test_prompt_longer_than_the_context(tmp_path, tiny_model_dir, sae_root) -> None:
    words = np.random.default_rng(0).choice(["stone", "river", "quietly", "ninety", "x7q"], size=9000)
    path = experiment(tmp_path, tiny_model_dir, sae_root, prompts=["ok", " ".join(words)])
    assert_one_line_error(tmp_path, *run_cli("run", str(path)), "prompts.1", "context of 8192")


def test_validate_prints_the_plan_without_a_model(tmp_path, sae_root) -> None:
    path = experiment(tmp_path, tmp_path / "not-needed", sae_root, steering={"features": [1, 2, 3]})
    result = CliRunner().invoke(app, ["validate", str(path), "--set", "steering.seeds=[0, 1]"])
    assert result.exit_code == 0, result.output
    assert "12 points" in result.stdout


def test_synth_writes_a_model_and_saes_that_a_local_sweep_runs_on(tmp_path, cache_dir) -> None:
    from runner.config.loading import load_experiment
    from runner.driver import run_sweep
    from runner.plan.prepare import prepare_sweep

    result = CliRunner().invoke(app, ["synth", str(tmp_path / "synth"), "--preset", "tiny", "--format", "huggingface"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "synth" / "model" / "tokenizer.model").is_file()
    assert (tmp_path / "synth" / "model-hf" / "config.json").is_file()
    layer_folders = sorted(p.name for p in (tmp_path / "synth" / "saes").iterdir() if p.is_dir())
    assert layer_folders == [f"layer_{i}" for i in range(4)]

    config = {
        "name": "offline",
        "model": {"source": "local", "path": "synth/model"},
        "sae": {"source": "local", "path": "synth/saes", "width": "256", "l0": "canonical"},
        "prompts": ["Once upon a time"],
        "steering": {"layers": [0, 3], "features": [1], "scales": [0, 25]},
        "sampling": {"max_new_tokens": 4},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    (tmp_path / "offline.yaml").write_text(yaml.safe_dump(config))
    sweep_plan = prepare_sweep(load_experiment(tmp_path / "offline.yaml"), cache_dir)
    sae_path = next(f.path for f in sweep_plan.sae_files.values() if f.layer == 3)
    assert (sae_path.parents[2].name, sae_path.parents[1].name, sae_path.name) == ("layer_3", "width_256", "params.npz")
    summary = run_sweep(sweep_plan, cache_dir=cache_dir)
    assert (summary.points_finished, summary.points_failed) == (4, 0)


def test_synth_rejects_an_unknown_preset(tmp_path) -> None:
    code, stderr = run_cli("synth", str(tmp_path / "x"), "--preset", "huge")
    assert code == 2 and stderr.strip() == (
        "error: --preset: 'huge' is not allowed (allowed: tiny, small, gemma2-2b, gemma2-9b, gemma2-27b)"
    )


@pytest.mark.parametrize(("options", "message"), [
    (["--sae-layers", "6,x"], "--sae-layers: '6,x' is not allowed (allowed: comma-separated block indices"),
    (["--sae-layers", "3,26"], "--sae-layers: [26] out of range (allowed: 0..25)"),
    (["--sae-width", "16q"], "--sae-width: '16q' is not allowed"),
    (["--format", "huggingface"], "--format: huggingface is not written for --preset gemma2-2b"),
])
def test_synth_rejects_bad_options_before_writing_anything(tmp_path, options, message) -> None:
    code, stderr = run_cli("synth", str(tmp_path / "x"), "--preset", "gemma2-2b", *options)
    assert code == 2 and stderr.strip().startswith(f"error: {message}")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--utilization", "--preset", "small", "--dtypes", "float16"],
     "--dtypes: ['float16'] not allowed (allowed: float32, bfloat16)"),
    (["--utilization", "--preset", "small", "--batch-sizes", "1,x"], "--batch-sizes: '1,x' is not allowed"),
    (["--utilization", "--preset", "huge"], "--preset: 'huge' is not allowed"),
    (["--memory-table", "--models", "gemma2-2b,gemma2-3b"], "--models: ['gemma2-3b'] not allowed"),
])
def test_bench_rejects_bad_options_in_one_line_before_any_work(tmp_path, options, message) -> None:
    code, stderr = run_cli("bench", "--cache-dir", str(tmp_path / "cache"), *options)
    assert code == 2 and stderr.strip().startswith(f"error: {message}"), stderr
    assert not (tmp_path / "cache").exists()
