"""Config -> points -> jobs: order, identity (point_key, sweep_id, job_id) and packing."""

import dataclasses

import pytest

from runner.config.schema import ExperimentConfig
from runner.errors import PlanError
from runner.plan.points import (
    SAEEvalPoint,
    SteeringPoint,
    _digest,
    check_grid_size,
    expand_points,
    grid_size,
    model_id,
    pack_jobs,
    sweep_id,
)

SAE_IDS = {20: "gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71", 21: "sae-21"}


def make_config(**changes) -> ExperimentConfig:
    data = {
        "name": "demo",
        "model": {"source": "kaggle", "variant": "gemma2-2b"},
        "sae": {"source": "huggingface", "release": "gemma-scope-2b-pt-res"},
        "prompts": ["a", "b"],
        "steering": {"layers": [20, 21], "features": [3124, 10004, 1], "scales": [0, 154], "seeds": [0, 1]},
        "sampling": {"temperature": 0.5, "top_k": 40, "max_new_tokens": 8},
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return ExperimentConfig.model_validate(data)


def test_points_cover_the_grid_curve_by_curve_in_layer_feature_prompt_scale_seed_order():
    points = expand_points(make_config(), SAE_IDS)
    assert len(points) == 2 * 2 * 3 * 2 * 2
    order = [(p.layer, p.feature, p.prompt_index, p.scale, p.seed) for p in points]
    assert order == sorted(order, key=lambda t: ([20, 21].index(t[0]), [3124, 10004, 1].index(t[1]), t[2], t[3], t[4]))
    first = points[0]
    assert (first.prompt, first.layer, first.feature, first.scale, first.seed) == ("a", 20, 3124, 0.0, 0)
    assert (points[1].seed, points[2].scale, points[4].prompt, points[8].feature) == (1, 154.0, "b", 10004)
    assert len({p.curve_key for p in points[:8]}) == 1, "a curve's points come together"
    assert first.sae_id == SAE_IDS[20] and first.model_id == "kaggle:gemma2-2b"
    assert (first.temperature, first.top_k, first.top_p, first.max_new_tokens) == (0.5, 40, None, 8)
    assert (first.mode, first.positions) == ("add", "all")


def test_neuronpedia_links_come_from_the_callback():
    points = expand_points(make_config(), SAE_IDS, lambda layer, feature: f"np/{layer}/{feature}")
    assert points[0].neuronpedia_url == "np/20/3124"
    assert expand_points(make_config(), SAE_IDS)[0].neuronpedia_url is None


def test_a_layer_without_sae_id_is_a_plan_error():
    with pytest.raises(PlanError, match=r"\[21\]"):
        expand_points(make_config(), {20: "x"})


def test_point_key_is_stable_and_ignores_only_the_neuronpedia_link():
    point = expand_points(make_config(), SAE_IDS)[0]
    assert point.point_key == expand_points(make_config(), SAE_IDS)[0].point_key
    assert len(point.point_key) == 16 and int(point.point_key, 16) >= 0
    assert dataclasses.replace(point, neuronpedia_url="x").point_key == point.point_key
    assert dataclasses.replace(point, scale=0).point_key == point.point_key, "0 and 0.0 are the same scale"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt_index", 5), ("prompt", "other"), ("layer", 3), ("feature", 9), ("scale", 1.5), ("seed", 7),
        ("mode", "clamp"), ("positions", "generated"), ("temperature", 1.0), ("top_k", 5), ("top_p", 0.9),
        ("max_new_tokens", 9), ("model_id", "kaggle:gemma2-9b"), ("sae_id", "other-sae"),
    ],
)
def test_point_key_changes_with_every_result_determining_field(field, value):
    point = expand_points(make_config(), SAE_IDS)[0]
    assert dataclasses.replace(point, **{field: value}).point_key != point.point_key


def test_params_are_strings_for_mlflow():
    point = expand_points(make_config(), SAE_IDS)[0]
    assert point.params() == {
        "model": "kaggle:gemma2-2b", "sae_id": SAE_IDS[20], "layer": "20", "feature": "3124", "scale": "0.0",
        "seed": "0", "temperature": "0.5", "top_k": "40", "top_p": "None", "mode": "add", "positions": "all",
        "prompt_index": "0", "max_new_tokens": "8", "dtype": "", "exclude_unknown_tokens": "False",
    }



