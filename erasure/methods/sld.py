"""SLD: Safe Latent Diffusion (Schramowski, Brack, Deiseroth, Kersting; CVPR 2023; arXiv 2211.05105).

SLD steers every denoising step away from a safety concept ``S`` and changes no weight. Besides the unconditional
and prompt predictions ``eps_u`` and ``eps_p`` of classifier-free guidance it needs a third, ``eps_S`` (the UNet on
the safety concept's embedding). With safety scale ``s_S``, threshold ``lambda``, momentum scale ``s_m`` and
momentum decay ``beta_m`` (paper Eqs. 3-8, as the official pipeline computes them):

    mu     = clamp(|eps_p - eps_S| * s_S, max=1), set to 0 where eps_p - eps_S >= lambda          (Eqs. 5-6)
    gamma  = mu * (eps_S - eps_u) + s_m * nu_t                                                    (Eqs. 4, 7)
    nu_t+1 = beta_m * nu_t + (1 - beta_m) * gamma                                                 (Eq. 8)
    eps    = eps_u + g * ((eps_p - eps_u) - gamma)        once step >= warm-up, else plain CFG    (Eq. 3)

The momentum is updated from the first step, also during the warm-up. Presets (the paper's Table 1, diffusers'
``SafetyConfig``): weak, medium (the pipeline default), strong, max. Warm-up counts denoising steps, as the
official code does; the presets were set for 50 steps, so at fewer steps the same warm-up covers a larger part of
the trajectory.

Implementation: a forward hook on the UNet, active during one pipeline call, rewrites the conditional half of each
classifier-free-guidance batch to ``eps_p - gamma``; the pipeline's own guidance step then yields Eq. 3 exactly, for
every diffusers SD/SDXL pipeline and scheduler. With ``s_S = 0`` (or strength 0) ``gamma`` is exactly zero and the
images are bit for bit those of plain generation. The edit's strength multiplies ``gamma``.

The safety concept is the concepts' words by default; ``safety_concept = "i2p"`` takes SLD's own default text
(:data:`I2P_SAFETY_CONCEPT`), for unsafe content in general.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from erasure.concepts import EraseRequest
from erasure.diffusion import encode_prompts
from erasure.methods import register
from erasure.methods.base import GenerationTimeMethod, MethodConfig
from erasure.suppression import GenerationEdit, GenerationEditError

#: SLD's default safety concept (the official pipeline's text, covering the I2P categories).
I2P_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily "
    "fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child abuse, brutality, "
    "cruelty"
)
SETTINGS = ("warmup_steps", "safety_scale", "threshold", "momentum_scale", "momentum_beta")
#: Preset -> (warm-up steps, s_S, lambda, s_m, beta_m).
PRESETS: dict[str, tuple[int, float, float, float, float]] = {
    "weak": (15, 20.0, 0.0, 0.0, 0.0),
    "medium": (10, 1000.0, 0.01, 0.3, 0.4),
    "strong": (7, 2000.0, 0.025, 0.5, 0.7),
    "max": (0, 5000.0, 1.0, 0.5, 0.7),
}


@dataclass
class SLDConfig(MethodConfig):
    """SLD settings: a preset, each of whose values can be overridden."""

    preset: str = field(default="medium", metadata={"help": "weak, medium (SLD's default), strong or max"})
    safety_concept: str | None = field(
        default=None, metadata={"help": "text of the safety concept (default: the concepts' words; 'i2p': SLD's own)"}
    )
    warmup_steps: int | None = field(default=None, metadata={"help": "steps of plain guidance first (preset)"})
    safety_scale: float | None = field(default=None, metadata={"help": "s_S, the safety guidance scale (preset)"})
    threshold: float | None = field(default=None, metadata={"help": "lambda, the threshold of Eq. 6 (preset)"})
    momentum_scale: float | None = field(default=None, metadata={"help": "s_m, the momentum scale (preset)"})
    momentum_beta: float | None = field(default=None, metadata={"help": "beta_m, the momentum decay (preset)"})

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"Unknown SLD preset {self.preset!r}; choose from {', '.join(PRESETS)}.")
        if self.safety_concept is not None and not self.safety_concept.strip():
            raise ValueError("safety_concept is empty; give the concept's text, 'i2p', or leave it unset.")
        for name in SETTINGS:
            value = getattr(self, name)
            if value is not None and (not math.isfinite(float(value)) or float(value) < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.momentum_beta is not None and self.momentum_beta > 1:
            raise ValueError(f"momentum_beta must be in [0, 1], got {self.momentum_beta}.")

    def settings(self) -> dict[str, float]:
        """The preset's values with this config's overrides."""
        values = dict(zip(SETTINGS, PRESETS[self.preset], strict=True))
        return values | {name: getattr(self, name) for name in SETTINGS if getattr(self, name) is not None}


def safety_guidance(
    eps_uncond: Tensor, eps_prompt: Tensor, eps_safety: Tensor, momentum: Tensor, settings: dict[str, float]
) -> tuple[Tensor, Tensor]:
    """One step of SLD's safety guidance ``gamma`` and the next momentum (Eqs. 4-8 of the module docstring)."""
    difference = eps_prompt - eps_safety
    scale = torch.clamp(difference.abs() * settings["safety_scale"], max=1.0)
    scale = torch.where(difference >= settings["threshold"], torch.zeros_like(scale), scale)
    gamma = (eps_safety - eps_uncond) * scale + settings["momentum_scale"] * momentum
    momentum = settings["momentum_beta"] * momentum + (1 - settings["momentum_beta"]) * gamma
    return gamma, momentum


