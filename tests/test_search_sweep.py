"""An adaptive scale search end to end on the tiny model: a constructed feature whose firing rate rises through 0.5
at a known scale, found in rounds with fewer generations than a grid; a target out of reach; a killed search
resumed from its last finished round."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from penzai import pz

from runner.config.loading import load_experiment
from runner.driver import SEARCH_ROUND_TAG, run_sweep
from runner.model import tokenizer as tokenizer_lib
from runner.nn import measurement
from runner.plan.points import sweep_id
from runner.plan.prepare import prepare_sweep
from runner.plan.search import SearchSettings, uniform_grid_generations
from runner.sae.params import read_params_npz, write_params_npz
from runner.tracking.search import sweep_parent, sweep_records
from tests.mlflow_server import kill_process_group

LAYER, FEATURE, CROSSING = 1, 5, 154.0
PROMPTS = ["The most iconic structure on Earth is", "Once upon a time", "My favourite food is"]
METRIC = "steer/feature_firing_rate"


@pytest.fixture(scope="module")
def constructed_sae(tiny_sae_paths, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The layer-1 SAE with feature 5 rebuilt so that it reads exactly the direction it steers, offset by the
    crossing: its pre-activation on the steered stream is `h . d + scale - 154`, so it fires at a position once
    the scale passes `154 - h . d` (and a threshold of 1e-3)."""
    arrays = read_params_npz(tiny_sae_paths[LAYER])
    direction = np.random.default_rng(1).standard_normal(arrays["W_dec"].shape[1])
    direction /= np.linalg.norm(direction)
    arrays["W_dec"][FEATURE] = direction
    arrays["W_enc"][:, FEATURE] = direction
    arrays["b_enc"][FEATURE] = -CROSSING
    arrays["threshold"][FEATURE] = 1e-3
    path = tmp_path_factory.mktemp("constructed-sae") / "params.npz"
    write_params_npz(arrays, path)
    return path, direction.astype(np.float32)


