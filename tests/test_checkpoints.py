"""The shipped toy-world checkpoints load with stock tools, offline, and are what the project says they are.

Folders: ``checkpoints/toyworld-sd`` (a diffusers StableDiffusionPipeline), ``checkpoints/toyworld-clip`` (an
open_clip ``local-dir:`` model) and ``checkpoints/toyworld-oracle`` (the attribute classifier). They ship with the
project, so a missing folder fails (never skips). ``ERASURE_CHECKPOINTS`` points the tests at another folder holding
the three.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = Path(os.environ.get("ERASURE_CHECKPOINTS", ROOT / "checkpoints"))
SD, CLIP, ORACLE = (CHECKPOINTS / name for name in ("toyworld-sd", "toyworld-clip", "toyworld-oracle"))
WITHOUT_PIP = CHECKPOINTS / "toyworld-sd-without-pip"  # the exact-unlearning reference of the probes
MAX_BYTES = 60 * 1024 * 1024
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


def require(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.fail(f"{folder} is absent: the checkpoints ship with the project (train_toyworld.py remakes them)")
    return folder


def files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.parametrize("folder", [SD, CLIP, ORACLE, WITHOUT_PIP], ids=lambda p: p.name)
def test_folder_is_small_safetensors_only_with_a_model_card(folder):
    require(folder)
    size = sum(p.stat().st_size for p in files(folder))
    assert size < MAX_BYTES, f"{folder.name} is {size / 2**20:.1f} MB; the limit is 60 MB"
    pickles = [str(p.relative_to(folder)) for p in files(folder) if p.suffix in PICKLE_SUFFIXES]
    assert not pickles, f"pickled weights must not ship: {pickles}"
    assert any(p.suffix == ".safetensors" for p in files(folder))
    card = folder / "README.md"
    assert card.is_file(), f"{folder.name} needs a README.md model card"
    assert len(card.read_text(encoding="utf-8").strip()) > 200, "the model card says what the model is and how made"


# ------------------------------------------------------------------------------------------------- toyworld-sd
@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1", "these loads must work offline"
    pipeline = StableDiffusionPipeline.from_pretrained(require(SD))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_sd_loads_with_stock_diffusers_as_an_sd1_pipeline(pipe):
    from diffusers import StableDiffusionPipeline

    from erasure.pipeline import ModelFamily, detect_family, load_pipeline

    assert isinstance(pipe, StableDiffusionPipeline)
    assert getattr(pipe, "safety_checker", None) is None
    assert [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")], "cross-attention modules named attn2"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == 4
    assert detect_family(pipe) is ModelFamily.SD1
    assert detect_family(load_pipeline(SD)) is ModelFamily.SD1


def test_sd_tokenizer_is_the_toy_tokenizer_in_sd1_layout(pipe, tmp_path):
    from transformers import CLIPTokenizer

    from erasure.toyworld.captions import TEMPLATES, all_subjects
    from erasure.toyworld.tokenizer import build_vocabulary

    folder = SD / "tokenizer"
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file(), "slow tokenizer files"
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 77
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):  # the classic files, without tokenizer.json
        shutil.copy(folder / name, tmp_path / name)
    slow = CLIPTokenizer.from_pretrained(tmp_path)
    vocab, merges = build_vocabulary()
    assert json.loads((folder / "vocab.json").read_text(encoding="utf-8")) == vocab
    assert [m for m in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if m] == merges
    tokenizer = pipe.tokenizer
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    for text in [t.format(x=s) for s in all_subjects() for t in TEMPLATES]:
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text.split()) + 2, f"{text!r}: a toy word splits"
        assert slow(text).input_ids == ids


def test_sd_scheduler_is_the_one_training_used(pipe):
    from diffusers import DDIMScheduler

    from erasure.toyworld.models import SCHEDULER_CONFIG
    from toyworld_train.train import training_noise_schedule

    scheduler = DDIMScheduler.from_pretrained(SD, subfolder="scheduler")
    assert isinstance(pipe.scheduler, DDIMScheduler), "a plain pipe(prompt) samples with DDIM"
    config = scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert config.num_train_timesteps == 1000 and config.prediction_type == "v_prediction"
    assert config.rescale_betas_zero_snr and config.timestep_spacing == "trailing"
    assert {key: config[key] for key in SCHEDULER_CONFIG} == SCHEDULER_CONFIG
    abar, prediction = training_noise_schedule(SCHEDULER_CONFIG)
    assert torch.equal(pipe.scheduler.alphas_cumprod, abar) and prediction == config.prediction_type
    pipe.scheduler.set_timesteps(25)
    assert int(pipe.scheduler.timesteps[0]) == 999, "trailing spacing starts sampling at the pure-noise step"


def test_sd_vae_latents_are_centred(pipe):
    """The shipped VAE has its per-channel latent mean folded into its biases: fresh renders encode near zero."""
    from erasure.toyworld.models import to_tensor
    from erasure.toyworld.quality import fresh_renders

    images, _ = fresh_renders(64, seed=99)
    with torch.no_grad():
        latents = pipe.vae.encode(to_tensor(images)).latent_dist.mean * pipe.vae.config.scaling_factor
    channel_means = latents.mean(dim=(0, 2, 3))
    assert channel_means.abs().max() < 0.25, channel_means  # the first toy world's were -1.21 .. 0.76
    assert 0.8 < float(latents.std()) < 1.25


def test_sd_generates_a_64x64_image_in_2_steps(pipe):
    generator = torch.Generator().manual_seed(0)
    images = pipe("a picture of a red circle", num_inference_steps=2, generator=generator, output_type="np").images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


# ----------------------------------------------------------------------------------------------- toyworld-clip
@pytest.fixture(scope="module")
def clip():
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{require(CLIP)}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{CLIP}")


def test_clip_loads_through_open_clip_local_dir(clip):
    from PIL import Image

    model, preprocess, tokenizer = clip
    pixels = preprocess(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert pixels.shape == (3, 64, 64)
    with torch.no_grad():
        image = model.encode_image(pixels[None])
        text = model.encode_text(tokenizer(["a red circle", "Pip"]))
    assert image.shape[1] == text.shape[1] and torch.isfinite(image).all() and torch.isfinite(text).all()


def test_clip_loads_through_load_clip(clip):
    from erasure.evaluation import load_clip

    model, _, _ = load_clip(str(CLIP))
    reference = clip[0].state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_clip_is_trained_zero_shot_beats_chance(clip):
    from erasure.toyworld.quality import ToyClipJudge, accuracy, fresh_renders

    images, labels = fresh_renders(60, seed=2024)
    verdicts = ToyClipJudge(*clip).predict(images)
    scores = accuracy(verdicts, labels)
    assert min(scores.values()) > 0.7, scores  # chance: 0.2 (colour) to 0.5 (character: none or not)


# --------------------------------------------------------------------------------------------- toyworld-oracle
def test_oracle_loads_and_reads_fresh_renders():
    from erasure.toyworld.models import ORACLE_HEADS
    from erasure.toyworld.quality import accuracy, fresh_renders, load_oracle, oracle_predict

    oracle = load_oracle(require(ORACLE))
    config = json.loads((ORACLE / "oracle_config.json").read_text())
    assert {k: tuple(v) for k, v in config["heads"].items()} == ORACLE_HEADS
    images, labels = fresh_renders(60, seed=2024)
    scores = accuracy(oracle_predict(oracle, images), labels)
    assert min(scores.values()) > 0.9, scores


def test_the_reference_without_pip_is_the_same_pipeline_trained_without_pip():
    import json

    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(str(require(WITHOUT_PIP)), safety_checker=None)
    shipped = StableDiffusionPipeline.from_pretrained(str(SD), safety_checker=None)

    def config(module):
        return {k: v for k, v in dict(module.config).items() if k != "_name_or_path"}

    assert config(reference.unet) == config(shipped.unet)
    assert config(reference.scheduler) == config(shipped.scheduler)
    assert reference.tokenizer.get_vocab() == shipped.tokenizer.get_vocab()
    recipe = json.loads((WITHOUT_PIP / "training_log.json").read_text())["recipe"]
    assert recipe["exclude_concept"] == ["Pip"] and recipe["seed"] == 0 and recipe["steps"] == 2400
