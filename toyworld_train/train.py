"""Training of the toy world's models from scratch: oracle, VAE, UNet + text encoder, and CLIP.

Every stage is seeded, stops at a step count or a wall-clock budget (whichever comes first), logs its loss and
saves a resumable state (weights, optimizer, EMA, step) to ``work_dir`` every few hundred steps. The driver is
``scripts/train_toyworld.py``; this module holds the loops so that tests can run a few steps of each.

It lives beside the ``erasure`` package, not in it (as ``open_clip_train`` beside ``open_clip``): the library only
reads the toy world's checkpoints, and nothing in ``erasure`` imports the trainer.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from erasure.toyworld.captions import sample_dataset, subject
from erasure.toyworld.models import ORACLE_HEADS, Oracle, to_tensor

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------- data
def _render_chunk(args: tuple[int, int]) -> tuple[np.ndarray, list[str], list]:
    count, seed = args
    return sample_dataset(count, seed)


def render_dataset(count: int, seed: int, workers: int | None = None, chunk: int = 2000):
    """Render ``count`` training examples in parallel; chunk ``k`` uses seed ``seed * 100_003 + k``.

    Returns:
        ``(images uint8 (N, 64, 64, 3), captions, scenes)``, identical for the same arguments whatever ``workers``.
    """
    jobs = [(min(chunk, count - start), seed * 100_003 + k) for k, start in enumerate(range(0, count, chunk))]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        parts = [_render_chunk(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    scenes = [s for p in parts for s in p[2]]
    return images, captions, scenes


def concept_names() -> dict[str, str]:
    """Every concept word of the world, lower-cased, mapped to its spelling (``"pip" -> "Pip"``)."""
    from erasure.toyworld.render import CHARACTERS, COLOURS, SHAPES, STYLES

    return {name.lower(): name for name in (*CHARACTERS, *COLOURS, *SHAPES, *STYLES)}


def shows_concept(scene, name: str) -> bool:
    """Whether ``scene`` shows the concept ``name`` (a character, colour, shape or style; case-insensitive).

    A character's scene shows its colour and shape too: a render of Pip is an image of a yellow circle.
    """
    labels = scene.labels()
    values = {str(labels[key]).lower() for key in ("character", "colour", "shape", "style")}
    return name.lower() in values


def exclude_concept(images: np.ndarray, captions: list[str], scenes: list, names: list[str]):
    """Drop every example whose image shows, or whose caption names, one of the concepts ``names``.

    Args:
        images: uint8 images ``(N, 64, 64, 3)``.
        captions: Their captions.
        scenes: Their scenes.
        names: Concept words of the world (``Pip``, ``red``, ``striped``, ``triangle`` ...).

    Returns:
        ``(images, captions, scenes)`` without those examples (the rest in their original order).

    Raises:
        ValueError: If a name is not a concept of the toy world.
    """
    known = concept_names()
    unknown = [name for name in names if name.lower() not in known]
    if unknown:
        raise ValueError(
            f"--exclude-concept {unknown[0]!r} is not a toy-world concept; known: {sorted(known.values())}"
        )
    keep = []
    for row, (text, scene) in enumerate(zip(captions, scenes, strict=True)):
        words = set(text.lower().split())
        if not any(shows_concept(scene, name) or name.lower() in words for name in names):
            keep.append(row)
    return images[keep], [captions[row] for row in keep], [scenes[row] for row in keep]


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image ``sigma`` ``(B, 1, 1, 1)`` and a ``2 * radius + 1`` tap kernel."""
    taps = 2 * radius + 1
    kernel_x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype).view(1, 1, 1, taps)
    weights = torch.exp(-(kernel_x**2) / (2 * sigma.clamp_min(1e-3) ** 2))
    weights = weights / weights.sum(-1, keepdim=True)
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    blurred = (padded.unfold(3, taps, 1) * weights.unsqueeze(-2)).sum(-1)
    return (blurred.unfold(2, taps, 1) * weights.unsqueeze(-2)).sum(-1)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, noise and small colour shifts, so judges trained on renders tolerate generated images."""
    batch = images.shape[0]
    device = images.device
    sigma = torch.rand(batch, 1, 1, 1, generator=generator, device=device) * 1.2
    blurred = _gaussian_blur(images, sigma, radius=2)
    shift = (torch.rand(batch, 3, 1, 1, generator=generator, device=device) - 0.5) * 0.12
    noise = torch.randn(images.shape, generator=generator, device=device) * 0.06
    return (blurred + shift + noise).clamp(-1, 1)


def degrade_strong(images: torch.Tensor, generator: torch.Generator, max_scale: float = 1.45) -> torch.Tensor:
    """Heavier, generator-like corruptions of renders in [-1, 1]: the ``degrade`` family made stronger, plus more.

    Each image gets, in turn: a random similarity warp (rotation up to 8 degrees, scale from 0.85 up to
    ``max_scale`` about the figure's centre as far as the figure stays on the canvas, shift up to 3 px, white fill);
    a mild random colour-mixing matrix (identity plus up to 0.08 per entry) and a per-channel shift up to +-0.1;
    low-frequency blotches (noise drawn on a 4x4 to 16x16 grid and upsampled, amplitude up to 0.35, kept inside the
    figure) like the textures a small diffusion model paints into flat fills; a faint background tint; a Gaussian
    blur of sigma up to 1.8; and pixel noise of standard deviation up to 0.1. None of these changes which colour,
    shape, style or character the image shows.

    Args:
        images: Renders in [-1, 1], ``(B, 3, H, W)``.
        generator: Source of randomness (on the images' device).
        max_scale: Largest figure scale of the warp (1.45: a figure of the largest rendered size nearly fills the
            canvas, as the generator's figures often do).

    Returns:
        Corrupted images in [-1, 1].
    """
    batch, _, height, width = images.shape
    device, dtype = images.device, images.dtype

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, device=device, dtype=dtype)

    # geometry: rotation and isotropic scale about the figure's centre, which then moves by a few pixels; the scale
    # goes up to max_scale (figures larger than the renderer draws, as a generator does) as long as the figure,
    # rotated, stays on the canvas; the canvas outside is white (background)
    mask = (images < 0.9).any(1)  # (B, H, W)
    coords_y = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height * 2 - 1
    coords_x = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width * 2 - 1
    rows_any, cols_any = mask.any(2), mask.any(1)
    big = torch.tensor(9.0, device=device, dtype=dtype)
    x0 = torch.where(cols_any, coords_x, big).amin(1)
    x1 = torch.where(cols_any, coords_x, -big).amax(1)
    y0 = torch.where(rows_any, coords_y, big).amin(1)
    y1 = torch.where(rows_any, coords_y, -big).amax(1)
    empty = x1 < x0
    centre = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2], -1).masked_fill(empty[:, None], 0.0)
    half = (torch.maximum(x1 - x0, y1 - y0) / 2 + 1 / width).masked_fill(empty, 1.0) * 1.2  # room for rotation
    limit = 1 - 2 * 2 / width  # keep 2 px of margin
    largest = (limit / half).clamp(max=max_scale)
    scale = torch.minimum(0.85 + uniform(batch) * (largest - 0.85).clamp_min(0), largest)
    reach = (limit - half * scale).clamp_min(0)[:, None]
    target = torch.maximum(torch.minimum(centre + (uniform(batch, 2) - 0.5) * 2 * (3 / (width / 2)), reach), -reach)
    angle = (uniform(batch) - 0.5) * 2 * math.radians(8)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], 1)  # output -> input
    offset = centre - (linear @ target[:, :, None])[:, :, 0]
    theta = torch.cat([linear, offset[:, :, None]], 2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1
    figure = (warped < 0.9).any(1, keepdim=True).to(dtype)  # pixels that are not (near) white background
    # colour: near-identity channel mixing about white, and a per-channel shift
    mixing = torch.eye(3, device=device, dtype=dtype) + (uniform(batch, 3, 3) - 0.5) * 0.16
    out = torch.einsum("bij,bjhw->bihw", mixing, warped - 1) + 1
    out = out + (uniform(batch, 3, 1, 1) - 0.5) * 0.2
    # low-frequency blotches inside the figure
    cells = int(4 * 2 ** int(torch.randint(0, 3, (1,), generator=generator, device=device)))
    blotch = torch.randn(batch, 3, cells, cells, generator=generator, device=device, dtype=dtype)
    blotch = F.interpolate(blotch, size=(height, width), mode="bicubic", align_corners=False)
    out = out + blotch * figure * (uniform(batch, 1, 1, 1) * 0.35)
    # faint low-frequency tint of the background
    tint = F.interpolate(torch.randn(batch, 3, 4, 4, generator=generator, device=device, dtype=dtype),
                         size=(height, width), mode="bilinear", align_corners=False)  # fmt: skip
    out = out - tint.abs() * (1 - figure) * (uniform(batch, 1, 1, 1) * 0.15)
    out = _gaussian_blur(out, uniform(batch, 1, 1, 1) * 1.8, radius=3)
    noise = torch.randn(images.shape, generator=generator, device=device, dtype=dtype)
    return (out + noise * uniform(batch, 1, 1, 1) * 0.1).clamp(-1, 1)


@torch.no_grad()
def vae_roundtrip(images: np.ndarray, vae, generator: torch.Generator, latent_noise: float = 0.0,
                  batch_size: int = 64) -> np.ndarray:  # fmt: skip
    """Encode renders with a pipeline's VAE and decode them again, optionally with noise added to the latents.

    Generated images are VAE decodes of latents a denoiser produced; a render sent through the same decoder carries
    exactly that decoder's artefacts (soft edges, ringing, colour bleeding). ``latent_noise`` adds Gaussian noise of
    a per-image standard deviation uniform in ``[0, latent_noise]`` (in units of the *scaled* latent, whose
    standard deviation is about 1) to the sampled latent, imitating a denoiser's imperfect latents.

    Args:
        images: uint8 renders ``(N, 64, 64, 3)``.
        vae: The pipeline's ``AutoencoderKL``.
        generator: Source of the posterior samples and the latent noise (on the VAE's device).
        latent_noise: Largest standard deviation of the added latent noise.
        batch_size: Images per VAE call.

    Returns:
        uint8 decodes, same shape as ``images``.
    """
    device = next(vae.parameters()).device
    scaling = vae.config.scaling_factor
    out = []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size]).to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator, device=device)
        level = torch.rand(len(x), 1, 1, 1, generator=generator, device=device) * latent_noise
        z = z + level * torch.randn(z.shape, generator=generator, device=device) / scaling
        decoded = vae.decode(z).sample.float().clamp(-1, 1)
        out.append(((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def scene_targets(scenes) -> dict[str, torch.Tensor]:
    """Class indices per oracle head for a list of scenes."""
    labels = [scene.labels() for scene in scenes]
    return {name: torch.tensor([values.index(lab[name]) for lab in labels]) for name, values in ORACLE_HEADS.items()}


# ----------------------------------------------------------------------------------------------------- training
@dataclass
class StageBudget:
    """When a training stage stops: after ``steps`` optimizer steps or ``seconds`` of wall clock."""

    steps: int
    seconds: float = math.inf


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _loop(
    name: str,
    budget: StageBudget,
    step_fn: Callable[[int, float], float],
    state_fn: Callable[[], dict],
    work_dir: Path | None,
    start_step: int = 0,
    save_every: int = 500,
    log_every: int = 100,
    on_step: Callable[[int], None] | None = None,
) -> list[tuple[int, float]]:
    """Run ``step_fn(step, progress)`` until the budget is spent; returns the logged ``(step, mean loss)`` curve.

    ``progress`` in [0, 1] is the larger of the step fraction and the time fraction of the budget, so learning-rate
    schedules finish their decay whichever limit ends the stage. ``on_step(step)``, when given, runs after every
    completed step (the denoiser's periodic quality check), after the state is saved.
    """
    curve: list[tuple[int, float]] = []
    started = time.monotonic()
    running, count = 0.0, 0
    bar = tqdm(total=budget.steps, initial=start_step, desc=f"train {name}", disable=None)
    step = start_step
    while step < budget.steps and time.monotonic() - started < budget.seconds:
        progress = min(1.0, max(step / budget.steps, (time.monotonic() - started) / budget.seconds))
        loss = step_fn(step, progress)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{name}: loss became {loss} at step {step}; lower the learning rate")
        running, count, step = running + loss, count + 1, step + 1
        bar.update(1)
        if step % log_every == 0:
            curve.append((step, running / count))
            bar.set_postfix(loss=f"{running / count:.4f}")
            logger.info("%s step %d loss %.5f (%.0f s)", name, step, running / count, time.monotonic() - started)
            running, count = 0.0, 0
        if work_dir is not None and step % save_every == 0:
            _save_state(work_dir / f"{name}.pt", {"step": step, **state_fn()})
        if on_step is not None:
            on_step(step)
    bar.close()
    if work_dir is not None:
        _save_state(work_dir / f"{name}.pt", {"step": step, "finished": True, **state_fn()})
    logger.info("%s stopped at step %d after %.0f s", name, step, time.monotonic() - started)
    return curve


def _resume(work_dir: Path | None, name: str, modules: dict, optimizer) -> int:
    path = work_dir / f"{name}.pt" if work_dir else None
    if path is None or not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key, module in modules.items():
        if key not in state:  # a state saved before this module was part of the stage
            logger.warning("%s: no %r in %s; it starts fresh", name, key, path)
            continue
        module.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resumed %s at step %d", name, state["step"])
    return int(state["step"])


def _batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        yield from torch.randperm(count, generator=generator).split(batch_size)


def _autocast(device: torch.device):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )


def train_oracle(images, scenes, budget, device, seed=0, batch_size=512, lr=2e-3, work_dir=None) -> Oracle:
    """Train the attribute classifier on renders (with ``degrade`` augmentation)."""
    torch.manual_seed(seed)
    oracle = Oracle().to(device)
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=lr, weight_decay=1e-4)
    start = _resume(work_dir, "oracle", {"model": oracle}, optimizer)
    x = to_tensor(images)
    targets = scene_targets(scenes)
    generator = torch.Generator().manual_seed(seed)
    device_generator = torch.Generator(device).manual_seed(seed)
    batches = _batches(len(x), batch_size, generator)

    def step(index: int, progress: float) -> float:
        oracle.train()
        rows = next(batches)
        inputs = degrade(x[rows].to(device), device_generator)
        with _autocast(device):
            logits = oracle(inputs)
            loss = sum(F.cross_entropy(logits[k].float(), targets[k][rows].to(device)) for k in ORACLE_HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
        optimizer.step()
        return loss.item()

    _loop("oracle", budget, step, lambda: {"model": oracle.state_dict(), "optimizer": optimizer.state_dict()},
          work_dir, start)  # fmt: skip
    return oracle.eval()


def train_vae(images, budget, device, seed=0, batch_size=128, lr=5e-4, kl_weight=1e-6, work_dir=None):
    """Train the AutoencoderKL to reconstruct renders (L1 + L2 + a small KL term)."""
    from erasure.toyworld.models import build_vae

    torch.manual_seed(seed)
    vae = build_vae().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = _resume(work_dir, "vae", {"model": vae}, optimizer)
    x = to_tensor(images)
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(len(x), batch_size, generator)

    def step(index: int, progress: float) -> float:
        vae.train()
        batch = x[next(batches)].to(device)
        with _autocast(device):
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample.float()
        kl = posterior.kl().mean() / batch[0].numel()
        loss = F.l1_loss(reconstruction, batch) + F.mse_loss(reconstruction, batch) + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (index + 1) / 200) * 0.5 * (1 + math.cos(math.pi * progress))
        optimizer.step()
        return loss.item()

    _loop("vae", budget, step, lambda: {"model": vae.state_dict(), "optimizer": optimizer.state_dict()},
          work_dir, start)  # fmt: skip
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, device, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every image (cached once; sampled per training step)."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="encode latents", disable=None):
        posterior = vae.encode(to_tensor(images[start : start + batch_size]).to(device)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


class EMA:
    """Exponential moving average of a set of modules' parameters."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {name: copy.deepcopy(module).eval().requires_grad_(False) for name, module in modules.items()}
        self.modules = modules

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend the live weights in (with warm-up: decay ``min(decay, (1 + step) / (10 + step))``)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, module in self.modules.items():
            for shadow, live in zip(self.shadow[name].parameters(), module.parameters(), strict=True):
                shadow.lerp_(live, 1 - decay)


def training_noise_schedule(scheduler_config: dict) -> tuple[torch.Tensor, str]:
    """``(abar_t for t = 0..T-1, prediction type)`` that the denoiser trains with, from a DDIM scheduler config.

    Built by diffusers' own ``DDPMScheduler`` from the same config the saved pipeline's ``DDIMScheduler`` loads, so
    training and stock sampling share one schedule (zero-terminal-SNR rescaling included).
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        **{k: v for k, v in scheduler_config.items() if k not in ("set_alpha_to_one", "steps_offset")}
    )
    return scheduler.alphas_cumprod.clone(), str(scheduler_config.get("prediction_type", "epsilon"))


def train_denoiser(latent_mean, latent_std, token_ids, tokenizer, scaling_factor, budget, device, seed=0,
                   batch_size=64, lr=1e-3, ema_decay=0.999, work_dir=None, init=None, text_targets=None,
                   text_aux_weight=0.1, warmup_steps=100, quality_check=None, check_every=500, save_every=500,
                   scheduler_config=None, offset_noise=0.0, high_noise_fraction=0.0):  # fmt: skip
    """Train UNet and text encoder jointly on the diffusion loss of the toy pipeline's noise schedule.

    The schedule and parameterisation are ``SCHEDULER_CONFIG``'s: with ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t)
    eps`` (Ho et al. 2020, eq. 4) the UNet regresses ``eps`` (eq. 14) for ``epsilon`` models or
    ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans & Ho 2022, section 4) for ``v_prediction`` models,
    with ``t`` uniform on ``[0, 1000)``. Under zero terminal SNR (``abar_999 = 0``) the v-loss at the last step is
    ``|v_hat + x_0|^2``: the model must draw the whole image from the prompt alone, as it must at sampling time.

    Args:
        latent_mean: VAE posterior means of the training images, ``(N, 4, 16, 16)`` (centred VAE).
        latent_std: VAE posterior standard deviations, same shape.
        token_ids: Token ids of each image's caption, ``(N, 77)``.
        tokenizer: The toy tokenizer (sizes the text encoder's vocabulary).
        scaling_factor: Latent scaling factor (the VAE's ``scaling_factor``).
        budget: Step and wall-clock budget of this stage.
        device: Training device.
        seed: Seed of weights, batches and noise.
        batch_size: Images per step.
        lr: Peak learning rate (linear warm-up over ``warmup_steps``, cosine to 10%).
        ema_decay: EMA decay of the shadow weights.
        work_dir: Folder for resumable training state, or ``None``.
        init: Optional ``(unet, text_encoder)`` to continue from (a previous run's weights); fresh ones otherwise.
        text_targets: Optional class indices per attribute (``scene_targets``; ``-1`` for empty captions). When
            given, linear heads on the text encoder's mean token state classify the caption's attributes, an
            auxiliary loss (weight ``text_aux_weight``) that keeps colour, shape, style and character words apart in
            the text encoder's output (joint training from scratch can otherwise leave two colour words nearly
            collinear). The heads are discarded after training.
        text_aux_weight: Weight of that auxiliary cross-entropy.
        warmup_steps: Steps of linear learning-rate warm-up.
        quality_check: Optional ``quality_check(step, unet, text_encoder, ema)`` called every ``check_every``
            steps and at the end (the driver generates a small prompt set and logs the oracle's verdicts).
        check_every: Steps between quality checks.
        save_every: Steps between saves of the resumable state (and at the end).
        scheduler_config: The noise schedule (a ``DDIMScheduler`` config); ``SCHEDULER_CONFIG`` by default.
        offset_noise: Standard deviation of a per-channel constant added to the noise (offset noise), which lets
            an epsilon model under SD's schedule learn to change an image's mean.
        high_noise_fraction: Share of each batch whose ``t`` is drawn from ``[600, 1000)`` instead of ``[0, 1000)``
            (more weight on the steps where colour and layout are decided, for epsilon models).

    Returns:
        ``(unet, text_encoder, ema)`` with the raw weights in the first two and the EMA copies in ``ema.shadow``.
    """
    from erasure.toyworld.models import SCHEDULER_CONFIG, build_text_encoder, build_unet

    torch.manual_seed(seed)
    unet, text_encoder = init if init is not None else (build_unet(), build_text_encoder(tokenizer))
    unet, text_encoder = unet.to(device).train(), text_encoder.to(device).train()
    alphas, prediction_type = training_noise_schedule(scheduler_config or SCHEDULER_CONFIG)
    alphas = alphas.to(device)
    hidden = text_encoder.config.hidden_size
    heads = torch.nn.ModuleDict(
        {name: torch.nn.Linear(hidden, len(ORACLE_HEADS[name])) for name in (text_targets or {})}
    ).to(device)
    parameters = list(unet.parameters()) + list(text_encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    ema = EMA({"unet": unet, "text_encoder": text_encoder}, ema_decay)
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema.shadow["unet"],
               "ema_text_encoder": ema.shadow["text_encoder"], **({"text_heads": heads} if heads else {})}  # fmt: skip
    start = _resume(work_dir, "denoiser", modules, optimizer)
    # Random streams are re-seeded from (seed, step) so that a resumed run draws what an uninterrupted one would.
    generator = torch.Generator().manual_seed(seed)
    device_generator = torch.Generator(device).manual_seed(seed)
    permutation: dict[str, torch.Tensor] = {}

    def batch_rows(index: int) -> torch.Tensor:
        per_epoch = math.ceil(len(latent_mean) / batch_size)
        epoch, position = divmod(index, per_epoch)
        if permutation.get("epoch") != epoch:
            generator.manual_seed(seed * 1_000_003 + epoch)
            permutation["epoch"], permutation["rows"] = epoch, torch.randperm(len(latent_mean), generator=generator)
        return permutation["rows"][position * batch_size : (position + 1) * batch_size]

    def step(index: int, progress: float) -> float:
        unet.train()
        text_encoder.train()
        device_generator.manual_seed(seed * 1_000_003 + index)
        rows = batch_rows(index)
        mean, std = latent_mean[rows].to(device), latent_std[rows].to(device)
        x0 = (mean + std * torch.randn(mean.shape, generator=device_generator, device=device)) * scaling_factor
        noise = torch.randn(x0.shape, generator=device_generator, device=device)
        if offset_noise:
            offset = torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=device_generator, device=device)
            noise = noise + offset_noise * offset
        t = torch.randint(0, len(alphas), (x0.shape[0],), generator=device_generator, device=device)
        if high_noise_fraction:
            high = torch.rand(x0.shape[0], generator=device_generator, device=device) < high_noise_fraction
            t = torch.where(high, 600 + t * 400 // len(alphas), t)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else noise
        with _autocast(device):
            context = text_encoder(token_ids[rows].to(device))[0]
            prediction = unet(x_t, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction.float(), target)
        if heads:
            summary = context[:, 1:].float().mean(dim=1)
            for name, head in heads.items():
                targets = text_targets[name][rows].to(device)
                if (targets >= 0).any():  # a batch of only empty captions has nothing to classify
                    loss = loss + text_aux_weight * F.cross_entropy(head(summary), targets, ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        warmup = min(1.0, (index + 1) / max(1, warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        optimizer.step()
        ema.update(index)
        return loss.item()

    def state() -> dict:
        return {
            "unet": unet.state_dict(),
            "text_encoder": text_encoder.state_dict(),
            "ema_unet": ema.shadow["unet"].state_dict(),
            "ema_text_encoder": ema.shadow["text_encoder"].state_dict(),
            **({"text_heads": heads.state_dict()} if heads else {}),
            "optimizer": optimizer.state_dict(),
        }

    def check(step_done: int) -> None:
        if quality_check is not None and step_done % check_every == 0:
            quality_check(step_done, unet.eval(), text_encoder.eval(), ema)

    _loop("denoiser", budget, step, state, work_dir, start, save_every=save_every, on_step=check)
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder, ema


def train_clip(images, scenes, captions, budget, device, seed=0, batch_size=1024, lr=1e-3, work_dir=None,
               init=None, augment=None, warmup_steps=200, train_text=True):  # fmt: skip
    """Contrastive training of the toy open_clip model (Radford et al. 2021) on renders and their captions.

    Captions repeat across the batch (63 subjects), so the InfoNCE targets are soft: every caption of the same
    subject counts as a positive (supervised-contrastive targets), instead of punishing true matches.

    Args:
        images: uint8 training images ``(N, 64, 64, 3)`` (renders, or renders sent through ``vae_roundtrip``).
        scenes: The scene of each image.
        captions: The caption of each image (empty ones are skipped).
        budget: Step and wall-clock budget.
        device: Training device.
        seed: Seed of weights, batches and augmentation.
        batch_size: Images per step.
        lr: Peak learning rate (linear warm-up over ``warmup_steps``, then cosine to 0).
        work_dir: Folder for resumable training state, or ``None``.
        init: Optional open_clip model to continue from (fine-tuning); a fresh one otherwise.
        augment: ``augment(images, generator)`` applied to every batch; ``degrade`` when ``None``.
        warmup_steps: Steps of linear learning-rate warm-up.
        train_text: When ``False``, the text tower and the logit scale stay frozen and only the image tower trains
            (fine-tuning for robustness without moving the zero-shot class embeddings); each distinct caption's
            features are then computed once.
    """
    import open_clip

    from erasure.toyworld.models import CLIP_MODEL_NAME, build_clip

    torch.manual_seed(seed)
    model = init if init is not None else build_clip()[0]
    model = model.to(device)
    augment = augment or degrade
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL_NAME)
    keep = [i for i, c in enumerate(captions) if c]
    x = to_tensor(images[keep])
    tokens = tokenizer([captions[i] for i in keep])
    subject_names = [subject(scenes[i]) for i in keep]
    subject_index = {name: k for k, name in enumerate(sorted(set(subject_names)))}
    subject_ids = torch.tensor([subject_index[name] for name in subject_names])
    frozen_text = None
    if not train_text:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("visual."))
        distinct, caption_row = torch.unique(tokens, dim=0, return_inverse=True)
        with torch.no_grad():
            model.eval()
            frozen_text = F.normalize(model.encode_text(distinct.to(device)).float(), dim=-1)[caption_row.to(device)]
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.1)
    start = _resume(work_dir, "clip", {"model": model}, optimizer)
    generator = torch.Generator().manual_seed(seed)
    device_generator = torch.Generator(device).manual_seed(seed)
    batches = _batches(len(x), batch_size, generator)

    def step(index: int, progress: float) -> float:
        model.train()
        rows = next(batches)
        batch = augment(x[rows].to(device), device_generator)
        same = (subject_ids[rows, None] == subject_ids[None, rows]).float().to(device)
        targets = same / same.sum(1, keepdim=True)
        with _autocast(device):
            if frozen_text is None:
                image_features, text_features, logit_scale = model(batch, tokens[rows].to(device))[:3]
            else:
                image_features = model.encode_image(batch, normalize=True)
                text_features, logit_scale = frozen_text[rows.to(device)], model.logit_scale.exp().detach()
        logits = logit_scale.float() * image_features.float() @ text_features.float().T
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (index + 1) / max(1, warmup_steps)) * 0.5 * (1 + math.cos(math.pi * progress))
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    _loop("clip", budget, step, lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
          work_dir, start)  # fmt: skip
    return model.eval()
