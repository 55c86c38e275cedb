"""Noisy latents for training erasure methods: from a model's own trajectory, or from images.

Fine-tuning methods need noisy latents ``x_t`` to evaluate their losses on. Two sources cover the field:

* :func:`partial_ddim`: run deterministic DDIM (Song et al. 2021, eq. 12 with ``eta = 0``) with classifier-free
  guidance from pure noise down to an intermediate step of a ``total_steps`` schedule. ESD (Gandikota et al. 2023)
  draws its ``x_t`` this way, so the latents show what the model itself generates for the concept.
* :func:`forward_noise` on :func:`images_to_latents`: the forward process
  ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` (Ho et al. 2020, eq. 4) applied to encoded images, as in
  the usual denoising loss and Forget-Me-Not (Zhang et al. 2023).

Both follow the pipeline's own noise schedule (``beta_*``, ``num_train_timesteps``, ``prediction_type``) whatever
scheduler class the pipeline carries: a :class:`~diffusers.DDIMScheduler` is built from the pipeline's scheduler
config. Both work for epsilon- and v-prediction models (the DDIM step converts the model output) and for SDXL
(the :class:`~erasure.diffusion.Conditioning` carries the pooled embeddings and micro-conditioning).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from torch import Tensor

from erasure.diffusion import Conditioning, predict_noise, unconditional_conditioning
from erasure.files import to_pil
from erasure.pipeline import default_image_size

__all__ = ["ddim_scheduler", "ddim_trajectory", "forward_noise", "images_to_latents", "initial_noise", "partial_ddim"]

Generators = torch.Generator | Sequence[torch.Generator] | None


def ddim_scheduler(pipe: DiffusionPipeline, total_steps: int | None = None) -> DDIMScheduler:
    """A fresh DDIM scheduler with the pipeline's noise schedule and parameterisation.

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline, with any scheduler.
        total_steps: If given, ``set_timesteps(total_steps)`` is called (on the UNet's device).

    Returns:
        The scheduler; a new object, so callers may change its state freely.
    """
    config = pipe.scheduler.config
    # Latent diffusion never clips x_0; DDIM's own defaults (clip_sample=True) only apply to configs that lack them.
    scheduler = DDIMScheduler.from_config(
        config,
        clip_sample=config.get("clip_sample", False),
        set_alpha_to_one=config.get("set_alpha_to_one", False),
    )
    if total_steps is not None:
        scheduler.set_timesteps(int(total_steps), device=pipe.unet.device)
    return scheduler


def _latent_shape(pipe: DiffusionPipeline, batch_size: int, size: int | None) -> tuple[int, int, int, int]:
    size = int(size) if size is not None else default_image_size(pipe)
    factor = int(pipe.vae_scale_factor)
    if size % factor:
        raise ValueError(f"Image size {size} is not a multiple of the VAE's downscaling factor {factor}.")
    return (batch_size, int(pipe.unet.config.in_channels), size // factor, size // factor)


def initial_noise(
    pipe: DiffusionPipeline, batch_size: int, size: int | None = None, generator: Generators = None
) -> Tensor:
    """Standard normal latents ``x_T``, drawn on the generators' device, then moved to the UNet's device/dtype.

    Args:
        pipe: The pipeline (for the latent shape, device and dtype).
        batch_size: Number of latents.
        size: Image side in pixels; the model's native size when not given.
        generator: One generator, one per latent (so batching does not change a latent), or ``None``.

    Returns:
        ``[B, C, size / f, size / f]`` noise.
    """
    shape = _latent_shape(pipe, batch_size, size)
    if isinstance(generator, Sequence):
        if len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for {batch_size} latents; pass one per latent.")
        noise = torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator])
    else:
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(shape, generator=generator, device=device)
    return noise.to(pipe.unet.device, pipe.unet.dtype)


@torch.no_grad()
def ddim_trajectory(
    pipe: DiffusionPipeline,
    conditioning: Conditioning,
    until_step: int,
    total_steps: int = 50,
    guidance: float = 3.0,
    generator: Generators = None,
    *,
    unconditional: Conditioning | None = None,
    latents: Tensor | None = None,
    batch_size: int | None = None,
    size: int | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Every state of a guided DDIM run: ``[(x_{tau_0}, tau_0), (x_{tau_1}, tau_1), ..., (x_{tau_k}, tau_k)]``.

    The same run as :func:`partial_ddim` (same arguments, same arithmetic), keeping each intermediate latent: the
    ``j``-th entry is exactly what ``partial_ddim(..., until_step=j)`` returns for the same initial noise. Each
    entry is a valid ``x_t`` of its own timestep, so one trajectory serves ``k + 1`` training steps where
    :func:`partial_ddim` serves one (ESD's ``cached`` sampler).

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline.
        conditioning: ``B`` prompts, or 1 prompt for every latent.
        until_step: Last state kept, ``0 <= until_step < total_steps`` (``total_steps - 1``: the whole run but the
            final step to ``x_0``).
        total_steps: Length of the DDIM schedule.
        guidance: CFG scale; 1 uses the conditional prediction alone (one forward per step).
        generator: Seeds the initial noise (one generator, or one per latent). Ignored if ``latents`` is given.
        unconditional: The unconditional conditioning; the pipeline's default when not given (computed once).
        latents: Initial noise ``x_{tau_0}``; drawn with :func:`initial_noise` when not given.
        batch_size: Number of latents when ``latents`` is not given; ``len(conditioning)`` by default.
        size: Image side in pixels (latents are ``size / vae_scale_factor``); the native size by default.

    Returns:
        ``until_step + 1`` pairs of ``[B, C, h, w]`` latents and the 0-d ``long`` timestep they sit at.

    Raises:
        ValueError: If ``until_step`` is outside ``[0, total_steps)``.
    """
    if not 0 <= int(until_step) < int(total_steps):
        raise ValueError(f"until_step must be in [0, {total_steps}), got {until_step}.")
    scheduler = ddim_scheduler(pipe, total_steps)
    if latents is None:
        latents = initial_noise(pipe, batch_size or len(conditioning), size, generator)
    latents = latents.to(pipe.unet.device, pipe.unet.dtype) * scheduler.init_noise_sigma
    use_cfg = float(guidance) != 1.0
    if use_cfg and unconditional is None:
        unconditional = unconditional_conditioning(pipe)
    states = [(latents, scheduler.timesteps[0].long())]
    for k, t in enumerate(scheduler.timesteps[: int(until_step)]):
        model_input = scheduler.scale_model_input(latents, t)
        output = predict_noise(
            pipe, model_input, t, conditioning, guidance if use_cfg else None, unconditional if use_cfg else None
        )
        latents = scheduler.step(output, t, latents, eta=0.0, return_dict=False)[0]
        states.append((latents, scheduler.timesteps[k + 1].long()))
    return states


@torch.no_grad()
def partial_ddim(
    pipe: DiffusionPipeline,
    conditioning: Conditioning,
    until_step: int,
    total_steps: int = 50,
    guidance: float = 3.0,
    generator: Generators = None,
    *,
    unconditional: Conditioning | None = None,
    latents: Tensor | None = None,
    batch_size: int | None = None,
    size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Denoise pure noise with DDIM and classifier-free guidance for the first ``until_step`` of ``total_steps``.

    With the DDIM timesteps ``tau_0 > tau_1 > ... > tau_{N-1}`` of an ``N = total_steps`` schedule, this starts at
    ``x_{tau_0}`` (noise) and takes ``until_step`` deterministic DDIM steps, each with the guided prediction
    ``out_uncond + guidance * (out_cond - out_uncond)``, ending at ``x_{tau_k}`` with ``k = until_step``. That
    latent and ``tau_k``, the timestep it sits at, are returned, so a caller evaluating the UNet on the pair sees a
    consistent noise level. Runs under ``torch.no_grad`` with the pipeline's current weights.

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline.
        conditioning: ``B`` prompts, or 1 prompt for every latent.
        until_step: DDIM steps to take, ``0 <= until_step < total_steps`` (0 returns the initial noise).
        total_steps: Length of the DDIM schedule.
        guidance: CFG scale; 1 uses the conditional prediction alone (one forward per step).
        generator: Seeds the initial noise (one generator, or one per latent). Ignored if ``latents`` is given.
        unconditional: The unconditional conditioning; the pipeline's default when not given (computed once).
        latents: Initial noise ``x_{tau_0}``; drawn with :func:`initial_noise` when not given.
        batch_size: Number of latents when ``latents`` is not given; ``len(conditioning)`` by default.
        size: Image side in pixels (latents are ``size / vae_scale_factor``); the native size by default.

    Returns:
        ``(x_t, t)``: ``[B, C, h, w]`` latents and a 0-d ``long`` tensor holding their timestep ``tau_k``.

    Raises:
        ValueError: If ``until_step`` is outside ``[0, total_steps)``.
    """
    states = ddim_trajectory(
        pipe, conditioning, until_step, total_steps, guidance, generator,
        unconditional=unconditional, latents=latents, batch_size=batch_size, size=size,
    )  # fmt: skip
    return states[-1]


def denoising_target(pipe: DiffusionPipeline, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet should output for ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``, in its parameterisation.

    ``noise`` for epsilon models; ``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0`` for v-prediction models (SD 2.x
    768, Salimans & Ho 2022, Eq. 9 of "Progressive distillation").
    """
    if str(pipe.scheduler.config.get("prediction_type", "epsilon")) != "v_prediction":
        return noise
    abar = ddim_scheduler(pipe).alphas_cumprod[timesteps.reshape(-1).cpu()].to(latents).view(-1, 1, 1, 1)
    return abar.sqrt() * noise - (1 - abar).sqrt() * latents


def forward_noise(
    pipe: DiffusionPipeline,
    latents: Tensor,
    timesteps: int | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample ``x_t ~ q(x_t | x_0)``: ``x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * noise``.

    Args:
        pipe: The pipeline, for its noise schedule.
        latents: ``[B, C, h, w]`` clean latents ``x_0`` (already multiplied by the VAE's scaling factor).
        timesteps: One timestep, one per latent, or ``None`` to draw each uniformly from
            ``[0, num_train_timesteps)``.
        generator: Seeds the timesteps and the noise (drawn on the generator's device, CPU by default).

    Returns:
        ``(x_t, noise, timesteps)``, the timesteps as a ``[B]`` long tensor on the latents' device.
    """
    batch_size = latents.shape[0]
    alphas_cumprod = ddim_scheduler(pipe).alphas_cumprod
    rng_device = generator.device if generator is not None else torch.device("cpu")
    if timesteps is None:
        timesteps = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=generator, device=rng_device)
    timesteps = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1).to(rng_device)
    if timesteps.numel() == 1:
        timesteps = timesteps.expand(batch_size)
    if timesteps.numel() != batch_size:
        raise ValueError(f"Got {timesteps.numel()} timesteps for {batch_size} latents; pass 1 or {batch_size}.")
    noise = torch.randn(latents.shape, generator=generator, device=rng_device).to(latents.device, latents.dtype)
    abar = alphas_cumprod[timesteps.cpu()].to(latents.device, torch.float32).view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents.float() + (1.0 - abar).sqrt() * noise.float()
    return noisy.to(latents.dtype), noise, timesteps.to(latents.device)


def images_to_latents(
    pipe: DiffusionPipeline,
    images: Any,
    size: int | None = None,
    generator: torch.Generator | None = None,
    *,
    sample: bool = True,
) -> Tensor:
    """Encode images with the pipeline's VAE into (scaled) latents ``x_0``.

    Args:
        pipe: The pipeline.
        images: PIL images, ``[H, W, 3]`` arrays (uint8, or floats in [0, 1]), or one ``[N, H, W, 3]`` array.
        size: Side the images are resized to; the model's native size when not given.
        generator: Seeds the sample from the VAE's posterior.
        sample: Sample the posterior (as training scripts do); ``False`` takes its mean.

    Returns:
        ``[N, C, size / f, size / f]`` latents times ``vae.config.scaling_factor``, in the UNet's dtype.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, Sequence) or isinstance(images, str | bytes) or not images:
        raise ValueError("images must be a non-empty list of PIL images or arrays, or an [N, H, W, 3] array.")
    size = int(size) if size is not None else default_image_size(pipe)
    pil = [to_pil(image) for image in images]
    pixels = pipe.image_processor.preprocess(pil, height=size, width=size)
    vae = pipe.vae
    with torch.no_grad():
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).to(pipe.unet.device, pipe.unet.dtype)
