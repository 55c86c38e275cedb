"""Architectures of the toy world's models: an SD-architecture pipeline, an open_clip model and an oracle.

The pipeline is a standard diffusers ``StableDiffusionPipeline`` (SD 1.x layout): ``AutoencoderKL`` with 4x
downsampling (64x64 RGB <-> 4x16x16 latents), ``UNet2DConditionModel`` whose cross-attention modules are named
``attn2`` as in SD, a ``CLIPTextModel`` with the toy tokenizer (77 tokens, padded with end-of-text like SD 1.x) and
SD's scaled-linear betas (0.00085..0.012 over 1000 steps) rescaled to zero terminal SNR, with v-prediction and
trailing DDIM timesteps. The VAE's latents are centred per channel (the shift folded into its 1x1 ``quant_conv`` /
``post_quant_conv`` biases, :func:`center_vae_latents`), so the pipeline needs nothing beyond stock diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from erasure.toyworld.render import CHARACTERS, COLOURS, SHAPES, STYLES

IMAGE_SIZE = 64
LATENT_SIZE = 16
TEXT_HIDDEN = 128
CLIP_MODEL_NAME = "toyworld-clip"
#: The sidecar an evaluator reads a CLIP folder's templates and preprocessing from (erasure.evaluation.clip).
CLIP_CARD_NAME = "erasure_clip.json"

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [64, 128, 128],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": IMAGE_SIZE,
}

UNET_CONFIG = {
    "sample_size": LATENT_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    # No attention at 16x16: cross- and self-attention run at 8x8, 4x4 and in the mid block, where a 64-pixel
    # image's layout and colour are decided; the 16x16 level keeps its ResNets for edges, stripes and faces.
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    "cross_attention_dim": TEXT_HIDDEN,
    "attention_head_dim": 4,  # diffusers' legacy name for the number of heads per level
    "norm_num_groups": 32,
}

# Zero terminal SNR, v-prediction and trailing timesteps (Lin et al. 2024, "Common Diffusion Noise Schedules and
# Sample Steps are Flawed", sections 3.1-3.4): SD's scaled-linear betas rescaled so that abar_T = 0, so the first
# sampling step sees pure noise in training too and colour and layout must come from the prompt, not from the
# image's mean leaking through sqrt(abar_T) x_0; v = sqrt(abar) eps - sqrt(1 - abar) x_0 keeps that step learnable.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}

# open_clip architecture (registered under CLIP_MODEL_NAME with open_clip.add_model_config). The text tower keeps
# open_clip's default tokenizer (49,408 tokens) so that the model loads through the stock factory.
CLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
}
CLIP_PREPROCESS = {"image_size": IMAGE_SIZE, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def build_vae():
    """A fresh ``AutoencoderKL`` of the toy architecture."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    """A fresh ``UNet2DConditionModel`` of the toy architecture."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder(tokenizer):
    """A fresh ``CLIPTextModel`` sized for the toy tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


# The first toy world's schedule (SD 1.x unchanged), kept for the recipe comparison ``--schedule sd-epsilon``.
SD_EPSILON_SCHEDULER_CONFIG = {
    **{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("rescale_betas_zero_snr", "timestep_spacing")},
    "prediction_type": "epsilon",
}


def build_scheduler(config: dict | None = None):
    """The toy pipeline's DDIM scheduler (``SCHEDULER_CONFIG`` unless another config is given)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**(config or SCHEDULER_CONFIG))


def register_clip_config() -> None:
    """Register the toy CLIP architecture with open_clip under ``toyworld-clip``."""
    import tempfile

    import open_clip

    if CLIP_MODEL_NAME in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / f"{CLIP_MODEL_NAME}.json").write_text(json.dumps(CLIP_CONFIG))
        open_clip.add_model_config(folder)


def build_clip():
    """A fresh open_clip model of the toy architecture, with its preprocessing."""
    import open_clip

    register_clip_config()
    model, _, preprocess = open_clip.create_model_and_transforms(
        CLIP_MODEL_NAME, pretrained=None, image_mean=CLIP_PREPROCESS["mean"], image_std=CLIP_PREPROCESS["std"]
    )
    return model, preprocess


