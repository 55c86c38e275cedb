"""UCE: Unified Concept Editing (Gandikota, Orgad, Belinkov, Materzynska, Bau; WACV 2024; arXiv 2308.14761).

UCE edits every cross-attention key and value projection ``W`` (``attn2.to_k``, ``attn2.to_v``) in closed form
so that the text embedding ``c_i`` of an erased concept produces the keys/values the anchor ("guide") concept
produced, ``v_i* = W0 c_anchor``, while preserved concepts ``c_j`` keep theirs, ``W0 c_j`` (paper Eq. 7, with the
``lambda`` ridge term of the official code):

    W = (sum_E v_i* c_i^T + lambda_p sum_P W0 c_j c_j^T + lambda W0)
        (sum_E c_i c_i^T + lambda_p sum_P c_j c_j^T + lambda I)^-1

(erase rows weighted by the erase scale). The solve is :mod:`erasure.methods.closed_form`, shared with RECE/MACE.

Which token embeddings become the ``c_i``:

* ``last_subject``: the last token of the concept's words in each erase prompt (the official code takes the last
  token of the prompt, which is the same when prompts end with the concept); the anchor's last token (the start
  token for the unconditional anchor ``""``, as in the official code). Preserve prompts use their last token.
* ``all_tokens``: every token of the concept's words, mapped to the anchor's last token, plus the prompt's
  end-of-text token, mapped to the anchor's end-of-text token (it carries the whole prompt through causal
  attention). Preserve prompts use all their tokens after the start token.

``preserve_tokens`` can pick the preserve rows apart from the erase rows (default: as ``tokens``). With the last
token only, nothing holds the other words of a prompt in place: the least-squares solve is free to move the keys
and values of every other token ("a picture of" in every prompt), and ``preserve_tokens = "all"`` adds those tokens
as preservation rows, so they stay where they were (``scripts/token_drift.py`` measures the drift; the README
reports it).

Paired anchors (``Concept.anchor`` as a list, one per erase prompt) give each erase prompt's rows its own anchor.
The text encoder is causal, so a concept token's embedding depends only on the words before it: erase prompts that
share the words up to the concept ("a striped red circle", "a striped blue square") give one and the same ``c_i``,
and the least-squares solve then maps it to the mean of their anchors' outputs.

SDXL: the text embeddings are both encoders' hidden states concatenated, as the UNet sees them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from erasure.attention import token_indices
from erasure.concepts import Concept, EraseRequest
from erasure.diffusion import encode_prompts
from erasure.methods import register
from erasure.methods.base import EraseMethod, MethodConfig, pipeline_tokenizers
from erasure.methods.closed_form import RidgeSolver

logger = logging.getLogger(__name__)

TOKEN_MODES = ("last_subject", "all_tokens")
PRESERVE_TOKEN_MODES = ("last", "all")
#: Prompts per text-encoder call (bounds the activations of large preserve sets).
ENCODE_CHUNK = 128


@dataclass
class UCEConfig(MethodConfig):
    """UCE settings; defaults follow the official code (erase scale 1, preserve scale 1, lambda 0.5)."""

    renamed_options: ClassVar[dict[str, str]] = {"lamb": "lam"}  # the official code's spelling, used until 0.1

    erase_scale: float = field(default=1.0, metadata={"help": "weight of each erase row (erase scale)"})
    preserve_scale: float = field(default=1.0, metadata={"help": "weight of each preserve row (lambda_p)"})
    lam: float = field(default=0.5, metadata={"help": "ridge strength pulling W towards W0 (lambda)"})
    tokens: str = field(
        default="last_subject",
        metadata={"help": "token embeddings edited: last_subject (official) or all_tokens (concept tokens + EOS)"},
    )
    preserve_tokens: str | None = field(
        default=None,
        metadata={
            "help": "preserve rows: last (each preserve prompt's last token) or all (every token after the start); "
            "default: last for last_subject, all for all_tokens"
        },
    )

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {', '.join(TOKEN_MODES)}, got {self.tokens!r}.")
        if self.preserve_tokens is None:
            self.preserve_tokens = "last" if self.tokens == "last_subject" else "all"
        if self.preserve_tokens not in PRESERVE_TOKEN_MODES:
            raise ValueError(
                f"preserve_tokens must be one of {', '.join(PRESERVE_TOKEN_MODES)}, got {self.preserve_tokens!r}."
            )
        for name in ("erase_scale", "preserve_scale", "lam"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}.")
        if self.erase_scale == 0:
            raise ValueError("erase_scale = 0 erases nothing; use a positive erase scale.")


def _positions(tokenizer: Any, prompt: str) -> tuple[int, int]:
    """``(last token, end-of-text)`` positions; for ``""`` the last token is the start token (position 0)."""
    length = len(tokenizer(prompt, truncation=True).input_ids)  # start + tokens + end
    return max(length - 2, 0), length - 1


@contextlib.contextmanager
def _padding_length(tokenizers: Sequence[Any], length: int) -> Iterator[None]:
    """Make the tokenizers pad (and truncate) to ``length`` tokens while the block runs."""
    saved = [tokenizer.model_max_length for tokenizer in tokenizers]
    try:
        for tokenizer in tokenizers:
            tokenizer.model_max_length = length
        yield
    finally:
        for tokenizer, value in zip(tokenizers, saved, strict=True):
            tokenizer.model_max_length = value


def encode_short(pipe: DiffusionPipeline, prompts: Sequence[str]) -> Tensor:
    """Float64 ``[N, L, D]`` token embeddings of ``prompts``, padded only to the longest one (``L`` tokens).

    CLIP text encoders are causal: the embedding at position ``i`` depends on tokens ``0..i`` only, so positions
    ``< L`` equal those of the usual 77-token encoding (to float rounding) while the encoder runs on ``L`` instead
    of 77 tokens per prompt. UCE reads positions up to each prompt's end token, all ``< L``.
    """
    tokenizers = pipeline_tokenizers(pipe)
    length = max(len(t(prompt, truncation=True).input_ids) for t in tokenizers for prompt in prompts)
    with _padding_length(tokenizers, length):
        chunks = [
            encode_prompts(pipe, prompts[start : start + ENCODE_CHUNK]).prompt_embeds.detach().to(torch.float64)
            for start in range(0, len(prompts), ENCODE_CHUNK)
        ]
    return torch.cat(chunks)


def encode_full(pipe: DiffusionPipeline, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Float64 ``[L, D]`` embeddings of each distinct prompt at every position the UNet attends to.

    ``L`` is the tokenizer's length, padding included: the rows of methods that use all of a prompt's tokens (RECE,
    MACE).
    """
    unique = list(dict.fromkeys(prompts))
    chunks = [
        encode_prompts(pipe, unique[i : i + ENCODE_CHUNK]).prompt_embeds.detach().to(torch.float64)
        for i in range(0, len(unique), ENCODE_CHUNK)
    ]
    return dict(zip(unique, torch.cat(chunks), strict=True)) if unique else {}