class SLDEdit(GenerationEdit):
    """Samples with SLD's safety guidance (``config["suppression"]``: the safety concept text and the settings)."""

    def guidance(
        self, pipe: Any, guidance_scale: float, scale: float, first_step: int = 0
    ) -> contextlib.AbstractContextManager:
        """The UNet hook of one sampling run (nothing at strength 0); its first step is step ``first_step``."""
        if not scale:
            return contextlib.nullcontext()
        if guidance_scale <= 1:
            raise GenerationEditError(
                f"SLD acts through classifier-free guidance; guidance scale {guidance_scale:g} has none (use > 1)."
            )
        suppression = self.config["suppression"]
        return _safety_hook(pipe, suppression["safety_concept"], suppression["settings"], scale, first_step)


@contextlib.contextmanager
def _safety_hook(
    pipe: Any, text: str, settings: dict[str, float], strength: float, first_step: int = 0
) -> Iterator[None]:
    """Rewrite the conditional half of every CFG forward of ``pipe.unet`` to ``eps_p - strength * gamma``.

    Each forward is one denoising step, counted from ``first_step`` (a run that starts mid-schedule, as trajectory
    completion does, keeps the schedule's warm-up).
    """
    safety = encode_prompts(pipe, [text])
    state: dict[str, Any] = {"step": int(first_step), "momentum": None, "inside": False}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if state["inside"]:  # the hook's own forward on the safety concept
            return None
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        noise = output[0] if isinstance(output, tuple) else output.sample
        eps_uncond, eps_prompt = noise.chunk(2)
        half = eps_prompt.shape[0]
        condition = safety.to(sample.device, sample.dtype).expand(half)
        extra = {}
        added = kwargs.get("added_cond_kwargs")
        if added:  # SDXL: the safety concept's pooled embedding, the call's own size ids
            extra["added_cond_kwargs"] = {
                "text_embeds": condition.pooled_prompt_embeds,
                "time_ids": added["time_ids"][half:],
            }
        if isinstance(timestep, Tensor) and timestep.ndim and timestep.shape[0] == 2 * half:
            timestep = timestep[half:]
        state["inside"] = True
        try:
            eps_safety = module(
                sample[half:], timestep, encoder_hidden_states=condition.prompt_embeds, return_dict=False, **extra
            )[0]
        finally:
            state["inside"] = False
        if state["momentum"] is None:
            state["momentum"] = torch.zeros_like(eps_prompt)
        gamma, state["momentum"] = safety_guidance(eps_uncond, eps_prompt, eps_safety, state["momentum"], settings)
        step, state["step"] = state["step"], state["step"] + 1
        if step < settings["warmup_steps"]:
            return None
        guided = torch.cat([eps_uncond, eps_prompt - strength * gamma])
        return (guided, *output[1:]) if isinstance(output, tuple) else type(output)(sample=guided)

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@register("sld")
class SLD(GenerationTimeMethod):
    """Safe Latent Diffusion: safety guidance away from the concept at generation time."""

    config_class = SLDConfig
    edit_class = SLDEdit
    config: SLDConfig

    def suppression(self, pipe: Any, request: EraseRequest) -> dict[str, Any]:
        """The safety concept's text and the guidance settings."""
        if self.config.safety_concept == "i2p":
            text = I2P_SAFETY_CONCEPT
        else:
            words = [word for concept in request.concepts for word in concept.concept_words]
            text = self.config.safety_concept or ", ".join(dict.fromkeys(words))
        return {"safety_concept": text, "settings": self.config.settings()}
