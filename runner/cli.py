"""The `runner` command line: run, validate, synth.

Every user error (bad YAML, missing checkpoint, SAE mismatch, out-of-range index...) is printed as one line on
stderr with a non-zero exit code, before any model is loaded or any MLflow run is created.
"""

from __future__ import annotations

import os

# Quiet the TensorFlow that `gemma` imports, and keep Ray from phoning home; before those packages load.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path  # noqa: E402
from typing import Annotated, Optional  # noqa: E402

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
    Optional[list[str]],
    typer.Option("--set", help="Override a field: --set steering.scales=[0,50] (repeatable).", show_default=False),
]
CacheDir = Annotated[
    Optional[Path],
    typer.Option(help="Where synthetic models and SAEs are written [default: $RUNNER_CACHE_DIR or ~/.cache/runner]."),
]


def _fail(error: RunnerError) -> typer.Exit:
    console.print(f"[red]error:[/red] {error}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code=2)


def _cache_dir(option: Path | None) -> Path:
    from runner.model import cache_dir_default

    return option if option is not None else cache_dir_default()


@app.command()
def validate(file: ExperimentFile, set_: Overrides = None) -> None:
    """Check an experiment file and print its plan, without loading a model."""
    from runner import plan
    from runner.config import load_experiment

    try:
        config = load_experiment(file, set_ or [])
    except RunnerError as error:
        raise _fail(error) from None
    steering = config.steering
    points = len(config.prompts) * len(steering.layers) * len(steering.features) * len(steering.scales)
    points *= len(steering.seeds)
    batch = config.sampling.batch_size
    batch_size = min(64, points) if batch == "auto" else batch
    jobs = -(-points // batch_size)
    typer.echo(f"{file}: valid")
    typer.echo(f"sweep {plan.sweep_id(config)}: {points} points in {jobs} jobs of up to {batch_size}")
    typer.echo(
        f"  {len(config.prompts)} prompts x {len(steering.layers)} layers x {len(steering.features)} features x "
        f"{len(steering.scales)} scales x {len(steering.seeds)} seeds; "
        f"up to {points * config.sampling.max_new_tokens} generated tokens"
    )


@app.command()
def run(
    file: ExperimentFile,
    set_: Overrides = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Require an existing sweep to continue (a plain run also resumes).")
    ] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Run a steering sweep and log every point to MLflow."""
    from runner.config import load_experiment
    from runner.sweep import prepare_sweep, run_sweep
    from runner.tracking import sweep_status

    try:
        config = load_experiment(file, set_ or [])
        sweep_plan = prepare_sweep(config, _cache_dir(cache_dir))
        if resume:
            status = sweep_status(config.tracking.uri, config.tracking.experiment, sweep_plan.sweep_id)
            if status.get("parent_status") is None:
                raise RunnerError(f"{file}: --resume given but sweep {sweep_plan.sweep_id} has no run yet in "
                                  f"{config.tracking.uri}; run without --resume to start it")
    except RunnerError as error:
        raise _fail(error) from None

    console.print(
        f"sweep [bold]{config.name}[/bold] ({sweep_plan.sweep_id}): {len(sweep_plan.points)} points, "
        f"{len(sweep_plan.jobs)} jobs of up to {sweep_plan.batch_size}", highlight=False,
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
            summary = run_sweep(sweep_plan, cache_dir=_cache_dir(cache_dir), progress=progress)
        except RunnerError as error:
            raise _fail(error) from None

    typer.echo(
        f"{summary.points_finished} points finished, {summary.points_failed} failed, "
        f"{summary.points_skipped} already done; {summary.generated_tokens} tokens in {summary.seconds:.1f}s"
    )
    typer.echo(f"parent run {summary.parent_run_id} in {config.tracking.uri}")
    if config.tracking.uri.startswith("sqlite:"):
        typer.echo(f"view: mlflow ui --backend-store-uri {config.tracking.uri}  then open "
                   f"http://127.0.0.1:5000/#/experiments/{summary.experiment_id}/runs")
    if summary.points_failed:
        raise typer.Exit(code=1)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write into (created).", show_default=False)],
    preset: Annotated[str, typer.Option(help="Synthetic model preset: tiny or small.")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    model_format: Annotated[
        str, typer.Option("--format", help="Checkpoint layout: kaggle (orbax) or huggingface (safetensors).")
    ] = "kaggle",
    target_l0: Annotated[float, typer.Option(help="Mean L0 the synthetic SAEs are calibrated to.")] = 16.0,
) -> None:
    """Write a synthetic Gemma2 model and an SAE for every layer, for offline pipelines (`source: local`)."""
    from runner import synthetic
    from runner.errors import ConfigError

    try:
        if preset not in synthetic.SYNTHETIC_PRESETS:
            raise ConfigError(f"--preset: {preset!r} is not allowed (allowed: {', '.join(synthetic.SYNTHETIC_PRESETS)})")
        if model_format not in ("kaggle", "huggingface"):
            raise ConfigError(f"--format: {model_format!r} is not allowed (allowed: kaggle, huggingface)")
        paths = write_synthetic_bundle(out_dir, preset, seed, model_format, target_l0)
    except RunnerError as error:
        raise _fail(error) from None
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


def write_synthetic_bundle(out_dir: Path, preset: str, seed: int, model_format: str, target_l0: float) -> dict:
    """Writes `out_dir/model` (Kaggle layout), optionally `out_dir/model-hf`, and `out_dir/saes` (every layer)."""
    from runner import hf_format, synthetic
    from runner.config import ModelConfig
    from runner.model import load_model
    from runner.sae_sources import write_synthetic_saes

    model_dir = synthetic.write_synthetic_model(out_dir / "model", preset, seed)
    paths = {"model": model_dir}
    loaded = load_model(ModelConfig(source="local", path=model_dir), cache_dir=out_dir)
    if model_format == "huggingface":
        flat = synthetic.synthetic_flat_params(synthetic.SYNTHETIC_PRESETS[preset], seed)
        hf_dir = hf_format.write_hf_checkpoint(flat, loaded.architecture, out_dir / "model-hf")
        (hf_dir / "tokenizer.model").write_bytes((model_dir / "tokenizer.model").read_bytes())
        paths["model-hf"] = hf_dir
    width = 4 * loaded.architecture.embedding_dim
    write_synthetic_saes(
        loaded, range(loaded.architecture.num_layers), out_dir / "saes", width=width, target_l0=target_l0, seed=seed
    )
    paths["saes"] = out_dir / "saes"
    paths["sae width"] = width
    return paths


def main() -> None:
    """Entry point of the `runner` console script."""
    app()


if __name__ == "__main__":
    main()
