"""What the planner knows of a sweep's model, SAEs and text: everything once resolved, or what can be known
without a download.

`runner.plan.prepare.plan_sweep` asks its questions through `SweepFacts`. `ResolvedFacts` (`runner run`) answers
from the checkpoint, the SAE files and the tokenizer; `OfflineFacts` (`runner validate`) from published shapes
and the config's labels:

- architecture: the checkpoint's, or the published one (None when only the checkpoint could tell);
- prompt lengths: tokenized, or estimated from their bytes;
- SAEs: resolved (Gemma Scope files are downloaded), or placeholders named after their grid cell;
- SAE widths: read from the files, or the width labels' latent counts;
- evaluation text: loaded and tokenized, or not read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from runner.config.schema import ExperimentConfig, SAEEvalConfig
from runner.errors import SAEError
from runner.model import synthetic
from runner.model import tokenizer as tokenizer_lib
from runner.model.architecture import Gemma2Architecture
from runner.model.loading import (
    planning_architecture,
    planning_stored_dtype,
    read_architecture,
    resolve_model_location,
    stored_dtype,
)
from runner.nn.sites import site_width
from runner.plan import points as plan
from runner.sae.params import read_params_npz
from runner.sae.sources import SAEFile, resolve_sae_file, width_latents
from runner.sae_eval import text_sets
from runner.sae_eval.text_sets import EvalTokens

if TYPE_CHECKING:
    from gemma import gm

#: An L0 of the grid: `canonical`, the N of `average_l0_N`, or a synthetic SAE's target L0.
L0 = int | float | str

#: Bytes of English text per Gemma token, about: a conservative prompt length before the tokenizer is at hand.
BYTES_PER_TOKEN = 3


class SweepFacts(Protocol):
    """The questions the planner asks about a sweep's model, SAEs and evaluation text."""

    @property
    def architecture(self) -> Gemma2Architecture | None:
        """The model's architecture; None when it is not known before the checkpoint is read."""

    @property
    def is_synthetic(self) -> bool:
        """Whether the checkpoint is a synthetic one."""

    @property
    def stored_dtype(self) -> str:
        """The dtype the checkpoint's weights are stored in (what `dtype: auto` loads)."""

    def prompt_token_counts(self, prompts: Sequence[str]) -> tuple[int, ...]:
        """Tokens of each prompt, BOS included."""

    def sae_file(self, layer: int, *, width: str | None, l0: L0, num_layers: int) -> SAEFile:
        """The SAE of one grid cell: the block whose site it reads, its width label (None: not known yet) and L0
        (see `runner.sae.sources.resolve_sae_file`); `num_layers` SAEs come from the same source."""

    def latents(self, sae_file: SAEFile) -> int | None:
        """The SAE's latent count; None when it is not known yet."""

    def eval_tokens(self, grid: SAEEvalConfig) -> EvalTokens | None:
        """The evaluation set of an SAE evaluation; None when the text is not read."""


