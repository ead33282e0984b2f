"""The experiment schema: what a valid file looks like, and the one-line error every invalid one gets."""

import pydantic
import pytest
import yaml

from runner.config.loading import load_experiment
from runner.config.schema import ExperimentConfig
from tests.config.experiment_files import EVALUATION, MINIMAL, error_of, write


def test_minimal_file_gets_documented_defaults(tmp_path):
    config = load_experiment(write(tmp_path))
    assert config.prompts == ("The weather today is", "My favourite city is")
    assert config.model.preset == "tiny" and config.model.seed == 0 and config.model.dtype == "auto"
    assert config.sae.width_features is None and config.sae.target_l0 == 16.0
    assert config.steering.scales == [0.0, 8.5] and config.steering.seeds == [0]
    assert (config.steering.mode, config.steering.positions) == ("add", "all")
    assert config.sampling.max_new_tokens == 32 and config.sampling.temperature == 0.0
    assert config.sampling.batch_size == "auto" and config.sampling.top_k is None
    assert config.tracking.uri == "sqlite:///mlflow.db"
    assert config.tracking.experiment == "demo", "the experiment defaults to the name"
    assert config.cluster.workers == 1 and config.cluster.resources == {"CPU": 1.0}


def test_config_is_frozen(tmp_path):
    config = load_experiment(write(tmp_path))
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.name = "other"  # type: ignore[misc]


def test_to_yaml_round_trips_and_canonical_dict_is_json_safe(tmp_path):
    text = MINIMAL.replace("{source: synthetic}\nsae", "{source: local, path: ckpt}\nsae")
    config = load_experiment(write(tmp_path, text))
    assert config.model.path == tmp_path / "ckpt"
    dumped = config.canonical_dict()
    assert dumped["model"]["path"] == str(tmp_path / "ckpt")
    assert dumped["prompts"] == list(config.prompts)
    again = load_experiment(write(tmp_path / "..", config.to_yaml(), name="dump.yaml"))
    assert again == config


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MINIMAL + "colour: red\n",
            "unknown field 'colour' (allowed: name, model, sae, prompts, steering, search, sae_eval, sampling, "
            "tracking, cluster)",
        ),
        (
            MINIMAL.replace("scales: [0, 8.5]", "scales: [0, 8.5], colour: red"),
            "unknown field 'steering.colour' (allowed: layers, features, scales, seeds, mode, positions, combinations)",
        ),
        (MINIMAL.replace("layers: [1]", "layers: [-1]"), "steering.layers.0: -1 is not allowed (allowed: >= 0)"),
        (MINIMAL.replace("layers: [1]", "layers: []"), "steering.layers: must not be empty"),
        (MINIMAL.replace("layers: [1]", "layers: [1, 1]"), "steering.layers: repeats [1] (allowed: each layer once)"),
        (MINIMAL.replace("[0, 8.5]", "[0, abc]"), "steering.scales.1: 'abc' is not a number"),
        (MINIMAL.replace("[0, 8.5]", "[0, .nan]"), "steering.scales.1: nan is not a finite number"),
        (
            MINIMAL.replace("[0, 8.5]}", "[0, 8.5], mode: boost}"),
            "steering.mode: 'boost' is not allowed (allowed: 'add', 'clamp' or 'ablate')",
        ),
        (MINIMAL + "sampling: {temperature: -1}\n", "sampling.temperature: -1 is not allowed (allowed: >= 0.0)"),
        (MINIMAL + "sampling: {top_p: 1.5}\n", "sampling.top_p: 1.5 is not allowed (allowed: <= 1.0)"),
        (MINIMAL + "sampling: {top_k: 0}\n", "sampling.top_k: 0 is not allowed (allowed: >= 1)"),
        (
            MINIMAL + "sampling: {max_new_tokens: 5000}\n",
            "sampling.max_new_tokens: 5000 is not allowed (allowed: <= 4096)",
        ),
        (
            MINIMAL + "sampling: {batch_size: 0}\n",
            "sampling.batch_size: 0 is not allowed (allowed: 'auto' or an integer >= 1)",
        ),
        (
            MINIMAL.replace("name: demo", "name: my demo"),
            "name: 'my demo' is not allowed (allowed: letters, digits, '_', '.', '-')",
        ),
        (MINIMAL.replace("name: demo\n", ""), "name: required field is missing"),
        (MINIMAL + "cluster: {workers: 0}\n", "cluster.workers: 0 is not allowed (allowed: >= 1)"),
    ],
)
def test_invalid_values_name_field_value_and_what_is_allowed(tmp_path, text, expected):
    assert error_of(write(tmp_path, text)) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            "{source: local, path: ckpt, variant: gemma2-2b}",
            "model.variant: does not apply to source 'local' (fields for local: source, path, dtype, "
            "upcast_activations)",
        ),
        (
            "{source: kaggle}",
            "model.variant: is required with source 'kaggle' (fields for kaggle: source, variant, dtype, "
            "upcast_activations)",
        ),
        ("{source: kaggle, variant: gemma3-1b}", "model.variant: 'gemma3-1b' is not a Kaggle Gemma2 variant"),
        ("{source: local}", "model.path: is required with source 'local'"),
        (
            "{source: synthetic, preset: huge}",
            "model.preset: 'huge' is not allowed (allowed: 'tiny', 'small', 'gemma2-2b', 'gemma2-9b' or 'gemma2-27b')",
        ),
        ("{source: huggingface}", "model: source 'huggingface' needs exactly one of 'repo_id'"),
        ("{source: huggingface, repo_id: gemma}", "model.repo_id: 'gemma' is not a Hugging Face repo id"),
    ],
)
def test_model_fields_must_fit_the_source(tmp_path, model, expected):
    text = MINIMAL.replace("model: {source: synthetic}", f"model: {model}")
    assert error_of(write(tmp_path, text)).startswith(expected)


