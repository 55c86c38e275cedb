"""The one sampler every attack and probe generates with: guided DDIM from seeded noise, with the probes' hooks.

Attacks must judge their images against base and edited columns made the same way, so every image of
:mod:`erasure.attacks` comes from :func:`sample` and :func:`decode`. With the defaults it is the pipeline's own
DDIM sampling (Song et al. 2021, Eq. 12, ``eta = 0``) with classifier-free guidance
``eps_u + w (eps_c - eps_u)`` (Ho & Salimans 2022, Eq. 6), one ``torch.Generator`` per image seeded with that
image's seed, as :func:`erasure.generate.generate` draws its noise; on a pipeline whose scheduler is DDIM the two
agree up to float rounding (tested). It adds what the probes need and ``pipe(...)`` cannot do:

* conditioning given as embeddings (Ring-A-Bell's ``tau(P) + eta c``, optimised tokens), not only prompts;
* a window of the schedule (``start``/``stop``): the trajectory-completion probe hands a latent from one model to
  the other mid-way;
* :func:`eta_ddim_step`, the noise-based probe's DDIM step (Lu et al., NeurIPS 2025, "When Are Concepts Erased
  From Diffusion Models?", the ``eta``-DDIM scheduler of their code), for any ``eta`` and noise factor ``v``::

      sigma_t = sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
      x_prev  = sqrt(abar_prev) * x0_hat + sqrt(|1 - abar_prev - (eta * sigma_t)^2|) * eps_hat + v * eta * sigma_t * z

  With ``eta = 0`` it is deterministic DDIM; with ``eta = 1, v = 1`` DDPM-variance DDIM (diffusers' ``eta = 1``).
  The absolute value keeps the radicand real for ``eta > 1`` (their "numerical stability" choice), and ``v`` is
  applied here, where the authors' released runner passes it to a pipeline that drops it;
* ``on_step``: a callback that may replace the latent after each step (RePaint-style inpainting blends the known
  region back in).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from erasure.diffusion import Conditioning, predict_noise, unconditional_conditioning
from erasure.generate import image_generators
from erasure.pipeline import default_image_size
from erasure.sampling import ddim_scheduler

__all__ = ["decode", "eta_ddim_step", "model_to_eps_x0", "sample", "seeded_noise"]

StepHook = Callable[[int, Tensor, Tensor], Tensor]


def seeded_noise(pipe, seeds: Sequence[int], size: int | None = None) -> tuple[Tensor, list[torch.Generator]]:
    """Initial latents ``x_T``, one CPU generator per image (as :func:`erasure.generate.generate` draws them).

    Returns:
        ``(latents, generators)``: the generators have drawn their image's noise and go on to draw its sampling
        noise, so an image depends on its own seed alone, never on its batch.
    """
    size = int(size) if size is not None else default_image_size(pipe)
    factor = int(pipe.vae_scale_factor)
    shape = (int(pipe.unet.config.in_channels), size // factor, size // factor)
    generators = image_generators(seeds)
    latents = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return latents.to(pipe.unet.device, pipe.unet.dtype), generators


def model_to_eps_x0(kind: str, output: Tensor, sample: Tensor, abar_t: Tensor) -> tuple[Tensor, Tensor]:
    """``(eps_hat, x0_hat)`` from a UNet output in its parameterisation (``epsilon``, ``v_prediction``, ``sample``).

    ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` and ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022).
    """
    alpha, beta = abar_t**0.5, (1 - abar_t) ** 0.5
    if kind == "epsilon":
        return output, (sample - beta * output) / alpha
    if kind == "v_prediction":
        return alpha * output + beta * sample, alpha * sample - beta * output
    if kind == "sample":
        return (sample - alpha * output) / beta, output
    raise ValueError(f"Unknown prediction type {kind!r}.")


def eta_ddim_step(
    scheduler,
    output: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    *,
    eta: float = 0.0,
    variance_scale: float = 1.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One DDIM step with noise scale ``eta`` and extra noise factor ``variance_scale`` (``v``), see module doc.

    Args:
        scheduler: A DDIM scheduler on which ``set_timesteps`` was called (its ``alphas_cumprod`` and step size).
        output: UNet output at ``(sample, timestep)``, in the scheduler's parameterisation.
        timestep: The current timestep ``t``.
        sample: ``x_t``.
        eta: DDIM's ``eta``; any value ``>= 0`` (the probe sweeps ``eta > 1``).
        variance_scale: The factor ``v`` on the added noise.
        noise: ``z``, required when ``eta * variance_scale != 0``.

    Returns:
        ``x_prev``.
    """
    t = int(timestep)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar_t = scheduler.alphas_cumprod[t]
    abar_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    eps, x0 = model_to_eps_x0(scheduler.config.prediction_type, output, sample, abar_t)
    sigma = ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
    std = float(eta) * sigma
    direction = (1 - abar_prev - std**2).abs() ** 0.5 * eps
    x_prev = abar_prev**0.5 * x0 + direction
    if float(eta) * float(variance_scale) != 0.0:
        if noise is None:
            raise ValueError("eta_ddim_step with eta > 0 needs the noise z.")
        x_prev = x_prev + float(variance_scale) * std * noise.to(x_prev.device, x_prev.dtype)
    return x_prev.to(sample.dtype)


@torch.no_grad()
def sample(
    pipe,
    conditioning: Conditioning,
    latents: Tensor,
    *,
    steps: int = 25,
    guidance: float = 7.5,
    start: int = 0,
    stop: int | None = None,
    eta: float = 0.0,
    variance_scale: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    unconditional: Conditioning | None = None,
    on_step: StepHook | None = None,
) -> Tensor:
    """Denoise ``latents`` over steps ``start .. stop`` of a ``steps``-long DDIM schedule.

    Args:
        pipe: The pipeline (its current weights: apply the edit around the call).
        conditioning: ``B`` prompt embeddings (or 1 for all).
        latents: ``x`` at step ``start`` (``x_T`` for ``start = 0``), ``[B, C, h, w]``.
        steps: Length of the schedule ``N``.
        guidance: CFG scale ``w``; ``<= 1`` uses the conditional prediction alone, as the pipeline does.
        start: First step index, ``0 <= start <= stop``.
        stop: One past the last step index (``N`` by default: down to ``x_0``).
        eta: See :func:`eta_ddim_step`.
        variance_scale: See :func:`eta_ddim_step`.
        generators: One per image; draw the sampling noise ``z`` when ``eta > 0``.
        unconditional: Unconditional conditioning; the pipeline's default when not given.
        on_step: ``on_step(i, t, x) -> x`` after step ``i`` (at timestep ``t``) produced ``x``.

    Returns:
        The latent after step ``stop - 1``.
    """
    stop = int(steps) if stop is None else int(stop)
    if not 0 <= int(start) <= stop <= int(steps):
        raise ValueError(f"need 0 <= start <= stop <= steps, got start={start}, stop={stop}, steps={steps}.")
    scheduler = ddim_scheduler(pipe, steps)
    cfg = float(guidance) > 1.0
    if cfg and unconditional is None:
        unconditional = unconditional_conditioning(pipe)
    x = latents.to(pipe.unet.device, pipe.unet.dtype)
    if start == 0:
        x = x * scheduler.init_noise_sigma
    noisy = float(eta) * float(variance_scale) != 0.0
    if noisy and (generators is None or len(generators) != x.shape[0]):
        raise ValueError("eta > 0 needs one generator per image for its sampling noise.")
    for i in range(int(start), stop):
        t = scheduler.timesteps[i]
        model_input = scheduler.scale_model_input(x, t)
        output = predict_noise(
            pipe, model_input, t, conditioning, float(guidance) if cfg else None, unconditional if cfg else None
        )
        z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]) if noisy else None
        x = eta_ddim_step(scheduler, output, t, x, eta=eta, variance_scale=variance_scale, noise=z)
        if on_step is not None:
            x = on_step(i, t, x)
    return x


@torch.no_grad()
def decode(pipe, latents: Tensor) -> np.ndarray:
    """VAE-decode latents into uint8 ``(N, H, W, 3)`` images, as the pipeline's ``output_type="np"`` does."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    # contiguous: the same values in another memory layout can take another conv kernel, rounding differently
    scaled = latents.to(vae.device, vae.dtype).contiguous() / vae.config.scaling_factor + shift
    images = vae.decode(scaled, return_dict=False)[0]
    array = pipe.image_processor.postprocess(images, output_type="np", do_denormalize=[True] * len(images))
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
