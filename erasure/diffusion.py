"""The diffusion maths every erasure method shares, on a loaded pipeline.

* :func:`encode_prompts` turns prompts into a :class:`Conditioning` (text embeddings, plus SDXL's pooled
  embeddings and micro-conditioning).
* :func:`predict_noise` runs the UNet on it, with classifier-free guidance
  ``eps_uncond + g * (eps_cond - eps_uncond)`` (Ho & Salimans 2022, eq. 6) in one batched forward when asked.
  The UNet's output is in the scheduler's parameterisation (epsilon or v); callers that need epsilon convert it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from erasure.pipeline import ModelFamily, default_image_size, detect_family, execution_device

__all__ = ["Conditioning", "encode_prompts", "predict_noise", "unconditional_conditioning"]


@dataclass
class Conditioning:
    """Text conditioning for a batch of prompts, without classifier-free-guidance doubling.

    Attributes:
        prompt_embeds: ``[B, 77, D]`` token embeddings fed to cross-attention.
        pooled_prompt_embeds: SDXL only: ``[B, P]`` pooled embedding of the second text encoder.
        add_time_ids: SDXL only: ``[B, 6]`` micro-conditioning (original size, crop top-left, target size).
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None = None
    add_time_ids: Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> Conditioning:
        """Select prompts along the batch dimension; an integer keeps the batch dimension (size 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda tensor: tensor[index])

    def _map(self, fn: Any) -> Conditioning:
        return Conditioning(
            fn(self.prompt_embeds),
            None if self.pooled_prompt_embeds is None else fn(self.pooled_prompt_embeds),
            None if self.add_time_ids is None else fn(self.add_time_ids),
        )

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move (and optionally cast) every tensor."""
        return self._map(lambda tensor: tensor.to(device=device, dtype=dtype))

    def detach(self) -> Conditioning:
        """Detach every tensor from the autograd graph."""
        return self._map(Tensor.detach)

    def repeat(self, times: int) -> Conditioning:
        """Repeat every prompt ``times`` times in a row (``[a, b] -> [a, a, b, b]``)."""
        return self._map(lambda tensor: tensor.repeat_interleave(times, dim=0))

    def expand(self, batch_size: int) -> Conditioning:
        """Return a conditioning of ``batch_size`` prompts: itself, or a single prompt repeated.

        Raises:
            ValueError: If the batch is neither ``batch_size`` nor 1.
        """
        if len(self) == batch_size:
            return self
        if len(self) == 1:
            return self.repeat(batch_size)
        raise ValueError(
            f"Conditioning holds {len(self)} prompts but {batch_size} are needed; pass 1 or {batch_size}."
        )

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate conditionings along the batch dimension.

        Raises:
            ValueError: If the list is empty or mixes SDXL and non-SDXL conditionings.
        """
        if not items:
            raise ValueError("Conditioning.cat needs at least one conditioning.")
        has_pooled = {item.pooled_prompt_embeds is not None for item in items}
        if len(has_pooled) > 1:
            raise ValueError("Conditioning.cat cannot mix SDXL conditionings (with pooled embeddings) and others.")

        def cat_field(name: str) -> Tensor | None:
            tensors = [getattr(item, name) for item in items]
            return None if tensors[0] is None else torch.cat(tensors, dim=0)

        return Conditioning(cat_field("prompt_embeds"), cat_field("pooled_prompt_embeds"), cat_field("add_time_ids"))

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``UNet2DConditionModel.forward``."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            if self.add_time_ids is None:
                raise ValueError("An SDXL conditioning needs add_time_ids; build it with encode_prompts.")
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.add_time_ids}
        return kwargs


def _sdxl_time_ids(pipe: DiffusionPipeline, batch_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Micro-conditioning as the SDXL pipeline builds it for its default size, crops (0, 0)."""
    size = default_image_size(pipe)
    if pipe.text_encoder_2 is not None:
        projection_dim = int(pipe.text_encoder_2.config.projection_dim)
    else:
        time_embeddings = 6 * pipe.unet.config.addition_time_embed_dim
        projection_dim = int(pipe.unet.add_embedding.linear_1.in_features) - time_embeddings
    time_ids = pipe._get_add_time_ids(
        (size, size), (0, 0), (size, size), dtype=dtype, text_encoder_projection_dim=projection_dim
    )
    return time_ids.to(device).repeat(batch_size, 1)


