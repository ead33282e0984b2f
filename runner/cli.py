"""The `runner` command line: run, validate, synth.

Every user error (bad YAML, missing checkpoint, SAE mismatch, out-of-range index...) is printed as one line on
stderr with a non-zero exit code, before any model is loaded or any MLflow run is created. Exit codes: 0 done,
1 some points failed, 2 an error (bad input, an unreachable store, a sweep another driver runs, a worker that
cannot start), 75 (`EX_TEMPFAIL`) stopped by an outage, resumable by running the same command again,
130 interrupted (Ctrl-C), also resumable.
"""

from __future__ import annotations

import os

# Quiet the TensorFlow that `gemma` imports and MLflow's per-artifact progress bars, and keep Ray from phoning home;
# before those packages load.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's usage telemetry wraps every client call (half the cost of logging a point) and phones home.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow logs at INFO by default (e.g. each time it creates a database's tables); runner prints what matters.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# Ending a run on a tracking server would read the run back and print a link to it (one line per child run).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# MLflow's HTTP client retries a call for minutes before it reports an unreachable server; runner's tracking
# thread does the retrying (tracking.retry_timeout_s), with results kept meanwhile.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

import gc
import logging
import warnings

from runner.redaction import scrub_log_records

# Whatever any library logs (urllib3 retrying a URL, MLflow, Ray) passes through runner's scrubbing of credentials.
scrub_log_records()
logging.getLogger("mlflow").setLevel(logging.WARNING)
# Ray starts its processes with fork+exec after JAX is imported; the exec makes JAX's fork warning moot.
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)

from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: E402

from runner.errors import RunnerError  # noqa: E402

app = typer.Typer(
    name="runner",
    help="SAE steering and SAE evaluation sweeps on Gemma2 (JAX + Penzai), tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ExperimentFile = Annotated[Path, typer.Argument(help="Experiment YAML file.", show_default=False)]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field: --set steering.scales=[0,50] (repeatable).", show_default=False),
]
CacheDir = Annotated[
    Path | None,
    typer.Option(help="Where synthetic models and SAEs are written [default: $RUNNER_CACHE_DIR or ~/.cache/runner]."),
]


#: Exit codes of `runner run` (see the module docstring).
EXIT_POINTS_FAILED = 1
EXIT_ERROR = 2
EXIT_RESUMABLE = 75
EXIT_INTERRUPTED = 130


def _fail(error: RunnerError, code: int = EXIT_ERROR) -> typer.Exit:
    """Prints `error` as one line (credentials removed) and returns the exit to raise."""
    from runner.redaction import scrub

    console.print("[red]error:[/red] ", scrub(" ".join(str(error).splitlines())), sep="", highlight=False,
                  markup=True, soft_wrap=True)
    return typer.Exit(code=code)


def _search_line(row: dict[str, Any]) -> str:
    """One curve's search outcome in words, e.g. `search L1 f5: found scale 156.25 (target metric 0.83
    [0.71, 0.95], n=6), kept scale 400; 5 rounds, 84 generations`."""
    target = ""
    if row["target_mean"] is not None:
        interval = row["target_interval"]
        spread = f" [{interval[0]:.3g}, {interval[1]:.3g}]" if interval is not None else ""
        target = f" (target metric {row['target_mean']:.3g}{spread}, n={row['target_n']})"
    if row["status"] == "found":
        outcome = f"found scale {row['found_scale']:g}{target}"
    elif row["status"] == "bound_violated":
        outcome = f"found scale {row['found_scale']:g}{target}, beyond the bound"
    elif row["status"] == "not_reached":
        best = f"{row['best_scale']:g}" if row["best_scale"] is not None else "none"
        outcome = f"target not reached; best scale tried {best}{target}"
    else:
        outcome = f"inconclusive: more prompts or seeds are needed{target}"
    kept = f", kept scale {row['kept_scale']:g}" if row["kept_scale"] is not None else ""
    return (f"search L{row['layer']} f{row['feature']}: {outcome}{kept}; {row['rounds']} rounds, "
            f"{row['generations']} generations")


