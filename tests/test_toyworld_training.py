"""Micro-training of every toy-world stage, resuming, and the driver's save formats.

Each stage runs two or three optimizer steps on a few dozen renders with small batches; the UNet, VAE and text
encoder configs are shrunk (module-wide) so the whole file stays fast on a CPU. The saved folders are loaded with
the stock loaders only: ``diffusers.StableDiffusionPipeline.from_pretrained`` and open_clip's ``local-dir:``.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

from erasure.toyworld import models
from erasure.toyworld.models import ORACLE_HEADS
from toyworld_train import train
from toyworld_train.train import StageBudget

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
BATCH = 8

TINY_VAE = dict(models.VAE_CONFIG, block_out_channels=[8, 16, 16], norm_num_groups=8)
TINY_TEXT_HIDDEN = 32
TINY_UNET = dict(
    models.UNET_CONFIG,
    block_out_channels=[16, 16, 32],
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=4,
    cross_attention_dim=TINY_TEXT_HIDDEN,
)


@pytest.fixture(scope="module", autouse=True)
def tiny_configs():
    """Shrink the SD-architecture models for the whole module (the oracle and CLIP are small already)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "VAE_CONFIG", TINY_VAE)
        patch.setattr(models, "UNET_CONFIG", TINY_UNET)
        patch.setattr(models, "TEXT_HIDDEN", TINY_TEXT_HIDDEN)
        yield


@pytest.fixture(scope="module")
def script():
    """``scripts/train_toyworld.py`` as a module (scripts are not a package)."""
    return load_script("train_toyworld.py", "train_toyworld_script")


@pytest.fixture(scope="module")
def data():
    """40 training examples: images, captions, scenes."""
    return train.render_dataset(40, seed=0, workers=1)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    from erasure.toyworld.tokenizer import write_tokenizer_files

    return CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp_path_factory.mktemp("tok") / "tokenizer"))


def _snapshot(state: dict) -> dict:
    return {
        key: {name: tensor.detach().clone() for name, tensor in value.items()}
        for key, value in state.items()
        if key != "optimizer"
    }


@pytest.fixture
def loops(monkeypatch):
    """Record every training loop: its start step, the weights it starts from and each step's loss."""
    calls = []
    original = train._loop

    def recording_loop(name, budget, step_fn, state_fn, work_dir, start_step=0, **kwargs):
        call = {"name": name, "start": start_step, "initial": _snapshot(state_fn()), "losses": []}
        calls.append(call)

        def step(index, progress):
            loss = step_fn(index, progress)
            call["losses"].append(loss)
            return loss

        return original(name, budget, step, state_fn, work_dir, start_step, **kwargs)

    monkeypatch.setattr(train, "_loop", recording_loop)
    return calls


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), f"{what}: {key}"


def assert_ran(call, start, steps):
    assert call["start"] == start
    assert len(call["losses"]) == steps
    assert all(math.isfinite(loss) for loss in call["losses"]), call["losses"]


def assert_resumed(work_dir: Path, name: str, run, loops, keys) -> None:
    """A second call with a larger budget restarts from the saved step and the saved weights."""
    saved = torch.load(work_dir / f"{name}.pt", map_location="cpu", weights_only=False)
    assert saved["step"] == 2 and saved.get("finished")
    run(StageBudget(3))
    assert_ran(loops[-1], start=2, steps=1)
    for key in keys:
        assert_same_state(loops[-1]["initial"][key], saved[key], f"{name} resumed {key}")
    assert torch.load(work_dir / f"{name}.pt", map_location="cpu", weights_only=False)["step"] == 3


# ------------------------------------------------------------------------------------------------------ stages
def test_oracle_trains_resumes_and_round_trips(data, loops, tmp_path, script):
    from erasure.toyworld.quality import load_oracle, oracle_predict

    images, _, scenes = data

    def run(budget):
        return train.train_oracle(images, scenes, budget, CPU, batch_size=BATCH, work_dir=tmp_path)

    oracle = run(StageBudget(2))
    assert_ran(loops[0], start=0, steps=2)
    assert_resumed(tmp_path, "oracle", run, loops, ["model"])

    script.save_oracle(tmp_path / "toyworld-oracle", oracle)
    assert {p.suffix for p in (tmp_path / "toyworld-oracle").iterdir()} == {".safetensors", ".json"}
    loaded = load_oracle(tmp_path / "toyworld-oracle")
    assert_same_state(loaded.state_dict(), oracle.state_dict(), "oracle")
    verdicts = oracle_predict(loaded, images[:4])
    assert len(verdicts) == 4
    assert all(v[head] in values for v in verdicts for head, values in ORACLE_HEADS.items())


