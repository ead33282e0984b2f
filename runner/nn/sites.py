"""Where Gemma Scope SAEs read Penzai's Gemma2, how a layer is inserted there, and the part of the model a change
at a site affects.

Sites of layer L (zero-indexed blocks; Gemma Scope's `-res`, `-mlp` and `-att` releases, `docs/metrics.md#sites`):

- `res`: the residual stream after block L (both residual adds done).
- `mlp`: the MLP branch output of block L after its post-FFW norm, before the residual add.
- `att`: the attention heads' outputs of block L before the output projection `W_O`, concatenated over heads
  (head-major, `index = head * head_dim + p`, heads numbered `kv_group * heads_per_group + query_head`): width
  `num_query_heads * head_dim`.

A layer inserted at a site sees and returns `{..., "embedding"}` arrays; at `att` it is wrapped in `AtHeads`,
which flattens the head axes into `embedding` and restores them afterwards. Blocks, the MLP branch and the
embedding prefix are found by type (the body's layout: `docs/penzai-gemma2.md#body-structure`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from penzai import pz
from penzai.models.transformer import model_parts

if TYPE_CHECKING:
    from runner.model.architecture import Gemma2Architecture

SITES: tuple[str, ...] = ("res", "mlp", "att")
#: A site of a block, `(layer, site)`; `(-1, "res")` stands for the residual stream entering block 0.
SiteKey = tuple[int, str]
#: The named axes of the attention heads' outputs, in the order they are flattened.
HEAD_AXES = ("head_groups", "query_heads", "projection")


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


@pz.pytree_dataclass
class KeepLastPosition(pz.nn.Layer):
    """Keeps the last position of the `seq` axis (as a length-1 axis). Inserted before the unembedding of a
    sampler, whose prefill then makes the logits of the last prompt position only, not `[batch, prompt,
    vocabulary]` of which it reads one row."""

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        return x[{"seq": pz.slice[-1:]}]


def logits_of_last_position(model: pz.nn.Layer) -> pz.nn.Layer:
    """`model` with `KeepLastPosition` before its unembedding (`EmbeddingDecode`): it returns `{..., seq: 1,
    vocabulary}` logits of its input's last position."""
    return pz.select(model).at_instances_of(pz.nn.EmbeddingDecode).insert_before(KeepLastPosition())


def site_width(architecture: Gemma2Architecture, site: str) -> int:
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
        # The MLP branch is [pre_ffw_norm, mlp, post_ffw_norm]: the site is after the post norm.
        branch = block.at_instances_of(pz.nn.Residual).where(_holds_mlp).at(lambda residual: residual.delta)
        return branch.apply(lambda sequence: pz.nn.Sequential([*sequence.sublayers, layer]))
    if site == "att":
        output = block.at_instances_of(pz.nn.Attention).at(lambda attention: attention.attn_value_to_output)
        return output.apply(
            lambda sequence: pz.nn.Sequential([sequence.sublayers[0], AtHeads(layer), *sequence.sublayers[1:]])
        )
    raise ValueError(f"unknown site {site!r} (allowed: {', '.join(SITES)})")


def _holds_mlp(residual: pz.nn.Residual) -> bool:
    return pz.select(residual.delta).at_instances_of(model_parts.TransformerFeedForward).count() > 0


def entry_point(layer_index: int, site: str) -> int:
    """The block whose *input* is the first activation a change at the site affects: block L for `mlp`/`att`
    (inside block L), block L+1 for `res` (after it)."""
    return layer_index + 1 if site == "res" else layer_index


def suffix_from_block(model: model_parts.TransformerLM, first_block: int) -> pz.nn.Sequential:
    """The body from block `first_block` on (blocks, final norm, unembedding, soft-cap) as one layer, including
    a layer inserted after block `first_block - 1` (`insert_after_block`).

    Called with the residual stream entering `first_block` and the side input `token_positions`, it returns the
    same logits as the whole model would: a patched suffix re-runs only the part of the model a change affects.
    """
    blocks = _block_positions(model)
    start = blocks[0] if first_block == 0 else blocks[first_block - 1] + 1
    return pz.nn.Sequential(list(model.body.sublayers[start:]))


def split_at_unembedding(model: pz.nn.Layer) -> tuple[pz.nn.Sequential, pz.nn.Sequential]:
    """The model's body in two: the trunk (the embedding, the blocks and any layer inserted among them, the final
    norm), which maps tokens to the final hidden states `{..., embedding}`, and the head (the unembedding
    `EmbeddingDecode` and what follows it: the soft-cap), which maps hidden states to logits.

    Teacher-forced metrics run the trunk once and the head on a few positions at a time, so that the logits over
    the vocabulary exist for those positions only. The trunk needs the side input `token_positions`. `model` is a
    `TransformerLM` (or one with layers inserted), frozen or not, or a part of its body that ends with the head
    (`suffix_from_block`).
    """
    sublayers = list(model.body.sublayers if isinstance(model, model_parts.TransformerLM) else model.sublayers)
    head = next(i for i, sublayer in enumerate(sublayers) if isinstance(sublayer, pz.nn.EmbeddingDecode))
    return pz.nn.Sequential(sublayers[:head]), pz.nn.Sequential(sublayers[head:])


def block_input_site(first_block: int) -> SiteKey:
    """The capture that yields the residual stream entering `first_block`: `res` after block `first_block - 1`.

    For block 0 there is none: `(-1, "res")` means the scaled embeddings (`embedded_tokens`).
    """
    return (first_block - 1, "res")


def embedded_tokens(
    model: model_parts.TransformerLM, tokens: pz.nx.NamedArray, **side_inputs: Any
) -> pz.nx.NamedArray:
    """The residual stream entering block 0: the body's layers before it (the embedding lookup and its rescale)."""
    prefix = pz.nn.Sequential(list(model.body.sublayers[: _block_positions(model)[0]]))
    return prefix(tokens, **side_inputs)


def _block_positions(model: model_parts.TransformerLM) -> list[int]:
    """The indices of the transformer blocks among the body's sublayers."""
    return [
        index
        for index, sublayer in enumerate(model.body.sublayers)
        if isinstance(sublayer, model_parts.TransformerBlock)
    ]
