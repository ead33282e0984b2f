"""Loading an experiment file: YAML, `--set` overrides and `prompts: {file: ...}`, each failure one line."""

import pytest

from runner.config.loading import load_experiment
from tests.config.experiment_files import MINIMAL, error_of, write


def test_overrides_set_scalars_lists_list_items_and_mapping_keys(tmp_path):
    path = write(tmp_path, MINIMAL + "cluster: {resources: {CPU: 2}}\n")
    config = load_experiment(
        path,
        [
            "steering.scales=[0, 10, 20]",
            "steering.features.1=7",
            "sampling.temperature=0.7",
            "cluster.resources.TPU=4",
            "tracking.experiment=other",
        ],
    )
    assert config.steering.scales == [0.0, 10.0, 20.0]
    assert config.steering.features == [0, 7]
    assert config.sampling.temperature == 0.7
    assert config.cluster.resources == {"CPU": 2.0, "TPU": 4.0}
    assert config.tracking.experiment == "other"
    assert load_experiment(path).steering.scales == [0.0, 8.5], "the file itself is untouched"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "steering.colour=red",
            "--set steering.colour: unknown field 'steering.colour' (allowed: layers, features, scales, seeds, "
            "mode, positions, combinations)",
        ),
        ("colour=red", "--set colour: unknown field 'colour' (allowed: name, model, sae, prompts, steering,"),
        ("steering.scales.5=1", "--set steering.scales.5: no item '5' (the list has 2 items)"),
        ("steering.scales", "--set 'steering.scales': expected KEY=VALUE"),
        ("steering.scales=[0, abc]", "steering.scales.1: 'abc' is not a number"),
        ("steering.scales=[0, 1", "--set steering.scales: invalid YAML"),
    ],
)
def test_bad_overrides_are_one_line_errors(tmp_path, override, expected):
    assert error_of(write(tmp_path), [override]).startswith(expected)


def test_prompts_file_is_read_relative_to_the_yaml(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "prompts.txt").write_text("first prompt\n\n   \nsecond — prompt\n", encoding="utf-8")
    text = MINIMAL.replace('prompts: ["The weather today is", "My favourite city is"]', "prompts: {file: prompts.txt}")
    config = load_experiment(write(tmp_path / "exp", text))
    assert config.prompts == ("first prompt", "second — prompt")


def test_missing_prompts_file_names_it(tmp_path):
    text = MINIMAL.replace('prompts: ["The weather today is", "My favourite city is"]', "prompts: {file: gone.txt}")
    assert error_of(write(tmp_path, text)) == f"prompts.file: {str(tmp_path / 'gone.txt')!r} not found"



@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [unclosed\n", "invalid YAML at line 2, column 1"),
        ("- a\n- b\n", "the top level must be a mapping of fields (allowed: name, model,"),
        ("", "the top level must be a mapping of fields"),
    ],
)
def test_unreadable_files_are_one_line_errors(tmp_path, text, expected):
    assert error_of(write(tmp_path, text)).startswith(expected)


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == "file not found"



def test_loader_uses_safe_yaml(tmp_path):
    text = MINIMAL.replace("name: demo", "name: !!python/object/apply:os.getcwd []")
    assert error_of(write(tmp_path, text)).startswith("invalid YAML")




def test_an_override_may_name_a_field_of_any_source_of_a_section(tmp_path):
    path = write(tmp_path)
    config = load_experiment(path, ["model.variant=gemma2-2b", "model.source=kaggle"])
    assert (config.model.source, config.model.variant) == ("kaggle", "gemma2-2b")
    assert error_of(path, ["model.colour=red"]) == (
        "--set model.colour: unknown field 'model.colour' (allowed: source, preset, seed, dtype, upcast_activations, "
        "variant, path, repo_id)"
    )


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    text = MINIMAL.replace("steering: {layers: [1], features: [0, 3], scales: [0, 8.5]}",
                           "steering:\n  layers: [1]\n  features: [0, 3]\n  scales: [0]\n  scales: [0, 8.5]")
    assert error_of(write(tmp_path, text)) == (
        "line 9, column 3: duplicate key 'scales' (first at line 8; allowed: each key once per mapping)"
    )


def test_a_key_given_twice_in_an_override_is_refused(tmp_path):
    assert "duplicate key 'CPU'" in error_of(write(tmp_path), ["cluster.resources={CPU: 1, CPU: 2}"])


def test_keys_merged_from_an_anchor_may_be_overridden(tmp_path):
    text = MINIMAL + "sampling:\n  <<: {max_new_tokens: 4, temperature: 0.5}\n  temperature: 0.7\n"
    config = load_experiment(write(tmp_path, text))
    assert (config.sampling.max_new_tokens, config.sampling.temperature) == (4, 0.7)


#: "Billion laughs": 9 aliases of 9 aliases of ... of a 12-value mapping, 9**8 copies of it once expanded.
BILLION_LAUGHS = """\
name: bomb
model: {source: synthetic}
sae: {source: synthetic}
steering: {layers: [1], features: [0], scales: [0]}
tracking: &a {experiment: [lol, lol, lol, lol, lol, lol, lol, lol, lol]}
x1: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
x2: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
x3: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
x4: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
x5: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
x6: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
x7: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
prompts: [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_an_alias_bomb_is_refused_while_it_is_parsed(tmp_path):
    # x6 (&g) stands for 9**6 copies of &a, over 6 million values: the first value beyond the bound.
    assert error_of(write(tmp_path, BILLION_LAUGHS)) == (
        "line 11, column 5: aliases expand this value to more than 1,000,000 values (allowed: at most 1,000,000; is "
        "this an alias bomb?)"
    )


def test_a_recursive_alias_is_refused(tmp_path):
    text = MINIMAL.replace('prompts: ["The weather today is", "My favourite city is"]', "prompts: &p [a, *p]")
    assert "a recursive alias" in error_of(write(tmp_path, text))


def test_anchors_and_aliases_of_a_normal_size_are_read(tmp_path):
    text = MINIMAL.replace("features: [0, 3], scales: [0, 8.5]", "features: &f [0, 3], scales: [0, 8.5], seeds: *f")
    assert load_experiment(write(tmp_path, text)).steering.seeds == [0, 3]


def test_a_file_beyond_the_size_limit_is_refused_unread(tmp_path):
    path = write(tmp_path, MINIMAL + "#" + "x" * (4 * 2**20) + "\n")
    assert error_of(path).startswith("the file is 4.0 MiB (allowed: at most 4 MiB;")