def conflicting_rows(inputs: Tensor, anchors: Tensor, tolerance: float = 1e-6) -> int:
    """How many erase rows have the same input ``c_i`` as a row with a different anchor (relative ``tolerance``)."""
    same_input = torch.cdist(inputs, inputs) <= tolerance * inputs.norm(dim=1).max()
    same_anchor = torch.cdist(anchors, anchors) <= tolerance * anchors.norm(dim=1).max()
    return int((same_input & ~same_anchor).any(dim=1).sum())


@register("uce")
class UCE(EraseMethod):
    """Unified Concept Editing: closed-form edit of every cross-attention key/value projection."""

    config_class = UCEConfig
    parameter_preset = "xattn_kv"
    needs_vae = False  # closed form on text embeddings and UNet weights: nothing is sampled (RECE inherits it)
    config: UCEConfig

    def _rows(
        self, tokenizer: Any, concept: Concept, embeddings: dict[str, Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Erase inputs ``c_i`` and the anchor embeddings whose outputs are their targets."""
        inputs, anchors = [], []
        for prompt, anchor_prompt in zip(concept.erase, concept.erase_anchors, strict=True):
            anchor_last, anchor_end = _positions(tokenizer, anchor_prompt)
            anchor = embeddings[anchor_prompt]
            found = token_indices(tokenizer, prompt, concept.concept_words)
            last, end = _positions(tokenizer, prompt)
            if not found:
                logger.info("UCE: %r does not contain %s; using its last token.", prompt, concept.concept_words)
                found = [last]
            positions = [found[-1]] if self.config.tokens == "last_subject" else found
            for position in positions:
                inputs.append(embeddings[prompt][position])
                anchors.append(anchor[anchor_last])
            if self.config.tokens == "all_tokens":
                inputs.append(embeddings[prompt][end])
                anchors.append(anchor[anchor_end])
        return inputs, anchors

    def _preserve_rows(self, tokenizer: Any, prompt: str, embedding: Tensor) -> list[Tensor]:
        last, end = _positions(tokenizer, prompt)
        if self.config.preserve_tokens == "last":
            return [embedding[last]]
        return [embedding[position] for position in range(1, end + 1)]

    def _erase(
        self,
        pipe: DiffusionPipeline,
        request: EraseRequest,
        parameters: dict[str, torch.nn.Parameter],
        *,
        images: Any = None,
        progress: bool = True,
        originals: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Solve Eq. 7 for every selected projection and write the result into ``parameters``."""
        tokenizer = pipe.tokenizer
        preserve = list(request.preserve_prompts)
        anchors = [anchor for concept in request.concepts for anchor in concept.erase_anchors]
        prompts = list(dict.fromkeys([*request.erase_prompts, *anchors, *preserve]))
        encoded = encode_short(pipe, prompts)
        embeddings = dict(zip(prompts, encoded, strict=True))

        erase_inputs, anchor_inputs = [], []
        for concept in request.concepts:
            inputs, anchors = self._rows(tokenizer, concept, embeddings)
            erase_inputs += inputs
            anchor_inputs += anchors
        preserve_inputs = [row for p in preserve for row in self._preserve_rows(tokenizer, p, embeddings[p])]

        c_erase = torch.stack(erase_inputs)  # [n_e, d]
        c_anchor = torch.stack(anchor_inputs)  # [n_e, d]
        conflicting = conflicting_rows(c_erase, c_anchor)
        if conflicting:
            logger.warning(
                "UCE: %d of %d erase rows share their token embedding with a row of a different anchor (the text "
                "encoder is causal: the concept word's embedding sees only the words before it); each such group is "
                "mapped to the mean of its anchors' outputs.",
                conflicting,
                len(c_erase),
            )
        c_preserve = torch.stack(preserve_inputs) if preserve_inputs else c_erase.new_zeros((0, c_erase.shape[1]))
        device = next(iter(parameters.values())).device
        solver = RidgeSolver(  # preserve rows keep W0's outputs: kept rows, no targets needed
            c_erase.to(device), self.config.erase_scale, self.config.lam,
            kept=c_preserve.to(device), kept_weights=self.config.preserve_scale,
        )  # fmt: skip

        erase_error, preserve_drift = [], []
        preserve_gram = solver.kept.T @ solver.kept  # ||C_p X^T||_F^2 = tr(X G X^T), without C_p X^T itself
        with torch.no_grad():
            for parameter in parameters.values():
                w0 = parameter.detach().to(solver.inputs.device, torch.float64)
                v_star = c_anchor.to(w0.device) @ w0.T  # W0 c_anchor
                w = solver.solve(w0, v_star)
                parameter.copy_(w.to(parameter.device, parameter.dtype))
                erase_error.append(
                    float((c_erase.to(w.device) @ w.T - v_star).norm() / v_star.norm().clamp_min(1e-12))
                )
                if len(c_preserve):
                    delta = w - w0
                    moved, kept = ((delta @ preserve_gram) * delta).sum(), ((w0 @ preserve_gram) * w0).sum()
                    preserve_drift.append(float((moved / kept.clamp_min(1e-24)).sqrt()))
        return {
            "edited_projections": len(parameters),
            "erase_rows": len(c_erase),
            "erase_rows_with_conflicting_anchors": conflicting,
            "preserve_rows": len(c_preserve),
            "relative_erase_residual": sum(erase_error) / len(erase_error),
            "relative_preserve_drift": sum(preserve_drift) / len(preserve_drift) if preserve_drift else 0.0,
        }
