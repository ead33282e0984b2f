"""`runner bench --end-to-end`: the real `runner run` of a sweep against the tutorial's loop over the same points,
tracked in a new sqlite database or by a real `mlflow server` started on loopback."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from runner.bench.tutorial import BenchPoint, tutorial_generate
from runner.model import tokenizer as tokenizer_lib
from runner.model.loading import load_model

#: The sweep `runner bench --end-to-end` runs by default: 256 points on the synthetic small model.
END_TO_END_EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "small_feature_scale_sweep.yaml"
#: Where the benchmark's sweep is tracked: a new sqlite database, or a real `mlflow server` (MLflow's default 4
#: workers, over its own sqlite database and proxied artifacts) on loopback.
TrackingStore = Literal["sqlite", "server"]
TRACKING_STORES: tuple[str, ...] = ("sqlite", "server")


def run_end_to_end(
    *, experiment: Path, cache_dir: Path, tutorial_points: int = 16, compilation_cache: bool = True,
    tracking: TrackingStore = "sqlite", tutorial: bool = True,
) -> dict[str, Any]:
    """Times `runner run` on an experiment in a fresh directory and process (Ray start-up, a new MLflow store and
    its logging included), then, with `tutorial`, the tutorial's loop on the same points, and returns the figures.

    `tracking` is where the sweep is logged: a new `sqlite:///mlflow.db`, or a real `mlflow server` started for the
    run (its start-up is not timed). The logging figures: `mlflow_logging_s` (the tracking thread's work, mostly
    while the workers compute), `mlflow_points_per_s` (finished points over that), and `mlflow_not_overlapped_s`
    (what the sweep waited on MLflow alone) with its share of the sweep.

    The tutorial's loop is timed on every distinct (prompt, layer) of the sweep once (each costs it new XLA
    compilations: `cold`), then on `tutorial_points` points spread over the sweep again (`warm`: everything
    compiled). Over all points it would take `cold + (points - combinations) * warm` seconds (`tutorial_s`), at
    its very best `points * warm` (`tutorial_warm_s`).

    Raises:
      RunnerError: `runner run` failed (its last output lines are in the message).
    """
    import contextlib
    import json
    import os
    import subprocess
    import sys
    import tempfile

    from runner.bench.tracking_server import MlflowServer
    from runner.config.loading import load_experiment
    from runner.errors import RunnerError
    from runner.execution.workers import load_saes
    from runner.plan.prepare import prepare_sweep

    with tempfile.TemporaryDirectory(prefix="runner-bench-") as scratch, contextlib.ExitStack() as stack:
        uri = "sqlite:///mlflow.db"
        if tracking == "server":
            server_dir = Path(scratch) / "server"
            server_dir.mkdir()
            try:
                uri = stack.enter_context(MlflowServer(server_dir, workers=None)).url
            except RuntimeError as error:
                raise RunnerError(f"--tracking server: {error}") from None
        summary_path = Path(scratch) / "summary.json"
        command = [sys.executable, "-m", "runner.cli", "run", str(Path(experiment).resolve()), "--set",
                   f"tracking.uri={uri}", "--cache-dir", str(cache_dir), "--summary-json", str(summary_path)]
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost",
               **({} if compilation_cache else {"RUNNER_COMPILATION_CACHE": "0"})}
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
        command_seconds = time.perf_counter() - started
        if finished.returncode != 0:
            tail = " | ".join((finished.stdout + finished.stderr).strip().splitlines()[-3:])
            raise RunnerError(f"runner run {experiment} failed ({finished.returncode}): {tail}")
        summary = json.loads(summary_path.read_text(encoding="utf-8"))

    figures = {
        "experiment": str(experiment),
        "tracking": tracking,
        "points": summary["points_total"],
        "compilation_cache": compilation_cache,
        "runner_command_s": round(command_seconds, 1),
        "runner_sweep_s": round(summary["seconds"], 1),
        "runner_generated_tokens": summary["generated_tokens"],
        "runner_points_finished": summary["points_finished"],
        "mlflow_logging_s": round(summary["tracking_seconds"], 1),
        "mlflow_points_per_s": round(summary["points_finished"] / max(summary["tracking_seconds"], 1e-9), 1),
        "mlflow_not_overlapped_s": round(summary["tracking_wait_seconds"], 1),
        "mlflow_not_overlapped_share_of_sweep": round(summary["tracking_wait_seconds"] / summary["seconds"], 3),
    }
    if not tutorial:
        return figures

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
        **figures,
        "new_tokens_per_point": new_tokens,
        "tutorial_combinations": len(first_of_combination),
        "tutorial_cold_s": round(cold_seconds, 1),
        "tutorial_warm_s_per_point": round(warm_per_point, 3),
        "tutorial_s": round(tutorial_seconds, 1),
        "tutorial_warm_s": round(tutorial_warm_seconds, 1),
        "speedup": round(tutorial_seconds / command_seconds, 1),
        "speedup_vs_warm_tutorial": round(tutorial_warm_seconds / command_seconds, 1),
    }
