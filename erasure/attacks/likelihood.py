"""Likelihood gaps: did the edit lower the model's likelihood of the concept, or only redirect its guidance?

"When Are Concepts Erased From Diffusion Models?" (Lu et al., NeurIPS 2025) separates *guidance-based avoidance*
(the conditional prediction is steered away; the unconditional model ``p(x)`` still carries the concept) from
*destruction-based removal* (the unconditional likelihood of the concept falls). This probe measures both with the
denoising loss, a proxy of the negative ELBO (and of a diffusion classifier's score). For images ``X``, a condition
``y`` and a model ``m``, with the same draws ``(t_j, eps_j)`` for every model and condition::

    L_m(x, y) = (1 / S) sum_j || eps_j - eps_m(x_{t_j}, t_j, tau(y)) ||^2           (v-target for v-prediction)

and, with base-model images of the concept's held-out prompts ``X_c`` and of its neighbours' ``X_n``, the
difference-in-differences, which discounts damage the edit does everywhere::

    D_uncond = [L_edit(X_c, "") - L_base(X_c, "")] - [L_edit(X_n, "") - L_base(X_n, "")]
    D_cond   = [L_edit(X_c, c)  - L_base(X_c, c)]  - [L_edit(X_n, c_n) - L_base(X_n, c_n)]

Avoidance predicts ``D_cond > 0`` with ``D_uncond`` near 0; destruction predicts ``D_uncond > 0``. A generation-time
suppression (negative prompt, SLD) changes no weight, so both are exactly 0. Intervals: percentile bootstrap over
the images, each set resampled on its own (an image keeps its draws). The gaps are evidence in ``summary.json`` and
``verdict.json``; they do not decide the verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from erasure.attacks.base import AttackError, evaluation_rows
from erasure.attacks.context import AttackContext
from erasure.concepts import Concept
from erasure.diffusion import Conditioning, predict_noise, unconditional_conditioning
from erasure.evaluation.functional import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED
from erasure.sampling import ddim_scheduler, denoising_target, images_to_latents

__all__ = ["LikelihoodConfig", "likelihood_gaps"]


@dataclass
class LikelihoodConfig:
    """Likelihood-gap settings."""

    samples: int = field(default=16, metadata={"help": "(t, eps) draws per image, shared by every model"})
    images: int = field(default=16, metadata={"help": "base images per set (concept, neighbours), at most"})
    seed: int | None = field(default=0, metadata={"help": "seed of the draws (None: the probe's first image seed)"})

    def __post_init__(self) -> None:
        for name in ("samples", "images"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AttackError(f"LikelihoodConfig: {name} must be an integer of at least 1, got {value!r}.")


def _losses(ctx: AttackContext, which: str, latents: torch.Tensor, prompts: Sequence[str | None], draws) -> np.ndarray:
    """``[N]`` mean denoising losses of model ``which`` over the shared draws; ``None`` prompts are unconditional."""
    pipe = ctx.pipe
    timesteps, noises = draws  # [S], [N, S, C, h, w]
    samples = len(timesteps)
    alphas = ddim_scheduler(pipe).alphas_cumprod
    totals = torch.zeros(len(prompts), dtype=torch.float64)
    with ctx.model(which), torch.no_grad():
        empty = unconditional_conditioning(pipe)
        conditions = [empty if p is None else ctx.encode([p]) for p in prompts]
        pairs = [(i, j) for i in range(len(prompts)) for j in range(samples)]
        chunk = max(1, ctx.batch_size)
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            images, steps = [i for i, _ in part], torch.tensor([j for _, j in part])
            x0 = latents[images]
            t = timesteps[steps]
            abar = alphas[t].to(x0).view(-1, 1, 1, 1)
            noise = torch.stack([noises[i][j] for i, j in part]).to(x0)
            x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
            target = denoising_target(pipe, x0, noise, t)
            condition = Conditioning.cat([conditions[i] for i in images])
            output = predict_noise(pipe, x_t, t.to(x0.device), condition)
            per_row = (output.float() - target.float()).pow(2).flatten(1).mean(1).double().cpu()
            totals.index_add_(0, torch.tensor(images), per_row)
    return (totals / samples).numpy()


def _did(concept: np.ndarray, neighbours: np.ndarray, draws: int, seed: int) -> dict[str, float]:
    """``mean(concept) - mean(neighbours)`` with a percentile-bootstrap 95% interval (each set resampled)."""
    rng = np.random.default_rng(seed)
    value = float(concept.mean() - neighbours.mean())
    samples = [
        rng.choice(concept, len(concept)).mean() - rng.choice(neighbours, len(neighbours)).mean() for _ in range(draws)
    ]
    low, high = np.quantile(samples, [0.025, 0.975])
    return {"value": value, "low": float(low), "high": float(high)}


def likelihood_gaps(ctx: AttackContext, concept: Concept, config: LikelihoodConfig | None = None) -> dict[str, Any]:
    """``D_uncond`` and ``D_cond`` (module docstring) with intervals, and the four per-set mean loss changes.

    Raises:
        AttackError: If the concept has no held-out neighbour prompts.
    """
    config = config or LikelihoodConfig()
    if not concept.evaluate_preserve:
        raise AttackError(f"Concept '{concept.name}' has no evaluate_preserve prompts: likelihood gaps need them.")
    per_prompt_c = max(1, -(-config.images // len(concept.evaluate)))
    per_prompt_n = max(1, -(-config.images // len(concept.evaluate_preserve)))
    targets = evaluation_rows(concept, per_prompt_c, ctx.base_seed)[: config.images]
    as_targets = Concept(name=concept.name, kind=concept.kind, erase=concept.erase, evaluate=concept.evaluate_preserve)
    neighbours = evaluation_rows(as_targets, per_prompt_n, ctx.base_seed)[: config.images]
    seed = ctx.base_seed if config.seed is None else config.seed
    generator = torch.Generator().manual_seed(seed)
    result: dict[str, Any] = {"samples": config.samples, "images": [len(targets), len(neighbours)], "seed": seed}
    changes = {}
    for name, rows in (("concept", targets), ("neighbours", neighbours)):
        latents = images_to_latents(ctx.pipe, ctx.base_images(rows), ctx.size, sample=False)
        count = len(ddim_scheduler(ctx.pipe).alphas_cumprod)
        timesteps = torch.randint(count, (config.samples,), generator=generator)
        noises = [torch.randn((config.samples, *latents.shape[1:]), generator=generator) for _ in rows]
        draws = (timesteps, noises)
        for condition, prompts in (("uncond", [None] * len(rows)), ("cond", [r.prompt for r in rows])):
            edited = _losses(ctx, "edited", latents, prompts, draws)
            base = _losses(ctx, "base", latents, prompts, draws)
            changes[(name, condition)] = edited - base
            result[f"{name}_{condition}_loss_change"] = float((edited - base).mean())
    for condition in ("uncond", "cond"):
        result[f"D_{condition}"] = _did(
            changes[("concept", condition)], changes[("neighbours", condition)], BOOTSTRAP_DRAWS, BOOTSTRAP_SEED
        )
    result["pattern"] = _pattern(result)
    return result


def _pattern(result: dict[str, Any]) -> str:
    """``destruction-like``, ``avoidance-like``, ``no change`` or ``unclear``, from the intervals."""
    uncond, cond = result["D_uncond"], result["D_cond"]
    if uncond["low"] > 0:
        return "destruction-like (the unconditional likelihood of the concept fell)"
    if cond["low"] > 0 and uncond["low"] <= 0 <= uncond["high"]:
        return "avoidance-like (only the prompt's likelihood of the concept fell)"
    if uncond["low"] <= 0 <= uncond["high"] and cond["low"] <= 0 <= cond["high"]:
        return "no change"
    return "unclear"
