"""Seeded, batched image generation: the one path from prompts and seeds to images, for a model and its edits.

* :func:`generate`: one ``torch.Generator`` per image, so the initial noise of an image depends on its seed alone,
  never on the batch it is drawn in. The denoising arithmetic of batched kernels can still differ in the last bits
  of float32 between batch sizes (on the order of 1e-6 on CPU), so an image generated in another batch size equals
  the original up to float rounding: at most one step of the uint8 scale, in rare pixels.
* :func:`generate_paired` / :func:`iter_generate_paired`: the base model and each edit on the same prompts and
  seeds (each edit applied alone, reverted after its images, also on failure). The evaluator, the grid, the demo
  and the measurement scripts all generate through it, so "base vs edited" means one thing everywhere.

Image folders (saving and reading images with a manifest) live in :mod:`erasure.files`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from erasure.suppression import active_generation_edit

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
    guidance_scale: float | Sequence[float] = 7.5,
    batch_size: int = 16,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Generate one image per (prompt, seed) pair.

    The initial latents of image ``i`` are drawn from ``torch.Generator().manual_seed(seeds[i])`` on the CPU, so the
    same prompt and seed start from the same noise whatever the batch size or device (the finished image can
    differ by float rounding between batch sizes: see the module docstring). Inside ``with edit.applied(pipe)`` of
    a generation-time edit (:mod:`erasure.suppression`: a negative prompt, SLD) every call samples with it.

    Args:
        pipe: A diffusers Stable Diffusion (or SDXL) pipeline.
        prompts: One prompt per image.
        seeds: One seed per image.
        steps: Denoising steps of the pipeline's scheduler.
        guidance_scale: Classifier-free guidance scale, or one per image (a batch is split into runs of equal
            scale, so each pipeline call has one).
        batch_size: Images per pipeline call.
        height: Image height (default: the pipeline's native size).
        width: Image width (default: the pipeline's native size).
        progress: Show a progress bar over batches; ``False`` also silences the pipeline's own bar of denoising
            steps for this call.

    Returns:
        uint8 array of shape ``(N, H, W, 3)``.
    """
    with contextlib.nullcontext() if progress else _steps_bar_off(pipe):
        return _generate(pipe, prompts, seeds, steps, guidance_scale, batch_size, height, width, progress)


@contextlib.contextmanager
def _steps_bar_off(pipe) -> Iterator[None]:
    """The diffusers pipeline's per-step progress bar off while the block runs, its own setting restored after."""
    had = hasattr(pipe, "_progress_bar_config")
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**(saved | {"disable": True}))
    try:
        yield
    finally:
        if had:
            pipe._progress_bar_config = saved
        else:
            del pipe._progress_bar_config


def _generate(pipe, prompts, seeds, steps, guidance_scale, batch_size, height, width, progress) -> np.ndarray:
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    scales = _per_image(guidance_scale, len(prompts))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or size, width or size
    channels = pipe.unet.config.in_channels
    shape = (channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    suppression, strength = active_generation_edit(pipe) or (None, 0.0)
    extra = suppression.pipeline_kwargs(pipe, strength) if suppression is not None else {}  # per-image values
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress or None):
        stop = min(start + batch_size, len(prompts))
        run_start = start
        while run_start < stop:  # one pipeline call per run of equal guidance scale
            run_stop = run_start + 1
            while run_stop < stop and scales[run_stop] == scales[run_start]:
                run_stop += 1
            generators = image_generators(seeds[run_start:run_stop])
            latents = torch.stack([torch.randn(shape, generator=g) for g in generators])
            guidance = (
                suppression.guidance(pipe, scales[run_start], strength) if suppression else contextlib.nullcontext()
            )
            with guidance:
                output = pipe(
                    list(prompts[run_start:run_stop]),
                    num_inference_steps=steps,
                    guidance_scale=scales[run_start],
                    height=height,
                    width=width,
                    latents=latents.to(pipe.device, pipe.unet.dtype),
                    output_type="np",
                    **{key: [value] * (run_stop - run_start) for key, value in extra.items()},  # one per prompt
                )
            images.append((np.clip(output.images, 0, 1) * 255).round().astype(np.uint8))
            run_start = run_stop
    return np.concatenate(images)


