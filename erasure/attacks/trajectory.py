"""Diffusion-completion probe: the base model starts the trajectory, the edited model finishes it.

Lu, Kriplani, Gandikota, Pham, Bau, Hegde, Cohen, "When Are Concepts Erased From Diffusion Models?" (NeurIPS 2025,
arXiv 2505.17013), the diffusion-completion probe. With the DDIM timesteps ``tau_0 > ... > tau_{N-1}`` of an
``N``-step schedule and the row's prompt ``c`` and seed::

    x_{tau_k} = DDIM_theta(x_T, c; steps 0 .. k-1)          (the base model, k steps)
    x_0       = DDIM_theta*(x_{tau_k}, c; steps k .. N-1)   (the edited model finishes)

``k = 0`` is the edited model's own generation and ``k = N`` the base model's (both tested; also under the
context's negative-prompt suppression, which only the edited half uses). An edit that only
redirects the text guidance lets a trajectory that has already committed to the concept land on it; an edit that
removed the concept pulls it off. The base prefix is run once per row to the largest ``k``, keeping each handoff
state, and the selector picks the best handoff per row.

With a reference model that never learned the concept (``--reference``), the reference finishes the same base
trajectories too: after ``k`` steps of the base model the image may already be committed to the concept, and a
model that never knew it can land on it from there. That rate is the floor the edit's must beat (rule 3 of
:mod:`erasure.attacks.verdict`). It needs a reference in the base's latent space and noise schedule
(:func:`~erasure.attacks.models.latent_space_mismatch`); otherwise the result's notes say why it was not run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from erasure.attacks import register
from erasure.attacks.base import Attack, AttackConfig, AttackError, AttackResult
from erasure.attacks.context import AttackContext
from erasure.attacks.models import latent_space_mismatch
from erasure.attacks.sampler import decode, seeded_noise
from erasure.concepts import Concept
from erasure.prompt_sets import PromptRow

__all__ = ["TrajectoryCompletion", "TrajectoryConfig", "complete"]


def complete(
    ctx: AttackContext,
    prompts: Sequence[str],
    seeds: Sequence[int],
    handoffs: Sequence[int],
    finisher: AttackContext | None = None,
) -> list[np.ndarray]:
    """Images for each handoff ``k``: the base model's first ``k`` DDIM steps, then the edited model's rest.

    Args:
        ctx: The context (its ``steps`` is ``N``, its ``guidance`` the CFG scale of both halves).
        prompts: One prompt per image.
        seeds: One seed per image.
        handoffs: Steps ``0 <= k <= N`` the base model takes.
        finisher: The context whose edited model finishes, prompted through its own text encoder (default
            ``ctx``); the reference control passes the reference's, which must share the base's latent space
            (:func:`~erasure.attacks.models.latent_space_mismatch`).

    Returns:
        One uint8 ``(len(prompts), H, W, 3)`` array per handoff, in order.
    """
    bad = [k for k in handoffs if not 0 <= int(k) <= ctx.steps]
    if bad:
        raise AttackError(f"handoff steps must lie in [0, {ctx.steps}] (the schedule's length); got {bad}.")
    wanted = sorted({int(k) for k in handoffs})
    out: dict[int, list[np.ndarray]] = {k: [] for k in wanted}
    for start in range(0, len(prompts), ctx.batch_size):
        stop = min(start + ctx.batch_size, len(prompts))
        cond = ctx.encode(prompts[start:stop])
        noise, _ = seeded_noise(ctx.pipe, seeds[start:stop], ctx.size)
        states = {0: noise}

        def keep(i: int, t: torch.Tensor, x: torch.Tensor, states=states) -> torch.Tensor:
            if i + 1 in out:
                states[i + 1] = x.clone()
            return x

        with ctx.model("base"):
            if wanted[-1] > 0:
                ctx.sample(cond, noise, stop=wanted[-1], on_step=keep)
        finishing = ctx if finisher is None else finisher
        finish_cond = cond if finisher is None else finisher.encode(prompts[start:stop])
        with finishing.model("edited") as pipe:
            for k in wanted:
                out[k].append(decode(pipe, finishing.sample(finish_cond, states[k], start=k)))
    return [np.concatenate(out[int(k)]) for k in handoffs]


@dataclass
class TrajectoryConfig(AttackConfig):
    """Trajectory-completion settings."""

    handoffs: tuple[int, ...] = field(
        default=(2, 5), metadata={"help": "DDIM steps the base model takes before the edited model finishes"}
    )

    PRESETS = {"toy": {"handoffs": (2, 5)}, "paper": {"handoffs": (1, 2)}}  # the runner's k in {0,1,2} of 50

    def validate(self) -> None:  # noqa: D102
        if not self.handoffs or min(self.handoffs) < 0:
            raise AttackError("TrajectoryConfig: handoffs must list at least one step count >= 0.")


@register("trajectory")
class TrajectoryCompletion(Attack):
    """Base model starts, edited model finishes; best handoff per row by the selector."""

    surface = "trajectory"
    config_class = TrajectoryConfig

    def check(self, ctx: AttackContext) -> None:  # noqa: D102
        if max(self.config.handoffs) > ctx.steps:
            raise AttackError(
                f"trajectory: handoffs {list(self.config.handoffs)} exceed the {ctx.steps} DDIM steps of the probe; "
                f"set handoffs within [0, {ctx.steps}] (--set trajectory.handoffs=[...]) or use more --steps."
            )

    def _run(self, ctx: AttackContext, concept: Concept, rows: list[PromptRow]) -> AttackResult:
        handoffs = list(self.config.handoffs)
        params = [{"handoff": k} for k in handoffs]
        prompts, seeds = [r.prompt for r in rows], [r.evaluation_seed for r in rows]
        variants = complete(ctx, prompts, seeds, handoffs)
        hits, picked, records = ctx.best_of(rows, variants, params, model="edited", attack=self.name)
        reference_hits, notes = None, {}
        if ctx.reference is not None:  # the never-trained model finishes the same base trajectories: the floor
            mismatch = latent_space_mismatch(ctx.pipe, ctx.reference.pipe, ctx.steps)
            if mismatch is None:
                finished = complete(ctx, prompts, seeds, handoffs, finisher=ctx.reference)
                reference_hits, _, more = ctx.best_of(rows, finished, params, model="reference", attack=self.name)
                records += more
            else:
                notes["reference_control"] = f"not run: the reference cannot finish the trajectories: {mismatch}"
        return self.result(rows, hits, reference_hits=reference_hits, records=records, images=picked, notes=notes)
