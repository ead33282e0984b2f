"""Validation errors as one line: field path, value, what is allowed; union tags read as the source."""

import pytest

from tests.config.experiment_files import EVALUATION, MINIMAL, error_of, write


def test_several_errors_share_one_line(tmp_path):
    text = MINIMAL.replace("steering: {layers: [1], features: [0, 3], scales: [0, 8.5]}",
                           "steering: {layers: [-1], features: [0, 3], scales: [0, 8.5], seeds: []}")
    assert error_of(write(tmp_path, text)) == (
        "steering.layers.0: -1 is not allowed (allowed: >= 0); steering.seeds: must not be empty"
    )




@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MINIMAL.replace("model: {source: synthetic}", "model: {preset: tiny}"),
            "model.source: required field is missing",
        ),
        (
            MINIMAL.replace("model: {source: synthetic}", "model: {source: gguf}"),
            "model.source: 'gguf' is not allowed (allowed: 'synthetic', 'kaggle', 'local' or 'huggingface')",
        ),
        (
            MINIMAL.replace("model: {source: synthetic}", "model: {source: local, path: ckpt, colour: red}"),
            "unknown field 'model.colour' (allowed: source, path, dtype, upcast_activations)",
        ),
        (
            MINIMAL.replace("model: {source: synthetic}", "model: 5"),
            "model: 5 is not a mapping (allowed fields: source, preset, seed, dtype, upcast_activations, variant, "
            "path, repo_id)",
        ),
        (
            MINIMAL.replace("sae: {source: synthetic}", "sae: {source: synthetic, width_features: 0}"),
            "sae.width_features: 0 is not allowed (allowed: >= 1)",
        ),
        (
            EVALUATION.replace("l0s: [canonical, 71]}", "l0s: [71], text: {column: body}}"),
            "sae_eval.text.column: does not apply to source 'bundled' (fields for bundled: source)",
        ),
        (
            EVALUATION.replace("l0s: [canonical, 71]}", "l0s: [71], text: {source: huggingface, dataset: a/b}}"),
            "sae_eval.text.files: is required with source 'huggingface': the files of the dataset repo to read, e.g. "
            "['data/train-00000-of-00001.parquet'] (globs allowed)",
        ),
        (
            EVALUATION.replace("l0s: [canonical, 71]}", "l0s: [71], text: {source: huggingface, dataset: a/b, "
                               "files: []}}"),
            "sae_eval.text.files: must not be empty",
        ),
    ],
)
def test_a_section_with_a_source_reads_the_source_from_the_error_location(tmp_path, text, expected):
    assert error_of(write(tmp_path, text)) == expected