def test_params_are_logged_in_the_order_of_the_param_names_runner_export_follows():
    steering = expand_points(make_config(), SAE_IDS)[0]
    assert tuple(steering.params()) == SteeringPoint.PARAM_NAMES
    evaluation = SAEEvalPoint(layer=3, site="mlp", width="16k", l0="canonical", sae_id="sae-3", model_id="m",
                              text="bundled:eval_text.txt", text_digest="ab12", context_length=64, num_sequences=2)
    assert evaluation.params() == {
        "model": "m", "sae_id": "sae-3", "layer": "3", "site": "mlp", "width": "16k", "l0_target": "canonical",
        "text": "bundled:eval_text.txt", "text_digest": "ab12", "context_length": "64", "num_sequences": "2",
        "dtype": "",
    }
    assert tuple(evaluation.params()) == SAEEvalPoint.PARAM_NAMES

def test_the_resolved_dtype_is_a_param_but_not_part_of_the_key():
    plain = expand_points(make_config(), SAE_IDS)[0]
    resolved = expand_points(make_config(), SAE_IDS, dtype="bfloat16")[0]
    assert resolved.params()["dtype"] == "bfloat16"
    assert (resolved.point_key, resolved.generation_key) == (plain.point_key, plain.generation_key)


def test_excluding_unknown_tokens_changes_the_key_and_leaves_earlier_keys_alone():
    plain = expand_points(make_config(), SAE_IDS)[0]
    excluding = expand_points(make_config(sampling__exclude_unknown_tokens=True), SAE_IDS)[0]
    assert excluding.exclude_unknown_tokens and excluding.point_key != plain.point_key
    keyed = {k: v for k, v in dataclasses.asdict(plain).items()  # the fields keys were first made of
             if k not in ("neuronpedia_url", "dtype", "exclude_unknown_tokens", "combined_with")}
    assert plain.point_key == _digest(keyed), "a key made before the field existed is unchanged"


def test_sweep_id_ignores_tracking_and_cluster_but_not_results():
    base = sweep_id(make_config())
    assert len(base) == 16
    assert sweep_id(make_config(tracking__uri="sqlite:///other.db", cluster__workers=8)) == base
    assert sweep_id(make_config(sampling__temperature=0.9)) != base
    assert sweep_id(make_config(steering__scales=[0, 155])) != base


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"source": "kaggle", "variant": "gemma2-2b"}, "kaggle:gemma2-2b"),
        ({"source": "synthetic"}, "synthetic:tiny:seed0"),
        ({"source": "synthetic", "preset": "small", "seed": 3}, "synthetic:small:seed3"),
        ({"source": "local", "path": "/ckpt/2b"}, "local:/ckpt/2b"),
        ({"source": "huggingface", "repo_id": "google/gemma-2-2b"}, "huggingface:google/gemma-2-2b"),
        ({"source": "kaggle", "variant": "gemma2-2b", "dtype": "bfloat16"}, "kaggle:gemma2-2b:bfloat16"),
    ],
)
def test_model_id(model, expected):
    assert model_id(make_config(model=model).model) == expected


def test_pack_jobs_makes_consecutive_chunks_with_content_ids():
    points = [p for p in expand_points(make_config(), SAE_IDS) if not p.is_baseline]
    jobs = pack_jobs(points, 10)
    full, rest = divmod(len(points), 10)
    assert [len(job.points) for job in jobs] == [10] * full + ([rest] if rest else [])
    assert [p for job in jobs for p in job.points] == points
    assert len({job.job_id for job in jobs}) == len(jobs)
    assert pack_jobs(points, 10)[0].job_id == jobs[0].job_id
    assert pack_jobs(points[:10], 10)[0].job_id == jobs[0].job_id, "a job id depends only on its points"
    assert pack_jobs([], 4) == []
    with pytest.raises(PlanError):
        pack_jobs(points, 0)


def test_points_are_hashable_values():
    point = expand_points(make_config(), SAE_IDS)[0]
    assert isinstance(point, SteeringPoint) and hash(point) == hash(dataclasses.replace(point))


def test_baseline_points_share_one_generation_per_prompt_and_seed():
    points = expand_points(make_config(), SAE_IDS)
    baselines = [p for p in points if p.is_baseline]
    assert baselines, "the test config sweeps scale 0"
    by_generation = {(p.prompt, p.seed) for p in baselines}
    assert len({p.generation_key for p in baselines}) == len(by_generation)
    assert all(p.generation_key == p.point_key for p in points if not p.is_baseline)
    assert len({p.point_key for p in baselines}) == len(baselines), "each baseline point is still its own result"