def _resume_command(file: Path, overrides: list[str] | None, cache_dir: Path | None, address: str | None,
                    workers: int | None) -> str:
    """The `runner run` command line that resumes this sweep, quoted for a POSIX shell."""
    import shlex

    words = ["runner", "run", str(file)]
    words += [f"--set={override}" for override in overrides or []]
    for option, value in (("--cache-dir", cache_dir), ("--address", address), ("--workers", workers)):
        if value is not None:
            words += [option, str(value)]
    return shlex.join(words)


def _check_preset(preset: str) -> None:
    from runner.errors import ConfigError
    from runner.model import synthetic

    if preset not in synthetic.SYNTHETIC_PRESETS:
        raise ConfigError(f"--preset: {preset!r} is not allowed (allowed: {', '.join(synthetic.SYNTHETIC_PRESETS)})")


def _cache_dir(option: Path | None) -> Path:
    from runner.model.loading import cache_dir_default

    return option if option is not None else cache_dir_default()


@app.command()
def validate(file: ExperimentFile, set_: Overrides = None) -> None:
    """Check an experiment file and print its plan (points, jobs, workers, tokens, memory), without loading a
    model."""
    from runner.config.loading import load_experiment
    from runner.plan.points import check_grid_size

    try:
        config = load_experiment(file, set_ or [])
        check_grid_size(config, source=file)  # a hostile grid is refused before the planner (and JAX) is imported
        from runner.plan.prepare import outline

        summary = outline(config)
    except RunnerError as error:
        raise _fail(error) from None
    unit = "generations" if config.kind == "steering" else "SAEs"
    typer.echo(f"{file}: valid")
    typer.echo(
        f"{config.kind} sweep {summary.sweep_id}: {'round 1: ' if config.search else ''}{summary.points} points in "
        f"{summary.jobs} jobs of up to "
        f"{summary.job_size} {unit}, {config.cluster.workers} worker(s) with {config.cluster.resources}"
    )
    tokens = "generated tokens (at most)" if config.kind == "steering" else "evaluated tokens"
    if config.search is not None:
        tokens = "generated tokens in round 1"
    typer.echo(f"  {summary.grid}; {summary.tokens:,} {tokens}")
    held = f", held as {summary.held_dtype} on {config.cluster.jax_platform()}" \
        if summary.held_dtype != summary.dtype else ""
    auto = " (auto: the checkpoint's stored dtype)" if config.model.dtype == "auto" else ""
    typer.echo(f"  model dtype: {summary.dtype}{auto}{held}")
    if summary.replica is not None:
        typer.echo(f"  each of the {config.cluster.workers} slice replica(s): {summary.replica}")
    if summary.memory_bytes is None:
        typer.echo("  memory per worker: unknown until the checkpoint is read (its architecture is not published)")
    else:
        model_bytes, sae_bytes, batch_bytes = summary.memory_parts
        rows = "generations" if config.kind == "steering" else "sequences"
        typer.echo(
            f"  memory per worker (an estimate, made without weights or compilation): about "
            f"{summary.memory_bytes / 2**30:.1f} GiB (model {model_bytes / 2**30:.1f} GiB, SAEs "
            f"{sae_bytes / 2**30:.2f} GiB, a batch of {summary.batch_rows} {rows} "
            f"{batch_bytes / 2**30:.2f} GiB); each worker chooses its batch from XLA's compiled memory analysis on "
            "its own devices"
        )


