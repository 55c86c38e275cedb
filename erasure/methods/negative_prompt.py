"""The negative-prompt baseline: sample with the concept as the negative prompt; no weight changes.

Classifier-free guidance computes ``eps = eps(x_t, n) + g (eps(x_t, c) - eps(x_t, n))`` with ``n`` the empty prompt.
With the concept's words as ``n`` the sampler is pushed away from the concept at every step (the negative-prompt
baseline of the erasure literature, e.g. ESD's and SLD's comparisons). It is the suppression-only reference: the
model still knows the concept, so ``erasure probe`` must find it "suppressed", and prompts that avoid the negative
prompt's words (or a textual-inversion token) bring the concept back.

The negative prompt is the concepts' words joined with ", " (``negative_prompt`` overrides it); it is the
pipeline's own ``negative_prompt`` argument, so every diffusers pipeline applies it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from erasure.concepts import EraseRequest
from erasure.methods import register
from erasure.methods.base import GenerationTimeMethod, MethodConfig
from erasure.suppression import GenerationEdit


@dataclass
class NegativePromptConfig(MethodConfig):
    """Negative-prompt settings."""

    negative_prompt: str | None = field(
        default=None, metadata={"help": "the negative prompt (default: the concepts' words, joined with ', ')"}
    )

    def __post_init__(self) -> None:
        if self.negative_prompt is not None and not self.negative_prompt.strip():
            raise ValueError("negative_prompt is empty; give the words to steer away from, or leave it unset.")


class NegativePromptEdit(GenerationEdit):
    """Samples with ``config["suppression"]["negative_prompt"]`` as the pipeline's negative prompt."""

    allowed_scales = (0.0, 1.0)

    def pipeline_kwargs(self, pipe: Any, scale: float) -> dict[str, Any]:
        """``negative_prompt`` for the pipeline call (nothing at scale 0)."""
        return {"negative_prompt": self.config["suppression"]["negative_prompt"]} if scale else {}


@register("negative-prompt")
class NegativePrompt(GenerationTimeMethod):
    """The concept as the negative prompt at generation time."""

    config_class = NegativePromptConfig
    edit_class = NegativePromptEdit
    config: NegativePromptConfig

    def suppression(self, pipe: Any, request: EraseRequest) -> dict[str, Any]:
        """The negative prompt."""
        words = [word for concept in request.concepts for word in concept.concept_words]
        return {"negative_prompt": self.config.negative_prompt or ", ".join(dict.fromkeys(words))}