@torch.no_grad()
def center_vae_latents(vae, channel_mean: torch.Tensor) -> None:
    """Shift a VAE's latent space so that its latents have per-channel mean zero, exactly and in place.

    With ``m`` the per-channel mean of the (unscaled) posterior means, the encoder's ``quant_conv`` (a 1x1 conv
    whose first ``C`` outputs are the posterior mean) gets ``b_q[:C] -= m``, so every latent becomes ``z' = z - m``;
    the decoder's ``post_quant_conv`` (``W z + b``) gets ``b_pq += W m``, so that ``W z' + b_pq' = W z + b_pq``:
    decoding a centred latent gives exactly the old decode of the raw one. The posterior's variance is untouched.

    Args:
        vae: A diffusers ``AutoencoderKL`` with ``quant_conv`` and ``post_quant_conv`` (SD's layout).
        channel_mean: ``[C]`` per-channel mean of the raw posterior means, in unscaled latent units.
    """
    channels = channel_mean.numel()
    mean = channel_mean.to(vae.quant_conv.bias.device, vae.quant_conv.bias.dtype)
    vae.quant_conv.bias[:channels] -= mean
    weight = vae.post_quant_conv.weight[:, :, 0, 0]  # [C_out, C]
    vae.post_quant_conv.bias += weight @ mean


ORACLE_HEADS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "style": STYLES,
    "character": ("none", *CHARACTERS),
}


class Oracle(nn.Module):
    """A small CNN that reads colour, shape, style and character off a 64x64 image.

    It is trained on renderer output only (with blur and noise so that it tolerates a generator's imperfections)
    and judges generated images independently of any CLIP model.
    """

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2),
            )  # fmt: skip

        self.features = nn.Sequential(
            block(3, width), block(width, 2 * width), block(2 * width, 4 * width), block(4 * width, 4 * width)
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(4 * width * 16, len(values)) for name, values in ORACLE_HEADS.items()}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for images in [-1, 1], shape ``(B, 3, 64, 64)``."""
        features = self.features(images).flatten(1)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        """Attribute names for images in [-1, 1]."""
        self.eval()
        logits = self(images)
        indices = {name: logit.argmax(-1).tolist() for name, logit in logits.items()}
        return [
            {name: ORACLE_HEADS[name][indices[name][row]] for name in ORACLE_HEADS} for row in range(images.shape[0])
        ]


def clip_card() -> dict:
    """The toy CLIP's ``erasure_clip.json``: its zero-shot templates (the caption templates) and preprocessing."""
    from erasure.toyworld.captions import TEMPLATES

    return {
        "format": "erasure-clip/1",
        "templates": [template.replace("{x}", "{}") for template in TEMPLATES],
        "preprocess_cfg": CLIP_PREPROCESS,
    }


def save_clip(model: nn.Module, out: str | Path) -> None:
    """Save a toy CLIP as an open_clip ``local-dir:`` folder, as ``checkpoints/toyworld-clip`` is laid out.

    The folder holds ``open_clip_config.json`` (architecture and preprocessing), ``open_clip_model.safetensors``,
    the raw architecture JSON and ``erasure_clip.json``, which declares the zero-shot templates an evaluator should
    use with this CLIP (the toy captions' templates, :data:`erasure.toyworld.captions.TEMPLATES`: the model never
    saw "a photo of ...") and its preprocessing. It is written to a temporary sibling first and renamed into place,
    so an interrupted save never leaves a half-written folder; an existing ``out`` is replaced.

    Args:
        model: The open_clip model.
        out: Destination folder.
    """
    from safetensors.torch import save_file

    from erasure.files import atomic_path

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out) as tmp:  # replaces an existing out in one rename; umask permissions
        tmp.mkdir()
        save_file(state, tmp / "open_clip_model.safetensors")
        config = {"model_cfg": CLIP_CONFIG, "preprocess_cfg": CLIP_PREPROCESS}
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        (tmp / f"{CLIP_MODEL_NAME}.json").write_text(json.dumps(CLIP_CONFIG, indent=2))
        (tmp / CLIP_CARD_NAME).write_text(json.dumps(clip_card(), indent=2) + "\n")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