@app.command()
def run(
    file: ExperimentFile,
    set_: Overrides = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Require an existing sweep to continue (a plain run also resumes).")
    ] = False,
    cache_dir: CacheDir = None,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join, e.g. 10.0.0.2:6379 or auto [default: cluster.address, else a "
                          "local Ray started for this run].", show_default=False),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker actors, one per host [default: cluster.workers].", show_default=False)
    ] = None,
    summary_json: Annotated[
        Path | None, typer.Option(help="Also write how the sweep ended (counts, timings) to this JSON file.",
                                     show_default=False)
    ] = None,
    take_over: Annotated[
        bool, typer.Option("--take-over", help="Run the sweep even though a tracking server records another "
                                               "driver running it (for a driver that is gone).")
    ] = False,
) -> None:
    """Run a sweep (steering or SAE evaluation) on Ray workers and log every point to MLflow."""
    import dataclasses
    import json

    from runner.config.loading import load_experiment
    from runner.config.locations import check_output_dir, check_output_file, check_write_locations
    from runner.plan import points as plan
    from runner.redaction import redact_uri

    overrides = list(set_ or [])
    if address is not None:
        overrides.append(f"cluster.address={json.dumps(address)}")
    if workers is not None:
        overrides.append(f"cluster.workers={workers}")
    try:
        # The preflight: everything that can be refused is refused here, before a store, a model or Ray is touched.
        config = load_experiment(file, overrides)
        check_write_locations(config, Path.cwd(), file)
        plan.check_grid_size(config, source=file)
        from runner.execution.ray_setup import check_ray_address_reachable, keep_driver_jax_on_cpu

        keep_driver_jax_on_cpu()  # before anything imports JAX: the driver must never take a host's accelerator
        if config.cluster.address:
            check_ray_address_reachable(config.cluster.address)
        cache = check_output_dir(_cache_dir(cache_dir), "--cache-dir")
        check_output_dir(Path.cwd() / ".runner" / "spool", "the spool directory (.runner/spool)")
        if summary_json is not None:
            check_output_file(summary_json, "--summary-json")
        from runner.tracking.lease import local_store_path

        store = local_store_path(config.tracking.uri)
        if store is not None:  # the store's directory holds it and its lease
            check_output_dir(store.absolute().parent, "tracking.uri")
    except RunnerError as error:
        raise _fail(error) from None

    from runner.driver import claim_sweep, run_sweep
    from runner.errors import TrackingUnavailable
    from runner.execution.ray_hosts import RayExecutor
    from runner.execution.ray_setup import LocalRayDied
    from runner.execution.slices import SliceExecutor
    from runner.plan.prepare import prepare_sweep

    uri = redact_uri(config.tracking.uri)
    resume_command = _resume_command(file, set_, cache_dir, address, workers)
    try:
        with console.status(f"reaching {uri}", spinner="dots") as reaching:
            def waiting(failure: str, pause: float) -> None:
                reaching.update(f"{uri} unreachable ({failure}); trying again in {pause:.0f} s, for up to "
                                f"{config.tracking.retry_timeout_s:g} s (tracking.retry_timeout_s)")

            lease = claim_sweep(config, plan.sweep_id(config), take_over=take_over, on_retry=waiting)
    except RunnerError as error:
        raise _fail(error) from None
    except KeyboardInterrupt:
        console.print("interrupted before the sweep started: nothing was run or logged", highlight=False)
        raise typer.Exit(code=EXIT_INTERRUPTED) from None
    progressed = {"done": 0}
    try:
        try:
            sweep_plan = prepare_sweep(config, cache)
            if resume:
                from runner.tracking.search import sweep_status

                state = sweep_status(config.tracking.uri, config.tracking.experiment, sweep_plan.sweep_id,
                                     count_points=False)
                if state.get("parent_status") is None:
                    raise RunnerError(f"{file}: --resume given but sweep {sweep_plan.sweep_id} has no run yet in "
                                      f"{uri}; run without --resume to start it")
            executor_class = SliceExecutor if config.cluster.replica == "slice" else RayExecutor
            executor = executor_class(sweep_plan, cache, config.cluster)
        except RunnerError as error:
            raise _fail(error) from None
        except KeyboardInterrupt:
            console.print("interrupted before the sweep started: nothing was run or logged", highlight=False)
            raise typer.Exit(code=EXIT_INTERRUPTED) from None

        where = config.cluster.address or "a local Ray"
        size = (f"{len(sweep_plan.points)} points" if sweep_plan.search is None else
                f"a scale search of up to {sweep_plan.search.max_rounds} rounds, {len(sweep_plan.points)} points in "
                "round 1")
        console.print(
            f"sweep [bold]{config.name}[/bold] ({sweep_plan.sweep_id}): {size}, "
            f"{len(sweep_plan.jobs)} jobs of up to {sweep_plan.batch_size}, {config.cluster.workers} worker(s) on "
            f"{where}", highlight=False,
        )
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} tok/s  failed {task.fields[failed]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as bar:
            task = bar.add_task("points", total=None, rate="-", failed=0)

            def progress(done: int, total: int, failed: int, tokens: int) -> None:
                progressed["done"] = done
                elapsed = bar.tasks[task].elapsed or 1e-9
                bar.update(task, completed=done, total=total, failed=failed, rate=f"{tokens / elapsed:,.0f}")

            def search_round(number: int, points: int, to_run: int) -> None:
                done = f"{points - to_run} already done" if to_run < points else "all to run"
                bar.console.print(f"search round {number}: {points} points ({done})", highlight=False)

            try:
                summary = run_sweep(sweep_plan, cache_dir=cache, executor=executor, progress=progress, lease=lease,
                                    on_round=search_round)
            except LocalRayDied as error:
                raise _fail(RunnerError(f"{error}; run `{resume_command}` to resume (finished points are "
                                        "skipped)"), EXIT_RESUMABLE) from None
            except TrackingUnavailable as error:  # the store went away during the sweep: results are spooled
                raise _fail(RunnerError(f"{error} (`{resume_command}`)"), EXIT_RESUMABLE) from None
            except RunnerError as error:
                raise _fail(error) from None
            except KeyboardInterrupt:
                bar.stop()
                console.print(
                    f"interrupted: the points that were running and the sweep's parent run are marked KILLED, the "
                    f"{progressed['done']} points logged are kept; run `{resume_command}` to resume (finished "
                    "points are skipped)", highlight=False, soft_wrap=True,
                )
                raise typer.Exit(code=EXIT_INTERRUPTED) from None
    finally:
        lease.release()

    spooled = f" ({summary.points_from_spool} logged from the spool)" if summary.points_from_spool else ""
    typer.echo(
        f"{summary.points_finished} points finished{spooled}, {summary.points_failed} failed, "
        f"{summary.points_skipped} already done; {summary.generated_tokens} tokens in {summary.seconds:.1f}s "
        f"(MLflow logging {summary.tracking_seconds:.1f}s, {summary.tracking_wait_seconds:.1f}s of it not overlapped "
        "with the workers)"
    )
    for row in summary.search:
        typer.echo(_search_line(row))
    if summary_json is not None:
        from runner.files import write_text_atomically

        write_text_atomically(summary_json, json.dumps(dataclasses.asdict(summary), indent=2) + "\n")
    faults = summary.faults
    if any(faults.values()):
        oom = faults.get("oom_retries", 0)
        typer.echo(
            f"faults: {faults['preemptions']} preemption(s) and {faults['worker_crashes']} worker crash(es) "
            f"(jobs requeued), {faults['job_retries']} job retr{'y' if faults['job_retries'] == 1 else 'ies'} "
            f"after a job's own error, {oom} out-of-memory retr{'y' if oom == 1 else 'ies'} at half the batch"
        )
    if faults.get("slice_wait_s"):
        typer.echo(f"slice replicas waited {faults['slice_wait_s']} s in all for a slice after losing theirs")
    typer.echo(f"parent run {summary.parent_run_id} in {uri}")
    typer.echo(f"view: {_runs_page(config.tracking.uri, summary.experiment_id)}")
    if summary.points_failed:
        raise typer.Exit(code=EXIT_POINTS_FAILED)


def _runs_page(uri: str, experiment_id: str | None) -> str:
    """How to open the experiment's runs table in the MLflow UI (the URI's credentials removed)."""
    from runner.redaction import redact_uri

    uri = redact_uri(uri)
    page = f"#/experiments/{experiment_id}/runs"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}  then open http://127.0.0.1:5000/{page}"