@pytest.mark.parametrize(
    ("sae", "expected"),
    [
        ("{source: huggingface}", "sae.release: is required with source 'huggingface'"),
        ("{source: huggingface, release: gemma-scope-2b-pt-res, seed: 3}", "sae.seed: does not apply to source"),
        ("{source: huggingface, release: gemma-scope-4b-pt-res}", "sae.release: 'gemma-scope-4b-pt-res' is not"),
        ("{source: huggingface, release: gemma-scope-2b-pt-mlp}", "sae.release: 'gemma-scope-2b-pt-mlp' holds 'mlp'"),
        ("{source: huggingface, release: gemma-scope-2b-pt-res, width: 8k}",
         "sae.width: '8k' is not a Gemma Scope width (allowed: 16k, 32k"),
        ("{source: huggingface, release: gemma-scope-2b-pt-res, l0: low}", "sae.l0: 'low' is not allowed"),
        ("{source: synthetic, release: gemma-scope-2b-pt-res}", "sae.release: does not apply to source 'synthetic'"),
        ("{source: local}", "sae.path: is required with source 'local'"),
    ],
)
def test_sae_fields_must_fit_the_source(tmp_path, sae, expected):
    text = MINIMAL.replace("sae: {source: synthetic}", f"sae: {sae}")
    assert error_of(write(tmp_path, text)).startswith(expected)


def test_huggingface_sae_accepts_release_width_and_l0(tmp_path):
    text = MINIMAL.replace(
        "sae: {source: synthetic}", "sae: {source: huggingface, release: gemma-scope-2b-pt-res, width: 65k, l0: 114}"
    ).replace("layers: [1]", "layers: [20]")  # layer 20's 65k SAEs have an average_l0_114 folder
    sae = load_experiment(write(tmp_path, text)).sae
    assert (sae.release, sae.width, sae.l0, sae.site) == ("gemma-scope-2b-pt-res", "65k", 114, "res")


HF_STEERING = MINIMAL.replace("sae: {source: synthetic}", "sae: {source: huggingface, release: gemma-scope-2b-pt-res}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            HF_STEERING.replace("release: gemma-scope-2b-pt-res}", "release: gemma-scope-2b-pt-res, l0: 72}")
            .replace("layers: [1]", "layers: [20]"),
            "sae.l0: 'gemma-scope-2b-pt-res' has no layer_20/width_16k/average_l0_72 (available: 22, 38, 71, 139, "
            "294, or canonical)",
        ),
        (
            HF_STEERING.replace("release: gemma-scope-2b-pt-res}", "release: gemma-scope-2b-pt-res, width: 131k}")
            .replace("layers: [1]", "layers: [12]"),
            "sae.l0: no canonical L0 is known for release 'gemma-scope-2b-pt-res' width '131k' layer 12 (available: "
            "12, 20, 36, 67, 129, 264); set an explicit `l0:`",
        ),
        (
            HF_STEERING.replace("release: gemma-scope-2b-pt-res}", "release: gemma-scope-2b-pt-res, width: 32k}"),
            "steering.layers: 'gemma-scope-2b-pt-res' has no width_32k SAE for layer 1 (layers with one: 12)",
        ),
        (
            HF_STEERING.replace("layers: [1]", "layers: [1, 30]"),
            "steering.layers: 'gemma-scope-2b-pt-res' has no width_16k SAE for layer 30 (layers with one: 0..25)",
        ),
        (
            MINIMAL.replace("sae: {source: synthetic}", "sae: {source: huggingface, release: gemma-scope-2b-pt-mlp, "
                            "site: mlp, width: 32k}"),
            "sae.width: '32k' is not a width of 'gemma-scope-2b-pt-mlp' (allowed: 16k, 65k)",
        ),
        (
            EVALUATION.replace("l0s:", "layers: [3, 20], l0s:"),
            "sae_eval.l0s: 'gemma-scope-2b-pt-res' has no layer_3/width_16k/average_l0_71 (available: 14, 28, 59, "
            "142, 315, or canonical)",
        ),
        (
            EVALUATION.replace("release: gemma-scope-2b-pt-res", "release: gemma-scope-9b-pt-mlp, site: mlp"),
            "sae_eval.widths: ['65k'] are not widths of 'gemma-scope-9b-pt-mlp' (allowed: 16k, 131k)",
        ),
    ],
)
def test_a_gemma_scope_sae_the_release_does_not_have_is_refused_naming_what_it_has(tmp_path, text, expected):
    """Refused while loading (`runner validate`), from the registry of Gemma Scope folders: nothing is downloaded."""
    assert error_of(write(tmp_path, text)).startswith(expected)


