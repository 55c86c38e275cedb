"""Tiny, seeded, offline Stable Diffusion pipelines for tests.

Nothing here touches the network: the tokenizer's vocabulary is generated in code and every model is built from
a config with random weights, using the component sizes of diffusers' own tests (``get_dummy_components`` of
``StableDiffusionPipelineFastTests`` and ``StableDiffusionXLPipelineFastTests``). The three families mirror the
real ones where it matters to this library:

* ``sd1``: CLIP-style text encoder (``quick_gelu``), conv ``proj_in``, epsilon prediction, pad token
  ``<|endoftext|>``.
* ``sd2``: OpenCLIP-style text encoder (``gelu``), ``use_linear_projection=True``, per-block
  ``attention_head_dim``, v-prediction, pad token ``!``.
* ``sdxl``: two text encoders (the second with a projection and a different width, as in SDXL), ``text_time``
  micro-conditioning, two transformer layers in the second block.

Example:
    >>> from erasure.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("sdxl", seed=0)  # a fresh copy each call; mutate freely
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from erasure.pipeline import ModelFamily
from erasure.toyworld.tokenizer import bytes_to_unicode

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"

#: Words that encode to exactly one token with :func:`tiny_tokenizer`'s default vocabulary.
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "by", "photo", "picture", "image", "painting", "drawing",
    "style", "art", "cat", "dog", "car", "tree", "house", "pip", "zog", "miro", "red", "green", "blue", "yellow",
    "purple", "circle", "square", "triangle", "cross", "plain", "striped", "outlined", "van", "gogh", "nudity",
)  # fmt: skip


def _apply_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split ``word`` the way CLIP's BPE does: merge the best-ranked adjacent pair until none is known."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:], strict=False)))
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tiny_vocabulary(words: Iterable[str] = TINY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build a CLIP-style byte-level BPE vocabulary in which every word of ``words`` is a single token.

    Merges are added greedily, each with a lower priority than all before it, so a word that is already one token
    can never be split by a later merge. The layout follows CLIP: 256 byte symbols, their ``</w>`` variants, the
    merged symbols in merge order, then ``<|startoftext|>`` and ``<|endoftext|>``.

    Args:
        words: Lowercase ASCII words (anything else is byte-encoded first, as the tokenizer does).

    Returns:
        ``(vocab, merges)``: token-to-id mapping and the ranked merge list.
    """
    byte_map = bytes_to_unicode()
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = "".join(byte_map[b] for b in word.lower().encode("utf-8"))
        while len(parts := _apply_bpe(symbols, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
    merges = list(ranks)
    symbols = list(byte_map.values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), START_TOKEN, END_TOKEN]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def tiny_tokenizer(words: Iterable[str] = TINY_WORDS, pad_token: str = END_TOKEN) -> CLIPTokenizer:
    """A small CLIP tokenizer (``model_max_length`` 77) whose vocabulary is generated in code.

    Every text is encodable: words outside ``words`` fall back to shorter pieces, down to single bytes.

    Args:
        words: Words that must be single tokens.
        pad_token: ``<|endoftext|>`` as in SD 1.x, or ``!`` as in SD 2.x / SDXL's second tokenizer.

    Returns:
        The tokenizer, loaded from ``vocab.json``/``merges.txt`` written to a temporary folder.
    """
    vocab, merges = tiny_vocabulary(tuple(words))
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        Path(folder, "merges.txt").write_text(merges_text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token=pad_token)


def _text_config(tokenizer: CLIPTokenizer, hidden_size: int, hidden_act: str, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-5,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )


def sd_ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """Stable Diffusion's DDIM scheduler settings (scaled-linear betas 0.00085..0.012, steps offset 1)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _unet(**overrides: object) -> UNet2DConditionModel:
    config: dict[str, object] = {
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
    }
    return UNet2DConditionModel(**(config | overrides))


def _build(family: ModelFamily) -> DiffusionPipeline:
    if family is ModelFamily.SD1:
        tokenizer = tiny_tokenizer()
        return StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(_text_config(tokenizer, 32, "quick_gelu", 32)),
            tokenizer=tokenizer,
            unet=_unet(),
            scheduler=sd_ddim_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family is ModelFamily.SD2:
        tokenizer = tiny_tokenizer(pad_token="!")
        return StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(_text_config(tokenizer, 32, "gelu", 32)),
            tokenizer=tokenizer,
            unet=_unet(attention_head_dim=(2, 4), use_linear_projection=True),
            scheduler=sd_ddim_scheduler("v_prediction"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    # SDXL: the encoders differ in width (as 768 vs 1280 in SDXL), so single-file loading can tell them apart.
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer(pad_token="!")
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, 64, "gelu", 32))
    time_embed_dim = 8
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, 32, "quick_gelu", 32)),
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_unet(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            transformer_layers_per_block=(1, 2),
            # six micro-conditioning numbers, each embedded, plus the pooled text embedding
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
            cross_attention_dim=32 + 64,
        ),
        scheduler=sd_ddim_scheduler(),
        add_watermarker=False,
    )


@functools.lru_cache(maxsize=8)
def _cached_pipeline(family: ModelFamily, seed: int) -> DiffusionPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build(family)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(family: str | ModelFamily = ModelFamily.SD1, seed: int = 0) -> DiffusionPipeline:
    """A tiny random Stable Diffusion pipeline of the given family (CPU, float32, 64x64 images).

    The same ``(family, seed)`` always gives identical weights; the global RNG is left untouched. Pipelines are
    cached, and each call returns a fresh deep copy, so callers may modify it.

    Args:
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        seed: Seed of the weight initialisation.

    Returns:
        A ``StableDiffusionPipeline`` (sd1, sd2) or ``StableDiffusionXLPipeline`` (sdxl), with no safety checker
        and the progress bar disabled.
    """
    return copy.deepcopy(_cached_pipeline(ModelFamily(family), seed))


def save_tiny_pipeline(path: str | Path, family: str | ModelFamily = ModelFamily.SD1, seed: int = 0) -> Path:
    """Write :func:`tiny_pipeline` as a diffusers folder (safetensors weights).

    Args:
        path: Folder to create (or overwrite files in).
        family: ``"sd1"``, ``"sd2"`` or ``"sdxl"``.
        seed: Seed of the weight initialisation.

    Returns:
        The folder, as a ``Path``.
    """
    path = Path(path)
    tiny_pipeline(family, seed).save_pretrained(path, safe_serialization=True)
    return path