@app.command()
def runs(file: ExperimentFile, set_: Overrides = None) -> None:
    """Show a sweep's state in MLflow: its parent run's status and its points by status."""
    from mlflow.exceptions import MlflowException

    from runner.config.loading import load_experiment
    from runner.plan import points as plan
    from runner.tracking.search import sweep_status

    try:
        config = load_experiment(file, set_ or [])
        sweep_id = plan.sweep_id(config)
        try:
            status = sweep_status(config.tracking.uri, config.tracking.experiment, sweep_id)
        except MlflowException as error:
            raise RunnerError(f"tracking.uri: cannot read {config.tracking.uri}: {error.message}") from None
    except RunnerError as error:
        raise _fail(error) from None

    from runner.redaction import redact_uri

    typer.echo(f"sweep {config.name} ({sweep_id}) in {redact_uri(config.tracking.uri)}")
    if status["parent_run_id"] is None:
        typer.echo("no runs yet")
        return
    typer.echo(f"parent run {status['parent_run_id']}: {status['parent_status']}")
    points: dict[str, int] = status["points"]
    num_points = status["num_points"] if status["num_points"] is not None else sum(points.values())
    not_started = max(num_points - sum(points.values()), 0)
    typer.echo(f"{num_points} points: {', '.join([*_by_status(points), f'{not_started} not started'])}")
    if status["kind"] == "steering":
        curves = status["children"]
        typer.echo(f"{sum(curves.values())} curve runs: {', '.join(_by_status(curves)) or 'none yet'}")
    typer.echo(f"view: {_runs_page(config.tracking.uri, status['experiment_id'])}")