def write_search(tmp_path: Path, sae_path: Path, *, high: float = 400, max_growth: int = 4, batch_size: int = 32,
                 name: str = "search-test") -> Path:
    config = {
        "name": name,
        "model": {"source": "synthetic", "preset": "tiny"},
        "sae": {"source": "local", "path": str(sae_path)},
        "prompts": PROMPTS,
        "steering": {"layers": [LAYER], "features": [FEATURE], "seeds": [0, 1]},
        "search": {"target": {"metric": METRIC, "at_least": 0.5}, "scales": {"low": 0, "high": high},
                   "tolerance": 5, "max_rounds": 8, "max_growth": max_growth},
        "sampling": {"max_new_tokens": 8, "temperature": 0.8, "batch_size": batch_size},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def records_of(config) -> dict:
    parent = sweep_parent(config.tracking.uri, config.tracking.experiment, sweep_id(config))
    return sweep_records(config.tracking.uri, parent)


def spread_of(tiny_model, records, direction: np.ndarray) -> float:
    """The largest |h . d| the feature's reading saw: over every generation's prompt and tokens, the unsteered
    stream after block 1 (steering adds after it, so the stream there depends only on the tokens). One pass over
    all of them, right-padded (a causal model's earlier positions do not see the padding)."""
    sequences = [tokenizer_lib.encode_prompt(tiny_model.tokenizer, record.prompt) + list(record.token_ids)
                 for record in records.values()]
    length = max(map(len, sequences))
    padded = np.zeros((len(sequences), length), np.int32)
    for row, ids in enumerate(sequences):
        padded[row, : len(ids)] = ids
    tokens = pz.nx.wrap(jnp.asarray(padded)).tag("batch", "seq")
    _, captured = measurement.capture(tiny_model.model, tokens, [(LAYER, "res")])
    stream = np.asarray(captured[(LAYER, "res")].unwrap("batch", "seq", "embedding"))
    real = np.arange(length)[None, :] < np.array([len(ids) for ids in sequences])[:, None]
    return float(np.abs(stream @ direction)[real].max())


@pytest.fixture(scope="module")
def found_search(constructed_sae, tmp_path_factory, cache_dir):
    tmp_path = tmp_path_factory.mktemp("search")
    config = load_experiment(write_search(tmp_path, constructed_sae[0]))
    plan = prepare_sweep(config, cache_dir)
    rounds = []
    summary = run_sweep(plan, cache_dir=cache_dir, on_round=lambda *args: rounds.append(args))
    return config, plan, summary, rounds


def test_the_search_finds_the_constructed_crossing_with_fewer_generations_than_a_grid(
        found_search, constructed_sae, tiny_model) -> None:
    config, plan, summary, rounds = found_search
    (row,) = summary.search
    records = records_of(config)
    spread = spread_of(tiny_model, records, constructed_sae[1])
    samples = len(PROMPTS) * 2
    grid = uniform_grid_generations(SearchSettings.from_config(config.search), samples)
    print(f"search: {row['generations']} generations in {row['rounds']} rounds, found scale {row['found_scale']} "
          f"(crossing {CROSSING} +- {spread:.2f}); a uniform grid of spacing 5 over [0, 400]: {grid} generations")
    assert row["status"] == "found"
    # Below 154 - spread the feature fires nowhere, above 154 + spread everywhere; the interval must clear 0.5
    # somewhere in between, and the search stops within `tolerance` of the largest scale that does not.
    assert CROSSING - spread <= row["found_scale"] <= CROSSING + spread + config.search.tolerance
    assert row["target_interval"][0] >= 0.5 and row["target_n"] == samples
    assert row["generations"] < grid and row["rounds"] <= config.search.max_rounds
    assert [number for number, _, _ in rounds] == list(range(1, row["rounds"] + 1))
    assert summary.points_total == len(records) == sum(points for _, points, _ in rounds)
    assert {record.status for record in records.values()} == {"FINISHED"}


def test_each_evaluation_is_a_point_tagged_with_its_round_and_the_curve_carries_the_summary(found_search) -> None:
    config, plan, summary, rounds = found_search
    records = records_of(config)
    by_round = collections.Counter(int(record.tags[SEARCH_ROUND_TAG]) for record in records.values())
    assert by_round == {number: points for number, points, _ in rounds}
    assert all(METRIC in record.metrics for record in records.values())

    from mlflow import MlflowClient

    client = MlflowClient(config.tracking.uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    (curve,) = client.search_runs([experiment.experiment_id], "tags.`runner.role` = 'curve'")
    (row,) = summary.search
    assert curve.data.tags["search/status"] == "found"
    assert curve.data.metrics["search/found_scale"] == row["found_scale"]
    assert curve.data.metrics["search/rounds"] == row["rounds"]
    assert curve.data.metrics["search/generations"] == row["generations"]
    assert curve.data.metrics["search/target_low"] >= 0.5 and curve.data.metrics["search/target_n"] == 6
    # Each scale's mean on the curve run comes with its interval over the 6 prompts x seeds.
    history = {name: {m.step: m.value for m in client.get_metric_history(curve.info.run_id, name)}
               for name in ("steer/nll", "steer/nll_ci_low", "steer/nll_ci_high", "steer/samples")}
    assert set(history["steer/nll"]) == set(history["steer/nll_ci_low"]) == set(history["steer/samples"])
    for step, mean in history["steer/nll"].items():
        assert history["steer/nll_ci_low"][step] <= mean <= history["steer/nll_ci_high"][step]
        assert history["steer/samples"][step] == 6


def test_a_target_no_scale_reaches_ends_not_reached_with_the_best_scale_tried(constructed_sae, tmp_path,
                                                                             cache_dir) -> None:
    config = load_experiment(write_search(tmp_path, constructed_sae[0], high=40, max_growth=1, name="unreached"))
    summary = run_sweep(prepare_sweep(config, cache_dir), cache_dir=cache_dir)
    (row,) = summary.search
    print(f"not reached after {row['rounds']} rounds; best scale tried {row['best_scale']}")
    assert row["status"] == "not_reached" and row["found_scale"] is None
    assert row["rounds"] <= config.search.max_rounds
    tried = {float(record.params["scale"]) for record in records_of(config).values()}
    assert max(tried) == 80.0, "the upper end doubled once (max_growth: 1) while the target was out of reach"
    assert row["best_scale"] in tried


def test_a_search_killed_in_round_3_resumes_from_round_3_and_runs_every_point_once(constructed_sae, tmp_path,
                                                                                   cache_dir) -> None:
    path = write_search(tmp_path, constructed_sae[0], batch_size=2, name="killed-search")
    config = load_experiment(path)
    command = [sys.executable, "-m", "runner.cli", "run", str(path), "--cache-dir", str(cache_dir)]
    env = {**{key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"},
           "JAX_COMPILATION_CACHE_DIR": str(cache_dir / "jax-cache")}  # the rerun reuses the first run's programs
    log_path = tmp_path / "first-run.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            logged_at_round_3 = None
            while True:  # kill -9 once round 3 has logged a job (rounds 1 and 2: 15 + 9 jobs of 2 generations)
                started = "search round 3:" in log_path.read_text()
                logged = len(list(tmp_path.glob("mlruns/*/*/artifacts/points/*.json")))
                if started and logged_at_round_3 is None:
                    logged_at_round_3 = logged
                if logged_at_round_3 is not None and logged > logged_at_round_3:
                    break
                assert driver.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "the search did not reach round 3"
                time.sleep(0.01)
            driver.send_signal(signal.SIGKILL)
            driver.wait()
        finally:
            driver.kill()
            kill_process_group(driver.pid)  # the local Ray it started

    before = records_of(config)
    rounds_before = collections.Counter(int(record.tags[SEARCH_ROUND_TAG]) for record in before.values())
    assert set(rounds_before) == {1, 2, 3}, f"killed during round 3: {rounds_before}"
    assert 0 < rounds_before[3] < 18, f"killed during round 3: {rounds_before}"
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout + again.stderr  # the round lines come with the progress bar, on stderr
    assert "search round 1: " in out and "search round 2: " in out
    for number in (1, 2):  # replayed from the logged points, nothing run again
        line = next(line for line in out.splitlines() if line.startswith(f"search round {number}: "))
        points = int(line.split(": ")[1].split(" points")[0])
        assert f"({points} already done)" in line, line
    round_3 = next(line for line in out.splitlines() if line.startswith("search round 3: "))
    assert round_3 == f"search round 3: 18 points ({rounds_before[3]} already done)", "it goes on from round 3"

    after = records_of(config)
    assert set(before) <= set(after) and all(after[key] == before[key] for key in before), \
        "the points logged before the kill are kept, not run again"
    finished_line = next(line for line in out.splitlines() if " points finished" in line)
    assert finished_line.startswith(f"{len(after) - len(before)} points finished, 0 failed, {len(before)} already done")
    assert {record.status for record in after.values()} == {"FINISHED"}
    assert "search L1 f5: found scale" in out
