"""`runner bench --end-to-end`: the real `runner run` of a sweep against the tutorial's loop over the same points."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from runner.bench.tutorial import BenchPoint, tutorial_generate
from runner.model import tokenizer as tokenizer_lib
from runner.model.loading import load_model

#: The sweep `runner bench --end-to-end` runs by default: 256 points on the synthetic small model.
END_TO_END_EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "small_feature_scale_sweep.yaml"


def run_end_to_end(
    *, experiment: Path, cache_dir: Path, tutorial_points: int = 16, compilation_cache: bool = True
) -> dict[str, Any]:
    """Times `runner run` on an experiment in a fresh directory and process (Ray start-up, a new MLflow database
    and its logging included), then the tutorial's loop on the same points, and returns the figures.

    The tutorial's loop is timed on every distinct (prompt, layer) of the sweep once (each costs it new XLA
    compilations: `cold`), then on `tutorial_points` points spread over the sweep again (`warm`: everything
    compiled). Over all points it would take `cold + (points - combinations) * warm` seconds (`tutorial_s`), at
    its very best `points * warm` (`tutorial_warm_s`).

    Raises:
      RunnerError: `runner run` failed (its last output lines are in the message).
    """
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from runner.config.loading import load_experiment
    from runner.errors import RunnerError
    from runner.execution.workers import load_saes
    from runner.plan.prepare import prepare_sweep

    with tempfile.TemporaryDirectory(prefix="runner-bench-") as scratch:
        summary_path = Path(scratch) / "summary.json"
        command = [sys.executable, "-m", "runner.cli", "run", str(Path(experiment).resolve()), "--set",
                   "tracking.uri=sqlite:///mlflow.db", "--cache-dir", str(cache_dir), "--summary-json",
                   str(summary_path)]
        env = {**os.environ, **({} if compilation_cache else {"RUNNER_COMPILATION_CACHE": "0"})}
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
        command_seconds = time.perf_counter() - started
        if finished.returncode != 0:
            tail = " | ".join((finished.stdout + finished.stderr).strip().splitlines()[-3:])
            raise RunnerError(f"runner run {experiment} failed ({finished.returncode}): {tail}")
        summary = json.loads(summary_path.read_text(encoding="utf-8"))

    config = load_experiment(Path(experiment))
    sweep_plan = prepare_sweep(config, cache_dir)
    loaded = load_model(config.model, cache_dir=cache_dir)
    saes = {sae.layer: sae.sae for sae in load_saes(loaded, config, sweep_plan.sae_files.values(), cache_dir).values()}
    new_tokens = config.sampling.max_new_tokens
    points = [
        BenchPoint(tuple(tokenizer_lib.encode_prompt(loaded.tokenizer, p.prompt)), p.layer, p.feature, p.scale, p.seed)
        for p in sweep_plan.points
    ]
    first_of_combination = {}
    for point in points:
        first_of_combination.setdefault((point.tokens, point.layer), point)
    started = time.perf_counter()
    for point in first_of_combination.values():
        tutorial_generate(loaded, saes, point, new_tokens, config.sampling.temperature)
    cold_seconds = time.perf_counter() - started
    sample = points[:: max(1, len(points) // tutorial_points)][:tutorial_points]
    started = time.perf_counter()
    for point in sample:
        tutorial_generate(loaded, saes, point, new_tokens, config.sampling.temperature)
    warm_per_point = (time.perf_counter() - started) / len(sample)
    tutorial_seconds = cold_seconds + (len(points) - len(first_of_combination)) * warm_per_point
    tutorial_warm_seconds = len(points) * warm_per_point
    return {
        "experiment": str(experiment),
        "points": len(points),
        "new_tokens_per_point": new_tokens,
        "compilation_cache": compilation_cache,
        "runner_command_s": round(command_seconds, 1),
        "runner_sweep_s": round(summary["seconds"], 1),
        "runner_generated_tokens": summary["generated_tokens"],
        "runner_points_finished": summary["points_finished"],
        "mlflow_logging_s": round(summary["tracking_seconds"], 1),
        "mlflow_not_overlapped_s": round(summary["tracking_wait_seconds"], 1),
        "mlflow_not_overlapped_share_of_sweep": round(summary["tracking_wait_seconds"] / summary["seconds"], 3),
        "tutorial_combinations": len(first_of_combination),
        "tutorial_cold_s": round(cold_seconds, 1),
        "tutorial_warm_s_per_point": round(warm_per_point, 3),
        "tutorial_s": round(tutorial_seconds, 1),
        "tutorial_warm_s": round(tutorial_warm_seconds, 1),
        "speedup": round(tutorial_seconds / command_seconds, 1),
        "speedup_vs_warm_tutorial": round(tutorial_warm_seconds / command_seconds, 1),
    }
