"""Gemma Scope naming: the registry of releases, their widths and L0 folders, file paths, SAE ids and Neuronpedia
links.

The registry is `runner/data/gemma_scope.json` (see its `source`): per release, the Hugging Face repo, the
Neuronpedia model id and, per width and layer, the `average_l0_N` folders the repo holds and the canonical one (the
average L0 closest to 100; the repos' own `canonical` folders were removed). Pure data and string functions; nothing
here downloads or reads weights.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from runner.errors import ConfigError

REGISTRY_PATH = Path(__file__).resolve().parent / "data" / "gemma_scope.json"


class WidthFolders(BaseModel):
    """The SAEs of one width of a release, by layer.

    Attributes:
      available_l0: The N of every `average_l0_N` folder of each layer.
      canonical_l0: The canonical N of each layer that has one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    available_l0: dict[int, tuple[int, ...]]
    canonical_l0: dict[int, int]


class Release(BaseModel):
    """One Gemma Scope release: where it is and which SAEs it holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    repo_id: str
    neuronpedia_model: str
    widths: dict[str, WidthFolders]


class _Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str
    releases: dict[str, Release]


@functools.cache
def registry() -> Mapping[str, Release]:
    """Every release of `gemma_scope.json`, by name (read once)."""
    return _Registry.model_validate_json(REGISTRY_PATH.read_bytes()).releases


#: Release names (repo `google/<release>`) in the published Gemma Scope set.
RELEASES: tuple[str, ...] = tuple(registry())
#: SAE widths as spelled in the `width_{W}` folders, narrowest first (the registry lists them so).
WIDTHS: tuple[str, ...] = tuple(dict.fromkeys(width for release in registry().values() for width in release.widths))


def release_site(release: str) -> str:
    """Returns the hook site (`res`, `mlp` or `att`) a release's SAEs read, e.g. `res` for `gemma-scope-2b-pt-res`."""
    _release(release)
    return release.rsplit("-", 1)[1]


def release_widths(release: str) -> tuple[str, ...]:
    """The widths a release has SAEs of, narrowest first."""
    return tuple(_release(release).widths)


def sae_layers(release: str, width: str) -> tuple[int, ...]:
    """The layers a release has SAEs of `width` for (none for a width it does not have)."""
    folders = _release(release).widths.get(width)
    return tuple(sorted(folders.available_l0)) if folders is not None else ()


def layer_problem(release: str, layer: int, width: str) -> str | None:
    """Why the release has no SAE of `width` for `layer`, as the rest of a one-line message (what is missing and
    what exists); None when it has one."""
    folders = _release(release).widths.get(width)
    if folders is None:
        return f"{release!r} has no width_{width} SAEs (its widths: {', '.join(release_widths(release))})"
    if layer not in folders.available_l0:
        layers = _spans(sae_layers(release, width))
        return f"{release!r} has no width_{width} SAE for layer {layer} (layers with one: {layers})"
    return None


def l0_problem(release: str, layer: int, width: str, l0: int | str) -> str | None:
    """Why `l0` (`canonical` or the N of `average_l0_N`) names no SAE of the release at `layer` and `width`, as the
    rest of a one-line message (what is missing and what exists); None when it names one."""
    problem = layer_problem(release, layer, width)
    if problem is not None:
        return problem
    folders = _release(release).widths[width]
    available = ", ".join(str(n) for n in folders.available_l0[layer])
    if l0 == "canonical":
        if layer in folders.canonical_l0:
            return None
        return (
            f"no canonical L0 is known for release {release!r} width {width!r} layer {layer} (available: "
            f"{available}); set an explicit `l0:` (the N of an average_l0_N folder)"
        )
    if int(l0) in folders.available_l0[layer]:
        return None
    also = ", or canonical" if layer in folders.canonical_l0 else ""
    return f"{release!r} has no layer_{layer}/width_{width}/average_l0_{l0} (available: {available}{also})"


def resolve_l0(release: str, layer: int, width: str, l0: int | str) -> int:
    """Returns the `average_l0_N` folder number: `l0` itself, or the canonical one of (release, width, layer).

    Raises:
      ConfigError: No such folder: the layer has no SAE of that width, `l0` is not among its folders, or it has no
        canonical one (see `l0_problem`).
    """
    problem = l0_problem(release, layer, width, l0)
    if problem is not None:
        raise ConfigError(f"sae.l0: {problem}")
    if l0 == "canonical":
        return _release(release).widths[width].canonical_l0[layer]
    return int(l0)


def hf_repo_id(release: str) -> str:
    """Returns the Hugging Face repo of a release, e.g. `google/gemma-scope-2b-pt-res`."""
    return _release(release).repo_id


def params_path(layer: int, width: str, l0: int) -> str:
    """Returns the path of one SAE inside a release, e.g. `layer_20/width_16k/average_l0_71/params.npz`."""
    return f"{_sae_folder(layer, width, l0)}/params.npz"


def sae_id(release: str, layer: int, width: str, l0: int | Literal["canonical"]) -> str:
    """Returns a stable name of one SAE, e.g. `gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71`."""
    return f"{release}/{_sae_folder(layer, width, resolve_l0(release, layer, width, l0))}"


def neuronpedia_url(release: str, layer: int, width: str, feature: int) -> str:
    """Returns the Neuronpedia dashboard of a feature.

    Example: `https://www.neuronpedia.org/gemma-2-2b/20-gemmascope-res-16k/3124`.
    """
    model = _release(release).neuronpedia_model
    return f"https://www.neuronpedia.org/{model}/{layer}-gemmascope-{release_site(release)}-{width}/{feature}"


def _sae_folder(layer: int, width: str, l0: int) -> str:
    return f"layer_{layer}/width_{width}/average_l0_{l0}"


def _spans(layers: tuple[int, ...]) -> str:
    """`0..25` for consecutive layers, else the list."""
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(str(layer) for layer in layers)


def _release(release: str) -> Release:
    found = registry().get(release)
    if found is None:
        raise ConfigError(f"sae.release: {release!r} is not a Gemma Scope release (allowed: {', '.join(RELEASES)})")
    return found
