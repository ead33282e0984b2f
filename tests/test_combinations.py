"""Several interventions in one point, end to end on the tiny model: the combination's generation is the one a
model with both decoder rows added by hand generates, and each of its features is measured."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import yaml
from penzai import pz

from runner.config.loading import load_experiment
from runner.driver import run_sweep
from runner.model import tokenizer as tokenizer_lib
from runner.nn import sites
from runner.nn.jumprelu import LATENT_AXIS
from runner.plan.points import sweep_id
from runner.plan.prepare import prepare_sweep
from runner.steering.sampler import SamplingBatch, SteeringSampler, left_pad, prompt_bucket
from runner.tracking.search import sweep_parent, sweep_records

COMBINATION = [(1, 7, 12.5), (3, 9, -20.0)]
PROMPT = "The most iconic structure on Earth is"


@pz.pytree_dataclass
class AddVector(pz.nn.Layer):
    """Adds a fixed vector: the hand-made intervention."""

    vector: pz.nx.NamedArray

    def __call__(self, x, **side_inputs):
        return x + self.vector.astype(x.dtype)


def test_a_two_feature_combination_generates_what_both_rows_added_by_hand_generate(
        tmp_path, tiny_model_dir, tiny_model, tiny_sae_paths, tiny_saes, cache_dir) -> None:
    sae_root = tiny_sae_paths[1].parents[3]  # ROOT/layer_1/width_256/average_l0_16/params.npz
    config_data = {
        "name": "combination",
        "model": {"source": "local", "path": str(tiny_model_dir)},
        "sae": {"source": "local", "path": str(sae_root), "width": "256", "l0": 16},
        "prompts": [PROMPT],
        "steering": {
            "layers": [1], "features": [7], "scales": [0, 12.5],
            "combinations": [[{"layer": layer, "feature": feature, "scale": scale}
                              for layer, feature, scale in COMBINATION]],
        },
        "sampling": {"max_new_tokens": 12, "temperature": 0.0, "batch_size": 4},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "combination.yaml"
    path.write_text(yaml.safe_dump(config_data))
    config = load_experiment(path)
    plan = prepare_sweep(config, cache_dir)
    summary = run_sweep(plan, cache_dir=cache_dir, output_dir=tmp_path)
    assert (summary.points_finished, summary.points_failed) == (3, 0), summary
    parent = sweep_parent(config.tracking.uri, config.tracking.experiment, sweep_id(config))
    records = sweep_records(config.tracking.uri, parent)
    (combined,) = [record for record in records.values() if "combined_with" in record.params]
    assert combined.params["combined_with"] == "L3F9 add -20"

    # The same generation from a model with both vectors added by hand (and no steering).
    by_hand = tiny_model.model
    for layer, feature, scale in COMBINATION:
        w_dec = np.asarray(tiny_saes[layer].decoder.w_dec.unwrap(LATENT_AXIS, "embedding"))
        by_hand = sites.insert_after_block(
            by_hand, layer, AddVector(pz.nx.wrap(jnp.asarray(scale * w_dec[feature], jnp.float32)).tag("embedding")))
    ids = tokenizer_lib.encode_prompt(tiny_model.tokenizer, PROMPT)
    prompt_len = prompt_bucket(len(ids))
    sampler = SteeringSampler(by_hand, {1: tiny_saes[1]}, batch_size=1, prompt_len=prompt_len, max_new_tokens=12)
    rows = np.full(1, -1, np.int32)  # NO_LAYER: the sampler's own steering sites stay idle
    batch = SamplingBatch(
        prompt_tokens=left_pad([ids], prompt_len), target_layer=rows, feature=np.zeros(1, np.int32),
        value=np.zeros(1, np.float32), mode=np.zeros(1, np.int32), steer_from=np.zeros(1, np.int32),
        temperature=np.zeros(1, np.float32), top_k=np.zeros(1, np.int32), top_p=np.ones(1, np.float32),
        seed=np.zeros(1, np.uint32), stream=np.zeros(1, np.uint32), probe_features=np.zeros(1, np.int32),
    )
    expected = [int(token) for token in sampler(batch).tokens[0]]
    generated = list(combined.token_ids)
    assert generated == expected[: len(generated)] and generated, (generated, expected)
    single = next(record for record in records.values()
                  if "combined_with" not in record.params and record.params["scale"] == 12.5)
    assert list(single.token_ids) != generated, "the second feature changes the generation"

    # Both features are measured: the first under the plain names too, each under its own label.
    for label in ("L1F7", "L3F9"):
        for name in ("concept_rate", "feature_activation", "feature_firing_rate", "logit_lens_mass", "l0"):
            assert f"steer/{label}/{name}" in combined.metrics, (label, name, sorted(combined.metrics))
    assert combined.metrics["steer/L1F7/feature_activation"] == combined.metrics["steer/feature_activation"]
    assert combined.metrics["steer/L3F9/feature_activation"] != combined.metrics["steer/L1F7/feature_activation"]
    assert combined.metrics["steer/nll"] > 0