def test_every_listed_layer_of_an_evaluation_grid_is_checked_but_all_layers_wait_for_the_model(tmp_path):
    listed = EVALUATION.replace("[canonical, 71]", "[canonical, 114]").replace("[16k, 65k]", "[65k]")
    assert load_experiment(write(tmp_path, listed.replace("l0s:", "layers: [20], l0s:"))).sae_eval.layers == [20]
    assert error_of(write(tmp_path, listed.replace("l0s:", "layers: [20, 21], l0s:"))).startswith(
        "sae_eval.l0s: 'gemma-scope-2b-pt-res' has no layer_21/width_65k/average_l0_114"
    )
    # `all` is the model's blocks, known once the planner has the model: the L0s are checked per layer there.
    assert load_experiment(write(tmp_path, listed)).sae_eval.layers == "all"



@pytest.mark.parametrize(
    ("prompts", "expected"),
    [
        ("[]", "prompts: must not be empty"),
        ("['ok', '  ']", "prompts.1: '  ' is blank (allowed: a non-empty prompt)"),
        ("[ok, 3]", "prompts.1: 3 is not a string"),
        ("{path: p.txt}", "unknown field 'prompts.path' (allowed: file)"),
    ],
)
def test_prompts_must_be_non_empty_strings(tmp_path, prompts, expected):
    text = MINIMAL.replace('["The weather today is", "My favourite city is"]', prompts)
    assert error_of(write(tmp_path, text)) == expected


@pytest.mark.parametrize("uri", ["https://alice:s3cret@mlflow.example.com", "postgresql://bob:pw@db/mlflow"])
def test_credentials_in_tracking_uri_are_rejected_without_echoing_them(tmp_path, uri):
    message = error_of(write(tmp_path, MINIMAL + f"tracking: {{uri: '{uri}'}}\n"))
    assert message.startswith("tracking.uri: ")
    assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert "s3cret" not in message and ":pw@" not in message


def test_validating_a_dict_directly_also_works(tmp_path):
    data = yaml.safe_load(MINIMAL)
    assert ExperimentConfig.model_validate(data).prompts[0] == "The weather today is"


@pytest.mark.parametrize(
    ("cluster", "platform"),
    [
        ("{}", "cpu"),
        ("{resources: {TPU: 4}}", "tpu"),
        ("{resources: {CPU: 8, GPU: 8}}", "gpu"),
        ("{resources: {TPU: 4}, platform: cpu}", "cpu"),
    ],
)
def test_cluster_platform_auto_follows_the_requested_accelerator(tmp_path, cluster, platform):
    config = load_experiment(write(tmp_path, MINIMAL + f"cluster: {cluster}\n"))
    assert config.cluster.jax_platform() == platform


def test_an_accelerator_platform_needs_its_resource(tmp_path):
    assert error_of(write(tmp_path, MINIMAL + "cluster: {platform: tpu}\n")) == (
        "cluster.platform: 'tpu' needs resources.TPU (allowed: request every TPU of a host, e.g. "
        "resources: {TPU: 4}, or platform cpu)"
    )


def test_an_sae_evaluation_needs_only_its_grid_and_gets_documented_defaults(tmp_path):
    config = load_experiment(write(tmp_path, EVALUATION))
    assert config.kind == "sae_eval" and config.steering is None and config.prompts == ()
    grid = config.sae_eval
    assert (grid.layers, grid.widths, grid.l0s) == ("all", ["16k", "65k"], ["canonical", 71])
    assert (grid.text.source, grid.context_length, grid.num_sequences, grid.batch_size) == ("bundled", 128, 32, 8)
    assert grid.saes_per_job == "auto" and grid.table_sequences == 4
    assert "steering" not in config.canonical_dict(), "the unused sweep kind stays out of the sweep's identity"
    again = load_experiment(write(tmp_path, config.to_yaml(), name="dump.yaml"))
    assert again == config