def _by_status(counts: dict[str, int]) -> list[str]:
    """`["3 FINISHED", "1 FAILED"]`: counts by MLflow status, finished first."""
    order = ["FINISHED", "FAILED", "KILLED", "RUNNING"]
    return [f"{counts[s]} {s}" for s in [s for s in order if s in counts] + sorted(set(counts) - set(order))]


@app.command()
def export(
    file: ExperimentFile,
    file_format: Annotated[str, typer.Option("--format", help="csv or parquet.", show_default=False)],
    set_: Overrides = None,
    out: Annotated[
        Path | None, typer.Option(help="Output file [default: <name>-<sweep id>.<format>].", show_default=False)
    ] = None,
) -> None:
    """Write one row per FINISHED point (point_key, params, prompt, text, metrics) to a CSV or Parquet file."""
    from mlflow.exceptions import MlflowException

    from runner.config.loading import load_experiment
    from runner.config.locations import check_output_file
    from runner.errors import ConfigError
    from runner.tracking import export as export_lib

    try:
        if file_format not in export_lib.EXPORT_FORMATS:
            raise ConfigError(f"--format: {file_format!r} is not allowed (allowed: csv, parquet)")
        config = load_experiment(file, set_ or [])
        default = export_lib.default_export_path(config, file_format)
        target = out if out is not None else default
        if target.is_dir():  # like cp: a directory receives the file under its default name
            target = target / default.name
        check_output_file(target, "--out")
        try:
            frame = export_lib.finished_points_frame(config)
        except MlflowException as error:
            raise RunnerError(f"tracking.uri: cannot read {config.tracking.uri}: {error.message}") from None
        path = export_lib.write_frame(frame, target, file_format)
    except RunnerError as error:
        raise _fail(error) from None
    typer.echo(f"wrote {len(frame)} rows to {path}")


