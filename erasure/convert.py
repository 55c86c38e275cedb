"""Key maps between diffusers' names and the original (LDM / SGM) single-file layout, both directions.

A Stable Diffusion checkpoint exists in two spellings of the same tensors: diffusers' folders
(``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight``) and the original CompVis/Stability single
file (``model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight``). The maps here are built
from the module structure itself (block by block, in order), so they hold for any UNet of the SD layout, toy-sized
or full-sized.

* :func:`unet_to_ldm`, :func:`vae_to_ldm`, :func:`text_encoder_keys`, :func:`text_encoder_to_open_clip`:
  diffusers -> LDM / OpenCLIP names (what :func:`erasure.export.save_single_file` writes).
* :func:`ldm_to_diffusers_names`: LDM -> diffusers names of a UNet (to read CompVis-era partial checkpoints).
* :func:`single_file_state_dict`: the whole pipeline in the single-file layout.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from torch import Tensor

from erasure.pipeline import ModelFamily, detect_family

__all__ = [
    "ldm_to_diffusers_names",
    "single_file_state_dict",
    "text_encoder_keys",
    "text_encoder_to_open_clip",
    "unet_to_ldm",
    "vae_to_ldm",
]


_UNET_RESNET_RENAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION_RENAMES = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def _rename_with(prefixes: dict[str, tuple[str, tuple[tuple[str, str], ...]]], key: str) -> str:
    """Map a diffusers key through the longest matching prefix, renaming the rest with its inner table."""
    best = max((p for p in prefixes if key.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise ValueError(f"No single-file name for '{key}': this layout is not supported for export.")
    target, inner = prefixes[best]
    rest = key[len(best) + 1 :]
    for old, new in inner:
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    return f"{target}.{rest}"


def unet_to_ldm(unet: torch.nn.Module) -> dict[str, Tensor]:
    """The UNet's state dict under LDM names (without the ``model.diffusion_model.`` prefix).

    LDM numbers blocks flat: ``input_blocks.0`` is ``conv_in``, then each down block takes ``layers + 1`` slots
    (its resnet/attention pairs, then its downsampler); ``output_blocks`` likewise for the up blocks. Inside a
    resnet, diffusers' ``norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut`` are LDM's ``in_layers.0``,
    ``in_layers.2``, ``emb_layers.1``, ``out_layers.0``, ``out_layers.3``, ``skip_connection``.

    Raises:
        ValueError: For a UNet whose layout has no single-file spelling.
    """
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError("Single-file export needs an int layers_per_block.")
    stride = layers + 1
    plain: tuple[tuple[str, str], ...] = ()
    prefixes: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
        "time_embedding.linear_1": ("time_embed.0", plain),
        "time_embedding.linear_2": ("time_embed.2", plain),
        "conv_in": ("input_blocks.0.0", plain),
        "conv_norm_out": ("out.0", plain),
        "conv_out": ("out.2", plain),
        "add_embedding.linear_1": ("label_emb.0.0", plain),
        "add_embedding.linear_2": ("label_emb.0.2", plain),
    }
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{1 + i * stride + j}.0", _UNET_RESNET_RENAMES)
        for j in range(len(getattr(block, "attentions", None) or ())):
            prefixes[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{1 + i * stride + j}.1", plain)
        if block.downsamplers:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{(i + 1) * stride}.0.op", plain)
    if unet.mid_block is not None:
        prefixes["mid_block.resnets.0"] = ("middle_block.0", _UNET_RESNET_RENAMES)
        prefixes["mid_block.attentions.0"] = ("middle_block.1", plain)
        prefixes["mid_block.resnets.1"] = ("middle_block.2", _UNET_RESNET_RENAMES)
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or ()
        for j in range(len(block.resnets)):
            prefixes[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{i * stride + j}.0", _UNET_RESNET_RENAMES)
        for j in range(len(attentions)):
            prefixes[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{i * stride + j}.1", plain)
        if block.upsamplers:
            slot = 2 if attentions else 1
            prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{i * stride + layers}.{slot}.conv", plain)
    return {_rename_with(prefixes, key): value for key, value in unet.state_dict().items()}


def vae_to_ldm(vae: torch.nn.Module) -> dict[str, Tensor]:
    """The VAE's state dict under LDM names (without ``first_stage_model.``).

    The decoder's up blocks are numbered in reverse (``up.{n-1-i}``), and the mid-block attention's linear
    projections become the 1x1 convolutions of the original code.
    """
    plain: tuple[tuple[str, str], ...] = ()
    resnet = (("conv_shortcut", "nin_shortcut"),)
    prefixes: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
        "quant_conv": ("quant_conv", plain),
        "post_quant_conv": ("post_quant_conv", plain),
    }
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in"] = (f"{part}.conv_in", plain)
        prefixes[f"{part}.conv_out"] = (f"{part}.conv_out", plain)
        prefixes[f"{part}.conv_norm_out"] = (f"{part}.norm_out", plain)
        prefixes[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION_RENAMES)
        for k in range(2):
            prefixes[f"{part}.mid_block.resnets.{k}"] = (f"{part}.mid.block_{k + 1}", resnet)
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", resnet)
        if block.downsamplers:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", plain)
    count = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{count - 1 - i}.block.{j}", resnet)
        if block.upsamplers:
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{count - 1 - i}.upsample.conv", plain)
    converted = {}
    for key, value in vae.state_dict().items():
        name = _rename_with(prefixes, key)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention uses 1x1 convolutions
        converted[name] = value
    return converted


def text_encoder_keys(text_encoder: torch.nn.Module) -> dict[str, Tensor]:
    """HF CLIP text weights keyed ``text_model.*`` (transformers >= 5.6 drops that prefix on CLIPTextModel)."""
    state = {}
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        state[key] = value
    return state


def text_encoder_to_open_clip(text_encoder: torch.nn.Module) -> dict[str, Tensor]:
    """Inverse of diffusers' ``convert_open_clip_checkpoint``: HF CLIP text weights in OpenCLIP names."""
    state = text_encoder_keys(text_encoder)
    fixed = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in fixed:
            converted[fixed[key]] = value
        elif key == "text_projection.weight":
            converted["text_projection"] = value.T.contiguous()
        elif not key.startswith("text_model.encoder.layers."):
            raise ValueError(f"No OpenCLIP name for '{key}'.")
    for index in range(text_encoder.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{index}.", f"transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            projections = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            converted[f"{dst}attn.in_proj_{kind}"] = torch.cat(projections, dim=0)
            converted[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            converted[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            converted[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            converted[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            converted[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return converted


def ldm_to_diffusers_names(unet: torch.nn.Module) -> dict[str, str]:
    """``{LDM name (without model.diffusion_model.): diffusers name}`` for every tensor of ``unet``.

    The inverse of :func:`unet_to_ldm`'s renaming, for the same UNet.

    Raises:
        ValueError: If the UNet's layout has no single-file spelling.
    """
    return dict(zip(unet_to_ldm(unet), unet.state_dict(), strict=True))


def single_file_state_dict(pipe: DiffusionPipeline) -> dict[str, Tensor]:
    """The pipeline's weights in the original (LDM / SGM) single-file layout.

    SD 1.x keeps the HF CLIP text encoder (``cond_stage_model.transformer.*``), SD 2.x writes it in OpenCLIP names
    (``cond_stage_model.model.*``), SDXL writes ``conditioner.embedders.0.transformer.*`` and
    ``conditioner.embedders.1.model.*``. The result loads back with ``from_single_file`` (and
    :func:`load_pipeline`).

    Args:
        pipe: A Stable Diffusion (1.x, 2.x) or SDXL pipeline.

    Returns:
        A flat state dict of CPU tensors.
    """
    family = detect_family(pipe)
    state = {f"model.diffusion_model.{k}": v for k, v in unet_to_ldm(pipe.unet).items()}
    state |= {f"first_stage_model.{k}": v for k, v in vae_to_ldm(pipe.vae).items()}
    if family is ModelFamily.SD1:
        state |= {f"cond_stage_model.transformer.{k}": v for k, v in text_encoder_keys(pipe.text_encoder).items()}
    elif family is ModelFamily.SD2:
        state |= {f"cond_stage_model.model.{k}": v for k, v in text_encoder_to_open_clip(pipe.text_encoder).items()}
    else:
        embedder_0 = text_encoder_keys(pipe.text_encoder)
        state |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in embedder_0.items()}
        embedder_1 = text_encoder_to_open_clip(pipe.text_encoder_2)
        state |= {f"conditioner.embedders.1.model.{k}": v for k, v in embedder_1.items()}
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
