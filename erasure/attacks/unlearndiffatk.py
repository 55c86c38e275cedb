"""UnlearnDiffAtk: prefix tokens on the simplex that make the edited model itself explain base images of the concept.

Zhang, Jia, Chen, Chen, Zhang, Liu, Ding, Liu, "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are
Still Easy To Generate Unsafe Images ... For Now" (ECCV 2024, arXiv 2310.11868). A diffusion model is its own
classifier, ``p_theta*(c' | x) ~ exp(-E_{t,eps} || eps - eps_theta*(x_t, t, c') ||^2)``, so the prompt the edited
model finds most likely for a base image ``x^tgt`` of the concept is the attack (their Eq. 5)::

    min_u  E_{t, eps} || eps - eps_theta*(sqrt(abar_t) x0^tgt + sqrt(1 - abar_t) eps, t, tau([s W_E; c])) ||^2
    s_j ~ Cat(u_j),  u_j in Delta^V  (k prefix slots, straight-through gradient, projection onto the simplex)

(:class:`~erasure.attacks.embedding.DenoiseObjective` with the ``simplex`` parametrisation, ``prefix`` slots). The
target images are the base model's images of the same held-out rows (the cached base column; the maintainers:
"generated using the original base diffusion model"), the tokens ``argmax u_j``. Differences from the official
code, by design: one prefix for all rows of the concept (universal; per-prompt is the official mode), selection of
the best evaluation by the selector, never the judge; the official schedule (50 ascending timesteps x 40 Adam
steps, batch 1, lr 0.01, weight decay 0.1, k = 5 for unsafe concepts and 3 otherwise) is the ``paper`` preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from erasure.attacks import register
from erasure.attacks.base import Attack, AttackConfig, AttackError, AttackResult, adversarial_row
from erasure.attacks.context import AttackContext
from erasure.attacks.optimise import DenoiseObjective, concept_latents, make_parametrisation, prompt_attack
from erasure.attacks.override import build_slots, token_embedding, vocabulary_ids
from erasure.concepts import Concept
from erasure.prompt_sets import PromptRow

__all__ = ["UnlearnDiffAtk", "UnlearnDiffAtkConfig"]


@dataclass
class UnlearnDiffAtkConfig(AttackConfig):
    """UnlearnDiffAtk settings."""

    tokens: int | None = field(default=None, metadata={"help": "prefix tokens k (default: 5 unsafe, 3 otherwise)"})
    steps: int = field(default=150, metadata={"help": "Adam steps"})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "Adam (L2) weight decay"})
    batch_size: int = field(default=16, metadata={"help": "(image, t, eps) samples per step"})
    schedule: str = field(
        default="uniform", metadata={"help": "timesteps: uniform (random each sample) or blocks (50 ascending)"}
    )
    eval_every: int = field(default=50, metadata={"help": "steps between selector evaluations (0: final only)"})

    PRESETS = {
        "toy": {"steps": 150, "batch_size": 16, "schedule": "uniform", "eval_every": 50},
        "paper": {"steps": 2000, "batch_size": 1, "schedule": "blocks", "eval_every": 40},
    }
    BUDGETS = ("steps", "batch_size")

    def validate(self) -> None:  # noqa: D102
        if self.schedule not in ("uniform", "blocks"):
            raise AttackError(f"UnlearnDiffAtkConfig: schedule must be uniform or blocks, got {self.schedule!r}.")
        if self.tokens is not None and self.tokens < 1:
            raise AttackError("UnlearnDiffAtkConfig: tokens must be at least 1.")


@register("unlearndiffatk")
class UnlearnDiffAtk(Attack):
    """Simplex prefix tokens minimising the edited model's denoising loss on base images of the concept."""

    surface = "text"
    config_class = UnlearnDiffAtkConfig

    def _run(self, ctx: AttackContext, concept: Concept, rows: list[PromptRow]) -> AttackResult:
        config = self.config
        k = config.tokens or (5 if concept.kind == "unsafe" else 3)
        generator = torch.Generator().manual_seed(config.seed)
        tokenizer = ctx.pipe.tokenizer
        by_prompt = {p: build_slots(tokenizer, p, k, "prefix") for p in dict.fromkeys(r.prompt for r in rows)}
        layouts = [by_prompt[r.prompt] for r in rows]
        table = token_embedding(ctx.pipe.text_encoder).weight.detach()
        param = make_parametrisation("simplex", table, vocabulary_ids(tokenizer), k)
        schedule = None
        if config.schedule == "blocks":  # 10, 30, ..., 990 for 1000 training steps
            total = int(ctx.pipe.scheduler.config.num_train_timesteps)
            schedule = torch.arange(50) * (total // 50) + total // 100
        objective = DenoiseObjective(concept_latents(ctx, rows), torch.arange(len(rows)), config.batch_size, schedule)
        found = prompt_attack(
            ctx, self.name, rows, layouts, param, objective, steps=config.steps, lr=config.lr, optimizer="adam",
            weight_decay=config.weight_decay, eval_every=config.eval_every, generator=generator,
        )  # fmt: skip
        prompts = [adversarial_row(r, text, self.name) for r, text in zip(rows, found["prompts"], strict=True)]
        notes = {"token_ids": found["token_ids"], "losses": found["losses"], "evaluations": found["evaluations"]}
        return self.result(
            rows, found["hits"], records=found["records"], prompts=prompts, images=found["images"], notes=notes
        )