def test_a_steering_sweep_keeps_its_identity_without_an_sae_eval_section(tmp_path):
    assert "sae_eval" not in load_experiment(write(tmp_path)).canonical_dict()


def test_a_text_file_glob_is_resolved_against_the_yaml(tmp_path):
    text = EVALUATION.replace("l0s: [canonical, 71]}", "l0s: [71], text: {source: file, path: 'texts/*.txt'}}")
    assert load_experiment(write(tmp_path, text)).sae_eval.text.path == str(tmp_path / "texts" / "*.txt")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL.replace("steering: {layers: [1], features: [0, 3], scales: [0, 8.5]}\n", ""),
         "(top level): neither 'steering' nor 'sae_eval' is given (allowed: exactly one of them: a steering sweep "
         "or an SAE evaluation)"),
        (MINIMAL + "sae_eval: {widths: [16k], l0s: [71]}\n",
         "(top level): both 'steering' and 'sae_eval' are given (allowed: exactly one of them: a steering sweep or "
         "an SAE evaluation)"),
        (EVALUATION + "prompts: [hello]\n", "prompts: does not apply to sae_eval sweeps (they read sae_eval.text)"),
        (EVALUATION + "sampling: {temperature: 1}\n", "sampling: does not apply to sae_eval sweeps"),
        (EVALUATION.replace("release: gemma-scope-2b-pt-res}", "release: gemma-scope-2b-pt-res, width: 16k}"),
         "sae.width: is set by the evaluation grid (set sae_eval.widths instead)"),
        (EVALUATION.replace("[16k, 65k]", "[16k, 8k]"),
         "sae_eval.widths: ['8k'] are not Gemma Scope widths (allowed: 16k, 32k, 65k, 131k, 262k, 524k, 1m)"),
        (EVALUATION.replace("[canonical, 71]", "[canonical, canonical]"),
         "sae_eval.l0s: repeats ['canonical'] (allowed: each l0 once)"),
        (EVALUATION.replace("[canonical, 71]", "[0]"), "sae_eval.l0s.0: 0 is not allowed (allowed: >= 1)"),
        (EVALUATION.replace("l0s:", "layers: some, l0s:"),
         "sae_eval.layers: 'some' is not allowed (allowed: 'all' or a list of block indices)"),
        (EVALUATION.replace("l0s:", "layers: [], l0s:"), "sae_eval.layers: must not be empty"),
        (EVALUATION.replace("l0s:", "context_length: 1, l0s:"),
         "sae_eval.context_length: 1 is not allowed (allowed: >= 2)"),
        (EVALUATION.replace("l0s: [canonical, 71]}", "l0s: [71], text: {source: file}}"),
         "sae_eval.text.path: is required with source 'file' (fields for file: source, path, column)"),
        (EVALUATION.replace("l0s: [canonical, 71]}", "l0s: [71], text: {source: huggingface, dataset: a/b}}"),
         "sae_eval.text.files: is required with source 'huggingface'"),
        (EVALUATION.replace("l0s: [canonical, 71]}", "l0s: [71], text: {source: bundled, column: body}}"),
         "sae_eval.text.column: does not apply to source 'bundled'"),
        (EVALUATION.replace("{source: huggingface, release: gemma-scope-2b-pt-res}", "{source: synthetic}")
         .replace("[16k, 65k]", "['256']"),
         "sae_eval.l0s: 'canonical' has no meaning for synthetic SAEs (allowed: target L0s, integers >= 1)"),
        (MINIMAL.replace("sae: {source: synthetic}", "sae: {source: synthetic, site: mlp}"),
         "sae.site: 'mlp': steering adds decoder rows to the residual stream (allowed: res)"),
        (MINIMAL.replace("prompts: [\"The weather today is\", \"My favourite city is\"]\n", ""),
         "prompts: is required with steering (a list of strings, or {file: PATH})"),
    ],
)
def test_invalid_sweep_kinds_and_evaluation_grids_are_one_line_errors(tmp_path, text, expected):
    assert error_of(write(tmp_path, text)).startswith(expected)




def test_each_source_keeps_only_its_own_fields(tmp_path):
    dumped = load_experiment(write(tmp_path)).canonical_dict()
    assert dumped["model"] == {"source": "synthetic", "preset": "tiny", "seed": 0, "dtype": "auto",
                               "upcast_activations": False}
    assert dumped["sae"] == {"source": "synthetic", "site": "res", "width_features": None, "target_l0": 16.0, "seed": 0}
    kaggle = MINIMAL.replace("model: {source: synthetic}", "model: {source: kaggle, variant: gemma2-2b}")
    assert load_experiment(write(tmp_path, kaggle)).canonical_dict()["model"] == {
        "source": "kaggle", "variant": "gemma2-2b", "dtype": "auto", "upcast_activations": False
    }