def test_vae_trains_and_resumes(data, loops, tmp_path):
    images = data[0]

    def run(budget):
        return train.train_vae(images, budget, CPU, batch_size=BATCH, work_dir=tmp_path)

    vae = run(StageBudget(2))
    assert_ran(loops[0], start=0, steps=2)
    assert_resumed(tmp_path, "vae", run, loops, ["model"])
    mean, std = train.encode_latents(vae, images[:5], CPU)
    assert mean.shape == std.shape == (5, 4, 16, 16)
    assert torch.isfinite(mean).all() and (std > 0).all()


@pytest.fixture(scope="module")
def latents(data):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = models.build_vae().eval()
    return train.encode_latents(vae, data[0], CPU)


def test_denoiser_with_text_targets_trains_and_resumes(data, latents, tokenizer, loops, tmp_path, script):
    _, captions, scenes = data
    token_ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    token_ids = token_ids.input_ids
    targets = script.caption_targets(captions, scenes)
    empty = torch.tensor([not c for c in captions])
    assert empty.any(), "the fixture should contain an empty caption"
    for name, values in ORACLE_HEADS.items():
        assert (targets[name][empty] == -1).all() and (targets[name][~empty] < len(values)).all()

    def run(budget, text_targets=targets, work_dir=tmp_path):
        return train.train_denoiser(*latents, token_ids, tokenizer, 1.0, budget, CPU, batch_size=BATCH,
                                    work_dir=work_dir, text_targets=text_targets)  # fmt: skip

    # Same seed, same first batch and noise: the auxiliary cross-entropy adds about 0.1 * sum(log K) to the loss.
    run(StageBudget(1), text_targets=None, work_dir=None)
    unet, text_encoder, ema = run(StageBudget(2))
    plain_loss, aux_loss = loops[0]["losses"][0], loops[1]["losses"][0]
    chance = 0.1 * sum(math.log(len(values)) for values in ORACLE_HEADS.values())
    assert 0.5 * chance < aux_loss - plain_loss < 2 * chance
    assert_ran(loops[1], start=0, steps=2)
    assert "text_heads" in torch.load(tmp_path / "denoiser.pt", weights_only=False)
    keys = ["unet", "text_encoder", "ema_unet", "ema_text_encoder", "text_heads"]
    assert_resumed(tmp_path, "denoiser", run, loops, keys)

    # the EMA shadow moved towards the live weights but is not them
    live, shadow = dict(unet.named_parameters()), dict(ema.shadow["unet"].named_parameters())
    assert any(not torch.equal(live[k], shadow[k]) for k in live)
    assert ema.shadow["text_encoder"].config.hidden_size == text_encoder.config.hidden_size


def test_clip_trains_resumes_and_loads_through_open_clip(data, loops, tmp_path, script):
    import open_clip
    from PIL import Image

    images, captions, scenes = data

    def run(budget):
        return train.train_clip(images, scenes, captions, budget, CPU, batch_size=BATCH, work_dir=tmp_path)

    model = run(StageBudget(2))
    assert_ran(loops[0], start=0, steps=2)
    assert_resumed(tmp_path, "clip", run, loops, ["model"])

    out = tmp_path / "toyworld-clip"
    models.save_clip(model, out)
    assert {p.suffix for p in out.iterdir()} == {".safetensors", ".json"}
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert_same_state(loaded.state_dict(), model.state_dict(), "clip")
    pixels = preprocess(Image.fromarray(images[0]))
    assert pixels.shape == (3, 64, 64)
    assert pixels.min() >= -1 and pixels.max() <= 1  # mean 0.5, std 0.5: the [-1, 1] range training used
    text = open_clip.get_tokenizer(f"local-dir:{out}")(["a red circle"])
    with torch.no_grad():
        assert loaded.encode_image(pixels[None]).shape == loaded.encode_text(text).shape == (1, 128)

    from erasure.evaluation import load_clip

    clip, _, _ = load_clip(str(out))
    assert_same_state(clip.state_dict(), model.state_dict(), "clip via load_clip")


