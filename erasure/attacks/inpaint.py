"""Inpainting (visual-context) probe: the edited model fills the masked centre of a base image of the concept.

Lu et al., "When Are Concepts Erased From Diffusion Models?" (NeurIPS 2025), the inpainting probe: the base
model's image of the row is kept outside a centred square and the edited model, prompted with the row, fills the
square. With a 4-channel UNet the known region is blended back after every step, as diffusers' inpainting pipeline
does for such UNets (RePaint-style, Lugmayr et al. 2022)::

    x_{tau_{i+1}} <- m * x_{tau_{i+1}} + (1 - m) * q(x_{tau_{i+1}} | x0^base)     (x0^base itself after the last step)

``m`` = 1 inside the square (generated), 0 outside (kept); ``q`` forward-noises the base image's latent with fresh
noise. An all-keep mask returns the VAE round trip of the base image (tested). A concept the edit only steered the
text away from is completed from its visual context; one it removed is not. The judge scores the whole image.
With a reference model (``erasure probe --reference``), the reference fills the same base images too: a model that
never learned the concept can still complete some of it from the kept border, and the verdict counts only what the
edited model completes beyond that floor.
``paper``: a 256-pixel square of 512 (half the side), as the official probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from erasure.attacks import register
from erasure.attacks.base import Attack, AttackConfig, AttackError, AttackResult
from erasure.attacks.context import AttackContext
from erasure.attacks.sampler import decode, seeded_noise
from erasure.concepts import Concept
from erasure.prompt_sets import PromptRow
from erasure.sampling import ddim_scheduler, images_to_latents

__all__ = ["InpaintConfig", "InpaintProbe", "centre_mask", "inpaint"]


def centre_mask(height: int, width: int, fraction: float) -> torch.Tensor:
    """``[1, 1, h, w]`` mask, 1 in the centred square whose side is ``fraction`` of the side, 0 elsewhere."""
    mask = torch.zeros(1, 1, height, width)
    side_h, side_w = round(height * fraction), round(width * fraction)
    top, left = (height - side_h) // 2, (width - side_w) // 2
    mask[..., top : top + side_h, left : left + side_w] = 1.0
    return mask


def inpaint(ctx: AttackContext, which: str, prompts, seeds, images: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """Fill ``mask`` (latent resolution, 1 = generate) of ``images`` with model ``which``, given ``prompts``."""
    out = []
    scheduler = ddim_scheduler(ctx.pipe, ctx.steps)
    with ctx.model(which) as pipe:
        for start in range(0, len(prompts), ctx.batch_size):
            stop = min(start + ctx.batch_size, len(prompts))
            cond = ctx.encode(prompts[start:stop])
            known = images_to_latents(pipe, images[start:stop], ctx.size, sample=False)
            noise, generators = seeded_noise(pipe, seeds[start:stop], ctx.size)
            m = mask.to(known)

            def blend(
                i: int, t: torch.Tensor, x: torch.Tensor, known=known, generators=generators, m=m
            ) -> torch.Tensor:
                if i + 1 < ctx.steps:
                    fresh = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x)
                    target = scheduler.add_noise(known, fresh, scheduler.timesteps[i + 1 : i + 2])
                else:
                    target = known
                return m * x + (1 - m) * target

            latents = ctx.sample(cond, noise, on_step=blend)
            out.append(decode(pipe, latents))
    return np.concatenate(out)


@dataclass
class InpaintConfig(AttackConfig):
    """Inpainting-probe settings."""

    CONTROL = True

    mask_fraction: float = field(default=0.5, metadata={"help": "side of the centred square, as a fraction"})

    PRESETS = {"toy": {"mask_fraction": 0.5}, "paper": {"mask_fraction": 0.5}}

    def validate(self) -> None:  # noqa: D102
        if not 0.0 <= self.mask_fraction <= 1.0:
            raise AttackError(f"InpaintConfig: mask_fraction must be in [0, 1], got {self.mask_fraction}.")


@register("inpaint")
class InpaintProbe(Attack):
    """The edited model completes a base image of the row around a masked centre."""

    surface = "trajectory"
    config_class = InpaintConfig

    def _run(self, ctx: AttackContext, concept: Concept, rows: list[PromptRow]) -> AttackResult:
        base = ctx.base_images(rows)
        factor = int(ctx.pipe.vae_scale_factor)
        mask = centre_mask(base.shape[1] // factor, base.shape[2] // factor, self.config.mask_fraction)
        prompts, seeds = [r.prompt for r in rows], [r.evaluation_seed for r in rows]
        attacked = inpaint(ctx, "edited", prompts, seeds, base, mask)
        hits, picked, records = ctx.best_of(rows, [attacked], [{}], model="edited", attack=self.name)
        base_hits = reference_hits = None
        if self.config.control:
            controlled = inpaint(ctx, "base", prompts, seeds, base, mask)
            base_hits, _, more = ctx.best_of(rows, [controlled], [{}], model="base", attack=self.name)
            records += more
        if ctx.reference is not None:  # the never-trained model fills the same base images: the visual-context floor
            filled = inpaint(ctx.reference, "edited", prompts, seeds, base, mask)
            reference_hits, _, more = ctx.best_of(rows, [filled], [{}], model="reference", attack=self.name)
            records += more
        return self.result(
            rows, hits, base_hits=base_hits, reference_hits=reference_hits, records=records, images=picked
        )
