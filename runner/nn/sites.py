"""Where Gemma Scope SAEs read Penzai's Gemma2, and how a layer is inserted or activations captured there.

Sites of layer L (zero-indexed blocks; Gemma Scope's `-res`, `-mlp` and `-att` releases):

- `res`: the residual stream after block L (both residual adds done).
- `mlp`: the MLP branch output of block L after its post-FFW norm, before the residual add.
- `att`: the attention heads' outputs of block L before the output projection `W_O`, concatenated over heads
  (head-major, `index = head * head_dim + p`, heads numbered `kv_group * heads_per_group + query_head`): width
  `num_query_heads * head_dim`.

A layer inserted at a site sees and returns `{..., "embedding"}` arrays; at `att` it is wrapped in `AtHeads`,
which flattens the head axes into `embedding` and restores them afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from penzai import pz
from penzai.models.transformer import model_parts

Site = Literal["res", "mlp", "att"]
SITES: tuple[str, ...] = ("res", "mlp", "att")
#: The named axes of the attention heads' outputs, in the order they are flattened.
HEAD_AXES = ("head_groups", "query_heads", "projection")
#: Sublayers of the body before block 0 (`EmbeddingLookup`, `ConstantRescale`).
_BODY_PREFIX = 2


@pz.pytree_dataclass
class AtHeads(pz.nn.Layer):
    """Runs `inner` on the attention heads' outputs flattened to one `embedding` axis, then unflattens.

    Attributes:
      inner: A layer over `{..., "embedding"}` of width `num_query_heads * head_dim`.
    """

    inner: pz.nn.Layer

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        sizes = [x.named_shape[name] for name in HEAD_AXES]
        flat = pz.nx.nmap(lambda heads: heads.reshape(-1))(x.untag(*HEAD_AXES)).tag("embedding")
        out = self.inner(flat, **side_inputs)
        return pz.nx.nmap(lambda values: values.reshape(sizes))(out.untag("embedding")).tag(*HEAD_AXES)


def site_width(architecture: Any, site: str) -> int:
    """Width of the activations at a site: the residual width for `res`/`mlp`, heads x head dim for `att`."""
    if site == "att":
        return architecture.num_query_heads * architecture.head_dim
    return architecture.embedding_dim


def insert_after_block(model: pz.nn.Layer, layer_index: int, layer: pz.nn.Layer) -> pz.nn.Layer:
    """Inserts `layer` right after transformer block `layer_index` (the `res` site of that layer)."""
    return (
        pz.select(model)
        .at_instances_of(model_parts.TransformerBlock)
        .pick_nth_selected(layer_index)
        .insert_after(layer)
    )


def insert_at_site(model: pz.nn.Layer, layer_index: int, site: str, layer: pz.nn.Layer) -> pz.nn.Layer:
    """Inserts `layer` at `site` of block `layer_index` (see the module docstring)."""
    if site == "res":
        return insert_after_block(model, layer_index, layer)
    block = pz.select(model).at_instances_of(model_parts.TransformerBlock).pick_nth_selected(layer_index)
    if site == "mlp":
        # The block's second residual branch: [pre_ffw_norm, mlp, post_ffw_norm]; append after the post norm.
        return block.at(lambda b: b.sublayers[1].delta).apply(
            lambda branch: pz.nn.Sequential([*branch.sublayers, layer])
        )
    if site == "att":
        output = block.at_instances_of(pz.nn.Attention).at(lambda attention: attention.attn_value_to_output)
        return output.apply(
            lambda sequence: pz.nn.Sequential([sequence.sublayers[0], AtHeads(layer), *sequence.sublayers[1:]])
        )
    raise ValueError(f"unknown site {site!r} (allowed: {', '.join(SITES)})")


@pz.pytree_dataclass
class SaveActivation(pz.nn.Layer):
    """Records its input in a state variable and passes it on (activation capture)."""

    saved: pz.StateVariable[pz.nx.NamedArray | None]

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        self.saved.value = x
        return x


def capture(
    model: model_parts.TransformerLM,
    tokens: pz.nx.NamedArray,
    sites: Sequence[tuple[int, str]],
    **side_inputs: Any,
) -> tuple[pz.nx.NamedArray, dict[tuple[int, str], pz.nx.NamedArray]]:
    """Runs the model once; returns its logits and the activation at every `(layer, site)` in `sites`."""
    saved = {key: pz.StateVariable(value=None, label=f"capture/{key[1]}_{key[0]}") for key in sites}
    patched = model
    for (layer_index, site), variable in saved.items():
        patched = insert_at_site(patched, layer_index, site, SaveActivation(variable))
    logits = patched(tokens, **side_inputs)
    return logits, {key: variable.value for key, variable in saved.items()}


def entry_point(layer_index: int, site: str) -> int:
    """The block whose *input* is the first activation a change at the site affects: block L for `mlp`/`att`
    (inside block L), block L+1 for `res` (after it)."""
    return layer_index + 1 if site == "res" else layer_index


def suffix_from_block(model: model_parts.TransformerLM, first_block: int) -> pz.nn.Sequential:
    """The body from block `first_block` on (blocks, final norm, unembedding, soft-cap) as one layer.

    Called with the residual stream entering `first_block` and the side input `token_positions`, it returns the
    same logits as the whole model would: a patched suffix re-runs only the part of the model a change affects.
    """
    return pz.nn.Sequential(list(model.body.sublayers[_BODY_PREFIX + first_block :]))


def block_input_site(first_block: int) -> tuple[int, str]:
    """The capture that yields the residual stream entering `first_block`: `res` after block `first_block - 1`.

    For block 0 there is none: `(-1, "res")` means the scaled embeddings (`embedded_tokens`).
    """
    return (first_block - 1, "res")


def embedded_tokens(model: model_parts.TransformerLM, tokens: pz.nx.NamedArray, **side_inputs: Any) -> Any:
    """The residual stream entering block 0: the embedding lookup and its rescale."""
    prefix = pz.nn.Sequential(list(model.body.sublayers[:_BODY_PREFIX]))
    return prefix(tokens, **side_inputs)
