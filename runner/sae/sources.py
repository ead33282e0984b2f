"""Where each steered layer's SAE comes from: Gemma Scope on Hugging Face, a local tree, or a synthetic SAE.

All sources end as a `params.npz` file in the Gemma Scope layout
(`layer_{L}/width_{W}/average_l0_{N}/params.npz`), which `runner.nn.jumprelu.load_sae` reads and validates. Each
source's config class (`runner.config.schema`) registers its functions here (`resolve_sae_file`,
`steering_width_and_l0`): a new source is a new class and its registrations.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from runner import gemma_scope
from runner.config.schema import HuggingFaceSAEConfig, LocalSAEConfig, SAEConfig, SyntheticSAEConfig
from runner.errors import SAEError
from runner.files import write_text_atomically
from runner.model import tokenizer as tokenizer_lib
from runner.nn import measurement
from runner.sae.params import calibrate_thresholds, random_sae_arrays, write_params_npz

if TYPE_CHECKING:
    from gemma import gm

    from runner.model.loading import LoadedModel

_L0_FOLDER = re.compile(r"^average_l0_(\d+)$")


@dataclasses.dataclass(frozen=True)
class SAEFile:
    """A resolved SAE file for one layer.

    Attributes:
      layer: The residual-stream site (after block `layer`).
      sae_id: Stable identifier recorded with every point.
      path: The `params.npz` (None until a synthetic SAE is written).
      release: Gemma Scope release when the SAE is one (for Neuronpedia links), else None.
      width: Width label of the SAE (`16k`, or the latent count of a synthetic SAE).
      l0: The resolved L0 label: the N of `average_l0_N`, or a synthetic SAE's target L0.
      site: Where the SAE reads (`res`, `mlp`, `att`).
    """

    layer: int
    sae_id: str
    path: Path | None
    release: str | None = None
    width: str | None = None
    l0: str | None = None
    site: str = "res"

    def neuronpedia_url(self, feature: int) -> str | None:
        """The feature's Neuronpedia page, for Gemma Scope SAEs."""
        if self.release is None or self.width is None:
            return None
        return gemma_scope.neuronpedia_url(self.release, self.layer, self.width, feature)


def synthetic_sae_width(sae_config: SyntheticSAEConfig, embedding_dim: int) -> int:
    """Latents of a steering sweep's synthetic SAE: `width_features`, else 4 x the model width."""
    return int(sae_config.width_features or 4 * embedding_dim)


def width_latents(label: str) -> int:
    """The latent count of a width label: `16k` = 16384, `1m` = 1048576, `256` = 256."""
    factor = {"k": 1024, "m": 1024**2}.get(label[-1], 1)
    return int(label.rstrip("km")) * factor


def synthetic_sae_id(model_id: str, layer: int, width: int, target_l0: float, seed: int, site: str = "res") -> str:
    """Identifier of a synthetic SAE, fixed by its inputs before it is written: the source, the Gemma Scope-like
    path of the SAE and, after `@`, the model it is fitted to (a synthetic model without its own `synthetic:`), e.g.
    `synthetic:layer_1/width_256/target_l0_16/seed0@tiny:seed0` (an `mlp` or `att` SAE: `synthetic-mlp:...`, like
    the Gemma Scope releases of those sites)."""
    source = "synthetic" if site == "res" else f"synthetic-{site}"
    fitted_to = model_id.removeprefix("synthetic:")
    return f"{source}:layer_{layer}/width_{width}/target_l0_{target_l0:g}/seed{seed}@{fitted_to}"


def resolve_sae_files(
    sae_config: SAEConfig, layers: Sequence[int], *, model_id: str, embedding_dim: int
) -> dict[int, SAEFile]:
    """The SAE file of every steered layer (the width and L0 a steering sweep reads from the SAE section, see
    `steering_width_and_l0`; then `resolve_sae_file`)."""
    width, l0 = steering_width_and_l0(sae_config, embedding_dim)
    return {
        layer: resolve_sae_file(sae_config, layer, width=width, l0=l0, model_id=model_id, num_layers=len(layers))
        for layer in layers
    }


@functools.singledispatch
def steering_width_and_l0(sae_config: SAEConfig, embedding_dim: int) -> tuple[str, int | float | str]:
    """The width label and L0 of the SAEs a steering sweep uses (an evaluation grid gives its own)."""
    raise TypeError(f"no SAE source {type(sae_config).__name__}")