def encode_prompts(
    pipe: DiffusionPipeline, prompts: str | Sequence[str], *, grad: bool = False, clip_skip: int | None = None
) -> Conditioning:
    """Encode prompts with the pipeline's own ``encode_prompt`` (no CFG doubling).

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline.
        prompts: One prompt or a list of prompts.
        grad: Track gradients through the text encoder(s); off by default.
        clip_skip: Layers to skip from the end of the text encoder, as in diffusers.

    Returns:
        The conditioning; for SDXL with pooled embeddings and ``add_time_ids`` for the default image size.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = execution_device(pipe)
    with torch.set_grad_enabled(grad):
        if detect_family(pipe) is ModelFamily.SDXL:
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
                clip_skip=clip_skip,
            )
            time_ids = _sdxl_time_ids(pipe, len(prompts), prompt_embeds.dtype, device)
            return Conditioning(prompt_embeds, pooled, time_ids)
        prompt_embeds, _ = pipe.encode_prompt(prompts, device, 1, False, clip_skip=clip_skip)
        return Conditioning(prompt_embeds)


def unconditional_conditioning(pipe: DiffusionPipeline, batch_size: int = 1, *, grad: bool = False) -> Conditioning:
    """The conditioning the pipeline itself uses for CFG without a negative prompt.

    That is the empty prompt, except for SDXL pipelines with ``force_zeros_for_empty_prompt``, which use zeros.

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline.
        batch_size: Number of copies.
        grad: Track gradients through the text encoder(s).

    Returns:
        The unconditional conditioning, ``batch_size`` long.
    """
    empty = encode_prompts(pipe, [""], grad=grad)
    if detect_family(pipe) is ModelFamily.SDXL and pipe.config.get("force_zeros_for_empty_prompt", False):
        empty = Conditioning(
            torch.zeros_like(empty.prompt_embeds), torch.zeros_like(empty.pooled_prompt_embeds), empty.add_time_ids
        )
    return empty.expand(batch_size)


def _timestep_batch(timesteps: int | float | Tensor, batch_size: int, device: torch.device) -> Tensor:
    if not isinstance(timesteps, Tensor):
        timesteps = torch.tensor(timesteps, dtype=torch.long if isinstance(timesteps, int) else torch.float32)
    timesteps = timesteps.to(device)
    if timesteps.ndim == 0 or timesteps.numel() == 1:
        return timesteps.reshape(1).expand(batch_size)
    if timesteps.ndim == 1 and timesteps.shape[0] == batch_size:
        return timesteps
    raise ValueError(
        f"timesteps has shape {tuple(timesteps.shape)}; pass one timestep or one per latent ({batch_size})."
    )


def predict_noise(
    pipe: DiffusionPipeline,
    latents: Tensor,
    timesteps: int | Tensor,
    conditioning: Conditioning,
    guidance_scale: float | None = None,
    unconditional: Conditioning | None = None,
) -> Tensor:
    """Run the UNet on noisy latents, optionally with classifier-free guidance.

    With ``guidance_scale = g`` the unconditional and conditional halves go through the UNet in one batched
    forward and the result is ``out_uncond + g * (out_cond - out_uncond)``. Gradients flow when enabled.

    The output is in the model's own parameterisation (noise for ``epsilon`` models, ``v`` for ``v_prediction``
    models; see :func:`prediction_type`). Latents are used as given: apply ``scheduler.scale_model_input`` first
    for schedulers that need it (DDIM does not).

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline.
        latents: ``[B, C, h, w]`` noisy latents.
        timesteps: An int, a 0-d tensor, or a 1-d tensor of 1 or ``B`` timesteps.
        conditioning: ``B`` prompts, or 1 prompt used for every latent.
        guidance_scale: CFG scale; ``None`` for the plain conditional prediction.
        unconditional: Unconditional conditioning (1 or ``B`` prompts); the pipeline's default
            (:func:`unconditional_conditioning`) when not given.

    Returns:
        ``[B, C, h, w]`` UNet output.
    """
    batch_size = latents.shape[0]
    t = _timestep_batch(timesteps, batch_size, latents.device)
    cond = conditioning.to(latents.device, latents.dtype).expand(batch_size)
    if guidance_scale is None:
        return pipe.unet(latents, t, **cond.unet_kwargs(), return_dict=False)[0]
    if unconditional is None:
        unconditional = unconditional_conditioning(pipe)
    uncond = unconditional.to(latents.device, latents.dtype).expand(batch_size)
    both = Conditioning.cat([uncond, cond])
    output = pipe.unet(torch.cat([latents, latents]), torch.cat([t, t]), **both.unet_kwargs(), return_dict=False)[0]
    out_uncond, out_cond = output.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)