@app.command()
def report(
    file: ExperimentFile,
    set_: Overrides = None,
    feature: Annotated[
        list[int] | None,
        typer.Option("--feature", help="A feature to show (repeatable) [default: the most steerable curves].",
                     show_default=False),
    ] = None,
    top: Annotated[int, typer.Option(help="Curves shown when no --feature is given.")] = 6,
    out: Annotated[
        Path | None, typer.Option(help="Output file [default: <name>-<sweep id>-report.html].", show_default=False)
    ] = None,
) -> None:
    """Write a steering sweep's report (per feature: generations at each scale and prompt beside the unsteered
    ones, with their metrics) to a self-contained HTML file."""
    from mlflow.exceptions import MlflowException

    from runner.config.loading import load_experiment
    from runner.errors import ConfigError
    from runner.plan import points as plan
    from runner.tracking.report import write_report
    from runner.tracking.search import sweep_parent, sweep_records

    try:
        config = load_experiment(file, set_ or [])
        if config.kind != "steering":
            raise ConfigError(f"{file}: an SAE evaluation sweep has no steering report (its plots and "
                              "sae_metrics.json are on its parent run)")
        if top < 1:
            raise ConfigError(f"--top: {top} is not allowed (allowed: >= 1)")
        sweep_id = plan.sweep_id(config)
        path = out or Path(f"{config.name}-{sweep_id[:8]}-report.html")
        if path.is_dir():
            raise ConfigError(f"--out: {path} is a directory (allowed: a file path)")
        try:
            parent = sweep_parent(config.tracking.uri, config.tracking.experiment, sweep_id)
            if parent is None:
                raise RunnerError(f"sweep {sweep_id} of {config.name!r} has no runs in {config.tracking.uri}; "
                                  "run it first")
            records = sweep_records(config.tracking.uri, parent).values()
        except MlflowException as error:
            raise RunnerError(f"tracking.uri: cannot read {config.tracking.uri}: {error.message}") from None
        written = write_report(path, records, sweep_id=sweep_id, features=feature or (), top=top)
    except RunnerError as error:
        raise _fail(error) from None
    typer.echo(f"wrote {written}")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write into (created).", show_default=False)],
    preset: Annotated[str, typer.Option(help="Synthetic model preset: tiny, small, or the published Gemma2 shapes "
                                             "gemma2-2b, gemma2-9b, gemma2-27b.")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    model_format: Annotated[
        str, typer.Option("--format", help="Checkpoint layout: kaggle (orbax) or huggingface (safetensors; tiny and "
                                           "small only).")
    ] = "kaggle",
    target_l0: Annotated[float | None, typer.Option(
        help="Mean L0 the synthetic SAEs are calibrated to [default: 16; 64 for the gemma2 presets].",
        show_default=False)] = None,
    sae_layers: Annotated[str | None, typer.Option(
        help="Comma-separated layers to write SAEs for [default: every layer; gemma2-2b 6,12,20, gemma2-9b 9,20,31, "
             "gemma2-27b 10,22,34].", show_default=False)] = None,
    sae_width: Annotated[str | None, typer.Option(
        help="SAE width label: a Gemma Scope width (16k, 65k, ...) or a latent count [default: 4 x d_model; 16k for "
             "the gemma2 presets].", show_default=False)] = None,
) -> None:
    """Write a synthetic Gemma2 model and SAEs in the Gemma Scope layout, for offline pipelines (`source: local`)."""
    try:
        spec = _synth_spec(preset, model_format, sae_layers, sae_width)
        paths = write_synthetic_bundle(out_dir, preset, seed, model_format,
                                       target_l0 if target_l0 is not None else (64.0 if spec[1] else 16.0),
                                       layers=spec[0], width_label=spec[1])
    except RunnerError as error:
        raise _fail(error) from None
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


def _synth_spec(preset: str, model_format: str, sae_layers: str | None,
                sae_width: str | None) -> tuple[list[int] | None, str | None]:
    """Checks `runner synth`'s options (one line per mistake); returns the SAE layers and width label asked for
    (None: the preset's)."""
    from runner.errors import ConfigError
    from runner.model import synthetic

    _check_preset(preset)
    spec = synthetic.PRESETS[preset]
    if model_format not in ("kaggle", "huggingface"):
        raise ConfigError(f"--format: {model_format!r} is not allowed (allowed: kaggle, huggingface)")
    if model_format == "huggingface" and spec.architecture.vocab_size > synthetic.SYNTHETIC_PRESETS["small"].vocab_size:
        raise ConfigError(f"--format: huggingface is not written for --preset {preset} (allowed: kaggle; huggingface "
                          "for tiny and small)")
    layers = None
    if sae_layers is not None:
        try:
            layers = sorted({int(layer) for layer in sae_layers.split(",")})
        except ValueError:
            raise ConfigError(f"--sae-layers: {sae_layers!r} is not allowed (allowed: comma-separated block "
                              "indices, e.g. 6,12,20)") from None
        bad = [layer for layer in layers if not 0 <= layer < spec.architecture.num_layers]
        if bad:
            raise ConfigError(f"--sae-layers: {bad} out of range (allowed: 0..{spec.architecture.num_layers - 1})")
    width = sae_width if sae_width is not None else spec.sae_width
    if width is not None:
        import pydantic

        from runner.config.schema import WidthLabel

        try:
            pydantic.TypeAdapter(WidthLabel).validate_python(width)
        except pydantic.ValidationError:
            raise ConfigError(f"--sae-width: {width!r} is not allowed (allowed: 16k, 32k, 65k, 131k, 262k, 524k, 1m, "
                              "or a latent count)") from None
    return layers, width