@steering_width_and_l0.register(HuggingFaceSAEConfig)
@steering_width_and_l0.register(LocalSAEConfig)
def _gemma_scope_width_and_l0(
    sae_config: HuggingFaceSAEConfig | LocalSAEConfig, embedding_dim: int
) -> tuple[str, int | float | str]:
    return sae_config.width, sae_config.l0


@steering_width_and_l0.register(SyntheticSAEConfig)
def _synthetic_width_and_l0(sae_config: SyntheticSAEConfig, embedding_dim: int) -> tuple[str, int | float | str]:
    return str(synthetic_sae_width(sae_config, embedding_dim)), sae_config.target_l0


@functools.singledispatch
def resolve_sae_file(
    sae_config: SAEConfig, layer: int, *, width: str, l0: int | float | str, model_id: str, num_layers: int = 1
) -> SAEFile:
    """Finds (downloading a Gemma Scope file if needed) one SAE of the configured source.

    Args:
      sae_config: The SAE section; each source's class registers how its SAEs are found.
      layer: The block whose site the SAE reads.
      width: Width label (`16k`); for synthetic SAEs the latent count.
      l0: `canonical` or the N of `average_l0_N`; for synthetic SAEs the target L0.
      model_id: Names synthetic SAEs (they are fitted to the model).
      num_layers: Layers resolved from the same source (a single `params.npz` serves only one).

    Synthetic SAEs are only named here (path None); `write_synthetic_saes` creates them from the loaded model.
    """
    raise TypeError(f"no SAE source {type(sae_config).__name__}")


@resolve_sae_file.register(SyntheticSAEConfig)
def _synthetic_sae(
    sae_config: SyntheticSAEConfig, layer: int, *, width: str, l0: int | float | str, model_id: str,
    num_layers: int = 1,
) -> SAEFile:
    latents = width_latents(str(width))
    sae_id = synthetic_sae_id(model_id, layer, latents, float(l0), sae_config.seed, sae_config.site)
    return SAEFile(layer, sae_id, path=None, width=str(latents), l0=f"{float(l0):g}", site=sae_config.site)


@resolve_sae_file.register(HuggingFaceSAEConfig)
def _huggingface_sae(
    sae_config: HuggingFaceSAEConfig, layer: int, *, width: str, l0: int | float | str, model_id: str,
    num_layers: int = 1,
) -> SAEFile:
    from huggingface_hub import hf_hub_download  # token: HF_TOKEN, read by huggingface_hub itself

    release = sae_config.release
    resolved = gemma_scope.resolve_l0(release, layer, width, l0 if isinstance(l0, str) else int(l0))
    filename = gemma_scope.params_path(layer, width, resolved)
    path = Path(hf_hub_download(gemma_scope.hf_repo_id(release), filename))
    sae_id = gemma_scope.sae_id(release, layer, width, resolved)
    return SAEFile(layer, sae_id, path, release=release, width=width, l0=str(resolved), site=sae_config.site)


@resolve_sae_file.register(LocalSAEConfig)
def _local_sae(
    sae_config: LocalSAEConfig, layer: int, *, width: str, l0: int | float | str, model_id: str, num_layers: int = 1
) -> SAEFile:
    root, site = sae_config.path, sae_config.site
    if root.is_file():
        if num_layers != 1:
            raise SAEError(f"{root}: one params.npz given but {num_layers} layers are steered; give a directory tree")
        return SAEFile(layer, f"local:{root}", root, width=width, l0=str(l0), site=site)
    width_dir = root / f"layer_{layer}" / f"width_{width}"
    if not width_dir.is_dir():
        raise SAEError(f"{width_dir}: no SAE for layer {layer} at width {width} in {root}")
    available = sorted(
        int(match.group(1)) for entry in width_dir.iterdir() if (match := _L0_FOLDER.match(entry.name))
    )
    if not available:
        raise SAEError(f"{width_dir}: holds no average_l0_N folders")
    if l0 == "canonical":
        chosen = min(available, key=lambda n: (abs(n - 100), n))  # Gemma Scope's canonical: L0 closest to 100
    elif int(l0) in available:
        chosen = int(l0)
    else:
        raise SAEError(f"{width_dir}: no average_l0_{l0} (available: {available})")
    path = width_dir / f"average_l0_{chosen}" / "params.npz"
    sae_id = f"local:{root.name}/layer_{layer}/width_{width}/average_l0_{chosen}"
    return SAEFile(layer, sae_id, path, width=width, l0=str(chosen), site=site)


