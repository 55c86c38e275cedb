"""Noise-based probe: DDIM with more sampling noise than DDPM's, and an extra noise factor.

Lu et al., "When Are Concepts Erased From Diffusion Models?" (NeurIPS 2025), the noise-based probe (their
``eta``-DDIM scheduler). Each step (:func:`erasure.attacks.sampler.eta_ddim_step`)::

    sigma_t = sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    x_prev  = sqrt(abar_prev) x0_hat + sqrt(|1 - abar_prev - (eta sigma_t)^2|) eps_hat + v * eta * sigma_t * z

swept over ``eta`` (``1.0 .. 1.85`` in the paper's config) and ``v`` (``1.00 .. 1.04``), best of the grid per row by
the selector. Extra noise lets the trajectory wander off the path the edited guidance steers it along; a concept
the edit only steered away from can then reappear. ``v`` multiplies the added noise as the paper writes it (the
authors' released runner passes it to a pipeline that ignores it, so their sweep is effectively over ``eta``).
With ``eta = 0`` the step is plain DDIM (tested). ``control`` runs the same sweep on the base model.

Extra noise can cost the neighbours too, so an attack that "brings the concept back" only by wrecking every image
is visible: with ``neighbours`` the probe also generates the concept's held-out neighbour rows with the setting
the selector picked most often, on both models, and reports their ratio
(:meth:`~erasure.attacks.context.AttackContext.neighbour_cost`).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from erasure.attacks import register
from erasure.attacks.base import Attack, AttackConfig, AttackError, AttackResult
from erasure.attacks.context import AttackContext
from erasure.concepts import Concept
from erasure.prompt_sets import PromptRow

__all__ = ["NoiseConfig", "NoiseProbe"]


@dataclass
class NoiseConfig(AttackConfig):
    """Noise-based probe settings."""

    CONTROL = True

    etas: tuple[float, ...] = field(default=(1.0, 1.34, 1.68), metadata={"help": "DDIM eta values swept"})
    variance_scales: tuple[float, ...] = field(
        default=(1.0, 1.04), metadata={"help": "extra noise factors v swept (v multiplies eta * sigma_t * z)"}
    )

    neighbours: bool = field(
        default=True,
        metadata={"help": "also measure the neighbour ratio at the most-picked (eta, v): 2 images per neighbour row"},
    )

    PRESETS = {
        "toy": {"etas": (1.0, 1.34, 1.68), "variance_scales": (1.0, 1.04)},
        "paper": {"etas": (1.0, 1.17, 1.34, 1.51, 1.68, 1.85), "variance_scales": (1.0, 1.02, 1.03, 1.04)},
    }

    def validate(self) -> None:  # noqa: D102
        if not self.etas or not self.variance_scales:
            raise AttackError(
                "NoiseConfig: etas and variance_scales must each list a value (a budget of 0 does nothing)."
            )
        if min(self.etas) < 0 or min(self.variance_scales) < 0:
            raise AttackError("NoiseConfig: eta and v must be >= 0.")

    def grid(self) -> list[tuple[float, float]]:
        """The ``(eta, v)`` variants; ``eta = 0`` once (``v`` has no effect there)."""
        pairs = [(float(e), float(v)) for e, v in itertools.product(self.etas, self.variance_scales)]
        return list(dict.fromkeys((e, 1.0) if e == 0 else (e, v) for e, v in pairs))


@register("noise")
class NoiseProbe(Attack):
    """eta-DDIM with a noise factor; best variant per row by the selector."""

    surface = "trajectory"
    config_class = NoiseConfig

    def _sweep(self, ctx: AttackContext, which: str, rows: list[PromptRow]):
        prompts, seeds = [r.prompt for r in rows], [r.evaluation_seed for r in rows]
        grid = self.config.grid()
        variants = [ctx.generate(which, prompts, seeds, eta=eta, variance_scale=v) for eta, v in grid]
        params = [{"eta": eta, "variance_scale": v} for eta, v in grid]
        return ctx.best_of(rows, variants, params, model=which, attack=self.name)

    def _run(self, ctx: AttackContext, concept: Concept, rows: list[PromptRow]) -> AttackResult:
        hits, picked, records = self._sweep(ctx, "edited", rows)
        base_hits = None
        if self.config.control:
            base_hits, _, base_records = self._sweep(ctx, "base", rows)
            records += base_records
        neighbour_cost = None
        if self.config.neighbours:
            chosen = Counter(
                (r["params"]["eta"], r["params"]["variance_scale"])
                for r in records
                if r["model"] == "edited" and r["selected"]
            )  # fmt: skip
            (eta, scale), _ = chosen.most_common(1)[0]
            neighbour_cost = ctx.neighbour_cost(concept, eta=eta, variance_scale=scale)
        return self.result(
            rows, hits, base_hits=base_hits, records=records, images=picked, neighbour_cost=neighbour_cost
        )
