"""`runner` on bad input: one clear line on stderr, a non-zero exit, and nothing left RUNNING in MLflow."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from typer.testing import CliRunner

from runner.cli import app
from runner.sae.params import random_sae_arrays, write_params_npz
from tests.mlflow_server import free_port, kill_process_group


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


def test_validate_prints_a_v5e_16_slices_hosts_and_refuses_a_topology_v5e_lacks(tmp_path) -> None:
    slice_experiment = str(Path(__file__).parent.parent / "experiments" / "gemma2_27b_v5e16_slice.yaml")
    result = CliRunner().invoke(app, ["validate", slice_experiment])
    assert result.exit_code == 0, result.output
    assert "v5e 4x4 slice (v5litepod-16): 4 hosts x 4 chips" in result.stdout
    assert "reserved as 4 bundles of {'CPU': 0, 'TPU': 4, 'tpu-v5e-16': 1}" in result.stdout

    code, stderr = run_cli("validate", slice_experiment, "--set", "cluster.slice_topology=2x2x2")
    assert_one_line_error(tmp_path, code, stderr, "cluster.slice_topology: '2x2x2' is not a v5e topology",
                          "(allowed for v5e: 2x4, 2x8, 4x4, 4x8, 8x8, 8x16, 16x16)")


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


# ---------------------------------------------------------------------------------------------------------------
# Hostile input: refused in one line, in bounded time and memory


#: Runs a command and reports its exit code, stderr, wall and CPU seconds and peak memory. A small launcher: a
#: child's peak memory (`ru_maxrss`) starts from its parent's at the fork, which for pytest is gigabytes.
LAUNCHER = (
    "import json, resource, subprocess, sys, time; started = time.monotonic(); "
    "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(json.dumps([done.returncode, done.stderr, time.monotonic() - started, "
    "usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024]))"
)


def validate_in_a_subprocess(path: Path) -> tuple[int, str, float, float, int]:
    """`runner validate` as a new process: exit code, stderr, wall and CPU seconds, peak memory (bytes)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    launched = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "runner.cli", "validate",
                               str(path)], env=env, capture_output=True, text=True, check=True, timeout=120)
    code, stderr, wall_s, cpu_s, peak_bytes = json.loads(launched.stdout)
    return code, stderr, wall_s, cpu_s, peak_bytes


def test_an_alias_bomb_and_a_ten_million_point_grid_are_refused_within_2_seconds_and_200_mb(tmp_path) -> None:
    from tests.config.test_loading import BILLION_LAUGHS

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "huge", "model": {"source": "synthetic"}, "sae": {"source": "synthetic"},
        "prompts": [f"prompt {i}" for i in range(10)],
        "steering": {"layers": list(range(10)), "features": list(range(100)), "scales": list(range(100)),
                     "seeds": list(range(10))},
    }))
    for path, needle in ((bomb, "aliases expand this value to more than 1,000,000 values"),
                         (grid, "is 10,000,000 points (allowed: at most 1,000,000;")):
        code, stderr, wall_s, cpu_s, peak_bytes = validate_in_a_subprocess(path)
        assert code == 2 and stderr.count("\n") == 1 and stderr.startswith(f"error: {path}: "), stderr
        assert needle in stderr
        # The whole command (interpreter start-up and imports included): CPU seconds, which a busy machine does
        # not inflate; the wall clock only guards against a refusal that grows without bound.
        assert cpu_s < 2.0 and wall_s < 20.0, (path.name, cpu_s, wall_s)
        assert peak_bytes < 200 * 2**20, (path.name, peak_bytes)


def test_a_duplicated_key_is_refused_with_its_line(tmp_path, tiny_model_dir, sae_root) -> None:
    path = experiment(tmp_path, tiny_model_dir, sae_root)
    path.write_text(path.read_text() + "name: second-name\n")
    assert_one_line_error(tmp_path, *run_cli("run", str(path)), "duplicate key 'name'", "(first at line")


def test_a_garbage_tokenizer_is_one_line_before_anything_starts(tmp_path, tiny_model_dir, sae_root) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "tokenizer.model").write_bytes(os.urandom(3000))
    path = experiment(tmp_path, broken, sae_root)
    assert_one_line_error(tmp_path, *run_cli("run", str(path)), "tokenizer.model is not a sentencepiece model")
    assert not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------------------------------------------