def _per_image(guidance_scale: float | Sequence[float], count: int) -> list[float]:
    if isinstance(guidance_scale, int | float):
        return [float(guidance_scale)] * count
    scales = [float(scale) for scale in guidance_scale]
    if len(scales) != count:
        raise ValueError(f"got {len(scales)} guidance scales for {count} prompts; give one scale, or one per prompt")
    return scales


def iter_generate_paired(
    pipe: Any,
    edits: Mapping[str, Any],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    base_label: str | None = "base",
    scale: float = 1.0,
    max_relative_change: float | None = None,
    batch_size: int = 16,
    progress: bool = True,
    **generate_kwargs: Any,
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Stream the images of the base model and of each edit, on the same prompts and seeds, batch by batch.

    Each edit is applied to ``pipe`` alone (:meth:`erasure.edit.Edit.applied`) and reverted before the next model,
    also when generation fails or the caller stops iterating, so ``pipe`` always ends with its base weights.
    Image ``i`` of every model starts from the same noise (seed ``seeds[i]``): any difference between two models'
    images is the edit's.

    Args:
        pipe: The base pipeline.
        edits: Label -> :class:`erasure.edit.Edit` (or ``None``: the model as loaded), generated in this order.
        prompts: One prompt per image.
        seeds: One seed per image.
        base_label: Label of the unedited model, generated first; ``None`` to skip it.
        scale: Strength at which each edit is applied.
        max_relative_change: Passed to :meth:`erasure.edit.Edit.apply_to` (its default when ``None``).
        batch_size: Images per pipeline call, and per yielded batch.
        progress: Show a progress bar per model.
        **generate_kwargs: Passed to :func:`generate` (``steps``, ``guidance_scale`` -- one or one per image --,
            ``height``, ``width``).

    Yields:
        ``(label, start, images)``: images ``start .. start + len(images)`` of model ``label``, uint8
        ``(n, H, W, 3)``.

    Raises:
        ValueError: If an edit is labelled like the base model.
    """
    if base_label is not None and base_label in edits:
        raise ValueError(f"An edit is labelled '{base_label}', the label of the base model; rename it.")
    models: dict[str, Any] = ({base_label: None} if base_label is not None else {}) | dict(edits)
    scales = _per_image(generate_kwargs.pop("guidance_scale", 7.5), len(prompts))
    limit = {} if max_relative_change is None else {"max_relative_change": max_relative_change}
    for label, edit in models.items():
        if edit is not None:
            logger.info("Generating %d images with edit '%s' (scale %s).", len(prompts), label, scale)
        context = contextlib.nullcontext() if edit is None else edit.applied(pipe, scale=scale, **limit)
        with context:
            batches = range(0, len(prompts), batch_size)
            for start in tqdm(batches, desc=f"generate {label}", disable=not progress or None):
                stop = start + batch_size
                images = generate(
                    pipe,
                    prompts[start:stop],
                    seeds[start:stop],
                    guidance_scale=scales[start:stop],
                    batch_size=batch_size,
                    progress=False,
                    **generate_kwargs,
                )
                yield label, start, images


def generate_paired(
    pipe: Any, edits: Mapping[str, Any], prompts: Sequence[str], seeds: Sequence[int], **kwargs: Any
) -> dict[str, np.ndarray]:
    """Images of the base model and of each edit from the same prompts and seeds, all at once.

    Arguments as :func:`iter_generate_paired`.

    Returns:
        ``{base_label: images, label: images, ...}`` in generation order, each ``(N, H, W, 3)`` uint8.
    """
    parts: dict[str, list[np.ndarray]] = {}
    for label, _, images in iter_generate_paired(pipe, edits, prompts, seeds, **kwargs):
        parts.setdefault(label, []).append(images)
    return {label: np.concatenate(chunks) for label, chunks in parts.items()}