def calibration_tokens(tokenizer: gm.text.Tokenizer, num_sequences: int = 16, seq_len: int = 64) -> np.ndarray:
    """`[num_sequences, seq_len]` windows of the bundled corpus, each starting with BOS (no padding)."""
    text = tokenizer_lib.CORPUS_PATH.read_text(encoding="utf-8")
    stream = tokenizer_lib.encode_prompt(tokenizer, text)[1:]
    body = seq_len - 1
    needed = num_sequences * body
    if len(stream) < needed:
        stream = (stream * (needed // max(len(stream), 1) + 1))[:needed]
    windows = np.asarray(stream[:needed], np.int32).reshape(num_sequences, body)
    return np.concatenate([np.full((num_sequences, 1), tokenizer_lib.BOS_ID, np.int32), windows], axis=1)


@functools.partial(jax.jit, static_argnames="site_keys")
def _site_activations(model: Any, tokens: jax.Array, site_keys: tuple[tuple[int, str], ...]) -> dict:
    """`{(layer, site): [B, S, D]}` activations of one pass over `tokens` (no padding), stopping before the
    unembedding."""
    named = pz.nx.wrap(tokens).tag("batch", "seq")
    positions = pz.nx.wrap(jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)).tag("batch", "seq")
    _, captured = measurement.capture_hidden(model, named, list(site_keys), token_positions=positions)
    return {key: value.unwrap("batch", "seq", "embedding") for key, value in captured.items()}


def write_synthetic_saes(
    loaded_model: LoadedModel,
    layers: Sequence[int],
    out_root: Path,
    *,
    width: int,
    target_l0: float,
    seed: int,
    site: str = "res",
    width_label: str | None = None,
) -> dict[int, Path]:
    """Writes a calibrated random JumpReLU SAE per layer under `out_root` in the Gemma Scope layout
    (`layer_{L}/width_{label}/average_l0_{N}/params.npz`, the label `width_label` or the latent count).

    Decoder rows are unit-norm random directions (encoder tied to them); each latent's threshold is set so that
    it fires on `target_l0 / width` of the corpus activations at that layer's `site` (BOS excluded), so the mean
    L0 lands near `target_l0`. The folder name records the L0 measured on the calibration tokens. Reuses SAEs
    already written with the same inputs. The activations come from one jitted pass that stops before the
    unembedding, so calibrating the SAEs of a 2B model needs no `[tokens, vocabulary]` logits.
    """
    marker_path = out_root / "runner_synthetic_saes.json"
    label = width_label or str(width)
    request = {"width": width, "target_l0": target_l0, "seed": seed, "layers": sorted(layers)}
    if site != "res":
        request["site"] = site
    if label != str(width):
        request["width_label"] = label
    if marker_path.is_file():
        marker = json.loads(marker_path.read_text())
        if {k: marker.get(k) for k in request} == request:
            return {int(layer): out_root / rel for layer, rel in marker["paths"].items()}

    tokens = calibration_tokens(loaded_model.tokenizer)
    activations_at = _site_activations(pz.freeze_params(loaded_model.model), jnp.asarray(tokens),
                                       tuple((layer, site) for layer in sorted(layers)))
    paths: dict[int, Path] = {}
    for layer in sorted(layers):
        activations = np.asarray(activations_at[(layer, site)], np.float32)[:, 1:]
        flat = activations.reshape(-1, activations.shape[-1])
        arrays = calibrate_thresholds(
            random_sae_arrays(flat.shape[-1], width, seed + 1000 * layer), flat, target_l0
        )
        pre = flat @ arrays["W_enc"] + arrays["b_enc"]
        measured_l0 = int(round(float((pre > arrays["threshold"]).sum(axis=1).mean())))
        relative = Path(f"layer_{layer}") / f"width_{label}" / f"average_l0_{measured_l0}" / "params.npz"
        paths[layer] = write_params_npz(arrays, out_root / relative)
    out_root.mkdir(parents=True, exist_ok=True)
    marker = {**request, "paths": {str(layer): str(path.relative_to(out_root)) for layer, path in paths.items()}}
    write_text_atomically(marker_path, json.dumps(marker, indent=2))
    return paths
