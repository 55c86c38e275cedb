"""Ring-A-Bell, continuous: the prompt embedding pushed along the concept's direction in text-embedding space.

Tsai, Hsu, Xie, Lin, Chen, Li, Chen, Yu, Huang, "Ring-A-Bell! How Reliable are Concept Removal Methods for
Diffusion Models?" (ICLR 2024, arXiv 2310.10012). The concept vector is the mean difference of the full (``77 x d``)
text-encoder outputs of paired prompts with and without the concept (their Eq. 2)::

    c_hat = (1 / N) sum_i [ tau(p_i^+) - tau(p_i^-) ]

with ``p^+`` the concept's ``erase`` prompts and ``p^-`` their anchors (paired anchors are exactly ``p^-``), or, for
the unconditional anchor, the prompt with the concept words removed. The attacked conditioning of a held-out
prompt ``P`` is ``tau(P) + eta * c_hat`` (Eq. 3's target), fed straight to the UNet as RECE's re-implementation does
(``CharlesGong12/RECE`` ``attack_methods/RingABell.py``) instead of searching tokens that reach it (the paper's
genetic algorithm): an embedding-space attack, an upper bound on what that search can find. It never queries the
edited UNet, so it cannot adapt to the edit, and transfers. Best ``eta`` per row by the selector; ``paper``:
``eta = 3`` (nudity in the paper and RECE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from erasure.attacks import register
from erasure.attacks.base import Attack, AttackConfig, AttackError, AttackResult, replace_words
from erasure.attacks.context import AttackContext
from erasure.concepts import Concept
from erasure.diffusion import Conditioning
from erasure.prompt_sets import PromptRow

__all__ = ["RingABell", "RingABellConfig", "concept_vector"]


def concept_vector(ctx: AttackContext, concept: Concept) -> torch.Tensor:
    """``c_hat``: mean ``tau(p+) - tau(p-)`` over the concept's erase prompts (``[77, d]``)."""
    positives = list(concept.erase)
    negatives = [
        anchor if anchor or isinstance(concept.anchor, tuple) else replace_words(p, concept.concept_words, "")
        for p, anchor in zip(positives, concept.erase_anchors, strict=True)
    ]
    with torch.no_grad():
        difference = ctx.encode(positives).prompt_embeds - ctx.encode(negatives).prompt_embeds
    return difference.mean(0)


@dataclass
class RingABellConfig(AttackConfig):
    """Ring-A-Bell (continuous) settings."""

    etas: tuple[float, ...] = field(default=(1.0, 3.0, 5.0), metadata={"help": "strengths eta of the concept vector"})

    PRESETS = {"toy": {"etas": (1.0, 3.0, 5.0)}, "paper": {"etas": (3.0,)}}

    def validate(self) -> None:  # noqa: D102
        if not self.etas:
            raise AttackError("RingABellConfig: etas must list at least one strength.")


@register("ring_a_bell")
class RingABell(Attack):
    """``tau(P) + eta c_hat`` on the edited model; best eta per row by the selector."""

    surface = "embedding"
    config_class = RingABellConfig

    def _run(self, ctx: AttackContext, concept: Concept, rows: list[PromptRow]) -> AttackResult:
        direction = concept_vector(ctx, concept)
        with torch.no_grad():
            plain = ctx.encode([r.prompt for r in rows]).prompt_embeds
        seeds = [r.evaluation_seed for r in rows]
        variants = [
            ctx.generate("edited", Conditioning(plain + float(eta) * direction), seeds) for eta in self.config.etas
        ]
        params = [{"eta": float(eta)} for eta in self.config.etas]
        hits, picked, records = ctx.best_of(rows, variants, params, model="edited", attack=self.name)
        notes = {"concept_vector_norm": float(direction.norm())}
        return self.result(
            rows, hits, records=records, images=picked, embeddings={"concept_vector": direction}, notes=notes
        )
