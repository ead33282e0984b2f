"""The utilization benchmark's accounting: what a loaded model holds and what a decode step reads."""

from __future__ import annotations

from runner.bench.utilization import decode_step_bytes, model_flops_per_token, parameter_bytes
from runner.nn.jumprelu import JumpReLUSAE
from runner.sae.params import random_sae_arrays


def test_a_loaded_model_holds_every_parameter_once_in_its_dtype(tiny_model) -> None:
    assert parameter_bytes(tiny_model.model) == tiny_model.architecture.parameter_count() * 4


def test_a_decode_step_reads_every_weight_the_sae_and_the_kv_cache(tiny_model) -> None:
    arch = tiny_model.architecture
    sae = JumpReLUSAE.from_arrays(random_sae_arrays(arch.embedding_dim, 256, seed=0))
    sae_bytes = 4 * (2 * arch.embedding_dim * 256 + 2 * 256 + arch.embedding_dim)
    read = decode_step_bytes(tiny_model, sae, 1, 10)
    assert read == arch.parameter_count() * 4 + sae_bytes + arch.kv_cache_bytes(1, 10, 4)


def test_a_token_costs_two_flops_per_weight_it_multiplies_plus_attention_and_the_sae_encoder(tiny_model) -> None:
    arch = tiny_model.architecture
    without_context = model_flops_per_token(arch, 0, 0)
    # Every weight but the final norm's multiplies once: the embedding as the unembedding, not at the lookup.
    assert without_context == 2 * (arch.parameter_count() - arch.embedding_dim)
    assert model_flops_per_token(arch, 10, 0) - without_context == 4 * arch.num_layers * arch.num_query_heads * \
        arch.head_dim * 10
    assert model_flops_per_token(arch, 0, 256) - without_context == 2 * arch.embedding_dim * 256