def write_synthetic_bundle(
    out_dir: Path, preset: str, seed: int, model_format: str, target_l0: float, *,
    layers: list[int] | None = None, width_label: str | None = None,
) -> dict:
    """Writes `out_dir/model` (Kaggle layout), optionally `out_dir/model-hf`, and `out_dir/saes`: an SAE for every
    layer of `layers` (default: the preset's `sae_layers`) at `width_label` (default: the preset's, else 4 x the
    model width), in the Gemma Scope layout."""
    from runner.config.schema import LocalModelConfig
    from runner.model import hf_format, synthetic
    from runner.model.loading import load_model
    from runner.sae.sources import width_latents, write_synthetic_saes

    spec = synthetic.PRESETS[preset]
    model_dir = synthetic.write_synthetic_model(out_dir / "model", preset, seed)
    paths = {"model": model_dir}
    loaded = load_model(LocalModelConfig(path=model_dir), cache_dir=out_dir)
    if model_format == "huggingface":
        flat = synthetic.synthetic_flat_params(spec.architecture, seed, spec.dtype)
        hf_dir = hf_format.write_hf_checkpoint(flat, loaded.architecture, out_dir / "model-hf")
        (hf_dir / "tokenizer.model").write_bytes((model_dir / "tokenizer.model").read_bytes())
        paths["model-hf"] = hf_dir
    label = width_label or spec.sae_width or str(4 * loaded.architecture.embedding_dim)
    write_synthetic_saes(
        loaded, layers if layers is not None else spec.sae_layers, out_dir / "saes", width=width_latents(label),
        target_l0=target_l0, seed=seed, width_label=label,
    )
    paths["saes"] = out_dir / "saes"
    paths["sae width"] = label
    return paths


