"""Gemma Scope naming: releases, canonical L0 tables, file paths, SAE ids and Neuronpedia links.

Pure data and string functions; nothing here downloads or reads weights.
"""

from __future__ import annotations

from typing import Literal

from runner.errors import ConfigError

#: Hugging Face releases (repo `google/<release>`) in the published Gemma Scope set.
RELEASES: tuple[str, ...] = (
    "gemma-scope-2b-pt-res",
    "gemma-scope-2b-pt-mlp",
    "gemma-scope-2b-pt-att",
    "gemma-scope-9b-pt-res",
    "gemma-scope-9b-pt-mlp",
    "gemma-scope-9b-pt-att",
    "gemma-scope-27b-pt-res",
    "gemma-scope-9b-it-res",
)

#: SAE widths as spelled in the `width_{W}` folders.
WIDTHS: tuple[str, ...] = ("16k", "32k", "65k", "131k", "262k", "524k", "1m")


def _parse_table(text: str) -> dict[int, int]:
    """Parses the reference sheet's `layer:l0 layer:l0 ...` notation."""
    return {int(layer): int(l0) for layer, l0 in (item.split(":") for item in text.split())}


#: Canonical SAE (average L0 closest to 100) per (release, width) and layer. The HF `canonical` folders were
#: removed, so this table is the only way to resolve `l0: canonical`.
CANONICAL_L0: dict[tuple[str, str], dict[int, int]] = {
    ("gemma-scope-2b-pt-res", "16k"): _parse_table(
        "0:105 1:102 2:141 3:59 4:124 5:68 6:70 7:69 8:71 9:73 10:77 11:80 12:82 13:84 14:84 15:78 16:78 17:77 "
        "18:74 19:73 20:71 21:70 22:72 23:75 24:73 25:116"
    ),
    ("gemma-scope-2b-pt-res", "65k"): _parse_table(
        "0:73 1:121 2:77 3:89 4:89 5:105 6:107 7:107 8:111 9:118 10:128 11:70 12:72 13:75 14:73 15:127 16:128 "
        "17:125 18:116 19:115 20:114 21:111 22:116 23:123 24:124 25:93"
    ),
    ("gemma-scope-9b-pt-res", "16k"): _parse_table("9:100 20:68 31:114"),
}

#: Neuronpedia model ids of the releases whose dashboards follow `<model>/<L>-gemmascope-res-<W>/<feature>`.
_NEURONPEDIA_MODELS: dict[str, str] = {
    "gemma-scope-2b-pt-res": "gemma-2-2b",
    "gemma-scope-9b-pt-res": "gemma-2-9b",
}


def release_site(release: str) -> str:
    """Returns the hook site (`res`, `mlp` or `att`) a release's SAEs read, e.g. `res` for `gemma-scope-2b-pt-res`."""
    _check_release(release)
    return release.rsplit("-", 1)[1]


def resolve_l0(release: str, layer: int, width: str, l0: int | Literal["canonical"]) -> int:
    """Returns the `average_l0_N` folder number: `l0` itself, or the canonical table's entry.

    Raises:
      ConfigError: `l0` is "canonical" and the table has no entry for (release, width, layer).
    """
    if l0 != "canonical":
        return int(l0)
    table = CANONICAL_L0.get((release, width), {})
    if layer not in table:
        known = ", ".join(f"{r} {w}" for r, w in CANONICAL_L0)
        raise ConfigError(
            f"sae.l0: no canonical L0 is known for release {release!r} width {width!r} layer {layer} "
            f"(tables exist for {known}); set an explicit `l0:` (the N of an average_l0_N folder)"
        )
    return table[layer]


def hf_repo_id(release: str) -> str:
    """Returns the Hugging Face repo of a release, e.g. `google/gemma-scope-2b-pt-res`."""
    _check_release(release)
    return f"google/{release}"


def params_path(layer: int, width: str, l0: int) -> str:
    """Returns the path of one SAE inside a release, e.g. `layer_20/width_16k/average_l0_71/params.npz`."""
    return f"{_sae_folder(layer, width, l0)}/params.npz"


def sae_id(release: str, layer: int, width: str, l0: int | Literal["canonical"]) -> str:
    """Returns a stable name of one SAE, e.g. `gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71`."""
    return f"{release}/{_sae_folder(layer, width, resolve_l0(release, layer, width, l0))}"


def neuronpedia_url(release: str, layer: int, width: str, feature: int) -> str | None:
    """Returns the Neuronpedia dashboard of a feature, or None for releases Neuronpedia ids are not known for.

    Example: `https://www.neuronpedia.org/gemma-2-2b/20-gemmascope-res-16k/3124`.
    """
    model = _NEURONPEDIA_MODELS.get(release)
    if model is None:
        return None
    return f"https://www.neuronpedia.org/{model}/{layer}-gemmascope-res-{width}/{feature}"


def _sae_folder(layer: int, width: str, l0: int) -> str:
    return f"layer_{layer}/width_{width}/average_l0_{l0}"


def _check_release(release: str) -> None:
    if release not in RELEASES:
        raise ConfigError(f"sae.release: {release!r} is not a Gemma Scope release (allowed: {', '.join(RELEASES)})")
