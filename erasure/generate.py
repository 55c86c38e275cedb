"""Seeded, batched image generation: one ``torch.Generator`` per image, so batching never changes an image."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def image_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per image, each seeded with its own seed."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 16,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Generate one image per (prompt, seed) pair.

    The initial latents of image ``i`` are drawn from ``torch.Generator().manual_seed(seeds[i])`` on the CPU, so the
    same prompt and seed give the same image whatever the batch size or device.

    Args:
        pipe: A diffusers Stable Diffusion (or SDXL) pipeline.
        prompts: One prompt per image.
        seeds: One seed per image.
        steps: Denoising steps of the pipeline's scheduler.
        guidance_scale: Classifier-free guidance scale.
        batch_size: Images per pipeline call.
        height: Image height (default: the pipeline's native size).
        width: Image width (default: the pipeline's native size).
        progress: Show a progress bar over batches.

    Returns:
        uint8 array of shape ``(N, H, W, 3)``.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or size, width or size
    channels = pipe.unet.config.in_channels
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress or None):
        batch_prompts = list(prompts[start : start + batch_size])
        generators = image_generators(seeds[start : start + batch_size])
        shape = (channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators])
        latents = latents.to(pipe.device, pipe.unet.dtype)
        output = pipe(
            batch_prompts,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            latents=latents,
            output_type="np",
        )
        images.append((np.clip(output.images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(images)
