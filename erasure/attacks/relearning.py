"""Relearning: a few fine-tuning steps of the edited model on base images of the concept, as a curve.

The attack of the relearning literature (Gao et al., "Meta-Unlearning on Diffusion Models", ICCV 2025; Suriyakumar
et al., "Unstable Unlearning", arXiv 2410.08074; MemoRa, Polowczyk et al., arXiv 2510.03263): starting from the
edited weights ``theta*``, a parameter subset ``S`` is fine-tuned with the plain denoising loss on ``n`` concept
images ``x_j`` and their captions ``y_j``::

    Delta* = argmin_{Delta in S}  sum_j E_{t, eps} || eps - eps_{theta* + Delta}(x_{j,t}, t, tau(y_j)) ||^2

(``v``-target for v-prediction models), and the held-out rows are judged after each of ``checkpoints`` optimiser
steps: the curve of target rate against steps is the result, the rate at the last checkpoint its ``hits``. An edit
that left the concept a short weight-space distance away comes back in a few steps. ``parameters``: ``xattn_kv``
(cross-attention keys and values, default), ``xattn``, or ``edit`` (exactly the tensors the edit touched). The
data are base-model images of the concept's ``erase`` prompts at seeds ``train_seed + j`` (never the held-out
images). ``rank = 0`` (default) fine-tunes the subset in full, the stronger attacker for the same steps; ``rank =
r`` constrains ``Delta`` to a rank-``r`` LoRA ``B A`` per 2-D weight (MemoRa's rank 4), run as a forward hook so
the weights themselves never change. Every trained tensor is restored bit for bit afterwards.

**Benign resurgence** (``resurgence``, Suriyakumar et al.): the same fine-tuning on base images of the concept's
*neighbours* only (its ``preserve`` prompts), never on the concept. A concept that comes back from fine-tuning on
other data was hidden, not removed: the fine-tuning only has to undo the edit's suppression.

As with textual inversion, fine-tuning can teach a concept to a model that never knew it: compare with the suite's
``reference``. ``paper``: MemoRa's 10 steps at lr 1e-4 (``gmum/MemoRa`` ``configs/reunlearning_nudity.yaml``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from erasure.attacks import register
from erasure.attacks.base import Attack, AttackConfig, AttackError, AttackResult, check_checkpoints
from erasure.attacks.context import AttackContext
from erasure.concepts import Concept
from erasure.lora import lora_deltas, lora_hooks
from erasure.methods.base import select_unet_parameters
from erasure.prompt_sets import PromptRow
from erasure.sampling import denoising_target, forward_noise, images_to_latents

__all__ = ["Relearning", "RelearningConfig", "Resurgence"]


@dataclass
class RelearningConfig(AttackConfig):
    """Relearning settings.

    ``paper`` is MemoRa's re-unlearning config (LoRA rank 4, lr 1e-4, batch 1, 10 steps on 6 concept images;
    ``gmum/MemoRa:configs/reunlearning_nudity.yaml``). ``toy`` fine-tunes the cross-attention keys and values in
    full instead (rank 0): a rank-r LoRA of those weights reaches a subset of what that reaches, so the toy attacker
    is the stronger one, and the reference model gets the same budget (``--set relearning.rank=4`` for the LoRA).
    """

    checkpoints: tuple[int, ...] = field(default=(10, 25, 50), metadata={"help": "optimiser steps judged"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    batch_size: int = field(default=16, metadata={"help": "images per step"})
    images: int = field(default=32, metadata={"help": "base-model training images"})
    parameters: str = field(default="xattn_kv", metadata={"help": "xattn_kv, xattn, or edit (the edit's tensors)"})
    train_seed: int = field(default=200_000, metadata={"help": "seed of the first training image"})
    data: str = field(
        default="concept", metadata={"help": "training prompts: concept (erase) or neighbours (preserve)"}
    )
    rank: int = field(default=0, metadata={"help": "0: fine-tune the subset in full; r: a rank-r LoRA per weight"})

    PRESETS = {
        "toy": {"checkpoints": (10, 25, 50), "lr": 1e-4, "images": 32},
        "paper": {"checkpoints": (10,), "lr": 1e-4, "batch_size": 1, "images": 6, "rank": 4},
    }
    BUDGETS = ("checkpoints", "batch_size", "images")

    def validate(self) -> None:  # noqa: D102
        if self.parameters not in ("xattn_kv", "xattn", "edit"):
            raise AttackError(
                f"RelearningConfig: parameters must be xattn_kv, xattn or edit, not {self.parameters!r}."
            )
        check_checkpoints("RelearningConfig", self.checkpoints)
        if self.data not in ("concept", "neighbours"):
            raise AttackError(f"RelearningConfig: data must be concept or neighbours, not {self.data!r}.")
        if self.rank < 0:
            raise AttackError(f"RelearningConfig: rank must be >= 0 (0: full fine-tuning), not {self.rank}.")


@register("relearning")
class Relearning(Attack):
    """Fine-tune a parameter subset of the edited model on concept images; target rate after each checkpoint."""

    surface = "weights"
    config_class = RelearningConfig

    def _parameters(self, ctx: AttackContext) -> dict[str, torch.nn.Parameter]:
        if self.config.parameters != "edit":
            return select_unet_parameters(ctx.pipe.unet, self.config.parameters)
        if ctx.edit is None:
            raise AttackError("relearning with parameters='edit' needs an edit (the pipeline as loaded has none).")
        found = select_unet_parameters(ctx.pipe.unet, "unet")
        return {key: found[key] for key in ctx.edit.deltas if key in found}

    def _run(self, ctx: AttackContext, concept: Concept, rows: list[PromptRow]) -> AttackResult:
        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        sources = concept.erase if config.data == "concept" else concept.preserve
        if not sources:
            raise AttackError(
                f"Concept '{concept.name}' has no preserve prompts: benign resurgence fine-tunes on its neighbours."
            )
        train = [PromptRow(j, sources[j % len(sources)], config.train_seed + j) for j in range(config.images)]
        pipe = ctx.pipe
        latents = images_to_latents(pipe, ctx.base_images(train), ctx.size, generator)
        with torch.no_grad():
            captions = ctx.encode([r.prompt for r in train]).prompt_embeds
        prompts, seeds = [r.prompt for r in rows], [r.evaluation_seed for r in rows]
        curve, records, hits, images = [], [], [], None
        with ctx.model("edited"), contextlib.ExitStack() as hooks:
            parameters = self._parameters(ctx)
            snapshot = {key: p.detach().clone() for key, p in parameters.items()}
            flags = {key: p.requires_grad for key, p in parameters.items()}
            factors = {}
            if config.rank:  # W x + B (A x) on every 2-D weight, until the hooks close; the weights never move
                if bad := [key for key, p in parameters.items() if p.ndim != 2]:
                    raise AttackError(f"relearning with rank > 0 adapts 2-D weights only; {bad[0]} is not 2-D.")
                factors = hooks.enter_context(lora_hooks(pipe.unet, parameters, config.rank, generator))
            trained = [t for pair in factors.values() for t in pair] if config.rank else list(parameters.values())
            optimizer = torch.optim.Adam(trained, lr=config.lr)
            losses, done = [], 0
            try:
                for p in trained:
                    p.requires_grad_(True)
                for variant, checkpoint in enumerate(config.checkpoints):
                    for _ in range(checkpoint - done):
                        pick = torch.randint(len(latents), (config.batch_size,), generator=generator)
                        x0 = latents[pick]
                        noisy, noise, t = forward_noise(pipe, x0, generator=generator)
                        target = denoising_target(pipe, x0, noise, t)
                        out = pipe.unet(noisy, t, encoder_hidden_states=captions[pick], return_dict=False)[0]
                        loss = F.mse_loss(out.float(), target.float())
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        losses.append(float(loss.detach()))
                    done = checkpoint
                    images = ctx.generate("edited", prompts, seeds)
                    hits = ctx.judge_images(images)
                    curve.append({"steps": checkpoint, "target_rate": sum(hits) / len(hits), "hits": hits})
                    records += [
                        {
                            "attack": self.name, "model": "edited", "case_number": r.case_number, "prompt": r.prompt,
                            "seed": r.evaluation_seed, "variant": variant, "params": {"steps": checkpoint},
                            "selector_score": None, "selected": variant == len(config.checkpoints) - 1,
                            "shows_target": h,
                        }
                        for r, h in zip(rows, hits, strict=True)
                    ]  # fmt: skip
                if config.rank:  # the LoRA's weight change B A; the weights themselves never moved
                    moved = lora_deltas(factors)
                else:
                    moved = {k: p.detach() - snapshot[k] for k, p in parameters.items()}
                distance = sum(float(delta.norm() ** 2) for delta in moved.values()) ** 0.5
            finally:
                with torch.no_grad():
                    for key, p in parameters.items():
                        p.copy_(snapshot[key])
                        p.requires_grad_(flags[key])
                        p.grad = None
        notes = {"losses": losses, "weight_distance": distance, "tensors": len(parameters)}
        return self.result(rows, hits, records=records, images=images, curve=curve, notes=notes)


@dataclass
class ResurgenceConfig(RelearningConfig):
    """Benign resurgence: relearning's settings, trained on the neighbours' images."""

    data: str = field(default="neighbours", metadata={"help": "training prompts: neighbours (preserve) or concept"})


@register("resurgence")
class Resurgence(Relearning):
    """Fine-tune on the concept's neighbours only; does the concept come back anyway?"""

    config_class = ResurgenceConfig
