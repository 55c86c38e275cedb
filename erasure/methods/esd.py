"""ESD: Erasing Concepts from Diffusion Models (Gandikota, Materzynska, Fiotto-Kaufman, Bau; ICCV 2023; 2303.07345).

ESD fine-tunes the model ``theta`` so that, conditioned on the concept ``c``, it predicts what the frozen original
``theta*`` predicts with *negative* guidance away from ``c`` (paper Eq. 7)::

    eps_theta(x_t, c, t)  <-  eps*(x_t, t) - eta * (eps*(x_t, c, t) - eps*(x_t, t))

trained with the squared error between the two sides (:func:`esd_target` builds the right-hand side,
:meth:`ESD._erase` the loss). With an anchor prompt ``a`` (``Concept.anchor``), the unconditional ``eps*(x_t, t)``
becomes ``eps*(x_t, a, t)``: the edited model maps ``c`` to ``a`` pushed away from ``c``; the default anchor ``""``
is exactly Eq. 7. (This is our reading of an anchor; the official ``--erase_from`` option is different: it conditions
the edited model on the ``erase_from`` prompt and keeps the unconditional in the guidance term.) Paired anchors (one
per erase prompt, ``"a striped red circle"`` -> ``"a red circle"``) make the guidance term the concept's own
direction, ``eps*(x_t, c, t) - eps*(x_t, a, t)``, rather than everything the prompt draws.

Each iteration draws one erase prompt, a DDIM step ``k`` uniformly from ``{0, ..., ddim_steps - 1}`` and fresh
noise, runs ``k`` DDIM steps with guidance ``guidance`` (3 in both official scripts) to get ``x_t`` at
``t = tau_k`` (:func:`erasure.sampling.partial_ddim`, no gradients), and evaluates both sides at that ``(x_t, t)``.

Where ``x_t`` comes from (``sampler``):

* ``edited``: the model being fine-tuned, as the paper's script (``train-scripts/train-esd.py``) does. As the
  concept fades, its trajectories drift off the concept, so training follows what the edited model would generate.
* ``frozen``: the original model, as the newer diffusers script (``esd_sd.py``) does. ``x_t`` always shows the
  concept, so every iteration trains on exactly the states where the concept would appear.
* ``cached``: the ``frozen`` distribution at a fraction of its cost. Neither the frozen model's trajectories nor its
  predictions change during training, so ``trajectories`` guided DDIM runs of the frozen model (erase prompts drawn
  as above, fresh noise each) are made once, every one of their ``ddim_steps`` states ``(x_{tau_k}, tau_k)`` is kept
  (:func:`erasure.sampling.ddim_trajectory`; state ``k`` is exactly ``partial_ddim``'s ``x_t`` for step ``k`` and
  the same noise), and the right-hand side of Eq. 7 is computed once per state. Each iteration then draws a
  state uniformly -- the same law as ``frozen``'s uniform ``k`` over fresh trajectories, from a finite sample of
  them -- and costs one forward and one backward of the trained model. UNet work: ``4 * trajectories *
  ddim_steps`` batch rows once (CFG trajectory and the two frozen predictions), plus ``batch_size`` per iteration,
  against ``frozen``'s ``~ddim_steps + 3`` rows per iteration.

Presets (``preset``), filled into any of ``iterations``, ``lr``, ``eta``, ``sampler`` left unset:

* ``fast`` (default): ``diffusers``' settings with the ``cached`` sampler: 8 trajectories of 25 DDIM steps. The
  same objective and the same distribution of training states as ``diffusers``, for about a tenth of its UNet work;
  the default because it erased as the ``diffusers`` preset did wherever both were compared (README).
* ``paper``: 1000 iterations, Adam lr 1e-5, eta 1, ``edited`` trajectories -- the settings behind the paper's
  reported results; name it to reproduce the paper's ESD.
* ``diffusers``: 200 iterations, lr 5e-5, eta 1, ``frozen`` trajectories -- the authors' newer script
  (``esd_sd.py``), with a fifth of ``paper``'s iterations. That script writes the target as
  ``eps*(x_t, c) - g * (eps*(x_t, c) - eps*(x_t))`` with ``negative_guidance`` ``g = 2``; with the unconditional
  anchor this is
  ``eps*(x_t) - (g - 1) * (eps*(x_t, c) - eps*(x_t))``, i.e. Eq. 7 with ``eta = g - 1 = 1``.

Variants, by the parameters trained (registered names): ``esd-x`` cross-attention (``xattn``), ``esd-u`` everything
but cross-attention (``noxattn``), ``esd-x-strict`` cross-attention keys and values (``xattn_kv``), ``esd-all`` the
whole UNet (``unet``).

v-prediction (SD 2.x): both sides are compared in the model's own output space. For fixed ``(x_t, t)``,
``v = (eps - sigma_t x_t) / alpha_t`` is affine in ``eps``, and the target's coefficients ``(1 + eta, -eta)`` sum to
one, so the v-space target is exactly the v of the epsilon-space target; the v-space loss equals the epsilon loss
weighted by ``1 / alpha_t^2``.

Memory: no second UNet. Only the original values of the trained tensors are kept -- the snapshot that
:meth:`~erasure.methods.base.EraseMethod.apply` takes anyway, borrowed rather than copied where it lives on the
parameters' device -- and swapped into the parameters (in place, one tensor at a time) for the frozen predictions;
the conditional and anchor predictions of the frozen model share one batched forward. The training forward runs
with the UNet's gradient checkpointing (``gradient_checkpointing``, on by default): at SD 1.4 size (512 px,
float32) the activations kept for the backward drop from about 1.5 GiB to 0.45 GiB, for one extra forward per
iteration (a few percent of an iteration that also runs ~25 DDIM steps). Adam steps each trained tensor inside the
backward pass, as soon as its gradient is complete, and drops that gradient (:func:`adam_steps_in_backward`; the
same update as one Adam stepped after the backward), so the gradients never all exist at once. What remains is
Adam's two moments of the trained tensors plus their snapshot (3 copies; ESD-x at SD 1.4: 3 x 168 MiB).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import Tensor
from tqdm.auto import tqdm

from erasure.concepts import EraseRequest
from erasure.diffusion import Conditioning, encode_prompts, predict_noise, unconditional_conditioning
from erasure.methods import register
from erasure.methods.base import (
    EraseMethod,
    MethodConfig,
    NonFiniteEditError,
    gradient_checkpointing,
    select_unet_parameters,
)
from erasure.sampling import ddim_trajectory, partial_ddim

logger = logging.getLogger(__name__)

__all__ = [
    "ESD",
    "ESD_PRESETS",
    "ESDConfig",
    "adam_steps_in_backward",
    "esd_target",
    "gradient_checkpointing",
    "original_weights",
]

#: Preset name -> values of the fields left unset (see the module docstring).
ESD_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"iterations": 1000, "lr": 1e-5, "eta": 1.0, "sampler": "edited", "ddim_steps": 50},
    "diffusers": {"iterations": 200, "lr": 5e-5, "eta": 1.0, "sampler": "frozen", "ddim_steps": 50},
    "fast": {"iterations": 200, "lr": 5e-5, "eta": 1.0, "sampler": "cached", "ddim_steps": 25},
}
PARAMETER_CHOICES = ("xattn", "noxattn", "xattn_kv", "unet")
SAMPLERS = ("edited", "frozen", "cached")
ANCHOR_MODES = ("concept", "unconditional")


@dataclass
class ESDConfig(MethodConfig):
    """ESD settings. ``iterations``, ``lr``, ``eta`` and ``sampler`` default to the chosen ``preset``."""

    parameters: str = field(
        default="xattn",
        metadata={"help": "parameters trained: xattn (ESD-x), noxattn (ESD-u), xattn_kv (ESD-x-strict), unet"},
    )
    preset: str = field(
        default="fast",
        metadata={
            "help": "defaults: fast (diffusers' settings on cached trajectories; the default), paper (1000 it, "
            "lr 1e-5, eta 1, edited: the paper's own run) or diffusers (200, 5e-5, 1, frozen: esd_sd.py)"
        },
    )
    iterations: int | None = field(default=None, metadata={"help": "training iterations (default: from preset)"})
    lr: float | None = field(default=None, metadata={"help": "Adam learning rate (default: from preset)"})
    eta: float | None = field(
        default=None,
        metadata={
            "help": "negative guidance strength eta of Eq. 7 (default: from preset); esd_sd.py's "
            "--negative_guidance g is eta = g - 1"
        },
    )
    sampler: str | None = field(
        default=None,
        metadata={
            "help": "model that makes x_t: edited (paper script), frozen (newer script) or cached (frozen "
            "trajectories made once, every state reused); default: preset"
        },
    )
    guidance: float = field(default=3.0, metadata={"help": "CFG scale of the partial DDIM trajectory making x_t"})
    ddim_steps: int | None = field(
        default=None, metadata={"help": "DDIM schedule length; x_t is at a random step of it (default: preset)"}
    )
    trajectories: int = field(
        default=8, metadata={"help": "cached sampler: frozen-model DDIM runs made once and reused"}
    )
    anchor: str = field(
        default="concept",
        metadata={
            "help": "reference of the guidance: concept (its anchor prompt; '' = unconditional) or unconditional"
        },
    )
    batch_size: int = field(default=1, metadata={"help": "trajectories per iteration"})
    resolution: int | None = field(default=None, metadata={"help": "image side of x_t in pixels (default: native)"})
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "recompute UNet activations in the backward pass (about 1/3 of the memory, a little time)"},
    )

    def __post_init__(self) -> None:
        if self.preset not in ESD_PRESETS:
            raise ValueError(f"preset must be one of {', '.join(ESD_PRESETS)}, got {self.preset!r}.")
        for name, value in ESD_PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.iterations = int(self.iterations)
        self.ddim_steps = int(self.ddim_steps)
        self.lr = float(self.lr)  # "1e-5" parsed as text or an int must still be a float
        self.eta = float(self.eta)
        self.guidance = float(self.guidance)
        if self.parameters not in PARAMETER_CHOICES:
            raise ValueError(f"parameters must be one of {', '.join(PARAMETER_CHOICES)}, got {self.parameters!r}.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}.")
        if self.anchor not in ANCHOR_MODES:
            raise ValueError(f"anchor must be one of {', '.join(ANCHOR_MODES)}, got {self.anchor!r}.")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if not self.eta > 0:
            raise ValueError(
                f"eta must be > 0 (it is the strength of the guidance away from the concept), got {self.eta}."
            )
        if self.ddim_steps < 1:
            raise ValueError(f"ddim_steps must be >= 1, got {self.ddim_steps}.")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.trajectories < 1:
            raise ValueError(f"trajectories must be >= 1, got {self.trajectories}.")
        if self.resolution is not None and self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {self.resolution}.")


def esd_target(out_concept: Tensor, out_anchor: Tensor, eta: float) -> Tensor:
    """The right-hand side of Eq. 7: ``out_anchor - eta * (out_concept - out_anchor)`` (frozen-model outputs)."""
    return out_anchor - eta * (out_concept - out_anchor)


@torch.no_grad()
def _swap_contents(parameters: Sequence[Tensor], stored: Sequence[Tensor]) -> None:
    """Exchange the values of each parameter and its stored tensor, one tensor at a time (little extra memory)."""
    for parameter, other in zip(parameters, stored, strict=True):
        scratch = parameter.detach().clone()
        parameter.copy_(other)
        other.copy_(scratch)


def _swappable(stored: Tensor | None, parameter: Tensor) -> bool:
    """Whether ``stored`` can hold ``parameter``'s values for :func:`original_weights`."""
    return (
        stored is not None
        and stored.device == parameter.device
        and stored.dtype == parameter.dtype
        and stored.shape == parameter.shape
    )