# The preflight: an output path that cannot be written stops `runner` before anything starts


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--cache-dir", "/proc/runner-cannot-write-here", "--cache-dir: cannot write to the directory"),
        ("--summary-json", "/proc/runner-cannot-write-here/summary.json", "--summary-json: cannot write to the"),
        ("--summary-json", ".", "--summary-json: '.' is a directory (allowed: a file path)"),
    ],
)
def test_an_output_path_that_cannot_be_written_is_refused_first(tmp_path, tiny_model_dir, sae_root, option, value,
                                                                needle) -> None:
    path = experiment(tmp_path, tiny_model_dir, sae_root)
    assert_one_line_error(tmp_path, *run_cli("run", str(path), option, value), needle)
    assert not (tmp_path / "mlflow.db").exists(), "nothing was opened"


def test_an_unreachable_tracking_server_is_one_line_before_ray_starts_and_keeps_its_token(
    tmp_path, tiny_model_dir, sae_root, monkeypatch
) -> None:
    import ray

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}/mlflow?token=s3cr3t-t0k3n"
    path = experiment(tmp_path, tiny_model_dir, sae_root, tracking={"uri": uri, "retry_timeout_s": 2})
    result = CliRunner().invoke(app, ["run", str(path)])
    assert_one_line_error(tmp_path, result.exit_code, result.stderr, "tracking.uri: http://127.0.0.1:",
                          "/mlflow?token=*** unreachable for", "(tracking.retry_timeout_s=2)")
    assert result.exit_code == 2 and "s3cr3t" not in result.output
    assert not ray.is_initialized(), "Ray was not started"


def test_runs_and_export_of_a_sweep_never_run_create_no_store(tmp_path, sae_root) -> None:
    path = experiment(tmp_path, tmp_path / "not-needed", sae_root)
    result = CliRunner().invoke(app, ["runs", str(path)])
    assert result.exit_code == 0 and "no runs yet" in result.stdout
    assert_one_line_error(tmp_path, *run_cli("export", str(path), "--format", "csv"), "has no runs", "run it first")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture()
def finished_sweep(tmp_path, tiny_model_dir, sae_root, cache_dir) -> Path:
    """The experiment file of a 2-point sweep run to its end (in this process)."""
    from runner.config.loading import load_experiment
    from runner.driver import run_sweep
    from runner.plan.prepare import prepare_sweep

    path = experiment(tmp_path, tiny_model_dir, sae_root)
    summary = run_sweep(prepare_sweep(load_experiment(path), cache_dir), cache_dir=cache_dir)
    assert summary.points_finished == 2
    return path


def test_export_into_a_directory_writes_the_file_there_under_its_default_name(finished_sweep, tmp_path) -> None:
    (tmp_path / "exports").mkdir()
    result = CliRunner().invoke(app, ["export", str(finished_sweep), "--format", "csv", "--out", "exports"])
    assert result.exit_code == 0, result.output
    (written,) = (tmp_path / "exports").iterdir()
    assert written.name.startswith("bad-input-") and written.suffix == ".csv"
    assert f"wrote 2 rows to {written.relative_to(tmp_path)}" in result.stdout
    code, stderr = run_cli("export", str(finished_sweep), "--format", "csv", "--out", "/proc/nope/x.csv")
    assert_one_line_error(tmp_path, code, stderr, "--out: cannot write to the directory '/proc/nope'")


# ---------------------------------------------------------------------------------------------------------------
# Faults of a real `runner run` (a new process, a local Ray): one line, the right exit code, no point failed or
# left RUNNING for what was not a point's fault


def start_runner(path: Path, cache_dir: Path) -> subprocess.Popen:
    env = {**{key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"},
           "PYTHONPATH": str(Path(__file__).parents[1]), "JAX_COMPILATION_CACHE_DIR": str(cache_dir / "jax-cache")}
    return subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(path), "--cache-dir", str(cache_dir)],
                            cwd=path.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        return process.communicate(timeout=300)
    finally:
        process.kill()
        kill_process_group(process.pid)
        process.wait()


def runs_by_status(database: Path) -> dict[tuple[str, str], int]:
    """(role, status) -> runs, straight from the sqlite file."""
    with sqlite3.connect(database, timeout=30) as connection:
        rows = connection.execute("select t.value, r.status, count(*) from runs r join tags t on t.run_uuid = "
                                  "r.run_uuid where t.key = 'runner.role' group by t.value, r.status").fetchall()
    return {(role, status): count for role, status, count in rows}