def test_jobs_hold_at_most_batch_size_distinct_generations():
    points = expand_points(make_config(), SAE_IDS)
    jobs = pack_jobs(points, 8)
    assert [p for job in jobs for p in job.points] == points
    assert all(len({p.generation_key for p in job.points}) <= 8 for job in jobs)
    assert max(len(job.points) for job in jobs) > 8, "shared baselines let a job carry more points than rows"


COMBINATION = [{"layer": 20, "feature": 3124, "scale": 154}, {"layer": 21, "feature": 10004, "scale": 40,
                                                                "mode": "clamp"}]


def test_a_combination_is_its_own_point_on_every_prompt_and_seed_after_the_grid():
    config = make_config(steering__combinations=[COMBINATION])
    points = expand_points(config, SAE_IDS)
    grid, combos = points[:48], points[48:]
    assert all(not p.combined_with for p in grid) and len(combos) == 2 * 2
    assert [(p.prompt_index, p.seed) for p in combos] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first = combos[0]
    assert [(i.layer, i.feature, i.scale, i.mode, i.sae_id) for i in first.interventions] == [
        (20, 3124, 154.0, "add", SAE_IDS[20]), (21, 10004, 40.0, "clamp", SAE_IDS[21])]
    assert first.params()["combined_with"] == "L21F10004 clamp 40"
    single = next(p for p in grid if (p.layer, p.feature, p.scale, p.seed, p.prompt_index) == (20, 3124, 154.0, 0, 0))
    assert single.point_key != first.point_key and "combined_with" not in single.params()
    assert dataclasses.replace(first, combined_with=()).point_key == single.point_key, \
        "a single-feature point's key does not depend on the combination field"


def test_a_combination_at_scale_zero_is_not_a_baseline():
    zero = [{**intervention, "scale": 0} for intervention in COMBINATION]
    zero[1]["mode"] = "add"
    (point, *_) = expand_points(make_config(steering__combinations=[zero], steering__layers=[],
                                            steering__features=[], steering__scales=None), SAE_IDS)
    assert not point.is_baseline and point.generation_key == point.point_key


def test_the_scales_of_an_ablation_share_one_generation():
    points = expand_points(make_config(steering__mode="ablate", steering__scales=[0, 10, 20]), SAE_IDS)
    assert len(points) == 2 * 2 * 3 * 3 * 2, "every point asked for is still its own result"
    assert len({p.point_key for p in points}) == len(points)
    cells = {(p.prompt_index, p.layer, p.feature, p.seed) for p in points}
    assert len({p.generation_key for p in points}) == len(cells), "one generation per ablated cell, not per scale"


def test_a_grid_beyond_the_point_limit_is_refused_by_its_count_before_it_is_expanded(monkeypatch):
    config = make_config(steering__features=list(range(1000)), steering__scales=list(range(500)),
                         steering__seeds=list(range(10)))
    assert grid_size(config) == 2 * 2 * 1000 * 500 * 10
    with pytest.raises(PlanError) as refused:
        expand_points(config, SAE_IDS)
    assert str(refused.value) == (
        "steering: 2 prompts x 2 layers x 1,000 features x 500 scales x 10 seeds is 20,000,000 points (allowed: at "
        "most 1,000,000; set RUNNER_MAX_POINTS to raise the limit, or split the sweep)"
    )
    monkeypatch.setenv("RUNNER_MAX_POINTS", "47")
    with pytest.raises(PlanError, match="is 48 points"):
        check_grid_size(make_config())
    monkeypatch.setenv("RUNNER_MAX_POINTS", "lots")
    with pytest.raises(PlanError, match="RUNNER_MAX_POINTS: 'lots' is not allowed"):
        check_grid_size(make_config())


def test_an_evaluation_grid_of_every_layer_is_counted_once_the_layers_are_known(monkeypatch):
    config = ExperimentConfig.model_validate({
        "name": "eval", "model": {"source": "kaggle", "variant": "gemma2-2b"},
        "sae": {"source": "huggingface", "release": "gemma-scope-2b-pt-res"},
        "sae_eval": {"layers": "all", "widths": ["16k", "65k"], "l0s": ["canonical"]},
    })
    monkeypatch.setenv("RUNNER_MAX_POINTS", "10")
    check_grid_size(config)  # 2 SAEs per layer while the layer count is unknown
    with pytest.raises(PlanError, match="is 52 points"):
        check_grid_size(config, num_layers=26)
