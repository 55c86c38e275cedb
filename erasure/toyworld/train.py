"""Training of the toy world's models from scratch: oracle, VAE, UNet + text encoder, and CLIP.

Every stage is seeded, stops at a step count or a wall-clock budget (whichever comes first), logs its loss and
saves a resumable state (weights, optimizer, EMA, step) to ``work_dir`` every few hundred steps. The driver is
``scripts/train_toyworld.py``; this module holds the loops so that tests can run a few steps of each.
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
from erasure.toyworld.models import ORACLE_HEADS, Oracle

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


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, noise and small colour shifts, so judges trained on renders tolerate generated images."""
    batch = images.shape[0]
    device = images.device
    sigma = torch.rand(batch, 1, 1, 1, generator=generator, device=device) * 1.2
    kernel_x = torch.arange(-2, 3, device=device, dtype=images.dtype).view(1, 1, 1, 5)
    weights = torch.exp(-(kernel_x**2) / (2 * sigma.clamp_min(1e-3) ** 2))  # (B, 1, 1, 5)
    weights = weights / weights.sum(-1, keepdim=True)
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")
    unfolded = padded.unfold(3, 5, 1)  # (B, 3, H+4, W, 5)
    blurred = (unfolded * weights.unsqueeze(-2)).sum(-1)
    unfolded = blurred.unfold(2, 5, 1)  # (B, 3, H, W, 5)
    blurred = (unfolded * weights.unsqueeze(-2)).sum(-1)
    shift = (torch.rand(batch, 3, 1, 1, generator=generator, device=device) - 0.5) * 0.12
    noise = torch.randn(images.shape, generator=generator, device=device) * 0.06
    return (blurred + shift + noise).clamp(-1, 1)


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
) -> list[tuple[int, float]]:
    """Run ``step_fn(step, progress)`` until the budget is spent; returns the logged ``(step, mean loss)`` curve.

    ``progress`` in [0, 1] is the larger of the step fraction and the time fraction of the budget, so learning-rate
    schedules finish their decay whichever limit ends the stage.
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


def train_denoiser(latent_mean, latent_std, token_ids, tokenizer, scaling_factor, budget, device, seed=0,
                   batch_size=1024, lr=5e-4, ema_decay=0.995, work_dir=None, init=None, text_targets=None,
                   text_aux_weight=0.1):  # fmt: skip
    """Train UNet and text encoder jointly on the epsilon-prediction loss of SD (Ho et al. 2020, eq. 14).

    Args:
        latent_mean: VAE posterior means of the training images, ``(N, 4, 16, 16)``.
        latent_std: VAE posterior standard deviations, same shape.
        token_ids: Token ids of each image's caption, ``(N, 77)``.
        tokenizer: The toy tokenizer (sizes the text encoder's vocabulary).
        scaling_factor: Latent scaling factor (the VAE's ``scaling_factor``).
        budget: Step and wall-clock budget of this stage.
        device: Training device.
        seed: Seed of weights, batches and noise.
        batch_size: Images per step.
        lr: Peak learning rate (warm-up 200 steps, cosine to 10%).
        ema_decay: EMA decay of the shadow weights.
        work_dir: Folder for resumable training state, or ``None``.
        text_targets: Optional class indices per attribute (``scene_targets``; ``-1`` for empty captions). When
            given, linear heads on the text encoder's mean token state classify the caption's attributes, an
            auxiliary loss (weight ``text_aux_weight``) that keeps colour, shape, style and character words apart in
            the text encoder's output; without it, joint training from scratch left "red" and "purple" at cosine
            0.99 and the generator confused colours. The heads are discarded after training.
        text_aux_weight: Weight of that auxiliary cross-entropy.
        init: Optional ``(unet, text_encoder)`` to continue from (a previous run's weights); fresh ones otherwise.

    Returns:
        ``(unet, text_encoder, ema)`` with the raw weights in the first two and the EMA copies in ``ema.shadow``.
    """
    from diffusers import DDPMScheduler

    from erasure.toyworld.models import SCHEDULER_CONFIG, build_text_encoder, build_unet

    torch.manual_seed(seed)
    unet, text_encoder = init if init is not None else (build_unet(), build_text_encoder(tokenizer))
    unet, text_encoder = unet.to(device).train(), text_encoder.to(device).train()
    noise_scheduler = DDPMScheduler(
        **{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")}
    )
    from erasure.toyworld.models import ORACLE_HEADS

    hidden = text_encoder.config.hidden_size
    heads = torch.nn.ModuleDict(
        {name: torch.nn.Linear(hidden, len(ORACLE_HEADS[name])) for name in (text_targets or {})}
    ).to(device)
    parameters = list(unet.parameters()) + list(text_encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    ema = EMA({"unet": unet, "text_encoder": text_encoder}, ema_decay)
    start = _resume(work_dir, "denoiser", {"unet": unet, "text_encoder": text_encoder,
                                            "ema_unet": ema.shadow["unet"],
                                            "ema_text_encoder": ema.shadow["text_encoder"],
                                            **({"text_heads": heads} if heads else {})}, optimizer)  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    device_generator = torch.Generator(device).manual_seed(seed)
    batches = _batches(len(latent_mean), batch_size, generator)
    alphas = noise_scheduler.alphas_cumprod.to(device)

    def step(index: int, progress: float) -> float:
        unet.train()
        text_encoder.train()
        rows = next(batches).to(latent_mean.device)
        mean, std = latent_mean[rows].to(device), latent_std[rows].to(device)
        x0 = (mean + std * torch.randn(mean.shape, generator=device_generator, device=device)) * scaling_factor
        noise = torch.randn(x0.shape, generator=device_generator, device=device)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=device_generator, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with _autocast(device):
            context = text_encoder(token_ids[rows.cpu()].to(device))[0]
            prediction = unet(x_t, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction.float(), noise)
        if heads:
            summary = context[:, 1:].float().mean(dim=1)
            for name, head in heads.items():
                targets = text_targets[name][rows.cpu()].to(device)
                if (targets >= 0).any():  # a batch of only empty captions has nothing to classify
                    loss = loss + text_aux_weight * F.cross_entropy(head(summary), targets, ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (index + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
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

    _loop("denoiser", budget, step, state, work_dir, start)
    return unet.eval(), text_encoder.eval(), ema


def train_clip(images, scenes, captions, budget, device, seed=0, batch_size=1024, lr=1e-3, work_dir=None):
    """Contrastive training of the toy open_clip model (Radford et al. 2021) on renders and their captions.

    Captions repeat across the batch (63 subjects), so the InfoNCE targets are soft: every caption of the same
    subject counts as a positive (supervised-contrastive targets), instead of punishing true matches.
    """
    import open_clip

    from erasure.toyworld.models import CLIP_MODEL_NAME, build_clip

    torch.manual_seed(seed)
    model, _ = build_clip()
    model = model.to(device)
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL_NAME)
    keep = [i for i, c in enumerate(captions) if c]
    x = to_tensor(images[keep])
    tokens = tokenizer([captions[i] for i in keep])
    subject_names = [subject(scenes[i]) for i in keep]
    subject_index = {name: k for k, name in enumerate(sorted(set(subject_names)))}
    subject_ids = torch.tensor([subject_index[name] for name in subject_names])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    start = _resume(work_dir, "clip", {"model": model}, optimizer)
    generator = torch.Generator().manual_seed(seed)
    device_generator = torch.Generator(device).manual_seed(seed)
    batches = _batches(len(x), batch_size, generator)

    def step(index: int, progress: float) -> float:
        model.train()
        rows = next(batches)
        batch = degrade(x[rows].to(device), device_generator)
        same = (subject_ids[rows, None] == subject_ids[None, rows]).float().to(device)
        targets = same / same.sum(1, keepdim=True)
        with _autocast(device):
            image_features, text_features, logit_scale = model(batch, tokens[rows].to(device))[:3]
        logits = logit_scale.float() * image_features.float() @ text_features.float().T
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (index + 1) / 200) * 0.5 * (1 + math.cos(math.pi * progress))
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    _loop("clip", budget, step, lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
          work_dir, start)  # fmt: skip
    return model.eval()
