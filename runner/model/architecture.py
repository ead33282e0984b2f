"""Gemma2 architecture, inferred from checkpoint tensor shapes.

Penzai 0.2.5 picks a Gemma preset by counting layers, so anything but the published sizes fails. Here the
architecture is read from the shapes of the flat Kaggle/Flax parameter dict (or its orbax metadata, so no
weights are read), which lets tiny synthetic checkpoints and real 2B/9B/27B checkpoints share one code path.

Flat layout (D embed, V vocab, N query heads, K kv heads, H head dim, F MLP width)::

    transformer/embedder               input_embedding [V, D]
    transformer/final_norm             scale [D]
    transformer/layer_i/attn/q_einsum          w [N, D, H]
    transformer/layer_i/attn/kv_einsum         w [2, K, D, H]
    transformer/layer_i/attn/attn_vec_einsum   w [N, H, D]
    transformer/layer_i/mlp/gating_einsum      w [2, D, F] (2B) or [2, F, D] (9B, 27B)
    transformer/layer_i/mlp/linear             w [F, D]
    transformer/layer_i/{pre,post}_{attention,ffw}_norm  scale [D]

More on the layout and the published sizes: `docs/penzai-gemma2.md#checkpoint-layout` and
`docs/penzai-gemma2.md#architecture-from-shapes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jax.typing import DTypeLike
from penzai.models.transformer.variants import llamalike_common

from runner.errors import CheckpointError

#: Gemma2 27B scales queries by (D / N) ** -0.5 = 144 ** -0.5 rather than head_dim ** -0.5. The scalar is not
#: recoverable from shapes; Hugging Face configs carry it as `query_pre_attn_scalar`.
_KNOWN_QUERY_PRE_ATTN_SCALARS: dict[tuple[int, int, int], float] = {(4608, 32, 128): 144.0}

_NORM_NAMES = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")


@dataclasses.dataclass(frozen=True)
class Gemma2Architecture:
    """Every hyper-parameter needed to build a Gemma2 transformer in Penzai.

    Attributes:
      num_layers: Number of decoder blocks.
      embedding_dim: Width of the residual stream (D).
      num_query_heads: Query heads (N).
      num_kv_heads: Key/value heads (K); N must be a multiple of K.
      head_dim: Per-head projection width (H).
      mlp_hidden_dim: Width of the gated MLP (F).
      vocab_size: Rows of the embedding table (V).
      gating_is_d_by_f: True when `gating_einsum` is stored [2, D, F] (2B), False for [2, F, D] (9B/27B).
      sliding_window: Window of the local-attention layers (even layers); odd layers are global.
      query_pre_attn_scalar: Queries are scaled by this ** -0.5.
      final_logit_softcap: Tanh soft cap of the output logits.
      attn_logits_soft_cap: Tanh soft cap of the attention logits.
      rope_wavelength: RoPE base.
      rms_norm_eps: RMSNorm epsilon.
      context_length: Longest sequence (prompt + generation) the model is meant to see.
    """

    num_layers: int
    embedding_dim: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_hidden_dim: int
    vocab_size: int
    gating_is_d_by_f: bool
    sliding_window: int = 4096
    query_pre_attn_scalar: float | None = None
    final_logit_softcap: float = 30.0
    attn_logits_soft_cap: float = 50.0
    rope_wavelength: float = 10_000.0
    rms_norm_eps: float = 1e-6
    context_length: int = 8192

    @property
    def query_head_multiplier(self) -> int:
        """Query heads per KV head."""
        return self.num_query_heads // self.num_kv_heads

    @property
    def query_scaling_factor(self) -> float:
        """The factor queries are multiplied by before the dot product."""
        scalar = self.query_pre_attn_scalar
        if scalar is None:
            key = (self.embedding_dim, self.num_query_heads, self.head_dim)
            scalar = _KNOWN_QUERY_PRE_ATTN_SCALARS.get(key, float(self.head_dim))
        return float(scalar) ** -0.5

    def parameter_count(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        d, f, h = self.embedding_dim, self.mlp_hidden_dim, self.head_dim
        attention = d * h * (2 * self.num_query_heads + 2 * self.num_kv_heads)
        per_layer = attention + 3 * d * f + 4 * d
        return self.num_layers * per_layer + self.vocab_size * d + d

    def kv_cache_bytes(self, batch_size: int, cache_len: int, bytes_per_element: int) -> int:
        """Bytes of the KV cache of a batch."""
        return 2 * batch_size * self.num_kv_heads * self.head_dim * cache_len * bytes_per_element * self.num_layers

    def to_llamalike_config(
        self, parameter_dtype: DTypeLike, activation_dtype: DTypeLike, use_layer_stack: bool = False
    ) -> llamalike_common.LlamalikeTransformerConfig:
        """The Penzai config that `build_llamalike_transformer` takes (Gemma2 settings)."""
        return llamalike_common.LlamalikeTransformerConfig(
            num_kv_heads=self.num_kv_heads,
            query_head_multiplier=self.query_head_multiplier,
            embedding_dim=self.embedding_dim,
            projection_dim=self.head_dim,
            mlp_hidden_dim=self.mlp_hidden_dim,
            num_decoder_blocks=self.num_layers,
            vocab_size=self.vocab_size,
            mlp_variant="geglu_approx",
            tie_embedder_and_logits=True,
            rope_wavelength=self.rope_wavelength,
            rms_norm_eps=self.rms_norm_eps,
            attention_type=(
                llamalike_common.AttentionTypeSlidingWindowCausal(self.sliding_window),
                llamalike_common.AttentionTypeGlobalCausal(),
            ),
            use_post_attn_norm=True,
            use_post_ffw_norm=True,
            final_logit_softcap=self.final_logit_softcap,
            attn_logits_soft_cap=self.attn_logits_soft_cap,
            query_scaling_factor=self.query_scaling_factor,
            parameter_dtype=parameter_dtype,
            activation_dtype=activation_dtype,
            use_layer_stack=use_layer_stack,
        )

    @classmethod
    def from_shapes(
        cls,
        shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
        *,
        sliding_window: int = 4096,
        query_pre_attn_scalar: float | None = None,
        source: str = "checkpoint",
    ) -> Gemma2Architecture:
        """Infers the architecture from `{flat_key: {"w" | "scale" | ...: shape}}` (no weights needed).

        Raises:
          CheckpointError: a tensor is missing or its shape contradicts the others.
        """
        params = {key.removeprefix("transformer/"): value for key, value in shapes.items()}

        def shape_of(key: str, leaf: str) -> tuple[int, ...]:
            try:
                return tuple(int(n) for n in params[key][leaf])
            except KeyError:
                raise CheckpointError(f"{source}: missing tensor transformer/{key}/{leaf}") from None

        num_layers = 0
        while f"layer_{num_layers}/mlp/linear" in params:
            num_layers += 1
        if num_layers == 0:
            raise CheckpointError(f"{source}: no transformer/layer_0/mlp/linear tensor; not a Gemma2 checkpoint")

        vocab_size, embedding_dim = shape_of("embedder", "input_embedding")
        num_query_heads, d_q, head_dim = shape_of("layer_0/attn/q_einsum", "w")
        two, num_kv_heads, d_kv, head_dim_kv = shape_of("layer_0/attn/kv_einsum", "w")
        mlp_hidden_dim, d_mlp = shape_of("layer_0/mlp/linear", "w")
        gating = shape_of("layer_0/mlp/gating_einsum", "w")
        if (d_q, d_kv, d_mlp) != (embedding_dim,) * 3 or two != 2 or head_dim_kv != head_dim:
            raise CheckpointError(f"{source}: attention/MLP shapes disagree with embedding width {embedding_dim}")
        if num_query_heads % num_kv_heads:
            raise CheckpointError(f"{source}: {num_query_heads} query heads not a multiple of {num_kv_heads} kv heads")
        if embedding_dim == mlp_hidden_dim:
            raise CheckpointError(f"{source}: MLP width equals embedding width; gating orientation is ambiguous")
        if gating == (2, embedding_dim, mlp_hidden_dim):
            gating_is_d_by_f = True
        elif gating == (2, mlp_hidden_dim, embedding_dim):
            gating_is_d_by_f = False
        else:
            raise CheckpointError(f"{source}: gating_einsum shape {gating} fits neither [2,D,F] nor [2,F,D]")

        arch = cls(
            num_layers=num_layers,
            embedding_dim=embedding_dim,
            num_query_heads=num_query_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            mlp_hidden_dim=mlp_hidden_dim,
            vocab_size=vocab_size,
            gating_is_d_by_f=gating_is_d_by_f,
            sliding_window=sliding_window,
            query_pre_attn_scalar=query_pre_attn_scalar,
        )
        for key, leaf, shape in arch.expected_shapes():
            if shape_of(key.removeprefix("transformer/"), leaf) != shape:
                found = shape_of(key.removeprefix("transformer/"), leaf)
                raise CheckpointError(f"{source}: tensor {key}/{leaf} has shape {found}, expected {shape}")
        return arch

    def expected_shapes(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """Every tensor of the flat layout as `(flat_key, leaf, shape)`."""
        d, f, n, k, h = self.embedding_dim, self.mlp_hidden_dim, self.num_query_heads, self.num_kv_heads, self.head_dim
        gating = (2, d, f) if self.gating_is_d_by_f else (2, f, d)
        entries = [
            ("transformer/embedder", "input_embedding", (self.vocab_size, d)),
            ("transformer/final_norm", "scale", (d,)),
        ]
        for i in range(self.num_layers):
            prefix = f"transformer/layer_{i}"
            entries += [
                (f"{prefix}/attn/q_einsum", "w", (n, d, h)),
                (f"{prefix}/attn/kv_einsum", "w", (2, k, d, h)),
                (f"{prefix}/attn/attn_vec_einsum", "w", (n, h, d)),
                (f"{prefix}/mlp/gating_einsum", "w", gating),
                (f"{prefix}/mlp/linear", "w", (f, d)),
            ]
            entries += [(f"{prefix}/{norm}", "scale", (d,)) for norm in _NORM_NAMES]
        return entries


#: The published Gemma2 sizes (Penzai's presets), by Kaggle variant and Hugging Face repo: what a sweep can be
#: planned with before anything is downloaded. Loading always reads the real shapes.
PUBLISHED: dict[str, Gemma2Architecture] = {
    "gemma2-2b": Gemma2Architecture(26, 2304, 8, 4, 256, 9216, 256_128, gating_is_d_by_f=True),
    "gemma2-9b": Gemma2Architecture(42, 3584, 16, 8, 256, 14_336, 256_128, gating_is_d_by_f=False),
    "gemma2-27b": Gemma2Architecture(46, 4608, 32, 16, 128, 36_864, 256_128, gating_is_d_by_f=False),
}
_PUBLISHED_NAMES = {
    **{f"{size}{tuned}": size for size in PUBLISHED for tuned in ("", "-it")},
    **{f"google/gemma-2-{size.removeprefix('gemma2-')}{tuned}": size for size in PUBLISHED for tuned in ("", "-it")},
}


def published_architecture(name: str) -> Gemma2Architecture | None:
    """The architecture of a published Gemma2 by Kaggle variant (`gemma2-9b-it`) or Hugging Face repo
    (`google/gemma-2-2b`); None for other names. The Hugging Face repos hold 256000 vocabulary rows, the Kaggle
    ones 256128."""
    size = _PUBLISHED_NAMES.get(name)
    if size is None:
        return None
    arch = PUBLISHED[size]
    return dataclasses.replace(arch, vocab_size=256_000) if name.startswith("google/") else arch

