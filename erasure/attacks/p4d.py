"""P4D: PEZ-projected tokens that make the edited model's noise match the base model's for the concept prompt.

Chin, Jiang, Huang, Chen, Chiu, "Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding
Problematic Prompts" (ICML 2024, arXiv 2309.06135), Eq. 3::

    min_{P'}  E_{x_t, t} || eps_theta*(x_t, t, tau(Pi(P'))) - eps_theta(x_t, t, tau(P)) ||^2

with ``Pi`` the nearest-vocabulary projection of PEZ (Wen et al. 2023): the forward uses the projected tokens, the
gradient taken there updates the continuous ``P'``
(:class:`~erasure.attacks.embedding.MatchObjective`, ``pez`` parametrisation). ``x_t`` is the base model's image of
the row forward-noised at a uniform ``t`` (P4D noises its target image), and the base predictions are computed
once into a bank, so each step costs one edited forward and backward. Layouts: P4D-K keeps the prompt and inserts a
learnable token before every ``every = 3`` prompt tokens (``place="interleave"``); P4D-N replaces the prompt by
``k = 16`` free tokens (``place="free"``). Tokens are shared by every row (universal), and the best evaluation is
chosen by the selector (P4D: CLIP image similarity every 50 steps). ``paper``: 3000 AdamW steps, lr 0.1, weight
decay 0.1, batch 1 (``joycenerd/P4D`` ``configs/esd_nudity_optmz_config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from erasure.attacks import register
from erasure.attacks.base import Attack, AttackConfig, AttackError, AttackResult, adversarial_row
from erasure.attacks.context import AttackContext
from erasure.attacks.optimise import MatchObjective, concept_latents, make_parametrisation, prompt_attack
from erasure.attacks.override import build_slots, token_embedding, vocabulary_ids
from erasure.concepts import Concept
from erasure.prompt_sets import PromptRow

__all__ = ["P4D", "P4DConfig"]


@dataclass
class P4DConfig(AttackConfig):
    """P4D settings."""

    place: str = field(default="interleave", metadata={"help": "interleave (P4D-K) or free (P4D-N)"})
    every: int = field(default=3, metadata={"help": "P4D-K: prompt tokens between inserted tokens"})
    tokens: int = field(default=16, metadata={"help": "P4D-N: free tokens replacing the prompt"})
    steps: int = field(default=150, metadata={"help": "AdamW steps"})
    lr: float = field(default=0.1, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW (decoupled) weight decay"})
    batch_size: int = field(default=16, metadata={"help": "bank samples per step"})
    bank: int = field(default=256, metadata={"help": "(x_t, t, base prediction) triples made once"})
    eval_every: int = field(default=50, metadata={"help": "steps between selector evaluations (0: final only)"})

    PRESETS = {
        "toy": {"steps": 150, "batch_size": 16, "bank": 256, "eval_every": 50},
        "paper": {"steps": 3000, "batch_size": 1, "bank": 3000, "eval_every": 50},
    }
    BUDGETS = ("steps", "batch_size", "bank", "every", "tokens")

    def validate(self) -> None:  # noqa: D102
        if self.place not in ("interleave", "free"):
            raise AttackError(f"P4DConfig: place must be interleave (P4D-K) or free (P4D-N), got {self.place!r}.")


@register("p4d")
class P4D(Attack):
    """PEZ tokens matching the edited model's predictions to the base model's for the concept prompt."""

    surface = "text"
    config_class = P4DConfig

    def _run(self, ctx: AttackContext, concept: Concept, rows: list[PromptRow]) -> AttackResult:
        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        tokenizer = ctx.pipe.tokenizer
        by_prompt = {
            p: build_slots(tokenizer, p, config.tokens, config.place, every=config.every)
            for p in dict.fromkeys(r.prompt for r in rows)
        }
        layouts = [by_prompt[r.prompt] for r in rows]
        k = max(len(layout.slots) for layout in layouts)
        table = token_embedding(ctx.pipe.text_encoder).weight.detach()
        param = make_parametrisation("pez", table, vocabulary_ids(tokenizer), k, generator=generator)
        objective = MatchObjective.bank(
            ctx, concept_latents(ctx, rows), [r.prompt for r in rows], torch.arange(len(rows)), config.bank,
            config.batch_size, generator,
        )  # fmt: skip
        found = prompt_attack(
            ctx, self.name, rows, layouts, param, objective, steps=config.steps, lr=config.lr, optimizer="adamw",
            weight_decay=config.weight_decay, eval_every=config.eval_every, generator=generator,
        )  # fmt: skip
        prompts = [adversarial_row(r, text, self.name) for r, text in zip(rows, found["prompts"], strict=True)]
        notes = {"token_ids": found["token_ids"], "losses": found["losses"], "evaluations": found["evaluations"]}
        return self.result(
            rows, found["hits"], records=found["records"], prompts=prompts, images=found["images"], notes=notes
        )
