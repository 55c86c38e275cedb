"""AdvUnlearn: adversarial training of the text encoder (Zhang et al., NeurIPS 2024; arXiv 2405.15234).

ESD (:mod:`erasure.methods.esd`) erases the concept for the prompts it trains on; an attacker then finds a prompt
embedding that brings it back. AdvUnlearn trains against that attacker, as a bi-level problem (paper Eqs. 3-5):

* **Inner attack** (an UnlearnDiffAtk-style soft prompt): ``k`` adversarial token vectors ``delta`` in the
  token-embedding space, prefixed to the erase prompt ``c`` (``c (+) delta``), optimised with Adam (lr 1e-3, 30 steps)
  so that the model being trained reproduces the *original* model's prediction for the concept::

      min_delta  || eps_theta(x_t, c (+) delta, t) - eps_theta*(x_t, c, t) ||^2

* **Outer step**: ESD's loss (Eq. 7, ``eta`` 1, guidance 3) evaluated on the adversarial prompt, plus the retain
  loss on preserve prompts ``c_r`` (the "reg" mode, weight ``gamma`` 0.3, 5 prompts per step). The anchor ``a`` is
  the concept's (``Concept.erase_anchors``; a concept file's default is the empty prompt, the official code's only
  choice)::

      L = || eps_theta(x_t, c (+) delta, t) - [eps*(x_t, a) - eta (eps*(x_t, c) - eps*(x_t, a))] ||^2
          + gamma * || eps_theta(x_t, c_r, t) - eps_theta*(x_t, c_r, t) ||^2

The attack starts after ``warmup_iterations`` (official 200 of 1000); before, the outer step is plain ESD.
Parameters: the text encoder's transformer layers and final layer norm by default (``text_encoder``, the paper's
choice and the official ``text_encoder_full``, which leaves the token and position tables alone: the robust encoder
then works in other SD 1.x UNets), or the UNet's ``xattn`` / ``noxattn``. Defaults: the README's command of the
official repository (1000 iterations, lr 1e-5, one adversarial token initialised from a random vocabulary row, the
``reg`` retain mode with weight 0.3); its argparse defaults differ (retain weight 1, warm-started attacks).

``x_t`` comes from ESD's ``cached`` sampler: ``trajectories`` guided DDIM runs of the original model, made once,
every state reused with its frozen predictions (the official code re-samples with the model being trained; with a
frozen UNet and an embedding-space attack, the frozen model's states are the ones where the concept appears). Each
inner-attack step and the outer step draw their own state of the prompt (the official code draws a fresh ``t`` and
``z`` for each), and the retain loss runs on states of the retain prompts' own trajectories (a second bank, as the
official code DDIM-samples each retain prompt), against the original model's cached predictions. The
adversarial vector enters the encoder through :class:`erasure.embedding_override.EmbeddingOverride` at position 1
(after the start token; the prompt shifts right by ``k``), the same override the probe's embedding attacks use.
Text-encoder changes are saved as ``text_encoder.*`` deltas, applied, scaled and reverted like UNet ones.
SD 1.x and 2.x (one text encoder), as the official code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from torch import Tensor
from tqdm.auto import tqdm

from erasure.concepts import EraseRequest
from erasure.diffusion import Conditioning, encode_prompts, predict_noise, unconditional_conditioning
from erasure.embedding_override import EmbeddingOverride, token_embedding
from erasure.methods import register
from erasure.methods.base import (
    EraseMethod,
    MethodConfig,
    NonFiniteEditError,
    gradient_checkpointing,
    preset_parameters,
)
from erasure.methods.esd import adam_steps_in_backward, esd_target
from erasure.pipeline import ModelFamily, execution_device
from erasure.sampling import ddim_trajectory

logger = logging.getLogger(__name__)

PARAMETER_CHOICES = ("text_encoder", "xattn", "noxattn")


@dataclass
class AdvUnlearnConfig(MethodConfig):
    """AdvUnlearn settings; defaults follow the official code (see the module docstring)."""

    parameters: str = field(
        default="text_encoder", metadata={"help": "parameters trained: text_encoder (paper), xattn or noxattn"}
    )
    iterations: int = field(default=1000, metadata={"help": "outer iterations"})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate of the trained parameters"})
    eta: float = field(default=1.0, metadata={"help": "ESD's negative guidance strength (Eq. 7)"})
    guidance: float = field(default=3.0, metadata={"help": "CFG scale of the DDIM trajectories making x_t"})
    ddim_steps: int = field(default=25, metadata={"help": "DDIM schedule of the cached trajectories"})
    trajectories: int = field(default=8, metadata={"help": "original-model DDIM runs made once and reused"})
    attack_steps: int = field(default=30, metadata={"help": "Adam steps of the inner attack per iteration"})
    attack_lr: float = field(default=1e-3, metadata={"help": "learning rate of the inner attack"})
    adversarial_tokens: int = field(default=1, metadata={"help": "adversarial token vectors prefixed to the prompt"})
    warmup_iterations: int = field(default=200, metadata={"help": "iterations of plain ESD before attacks start"})
    retain_weight: float = field(default=0.3, metadata={"help": "gamma, the weight of the retain loss"})
    retain_batch: int = field(default=5, metadata={"help": "preserve prompts per retain step"})
    resolution: int | None = field(default=None, metadata={"help": "image side of x_t in pixels (default: native)"})
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "recompute UNet activations in the backward pass (about 1/3 of the memory, a little time)"},
    )

    def __post_init__(self) -> None:
        self.lr, self.attack_lr = float(self.lr), float(self.attack_lr)
        if self.parameters not in PARAMETER_CHOICES:
            raise ValueError(f"parameters must be one of {', '.join(PARAMETER_CHOICES)}, got {self.parameters!r}.")
        for name in ("iterations", "ddim_steps", "trajectories", "adversarial_tokens", "retain_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("attack_steps", "warmup_iterations", "retain_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not self.lr > 0 or not self.attack_lr > 0 or not self.eta > 0:
            raise ValueError("lr, attack_lr and eta must be > 0.")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {self.resolution}.")


def prefixed_ids(tokenizer: Any, prompts: list[str], count: int) -> Tensor:
    """``[B, L]`` ids ``[SOT, slot x count, prompt tokens, EOT, padding]``, cut to the tokenizer's length ``L``.

    The slots hold the end-of-text id as a placeholder; :class:`EmbeddingOverride` replaces their rows.
    """
    length = int(tokenizer.model_max_length)
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        rows.append([ids[0], *[tokenizer.eos_token_id] * count, *ids[1:]][:length])
    return torch.tensor(rows, dtype=torch.long)


def encode_with_prefix(pipe: DiffusionPipeline, override: EmbeddingOverride, ids: Tensor, vectors: Tensor) -> Tensor:
    """Prompt embeddings of ``ids`` with ``vectors`` (``[B, k, d]``) at positions ``1..k`` (gradients flow)."""
    positions = [torch.arange(1, 1 + vectors.shape[1])] * len(ids)
    with override.rows(positions, list(vectors)):
        return pipe.text_encoder(ids.to(execution_device(pipe)))[0]


@register("advunlearn")
class AdvUnlearn(EraseMethod):
    """AdvUnlearn: ESD on adversarial soft prompts, training the text encoder, with a retain loss."""

    config_class = AdvUnlearnConfig
    supported_families = (ModelFamily.SD1, ModelFamily.SD2)
    config: AdvUnlearnConfig

    @classmethod
    def test_config(cls) -> dict[str, Any]:
        """Three iterations (the attack from the second, two steps each) on 16-pixel images, 4-step schedules."""
        return {"iterations": 3, "warmup_iterations": 1, "attack_steps": 2, "ddim_steps": 4, "trajectories": 2,
                "resolution": 16}  # fmt: skip

    def select_parameters(self, pipe: DiffusionPipeline) -> dict[str, torch.nn.Parameter]:
        """Text encoder layers and final norm (no embedding tables: official ``text_encoder_full``), or UNet."""
        selected = preset_parameters(pipe, self.config.parameters)
        if self.config.parameters == "text_encoder":
            selected = {key: p for key, p in selected.items() if ".embeddings." not in key}
        return selected

    @torch.no_grad()
    def _state_bank(
        self, pipe: DiffusionPipeline, prompts: list[str], anchors: list[str] | None, generator: torch.Generator
    ) -> dict:
        """Original-model states ``x_t`` of ``trajectories`` guided DDIM runs, each run on a random one of ``prompts``.

        Every state keeps its prompt (``rows``), timestep and the original model's prediction for that prompt
        (``prediction``: ``eps*(x_t, c)``, the attack's and the retain loss's target) and, with ``anchors``, ESD's
        Eq. 7 target (``target``). Made once, before any weight changes, so every cached prediction is the
        original model's whatever is trained.
        """
        config = self.config
        unconditional = unconditional_conditioning(pipe)
        conditioning = encode_prompts(pipe, prompts)
        anchor_cond = (
            Conditioning.cat([encode_prompts(pipe, [a]) if a else unconditional for a in anchors]) if anchors else None
        )
        rows = torch.randint(len(prompts), (config.trajectories,), generator=generator)
        states = ddim_trajectory(
            pipe, conditioning[rows], config.ddim_steps - 1, config.ddim_steps, config.guidance, generator,
            unconditional=unconditional, size=config.resolution,
        )  # fmt: skip
        targets, predictions = [], []
        for latents, timestep in states:
            if anchor_cond is None:
                predictions.append(predict_noise(pipe, latents, timestep, conditioning[rows]).float())
                continue
            pair = Conditioning.cat([conditioning[rows], anchor_cond[rows]])
            both = predict_noise(pipe, torch.cat([latents, latents]), timestep, pair)
            out_concept, out_anchor = both.float().chunk(2)
            targets.append(esd_target(out_concept, out_anchor, config.eta))
            predictions.append(out_concept)
        return {
            "prompts": prompts,
            "x_t": torch.cat([latents for latents, _ in states]),
            "t": torch.cat([timestep.expand(config.trajectories) for _, timestep in states]),
            "rows": rows.repeat(len(states)),
            "target": torch.cat(targets) if targets else None,
            "prediction": torch.cat(predictions),
        }

    @staticmethod
    def _draw(bank: dict, row: int, generator: torch.Generator) -> Tensor:
        """The index of a random cached state of prompt ``row`` (any timestep, any of its trajectories)."""
        (candidates,) = torch.nonzero(bank["rows"] == row, as_tuple=True)
        return candidates[torch.randint(len(candidates), (1,), generator=generator)]

    def _attack(
        self, pipe: DiffusionPipeline, override: EmbeddingOverride, ids: Tensor, bank: dict, row: int,
        start: Tensor, generator: torch.Generator,
    ) -> tuple[Tensor, float]:  # fmt: skip
        """The inner attack: ``delta`` minimising ``|| eps_theta(x_t, c (+) delta) - eps*(x_t, c) ||^2``.

        Each step draws a fresh cached state of the prompt (as the official attack draws a fresh ``t`` and ``z`` per
        step), so ``delta`` is fitted to the concept rather than to one noisy latent. The official loop never zeroes
        the attack's gradients (Adam sees their running sum); here each step's gradient is its own.
        """
        delta = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=self.config.attack_lr)
        loss = torch.zeros(())
        for _ in range(self.config.attack_steps):
            pick = self._draw(bank, row, generator)
            embeds = encode_with_prefix(pipe, override, ids, delta)
            prediction = pipe.unet(bank["x_t"][pick], bank["t"][pick], encoder_hidden_states=embeds,
                                   return_dict=False)[0]  # fmt: skip
            loss = F.mse_loss(prediction.float(), bank["prediction"][pick])
            (gradient,) = torch.autograd.grad(loss, [delta])  # the trained weights get no gradient here
            delta.grad = gradient
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return delta.detach(), float(loss.detach())

    def _erase(
        self,
        pipe: DiffusionPipeline,
        request: EraseRequest,
        parameters: dict[str, torch.nn.Parameter],
        *,
        images: Any = None,
        progress: bool = True,
        originals: dict[str, Tensor] | None = None,
    ) -> dict[str, Any]:
        """Warm-up ESD, then per iteration the inner attack and the outer step of the module docstring."""
        config = self.config
        if images is not None:
            logger.warning("AdvUnlearn makes its own noisy latents from the model; the given images are not used.")
        generator = torch.Generator().manual_seed(config.seed)
        prompts = [prompt for concept in request.concepts for prompt in concept.erase]
        anchors = [anchor for concept in request.concepts for anchor in concept.erase_anchors]
        bank = self._state_bank(pipe, prompts, anchors, generator)  # before any change: the original model
        retain = list(request.preserve_prompts)
        retain_bank = None
        if retain and config.retain_weight:  # the retain prompts' own states, as the official DDIM-samples them
            retain_bank = self._state_bank(pipe, retain, None, generator)
        elif not retain:
            logger.warning("AdvUnlearn: the request has no preserve prompts; training without the retain loss.")
        ids = prefixed_ids(pipe.tokenizer, prompts, config.adversarial_tokens)
        plain_ids = prefixed_ids(pipe.tokenizer, prompts, 0)
        table = token_embedding(pipe.text_encoder).weight.detach()
        trained = list(parameters.values())
        pipe.unet.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        for parameter in trained:
            parameter.requires_grad_(True)
        losses, attack_losses = [], []
        with (
            EmbeddingOverride(pipe.text_encoder) as override,
            adam_steps_in_backward(trained, config.lr),
            gradient_checkpointing(pipe.unet, config.gradient_checkpointing),
        ):
            bar = tqdm(range(config.iterations), desc=self.name, disable=not progress or None)
            for iteration in bar:
                pick = torch.randint(len(bank["t"]), (1,), generator=generator)  # as ESD's cached sampler draws
                row = int(bank["rows"][pick])
                if iteration >= config.warmup_iterations and config.attack_steps:
                    start = table[torch.randint(len(table), (1, config.adversarial_tokens), generator=generator)]
                    delta, attack_loss = self._attack(pipe, override, ids[[row]], bank, row, start, generator)
                    attack_losses.append(attack_loss)
                    pick = self._draw(bank, row, generator)  # the outer step's own state, as the official
                    embeds = encode_with_prefix(pipe, override, ids[[row]], delta)
                else:
                    embeds = pipe.text_encoder(plain_ids[[row]].to(bank["x_t"].device))[0]
                x_t, t = bank["x_t"][pick], bank["t"][pick]
                prediction = pipe.unet(x_t, t, encoder_hidden_states=embeds, return_dict=False)[0]
                loss = F.mse_loss(prediction.float(), bank["target"][pick])
                if retain_bank is not None:
                    chosen = torch.randperm(len(retain_bank["t"]), generator=generator)[: config.retain_batch]
                    retain_ids = prefixed_ids(pipe.tokenizer, [retain[int(i)] for i in retain_bank["rows"][chosen]], 0)
                    current = pipe.text_encoder(retain_ids.to(x_t.device))[0]
                    moved = pipe.unet(retain_bank["x_t"][chosen], retain_bank["t"][chosen],
                                      encoder_hidden_states=current, return_dict=False)[0]  # fmt: skip
                    loss = loss + config.retain_weight * F.mse_loss(moved.float(), retain_bank["prediction"][chosen])
                if not torch.isfinite(loss):
                    raise NonFiniteEditError(
                        f"AdvUnlearn loss became {loss.item()} at iteration {iteration}; lower lr (now "
                        f"{config.lr:g}). The pipeline was restored."
                    )
                loss.backward()  # also the optimiser step: adam_steps_in_backward
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
        return {
            "iterations": config.iterations,
            "attacked_iterations": len(attack_losses),
            "cached_states": len(bank["t"]),
            "cached_retain_states": len(retain_bank["t"]) if retain_bank is not None else 0,
            "retain_prompts": len(retain),
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "attack_loss_first": attack_losses[0] if attack_losses else None,
            "attack_loss_last": attack_losses[-1] if attack_losses else None,
        }