@app.command()
def bench(
    preset: Annotated[str, typer.Option(help="Synthetic model preset: tiny, small, gemma2-2b, gemma2-9b or "
                                             "gemma2-27b (the gemma2 presets: --utilization).")] = "small",
    points: Annotated[int, typer.Option(help="Steering points to generate.")] = 64,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per point.")] = 32,
    batch_size: Annotated[int | None, typer.Option(help="Rows per batch [default: min(64, points)].")] = None,
    baseline_points: Annotated[int, typer.Option(help="Points the tutorial loop is timed on.")] = 8,
    cache_dir: CacheDir = None,
    end_to_end: Annotated[
        bool, typer.Option("--end-to-end", help="Time `runner run` on --experiment (Ray and MLflow included) "
                                                "against the tutorial's loop over the same points.")
    ] = False,
    experiment: Annotated[
        Path | None, typer.Option(help="The sweep of --end-to-end [default: "
                                          "experiments/small_feature_scale_sweep.yaml].", show_default=False)
    ] = None,
    compilation_cache: Annotated[
        bool, typer.Option(help="Let the --end-to-end workers reuse compiled programs from earlier runs.")
    ] = True,
    tracking: Annotated[
        str, typer.Option(help="Where --end-to-end logs: sqlite (a new database) or server (a real `mlflow "
                               "server` started on loopback).")
    ] = "sqlite",
    tutorial: Annotated[
        bool, typer.Option(help="Also time the tutorial's loop on the --end-to-end sweep's points.")
    ] = True,
    utilization: Annotated[
        bool, typer.Option("--utilization", help="Tokens/s, compiled memory, peak memory and utilization of the "
                                                 "sampler per dtype and batch size (implied by the gemma2 presets).")
    ] = False,
    dtypes: Annotated[str, typer.Option(help="--utilization: comma-separated dtypes.")] = "float32,bfloat16",
    batch_sizes: Annotated[str, typer.Option(help="--utilization: comma-separated batch sizes.")] = "1,8,32",
    model_dir: Annotated[
        Path | None, typer.Option(help="--utilization: the preset's model as `runner synth` wrote it (OUT_DIR/model) "
                                       "[default: written to the cache directory].", show_default=False)
    ] = None,
    memory_table: Annotated[
        bool, typer.Option("--memory-table", help="The batch and memory the planner picks for Gemma2 2B/9B/27B on "
                                                  "v5e-8, v6e-8, H100-80GB and a 24 GB CPU host, from compiled "
                                                  "memory analyses with abstract weights.")
    ] = False,
    models: Annotated[str, typer.Option(help="--memory-table: comma-separated Gemma2 presets.")] = (
        "gemma2-2b,gemma2-9b,gemma2-27b"
    ),
) -> None:
    """Benchmark runner; prints one JSON line.

    Without options: the batched sampler against the Gemma Scope tutorial's loop on --points synthetic points.
    --end-to-end: the whole `runner run` of a sweep in a fresh directory and process, against the tutorial's loop
    on the same points. --utilization: the sampler per dtype and batch size, with the machine's measured matmul
    rate and memory bandwidth. --memory-table: computed, not measured, batches and memory for real sizes.
    """
    import json

    from runner.bench.end_to_end import END_TO_END_EXPERIMENT, TRACKING_STORES, run_end_to_end
    from runner.bench.sampler import run_benchmark
    from runner.errors import ConfigError

    if memory_table:
        from runner.bench.memory_table import run_memory_table

        try:
            typer.echo(json.dumps(run_memory_table(tuple(model.strip() for model in models.split(",")))))
        except RunnerError as error:
            raise _fail(error) from None
        return
    if utilization or preset.startswith("gemma2-"):
        from runner.bench.utilization import run_utilization

        try:
            _check_preset(preset)
            dtype_list = [dtype.strip() for dtype in dtypes.split(",")]
            bad = [dtype for dtype in dtype_list if dtype not in ("float32", "bfloat16")]
            if bad:
                raise ConfigError(f"--dtypes: {bad} not allowed (allowed: float32, bfloat16)")
            try:
                sizes = [int(size) for size in batch_sizes.split(",")]
            except ValueError:
                raise ConfigError(f"--batch-sizes: {batch_sizes!r} is not allowed (allowed: comma-separated "
                                  "integers >= 1)") from None
            if any(size < 1 for size in sizes) or new_tokens < 1:
                raise ConfigError("--batch-sizes and --new-tokens must be >= 1")
            figures = run_utilization(preset=preset, cache_dir=_cache_dir(cache_dir), dtypes=dtype_list,
                                      batch_sizes=sizes, new_tokens=new_tokens, model_dir=model_dir)
        except RunnerError as error:
            raise _fail(error) from None
        typer.echo(json.dumps(figures))
        return

    if end_to_end:
        try:
            if tracking not in TRACKING_STORES:
                raise ConfigError(f"--tracking: {tracking!r} is not allowed (allowed: {', '.join(TRACKING_STORES)})")
            figures = run_end_to_end(experiment=experiment or END_TO_END_EXPERIMENT, cache_dir=_cache_dir(cache_dir),
                                     tutorial_points=baseline_points, compilation_cache=compilation_cache,
                                     tracking=tracking, tutorial=tutorial)
        except RunnerError as error:
            raise _fail(error) from None
        typer.echo(json.dumps(figures))
        return
    try:
        _check_preset(preset)
        checked = [("--points", points), ("--new-tokens", new_tokens), ("--baseline-points", baseline_points)]
        for name, value in checked + ([("--batch-size", batch_size)] if batch_size is not None else []):
            if value < 1:
                raise ConfigError(f"{name}: {value} is not allowed (allowed: >= 1)")
    except RunnerError as error:
        raise _fail(error) from None
    figures = run_benchmark(
        preset=preset,
        points=points,
        new_tokens=new_tokens,
        batch_size=batch_size,
        baseline_points=baseline_points,
        cache_dir=_cache_dir(cache_dir),
    )
    typer.echo(json.dumps(figures))


def main() -> None:
    """Entry point of the `runner` console script."""
    try:
        app()
    finally:
        # The process ends here. Its last garbage collection would walk the whole heap JAX, Ray and MLflow built
        # (over a second after a sweep) to free memory the exit frees anyway.
        gc.freeze()


if __name__ == "__main__":
    main()
