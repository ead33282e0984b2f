"""The `runner` command line: run, validate, synth.

Every user error (bad YAML, missing checkpoint, SAE mismatch, out-of-range index...) is printed as one line on
stderr with a non-zero exit code, before any model is loaded or any MLflow run is created.
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
# MLflow's HTTP client retries a call for minutes before it reports an unreachable server; runner's tracking
# thread does the retrying (tracking.retry_timeout_s), with results kept meanwhile.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

import gc
import logging
import warnings

logging.getLogger("mlflow").setLevel(logging.WARNING)
# Ray starts its processes with fork+exec after JAX is imported; the exec makes JAX's fork warning moot.
warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)

from pathlib import Path  # noqa: E402
from typing import Annotated  # noqa: E402

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


def _fail(error: RunnerError) -> typer.Exit:
    console.print(f"[red]error:[/red] {error}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code=2)


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
    from runner.plan.prepare import outline

    try:
        config = load_experiment(file, set_ or [])
    except RunnerError as error:
        raise _fail(error) from None
    summary = outline(config)
    unit = "generations" if config.kind == "steering" else "SAEs"
    typer.echo(f"{file}: valid")
    typer.echo(
        f"{config.kind} sweep {summary.sweep_id}: {summary.points} points in {summary.jobs} jobs of up to "
        f"{summary.job_size} {unit}, {config.cluster.workers} worker(s) with {config.cluster.resources}"
    )
    tokens = "generated tokens (at most)" if config.kind == "steering" else "evaluated tokens"
    typer.echo(f"  {summary.grid}; {summary.tokens:,} {tokens}")
    held = f", held as {summary.held_dtype} on {config.cluster.jax_platform()}" \
        if summary.held_dtype != summary.dtype else ""
    auto = " (auto: the checkpoint's stored dtype)" if config.model.dtype == "auto" else ""
    typer.echo(f"  model dtype: {summary.dtype}{auto}{held}")
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
) -> None:
    """Run a sweep (steering or SAE evaluation) on Ray workers and log every point to MLflow."""
    import dataclasses
    import json

    from runner.execution.ray_hosts import RayExecutor
    from runner.execution.ray_setup import keep_driver_jax_on_cpu
    from runner.execution.slices import SliceExecutor

    keep_driver_jax_on_cpu()  # before anything imports JAX: the driver must never take a host's accelerator
    from runner.config.loading import load_experiment
    from runner.config.locations import check_write_locations
    from runner.driver import run_sweep
    from runner.plan.prepare import prepare_sweep

    overrides = list(set_ or [])
    if address is not None:
        overrides.append(f"cluster.address={json.dumps(address)}")
    if workers is not None:
        overrides.append(f"cluster.workers={workers}")
    try:
        config = load_experiment(file, overrides)
        check_write_locations(config, Path.cwd(), file)
        sweep_plan = prepare_sweep(config, _cache_dir(cache_dir))
        if resume:
            from runner.tracking.search import sweep_status  # MLflow: otherwise imported while Ray starts

            status = sweep_status(config.tracking.uri, config.tracking.experiment, sweep_plan.sweep_id)
            if status.get("parent_status") is None:
                raise RunnerError(f"{file}: --resume given but sweep {sweep_plan.sweep_id} has no run yet in "
                                  f"{config.tracking.uri}; run without --resume to start it")
        executor_class = SliceExecutor if config.cluster.replica == "slice" else RayExecutor
        executor = executor_class(sweep_plan, _cache_dir(cache_dir), config.cluster)
    except RunnerError as error:
        raise _fail(error) from None

    where = config.cluster.address or "a local Ray"
    console.print(
        f"sweep [bold]{config.name}[/bold] ({sweep_plan.sweep_id}): {len(sweep_plan.points)} points, "
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
            elapsed = bar.tasks[task].elapsed or 1e-9
            bar.update(task, completed=done, total=total, failed=failed, rate=f"{tokens / elapsed:,.0f}")

        try:
            summary = run_sweep(sweep_plan, cache_dir=_cache_dir(cache_dir), executor=executor, progress=progress)
        except RunnerError as error:
            raise _fail(error) from None

    spooled = f" ({summary.points_from_spool} logged from the spool)" if summary.points_from_spool else ""
    typer.echo(
        f"{summary.points_finished} points finished{spooled}, {summary.points_failed} failed, "
        f"{summary.points_skipped} already done; {summary.generated_tokens} tokens in {summary.seconds:.1f}s "
        f"(MLflow logging {summary.tracking_seconds:.1f}s, {summary.tracking_wait_seconds:.1f}s of it not overlapped "
        "with the workers)"
    )
    if summary_json is not None:
        summary_json.write_text(json.dumps(dataclasses.asdict(summary), indent=2) + "\n", encoding="utf-8")
    faults = summary.faults
    if any(faults.values()):
        oom = faults.get("oom_retries", 0)
        typer.echo(
            f"faults: {faults['preemptions']} preemption(s) and {faults['worker_crashes']} worker crash(es) "
            f"(jobs requeued), {faults['job_retries']} job retr{'y' if faults['job_retries'] == 1 else 'ies'} "
            f"after a job's own error, {oom} out-of-memory retr{'y' if oom == 1 else 'ies'} at half the batch"
        )
    typer.echo(f"parent run {summary.parent_run_id} in {config.tracking.uri}")
    typer.echo(f"view: {_runs_page(config.tracking.uri, summary.experiment_id)}")
    if summary.points_failed:
        raise typer.Exit(code=1)


def _runs_page(uri: str, experiment_id: str | None) -> str:
    """How to open the experiment's runs table in the MLflow UI."""
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

    typer.echo(f"sweep {config.name} ({sweep_id}) in {config.tracking.uri}")
    if status["parent_run_id"] is None:
        typer.echo("no runs yet")
        return
    typer.echo(f"parent run {status['parent_run_id']}: {status['parent_status']}")
    children: dict[str, int] = status["children"]
    num_points = status["num_points"] if status["num_points"] is not None else sum(children.values())
    order = ["FINISHED", "FAILED", "KILLED", "RUNNING"]
    statuses = [s for s in order if s in children] + sorted(set(children) - set(order))
    counts = [f"{children[s]} {s}" for s in statuses]
    not_started = max(num_points - sum(children.values()), 0)
    typer.echo(f"{num_points} points: {', '.join([*counts, f'{not_started} not started'])}")
    typer.echo(f"view: {_runs_page(config.tracking.uri, status['experiment_id'])}")


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
    from runner.errors import ConfigError
    from runner.tracking import export as export_lib

    try:
        if file_format not in export_lib.EXPORT_FORMATS:
            raise ConfigError(f"--format: {file_format!r} is not allowed (allowed: csv, parquet)")
        config = load_experiment(file, set_ or [])
        try:
            frame = export_lib.finished_points_frame(config)
        except MlflowException as error:
            raise RunnerError(f"tracking.uri: cannot read {config.tracking.uri}: {error.message}") from None
        path = export_lib.write_frame(frame, out or export_lib.default_export_path(config, file_format), file_format)
    except RunnerError as error:
        raise _fail(error) from None
    typer.echo(f"wrote {len(frame)} rows to {path}")


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

    from runner.bench.end_to_end import END_TO_END_EXPERIMENT, run_end_to_end
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
            figures = run_end_to_end(experiment=experiment or END_TO_END_EXPERIMENT, cache_dir=_cache_dir(cache_dir),
                                     tutorial_points=baseline_points, compilation_cache=compilation_cache)
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