def test_denoiser_resumes_to_the_state_an_uninterrupted_run_reaches(data, latents, tokenizer, tmp_path):
    _, captions, _ = data
    token_ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")

    def run(work_dir, quality_check=None):
        return train.train_denoiser(*latents, token_ids.input_ids, tokenizer, 1.0, StageBudget(3), CPU,
                                    batch_size=BATCH, work_dir=work_dir, save_every=1, check_every=2,
                                    quality_check=quality_check)  # fmt: skip

    def interrupt(step, *models):
        raise KeyboardInterrupt

    run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "interrupted", quality_check=interrupt)  # Ctrl-C after step 2 was saved
    assert torch.load(tmp_path / "interrupted" / "denoiser.pt", weights_only=False)["step"] == 2
    run(tmp_path / "interrupted")  # the same command again continues from the saved step
    straight = torch.load(tmp_path / "straight" / "denoiser.pt", weights_only=False)
    resumed = torch.load(tmp_path / "interrupted" / "denoiser.pt", weights_only=False)
    assert straight["step"] == resumed["step"] == 3
    for key in ("unet", "text_encoder", "ema_unet", "ema_text_encoder"):
        assert_same_state(straight[key], resumed[key], f"resumed {key}")


class ConstantUNet(torch.nn.Module):
    """Predicts the same tensor for every input (a stand-in whose loss can be computed by hand)."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, encoder_hidden_states):
        sample = self.output.expand(x_t.shape[0], -1, -1, -1) + 0 * self.weight
        return type("UNetOutput", (), {"sample": sample})()


def test_denoiser_regresses_v_under_zero_terminal_snr(tokenizer, loops, monkeypatch):
    """At t = T-1 abar is 0, so x_t is pure noise and the v target sqrt(abar) eps - sqrt(1 - abar) x0 is -x0: a
    model predicting -x0 there has zero loss, one predicting +x0 has loss mean((2 x0)^2)."""
    abar, prediction = train.training_noise_schedule(models.SCHEDULER_CONFIG)
    assert prediction == "v_prediction" and abar[-1] == 0 and abar[0] > 0.99
    monkeypatch.setattr(torch, "randint", lambda low, high, size, **kwargs: torch.full(size, high - 1))
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    mean, std = x0.expand(BATCH, -1, -1, -1).clone(), torch.zeros(BATCH, 4, 16, 16)  # every row's x0 is x0
    token_ids = tokenizer([""] * BATCH, padding="max_length", max_length=77, return_tensors="pt").input_ids
    for output, expected in ((-x0, 0.0), (x0, float((2 * x0).pow(2).mean()))):
        init = (ConstantUNet(output), models.build_text_encoder(tokenizer))
        train.train_denoiser(mean, std, token_ids, tokenizer, 1.0, StageBudget(1), CPU, batch_size=BATCH, init=init)
        assert loops[-1]["losses"][0] == pytest.approx(expected, abs=1e-6)
    # the epsilon schedule's target is the noise, which a constant cannot match
    init = (ConstantUNet(-x0), models.build_text_encoder(tokenizer))
    train.train_denoiser(mean, std, token_ids, tokenizer, 1.0, StageBudget(1), CPU, batch_size=BATCH, init=init,
                         scheduler_config=models.SD_EPSILON_SCHEDULER_CONFIG)  # fmt: skip
    assert loops[-1]["losses"][0] > 0.5


def test_center_vae_latents_is_exact():
    """Decoding a centred latent gives the old decode of the raw one; encoding shifts the mean by exactly m."""
    torch.manual_seed(0)
    vae = models.build_vae().eval()
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        raw = vae.encode(images).latent_dist
        old_decode = vae.decode(raw.mean).sample
        m = torch.tensor([0.3, -1.2, 0.8, -0.3])
        models.center_vae_latents(vae, m)
        centred = vae.encode(images).latent_dist
        new_decode = vae.decode(centred.mean).sample
    torch.testing.assert_close(centred.mean, raw.mean - m.view(1, -1, 1, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(centred.std, raw.std)
    torch.testing.assert_close(new_decode, old_decode, atol=1e-5, rtol=0)


def test_exclude_concept_leaves_no_image_or_caption_of_it(data):
    images, captions, scenes = train.render_dataset(300, seed=1, workers=1)
    for name in ("Pip", "striped", "red", "triangle"):
        kept_images, kept_captions, kept_scenes = train.exclude_concept(images, captions, scenes, [name])
        assert 0 < len(kept_images) < len(images)
        assert len(kept_images) == len(kept_captions) == len(kept_scenes)
        assert not any(train.shows_concept(scene, name) for scene in kept_scenes)
        assert not any(name.lower() in caption.lower().split() for caption in kept_captions)
        removed = len(images) - len(kept_images)
        assert removed == sum(train.shows_concept(scene, name) for scene in scenes), "only the concept's rows go"
        # the rows kept are the original rows, in order, with their own captions
        index = [i for i, scene in enumerate(scenes) if not train.shows_concept(scene, name)]
        np.testing.assert_array_equal(kept_images, images[index])
        assert kept_captions == [captions[i] for i in index]
    without_pip = train.exclude_concept(images, captions, scenes, ["pip"])[2]
    assert all(scene.character != "Pip" for scene in without_pip)
    assert any(scene.colour == "yellow" and scene.shape == "circle" for scene in without_pip), "objects stay"
    with pytest.raises(ValueError, match="'Pipp' is not a toy-world concept"):
        train.exclude_concept(images, captions, scenes, ["Pipp"])


def test_render_dataset_chunks_are_seeded():
    a = train.render_dataset(10, seed=3, workers=1, chunk=4)
    b = train.render_dataset(10, seed=3, workers=1, chunk=4)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1] and len(a[2]) == 10
    assert not np.array_equal(a[0], train.render_dataset(10, seed=4, workers=1, chunk=4)[0])


# -------------------------------------------------------------------------------------------- saved pipeline
def test_save_pipeline_writes_a_stock_sd1_folder(tmp_path, tokenizer, script):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from erasure.pipeline import ModelFamily, detect_family, load_pipeline

    torch.manual_seed(0)
    vae, unet = models.build_vae(), models.build_unet()
    text_encoder = models.build_text_encoder(tokenizer)
    out = tmp_path / "toyworld-sd"
    vae.register_to_config(scaling_factor=0.7)
    script.save_pipeline(out, vae, unet, text_encoder, tokenizer)

    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}], "safetensors only"
    assert {p.parent.name for p in files if p.suffix == ".safetensors"} == {"unet", "vae", "text_encoder"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".toyworld-sd")], "no temporary left behind"

    # the classic tokenizer files alone load to the same tokenizer (SD 1.x layout, end-of-text padding)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(out / "tokenizer" / name, tmp_path / name)
    slow = CLIPTokenizer.from_pretrained(tmp_path)
    assert slow("a striped red circle").input_ids == tokenizer("a striped red circle").input_ids
    config = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77

    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor == 0.7
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer.pad_token == pipe.tokenizer.eos_token
    assert isinstance(pipe.scheduler, DDIMScheduler)
    scheduler = pipe.scheduler.config
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert scheduler.num_train_timesteps == 1000 and scheduler.prediction_type == "v_prediction"
    assert scheduler.rescale_betas_zero_snr and scheduler.timestep_spacing == "trailing"
    # stock diffusers samples with exactly the schedule and parameterisation the denoiser trained with
    abar, prediction = train.training_noise_schedule(models.SCHEDULER_CONFIG)
    assert torch.equal(pipe.scheduler.alphas_cumprod, abar) and prediction == scheduler.prediction_type
    assert abar[-1] == 0, "zero terminal SNR: the last training step is pure noise"
    assert any(name.endswith("attn2") for name, _ in pipe.unet.named_modules())
    assert_same_state(pipe.unet.state_dict(), unet.state_dict(), "unet")
    assert_same_state(pipe.text_encoder.state_dict(), text_encoder.state_dict(), "text_encoder")

    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images  # fmt: skip
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert detect_family(load_pipeline(out)) is ModelFamily.SD1

    # saving again replaces the folder atomically
    vae.register_to_config(scaling_factor=0.5)
    script.save_pipeline(out, vae, unet, text_encoder, tokenizer)
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == 0.5
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".toyworld-sd")], "no temporary left behind"


# --- robustness augmentations (scripts/finetune_toyworld_clip.py) ---------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_strong_degradation_is_seeded_bounded_and_keeps_what_the_image_shows():
    """degrade_strong changes pixels, not content: the shipped oracle still reads the renders' attributes."""
    from erasure.toyworld.quality import fresh_renders, load_oracle, oracle_predict

    images, labels = fresh_renders(96, seed=11)
    batch = train.to_tensor(images)
    first = train.degrade_strong(batch, torch.Generator().manual_seed(0))
    again = train.degrade_strong(batch, torch.Generator().manual_seed(0))
    other = train.degrade_strong(batch, torch.Generator().manual_seed(1))
    assert first.shape == batch.shape and torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= -1 and first.max() <= 1 and (first - batch).abs().mean() > 0.02
    degraded = ((first + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    verdicts = oracle_predict(load_oracle(REPO / "checkpoints/toyworld-oracle"), degraded)
    for attribute in ORACLE_HEADS:
        agreement = np.mean([v[attribute] == e[attribute] for v, e in zip(verdicts, labels, strict=True)])
        assert agreement >= 0.85, (attribute, agreement)


def test_vae_roundtrip_reconstructs_and_latent_noise_moves_it_further():
    from diffusers import AutoencoderKL

    from erasure.toyworld.quality import fresh_renders

    vae = AutoencoderKL.from_pretrained(REPO / "checkpoints/toyworld-sd/vae").eval()
    images, _ = fresh_renders(8, seed=5)
    with torch.no_grad():
        clean = train.vae_roundtrip(images, vae, torch.Generator().manual_seed(0))
        noisy = train.vae_roundtrip(images, vae, torch.Generator().manual_seed(0), latent_noise=1.0)
    assert clean.shape == images.shape and clean.dtype == np.uint8
    clean_error = np.abs(clean.astype(float) - images).mean()
    assert clean_error < 20  # a faithful reconstruction (pixel values 0..255)
    assert np.abs(noisy.astype(float) - images).mean() > clean_error


@pytest.mark.parametrize("keep", [True, False], ids=["keep-vae", "re-centre"])
def test_keep_vae_trains_in_the_given_vaes_latent_space_bit_for_bit(tmp_path, tokenizer, script, keep):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = tmp_path / "base"
    vae = models.build_vae()
    vae.register_to_config(scaling_factor=0.7)
    script.save_pipeline(base, vae, models.build_unet(), models.build_text_encoder(tokenizer), tokenizer)
    args = ["--vae-from", str(base), "--out", str(tmp_path), "--name", "ref", "--work-dir", str(tmp_path / "work"),
            "--images", "16", "--steps", "1", "--batch-size", "4", "--check-every", "1", "--device", "cpu",
            "--exclude-concept", "Pip"] + (["--keep-vae"] if keep else [])  # fmt: skip
    script.main(args)
    weights = [
        load_file(folder / "vae" / "diffusion_pytorch_model.safetensors") for folder in (base, tmp_path / "ref")
    ]
    same = all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    config = json.loads((tmp_path / "ref" / "vae" / "config.json").read_text())
    log = json.loads((tmp_path / "ref" / "training_log.json").read_text())
    assert same == keep and (config["scaling_factor"] == 0.7) == keep  # re-centring moves biases and the scale
    assert ("latent_channel_mean_kept" in log) == keep and ("latent_channel_mean_removed" in log) != keep


def test_keep_vae_refuses_a_vae_it_would_train(script):
    with pytest.raises(SystemExit):
        script.parse_args(["--keep-vae", "--stages", "vae", "denoiser"])