class ResolvedFacts:
    """Everything, from the checkpoint (its metadata: no weights are read), the SAE files and the tokenizer.

    Args:
      config: The experiment.
      architecture: The checkpoint's architecture.
      tokenizer: The checkpoint's tokenizer.
      is_synthetic: Whether the checkpoint is a synthetic one.
    """

    def __init__(self, config: ExperimentConfig, architecture: Gemma2Architecture, tokenizer: gm.text.Tokenizer,
                 is_synthetic: bool, stored_dtype: str = "float32"):
        self._config = config
        self._architecture = architecture
        self._tokenizer = tokenizer
        self._is_synthetic = is_synthetic
        self._stored_dtype = stored_dtype
        self._model_id = plan.model_id(config.model)

    @classmethod
    def read(cls, config: ExperimentConfig, cache_dir: Path) -> ResolvedFacts:
        """Finds the configured checkpoint (downloading it, or writing a synthetic one, if needed) and reads its
        architecture and tokenizer."""
        location = resolve_model_location(config.model, cache_dir)
        architecture = read_architecture(location)
        tokenizer = tokenizer_lib.load_tokenizer(location.tokenizer_path)
        return cls(config, architecture, tokenizer, location.is_synthetic, stored_dtype(location))

    @property
    def architecture(self) -> Gemma2Architecture:
        """The checkpoint's architecture."""
        return self._architecture

    @property
    def is_synthetic(self) -> bool:
        """Whether the checkpoint is a synthetic one."""
        return self._is_synthetic

    @property
    def stored_dtype(self) -> str:
        """The checkpoint's stored dtype, from its metadata."""
        return self._stored_dtype

    def prompt_token_counts(self, prompts: Sequence[str]) -> tuple[int, ...]:
        """Tokens of each prompt as the checkpoint's tokenizer encodes it, BOS included."""
        return tuple(len(tokenizer_lib.encode_prompt(self._tokenizer, prompt)) for prompt in prompts)

    def sae_file(self, layer: int, *, width: str | None, l0: L0, num_layers: int) -> SAEFile:
        """The SAE's file, found (downloaded from Hugging Face, or looked up in a local tree) or, for a synthetic
        SAE, named (it is written once the model is loaded)."""
        return resolve_sae_file(self._config.sae, layer, width=width, l0=l0, model_id=self._model_id,
                                num_layers=num_layers)

    def latents(self, sae_file: SAEFile) -> int:
        """The SAE's width, read from its file (synthetic: the width it will be written with).

        Raises:
          SAEError: The file is not a valid SAE of the model's site, or a Gemma Scope file's width is not its
            label's.
        """
        if sae_file.path is None:
            return int(sae_file.width)
        expected_d_in = site_width(self._architecture, sae_file.site)
        d_sae = read_params_npz(sae_file.path, expected_d_in=expected_d_in)["W_enc"].shape[1]
        if self._config.sae.source == "huggingface" and d_sae != width_latents(sae_file.width):
            raise SAEError(f"{sae_file.path}: holds {d_sae} latents but width {sae_file.width} has "
                           f"{width_latents(sae_file.width)}")
        return d_sae

    def eval_tokens(self, grid: SAEEvalConfig) -> EvalTokens:
        """The evaluation text, read and cut into the grid's windows."""
        return text_sets.load_eval_tokens(grid.text, self._tokenizer, context_length=grid.context_length,
                                          num_sequences=grid.num_sequences)


class OfflineFacts:
    """What is known without downloading or loading anything: a synthetic preset's, a published Gemma2's or a
    local checkpoint's architecture (`runner.model.loading.planning_architecture`), prompt lengths estimated
    from their bytes, placeholder SAEs and the widths their labels name.

    Args:
      config: The experiment.
    """

    def __init__(self, config: ExperimentConfig):
        self._config = config
        self._architecture = planning_architecture(config.model)
        model = config.model
        self._is_synthetic = model.source == "synthetic" or (
            model.source == "local" and synthetic.synthetic_architecture(Path(model.path)) is not None
        )

    @property
    def architecture(self) -> Gemma2Architecture | None:
        """The published (or locally readable) architecture; None when only the checkpoint could tell."""
        return self._architecture

    @property
    def is_synthetic(self) -> bool:
        """Whether the model is a synthetic preset, or a local checkpoint marked synthetic."""
        return self._is_synthetic

    @property
    def stored_dtype(self) -> str:
        """The stored dtype as far as it is known without a download (`planning_stored_dtype`)."""
        return planning_stored_dtype(self._config.model)

    def prompt_token_counts(self, prompts: Sequence[str]) -> tuple[int, ...]:
        """Each prompt's tokens guessed from its UTF-8 bytes (`BYTES_PER_TOKEN`), BOS included."""
        return tuple(math.ceil(len(prompt.encode("utf-8")) / BYTES_PER_TOKEN) + 1 for prompt in prompts)

    def sae_file(self, layer: int, *, width: str | None, l0: L0, num_layers: int) -> SAEFile:
        """A placeholder SAE named after its grid cell (resolving it may download): the same points and jobs."""
        return SAEFile(layer, f"unresolved:layer_{layer}/width_{width}/l0_{l0}", path=None, width=width,
                       l0=str(l0), site=self._config.sae.site)

    def latents(self, sae_file: SAEFile) -> int | None:
        """The latent count of the SAE's width label; None while the label is unknown."""
        return width_latents(sae_file.width) if sae_file.width is not None else None

    def eval_tokens(self, grid: SAEEvalConfig) -> None:
        """The text is not read offline."""
        return None
