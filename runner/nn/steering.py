"""Patching Gemma2 with SAE steering (Penzai layers inserted after blocks).

A `SteeringSite` sits after every block that a sweep steers. Each batch row carries its own interventions in
the side input `steering` (`SteeringInputs`): up to K of them (the `intervention` axis; K is a program shape), each
a target layer, feature, value and mode. A site adds the interventions that target its layer and ignores the
others, so one model tree (and one compiled program) serves every mix of layers, features and scales, and a row may
steer several features at once (a combination). Steering at value 0 in `add` mode leaves the residual stream
bit-identical. A `clamp` reads the feature on the stream as it enters the site, before the site's other
interventions.

Modes (on the residual stream `h` after block L, decoder row `d_i = W_dec[i]`, unit norm):
  - `add`:    `h + value * d_i` (the Gemma Scope tutorial's intervention);
  - `clamp`:  `h + (value - f_i(h)) * d_i`, with `f_i` the SAE's JumpReLU activation of feature i;
  - `ablate`: clamp to 0.

Definitions: `docs/metrics.md#steering-metrics`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike
from penzai import pz

from runner.nn.jumprelu import LATENT_AXIS, JumpReLUSAE
from runner.nn.sites import insert_after_block

MODE_CODES: dict[str, int] = {"add": 0, "clamp": 1, "ablate": 1}
NO_LAYER = -1
#: Per-row and intervention totals a `SteeringSite` accumulates over the positions of `measure_mask`, for the
#: interventions at its layer.
TOTAL_NAMES = ("tokens", "l0", "feature_activation", "feature_fires")
#: Totals of unsteered (baseline) rows, accumulated at every site: `{batch}` and `{batch, probe}` for the probes.
BASELINE_TOTAL_NAMES = ("baseline_tokens", "baseline_l0", "probe_activation", "probe_fires")


#: The axis of a row's interventions.
INTERVENTION_AXIS = "intervention"


@pz.pytree_dataclass
class SteeringInputs(pz.Struct):
    """The interventions of every batch row: `{batch, intervention}` named arrays, and `steer_from` `{batch}`.

    Attributes:
      target_layer: Block after which the intervention applies (`NO_LAYER`: none; a row with none is unsteered).
      feature: SAE latent index.
      value: Scale (`add`) or clamp value (`clamp`; 0 for `ablate`).
      mode: `MODE_CODES` of the intervention's mode.
      steer_from: First token position the row is steered at (0: all, 1: skip BOS, prompt length: generated
        tokens only).
    """

    target_layer: pz.nx.NamedArray
    feature: pz.nx.NamedArray
    value: pz.nx.NamedArray
    mode: pz.nx.NamedArray
    steer_from: pz.nx.NamedArray

    @classmethod
    def from_rows(
        cls,
        target_layer: ArrayLike,
        feature: ArrayLike,
        value: ArrayLike,
        mode: ArrayLike | Sequence[str] | Sequence[Sequence[str]],
        steer_from: ArrayLike,
    ) -> SteeringInputs:
        """Builds the inputs from per-row sequences or arrays: `[B]` (one intervention per row) or `[B, K]`; mode
        given as names or `MODE_CODES`; `steer_from` `[B]`."""
        mode_codes = np.vectorize(lambda m: MODE_CODES[m] if isinstance(m, str) else m, otypes=[np.int32])(
            np.asarray(mode, dtype=object)) if _holds_names(mode) else mode

        def rows(values: ArrayLike, dtype: DTypeLike) -> pz.nx.NamedArray:
            array = jnp.asarray(values, dtype=dtype)
            return pz.nx.wrap(array if array.ndim == 2 else array[:, None]).tag("batch", INTERVENTION_AXIS)

        return cls(
            target_layer=rows(target_layer, jnp.int32),
            feature=rows(feature, jnp.int32),
            value=rows(value, jnp.float32),
            mode=rows(mode_codes, jnp.int32),
            steer_from=pz.nx.wrap(jnp.asarray(steer_from, dtype=jnp.int32)).tag("batch"),
        )

    @property
    def steered(self) -> pz.nx.NamedArray:
        """`{batch}`: whether the row has any intervention."""
        return (self.target_layer != NO_LAYER).untag(INTERVENTION_AXIS).any()


def _holds_names(mode: object) -> bool:
    """Whether `mode` is a (nested) sequence of mode names."""
    while isinstance(mode, (list, tuple)) and mode:
        mode = mode[0]
    return isinstance(mode, str)


@pz.pytree_dataclass
class SteeringSite(pz.nn.Layer):
    """Steers (and optionally measures) the residual stream after block `layer_index`.

    Side inputs read: `steering` (`SteeringInputs`; absent: identity), `token_positions` (`{batch?, seq}`; pad
    positions are -1 and never steered), `measure_mask` (`{batch, seq}` bool; where to accumulate totals),
    `probe_features` (`{probe}` latent indices measured on unsteered rows, which share one baseline generation
    across the sweep's layers and features).

    Attributes:
      layer_index: The block this site follows.
      sae: The SAE of this layer (decoder rows are the steering directions; the encoder measures).
      totals: Per-row sums of `TOTAL_NAMES` over measured positions, or None to measure nothing.
    """

    layer_index: int = dataclasses.field(metadata={"pytree_node": False})
    sae: JumpReLUSAE
    totals: pz.StateVariable[dict[str, pz.nx.NamedArray]] | None = None

    def __call__(self, x: pz.nx.NamedArray, **side_inputs: Any) -> pz.nx.NamedArray:
        steering: SteeringInputs | None = side_inputs.get("steering")
        if steering is None:
            return x
        token_positions = side_inputs["token_positions"]
        active = steering.target_layer == self.layer_index  # {batch, intervention}
        steer_mask = active & (token_positions >= steering.steer_from)  # {batch, seq, intervention}

        direction = self.sae.decoder.w_dec[{LATENT_AXIS: steering.feature}]
        x32 = x.astype(jnp.float32)
        feature_now = self.sae.encoder.selected_activations(x32, steering.feature)
        is_clamp = steering.mode == MODE_CODES["clamp"]
        delta = pz.nx.nmap(jnp.where)(is_clamp, steering.value - feature_now, steering.value)
        change = (pz.nx.nmap(jnp.where)(steer_mask, delta, 0.0) * direction).untag(INTERVENTION_AXIS).sum()
        steered = x32 + change
        out = pz.nx.nmap(jnp.where)(steer_mask.untag(INTERVENTION_AXIS).any(), steered.astype(x.dtype), x)

        measure_mask = side_inputs.get("measure_mask")
        if self.totals is not None and measure_mask is not None:
            baseline = measure_mask & ~steering.steered
            self._accumulate(
                out.astype(jnp.float32), steering.feature, measure_mask & active, baseline,
                side_inputs["probe_features"],
            )
        return out

    def _accumulate(
        self,
        x32: pz.nx.NamedArray,
        feature: pz.nx.NamedArray,
        mask: pz.nx.NamedArray,
        baseline_mask: pz.nx.NamedArray,
        probe_features: pz.nx.NamedArray,
    ) -> None:
        latents = self.sae.encode(x32)
        l0 = (latents > 0).astype(jnp.float32).untag(LATENT_AXIS).sum()
        activation = self.sae.encoder.selected_activations(x32, feature)  # {batch, seq, intervention}
        probes = latents[{LATENT_AXIS: probe_features}]  # {batch, seq, probe}
        weight = mask.astype(jnp.float32)
        baseline_weight = baseline_mask.astype(jnp.float32)
        increments = {
            "tokens": weight,
            "l0": l0 * weight,
            "feature_activation": activation * weight,
            "feature_fires": (activation > 0).astype(jnp.float32) * weight,
            "baseline_tokens": baseline_weight,
            "baseline_l0": l0 * baseline_weight,
            "probe_activation": probes * baseline_weight,
            "probe_fires": (probes > 0).astype(jnp.float32) * baseline_weight,
        }
        self.totals.value = {
            name: self.totals.value[name] + increments[name].untag("seq").sum() for name in self.totals.value
        }


def add_steering_sites(
    model: pz.nn.Layer,
    saes: Mapping[int, JumpReLUSAE],
    batch_size: int | None = None,
    num_probes: int = 1,
    num_interventions: int = 1,
) -> pz.nn.Layer:
    """Inserts a `SteeringSite` after every block in `saes`; with `batch_size`, each site also keeps totals
    (`TOTAL_NAMES` per row and intervention, of `num_interventions` per row; and `BASELINE_TOTAL_NAMES` over
    `num_probes` probe features)."""
    for layer_index in sorted(saes):
        totals = None
        if batch_size is not None:
            per_intervention = {"batch": batch_size, INTERVENTION_AXIS: num_interventions}
            zeros = {name: pz.nx.zeros(per_intervention, dtype=jnp.float32) for name in TOTAL_NAMES}
            zeros["baseline_tokens"] = pz.nx.zeros({"batch": batch_size}, dtype=jnp.float32)
            zeros["baseline_l0"] = pz.nx.zeros({"batch": batch_size}, dtype=jnp.float32)
            for name in ("probe_activation", "probe_fires"):
                zeros[name] = pz.nx.zeros({"batch": batch_size, "probe": num_probes}, dtype=jnp.float32)
            totals = pz.StateVariable(value=zeros, label=f"steering/totals_{layer_index}")
        model = insert_after_block(model, layer_index, SteeringSite(layer_index, saes[layer_index], totals))
    return model


def combine_totals(totals_by_layer: Mapping[int, Mapping[str, ArrayLike]]) -> dict[str, np.ndarray]:
    """Adds the `TOTAL_NAMES` totals (`[batch, intervention]` arrays) of all sites (an intervention is measured
    only at its own layer)."""
    combined = {name: 0.0 for name in TOTAL_NAMES}
    for totals in totals_by_layer.values():
        for name in TOTAL_NAMES:
            combined[name] = combined[name] + np.asarray(totals[name], dtype=np.float64)
    return combined


def baseline_totals(totals: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    """One site's `BASELINE_TOTAL_NAMES` totals as float64 arrays (`[batch]`, or `[batch, probe]`)."""
    return {name: np.asarray(totals[name], dtype=np.float64) for name in BASELINE_TOTAL_NAMES}