@contextlib.contextmanager
def original_weights(parameters: Sequence[Tensor], originals: Sequence[Tensor]) -> Iterator[None]:
    """Run the block with ``originals`` in ``parameters``; the trained values are back on exit (also on errors).

    ``originals`` holds the trained values while the block runs, so no full second copy is ever needed.
    """
    _swap_contents(parameters, originals)
    try:
        yield
    finally:
        _swap_contents(parameters, originals)


@contextlib.contextmanager
def adam_steps_in_backward(parameters: Sequence[torch.nn.Parameter], lr: float) -> Iterator[None]:
    """While the block runs, each backward pass steps Adam on a tensor as soon as its gradient is complete.

    Adam is elementwise: one ``Adam([p])`` per tensor, stepped when ``p``'s gradient has been accumulated, makes
    the same update as one ``Adam(parameters)`` stepped after ``loss.backward()``. The gradient is dropped right
    after its step, so the trained tensors' gradients never all exist at once, and the optimiser's temporaries are
    those of one tensor rather than of all (ESD-x at SD 1.4: 168 MiB of gradients; ESD-u: 3.1 GiB). The in-place
    step is safe inside the backward because a tensor's gradient is complete only after every node that used it
    has run (a block under non-reentrant checkpointing is recomputed before any of its gradients are complete).
    What the block must keep to: one backward per step through a graph built once (no ``retain_graph``, no
    gradient accumulation over several backwards). Gradients left on the tensors are dropped on entry.

    Args:
        parameters: The trained tensors.
        lr: Adam's learning rate.
    """
    for parameter in parameters:
        parameter.grad = None  # an old gradient would be added to the first step's
    optimizers = [torch.optim.Adam([parameter], lr=lr) for parameter in parameters]

    def hook_for(optimizer: torch.optim.Optimizer) -> Any:
        def step(parameter: Tensor) -> None:
            optimizer.step()
            parameter.grad = None

        return step

    handles = [
        parameter.register_post_accumulate_grad_hook(hook_for(optimizer))
        for parameter, optimizer in zip(parameters, optimizers, strict=True)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _loss_summary(losses: list[float], points: int = 20) -> dict[str, Any]:
    """First/last/min and a curve of chunk means (at most ``points`` numbers) of a loss history."""
    chunk = max(1, -(-len(losses) // points))
    curve = [sum(losses[i : i + chunk]) / len(losses[i : i + chunk]) for i in range(0, len(losses), chunk)]
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_min": min(losses),
        "loss_mean_last_10pct": sum(tail) / len(tail),
        "loss_curve": curve,
        "loss_curve_chunk": chunk,
    }


@register("esd-all", parameters="unet")
@register("esd-x-strict", parameters="xattn_kv")
@register("esd-u", parameters="noxattn")
@register("esd-x", parameters="xattn")
class ESD(EraseMethod):
    """Erased Stable Diffusion: fine-tune towards negatively guided predictions of the frozen model (Eq. 7)."""

    name = "esd-x"
    config_class = ESDConfig
    parameter_preset = "xattn"
    config: ESDConfig

    @classmethod
    def test_config(cls) -> dict[str, Any]:
        """Two iterations on 8x8 latents with a 4-step schedule."""
        return {"iterations": 2, "ddim_steps": 4, "resolution": 16}

    def select_parameters(self, pipe: DiffusionPipeline) -> dict[str, torch.nn.Parameter]:
        """The UNet parameters of ``config.parameters``."""
        return select_unet_parameters(pipe.unet, self.config.parameters)

    def _conditionings(
        self, pipe: DiffusionPipeline, request: EraseRequest
    ) -> tuple[list[str], Conditioning, Conditioning, Conditioning]:
        """Erase prompts, their conditionings, their anchors' conditionings and the unconditional one."""
        prompts = [prompt for concept in request.concepts for prompt in concept.erase]
        anchors = [
            anchor if self.config.anchor == "concept" else ""
            for concept in request.concepts
            for anchor in concept.erase_anchors
        ]
        unconditional = unconditional_conditioning(pipe)
        concept_cond = encode_prompts(pipe, prompts)
        named = sorted({anchor for anchor in anchors if anchor})
        named_cond = encode_prompts(pipe, named) if named else None
        rows = [named_cond[named.index(anchor)] if anchor else unconditional for anchor in anchors]
        anchor_cond = Conditioning.cat(rows)
        return prompts, concept_cond, anchor_cond, unconditional

    def _fresh_state(
        self,
        pipe: DiffusionPipeline,
        concept_cond: Conditioning,
        anchor_cond: Conditioning,
        unconditional: Conditioning,
        generator: torch.Generator,
        trained: list[torch.nn.Parameter],
        frozen_values: list[Tensor],
    ) -> tuple[Tensor, Tensor, Conditioning, Tensor]:
        """One iteration's ``(x_t, t, c, target)`` from a new partial trajectory (``edited`` / ``frozen``)."""
        config = self.config
        rows = torch.randint(len(concept_cond), (config.batch_size,), generator=generator)
        step = int(torch.randint(config.ddim_steps, (1,), generator=generator))
        cond, anchor = concept_cond[rows], anchor_cond[rows]
        with torch.no_grad(), contextlib.ExitStack() as frozen:
            if config.sampler == "frozen":  # one swap covers the trajectory and the targets
                frozen.enter_context(original_weights(trained, frozen_values))
            x_t, t = partial_ddim(
                pipe, cond, step, config.ddim_steps, config.guidance, generator,
                unconditional=unconditional, size=config.resolution,
            )  # fmt: skip
            if config.sampler != "frozen":
                frozen.enter_context(original_weights(trained, frozen_values))
            # eps*(x_t, c, t) and eps*(x_t, a, t) of the original weights, in one batched forward
            both = predict_noise(pipe, torch.cat([x_t, x_t]), t, Conditioning.cat([cond, anchor]))
            out_concept, out_anchor = both.chunk(2)
            target = esd_target(out_concept.float(), out_anchor.float(), config.eta)
        return x_t, t, cond, target

    @torch.no_grad()
    def _frozen_state_bank(
        self,
        pipe: DiffusionPipeline,
        prompts: list[str],
        concept_cond: Conditioning,
        anchor_cond: Conditioning,
        unconditional: Conditioning,
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        """The ``cached`` sampler's states: every ``(x_{tau_k}, tau_k)`` of ``trajectories`` frozen DDIM runs.

        Returns ``x_t`` ``[N, C, h, w]``, ``t`` ``[N]``, ``rows`` ``[N]`` (the erase prompt of each state) and
        ``target`` (Eq. 7's right-hand side of the frozen model) for ``N = trajectories * ddim_steps`` states.
        """
        config = self.config
        rows = torch.randint(len(prompts), (config.trajectories,), generator=generator)
        states = ddim_trajectory(
            pipe, concept_cond[rows], config.ddim_steps - 1, config.ddim_steps, config.guidance, generator,
            unconditional=unconditional, size=config.resolution,
        )  # fmt: skip
        x_t = torch.cat([latents for latents, _ in states])  # step-major: state k of every trajectory, k = 0, 1, ...
        t = torch.cat([timestep.expand(config.trajectories) for _, timestep in states])
        state_rows = rows.repeat(len(states))
        targets = []
        for k, (latents, timestep) in enumerate(states):  # one batched frozen forward per DDIM step
            cond, anchor = concept_cond[rows], anchor_cond[rows]
            both = predict_noise(pipe, torch.cat([latents, latents]), timestep, Conditioning.cat([cond, anchor]))
            out_concept, out_anchor = both.chunk(2)
            targets.append(esd_target(out_concept.float(), out_anchor.float(), config.eta))
            logger.debug("ESD cached targets: step %d of %d", k + 1, len(states))
        return {"x_t": x_t, "t": t, "rows": state_rows, "target": torch.cat(targets)}

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
        config = self.config
        if images is not None:
            logger.warning("ESD makes its own noisy latents from the model; the given images are not used.")
        trained = list(parameters.values())
        # borrow apply()'s snapshot where it can be swapped with the parameters directly (same device and dtype):
        # original_weights() swaps values in and out and always swaps them back, so it is intact when we return
        frozen_values = [
            originals[key]
            if originals is not None and _swappable(originals.get(key), parameter)
            else parameter.detach().clone()
            for key, parameter in parameters.items()
        ]
        pipe.unet.requires_grad_(False)
        for parameter in trained:
            parameter.requires_grad_(True)
        prompts, concept_cond, anchor_cond, unconditional = self._conditionings(pipe, request)
        generator = torch.Generator().manual_seed(config.seed)
        bank = None
        if config.sampler == "cached":  # the parameters still hold the original weights: nothing to swap
            bank = self._frozen_state_bank(pipe, prompts, concept_cond, anchor_cond, unconditional, generator)
        losses: list[float] = []
        # the training forward keeps activations for the backward; checkpointing keeps block inputs only. Adam
        # steps each tensor inside loss.backward(), as soon as its gradient is complete (same update, less memory)
        with (
            gradient_checkpointing(pipe.unet, config.gradient_checkpointing),
            adam_steps_in_backward(trained, config.lr),
        ):
            bar = tqdm(range(config.iterations), desc=self.name, disable=not progress or None)
            for iteration in bar:
                if bank is not None:
                    picks = torch.randint(len(bank["t"]), (config.batch_size,), generator=generator)
                    x_t, t, target = bank["x_t"][picks], bank["t"][picks], bank["target"][picks]
                    cond = concept_cond[bank["rows"][picks]]
                else:
                    x_t, t, cond, target = self._fresh_state(
                        pipe, concept_cond, anchor_cond, unconditional, generator, trained, frozen_values
                    )
                prediction = predict_noise(pipe, x_t, t, cond)  # eps_theta(x_t, c, t), with gradients
                loss = torch.nn.functional.mse_loss(prediction.float(), target)
                if not torch.isfinite(loss):
                    raise NonFiniteEditError(
                        f"ESD loss became {loss.item()} at iteration {iteration}; lower lr "
                        f"(now {config.lr:g}) or use float32. The pipeline was restored."
                    )
                loss.backward()  # also the optimiser step: adam_steps_in_backward
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
        return {
            "iterations": config.iterations,
            "sampler": config.sampler,
            **({"cached_states": len(bank["t"])} if bank is not None else {}),
            "eta": config.eta,
            "lr": config.lr,
            "prompts": prompts,
            **_loss_summary(losses),
        }