def point_records_by_status(directory: Path) -> dict[str, int]:
    """Status -> points, from the point records the sweep logged on its parent run (a local store's artifacts)."""
    from runner.tracking.records import read_batches

    paths = sorted(directory.glob("mlruns/*/*/artifacts/points/*.json"))
    try:
        records = read_batches(paths)
    except (OSError, ValueError):  # a file being written
        return {}
    counts: dict[str, int] = {}
    for record in records.values():
        counts[record.status] = counts.get(record.status, 0) + 1
    return counts


def points_finished(database: Path) -> int:
    return point_records_by_status(database.parent).get("FINISHED", 0)


def wait_for_points(process: subprocess.Popen, database: Path, count: int) -> None:
    deadline = time.monotonic() + 240
    while points_finished(database) < count:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no point finished in time"
        time.sleep(0.2)


#: Lines Ray forwards from a worker process (`(HostWorker pid=N) ...`, coloured or not).
RAY_WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\((HostWorker|SliceHostWorker|raylet)[^)]*\)")


def error_lines(stderr: str) -> list[str]:
    # runner's own output holds no traceback. What Ray forwards from a worker it is killing (at times the
    # interpreter's shutdown noise, `RuntimeError: Event loop is closed` from uvloop) is Ray's, not runner's.
    own = "\n".join(line for line in stderr.splitlines() if not RAY_WORKER_LINE.match(line))
    assert "Traceback" not in own, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_truncated_checkpoint_ends_the_sweep_with_orbaxs_cause_in_one_line_and_fails_no_point(
    tmp_path, tiny_model_dir, sae_root, cache_dir
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    data = max((path for path in broken.rglob("*") if path.is_file()), key=lambda path: path.stat().st_size)
    os.truncate(data, data.stat().st_size // 2)
    _, stderr = finish(process := start_runner(experiment(tmp_path, broken, sae_root), cache_dir))
    assert process.returncode == 2, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert " cannot load the model checkpoint: OUT_OF_RANGE: Error reading " in line
    assert stderr.count("OUT_OF_RANGE") == 1, f"shown once: {stderr[-3000:]}"
    assert runs_by_status(tmp_path / "mlflow.db") == {("sweep", "FAILED"): 1}, f"no point run, none RUNNING: {stderr}"


def test_a_dead_local_ray_node_stops_the_sweep_resumably_with_the_command_to_resume(
    tmp_path, tiny_model_dir, sae_root, cache_dir
) -> None:
    features = list(range(1, 41))  # 80 points of a batch of 1: the sweep is still going when its raylet dies
    path = experiment(tmp_path, tiny_model_dir, sae_root, steering={"features": features},
                      sampling={"batch_size": 1})
    process = start_runner(path, cache_dir)
    wait_for_points(process, tmp_path / "mlflow.db", 2)
    raylet = next(child for child in psutil.Process(process.pid).children(recursive=True) if child.name() == "raylet")
    raylet.kill()
    _, stderr = finish(process)
    assert process.returncode == 75, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert line.startswith(f"error: the local Ray node died: its raylet (pid {raylet.pid}) is gone (killed, ")
    assert f"run `runner run {path} --cache-dir {cache_dir}` to resume (finished points are skipped)" in line
    left = int(line.split("; ")[1].split(" of the sweep's points")[0])
    assert point_records_by_status(tmp_path) == {"FINISHED": 2 * len(features) - left} and left > 0, \
        "no point FAILED"
    counts = runs_by_status(tmp_path / "mlflow.db")
    assert set(counts) <= {("curve", "FINISHED"), ("sweep", "FAILED")}, "no run RUNNING"
    assert counts[("sweep", "FAILED")] == 1


def test_ctrl_c_says_how_to_resume_and_leaves_nothing_running(tmp_path, tiny_model_dir, sae_root, cache_dir) -> None:
    path = experiment(tmp_path, tiny_model_dir, sae_root, steering={"features": list(range(1, 41))},
                      sampling={"batch_size": 1})
    process = start_runner(path, cache_dir)
    wait_for_points(process, tmp_path / "mlflow.db", 1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = finish(process)
    assert process.returncode == 130, stderr[-3000:]
    assert error_lines(stderr) == []
    assert f"run `runner run {path} --cache-dir {cache_dir}` to resume (finished points are skipped)" in stderr
    counts = runs_by_status(tmp_path / "mlflow.db")
    assert ("curve", "RUNNING") not in counts and ("sweep", "RUNNING") not in counts
    assert counts[("sweep", "KILLED")] == 1 and point_records_by_status(tmp_path).get("FINISHED", 0) >= 1
