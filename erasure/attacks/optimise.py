"""Embedding-space optimisation, shared once: parametrisations, objectives, the loop, and prompt attacks on it.

The slot rows are put into prompts by :mod:`erasure.attacks.override`; this module finds them.

**Parametrisations** (:func:`make_parametrisation`) turn parameters into the ``k`` slot rows ``E in R^{k x d}``:

* ``soft``: ``E`` free (AdvUnlearn's inner attack; an embedding, not text: an upper bound on text attacks);
* ``pez``: free ``E``, forward with its projection ``P(E)_j = W_E[argmax_v cos(E_j, W_E[v])]``, the gradient taken at
  ``P(E)`` and applied to ``E`` (Wen et al. 2023, "Hard Prompts Made Easy", Alg. 1; P4D, Chin et al. 2024);
* ``simplex``: ``u_j in Delta^V`` per slot, forward with a one-hot ``s_j ~ Cat(u_j)``, ``E = s W_E``, the gradient
  w.r.t. ``s`` clipped to ``[-1, 1]`` and passed to ``u`` (straight-through), then ``u_j <- Pi_Delta(u_j)`` after each
  step; tokens are ``argmax u_j`` (UnlearnDiffAtk, Zhang et al. ECCV 2024, Sec. 4). :func:`project_simplex` is the
  exact Euclidean projection, ``w = max(v - theta, 0)`` with ``theta = (sum_{i<=rho} u_(i) - 1) / rho`` over the
  sorted ``u_(1) >= u_(2) >= ...`` and ``rho = max{j : u_(j) > (sum_{i<=j} u_(i) - 1) / j}`` (Held et al. 1974;
  Duchi et al. 2008, Fig. 1), instead of the official code's bisection;
* ``token``: one new row ``v_*`` (textual inversion, Gal et al. 2023; Concept Inversion, Pham et al. ICLR 2024).

**Objectives** (the loop is objective-agnostic; ``c'`` is the conditioning with the slot rows):

* :class:`DenoiseObjective`: ``E_{x0,t,eps} || target - f_theta*(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c') ||^2``
  with ``target = eps`` (``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` for v-prediction models): the edited model's
  own denoising loss on base-model images of the concept, no CFG (UnlearnDiffAtk Eq. 5; textual inversion);
* :class:`MatchObjective`: ``E || f_{theta*}(x_t, t, c') - f_theta(x_t, t, c) ||^2`` on a bank of ``(x_t, t,
  f_theta(x_t, t, c))`` made once with the base model (P4D, Chin et al. ICML 2024, Eq. 3): one edited forward and
  backward per sample, no base UNet in the loop;
* :class:`EmbedObjective`: ``|| tau(c') - target ||_F^2`` (text encoder only), a gradient relaxation of
  Ring-A-Bell's search for ``tau(P) + eta c_hat`` (Tsai et al. ICLR 2024, Eq. 4).

:func:`optimise` runs Adam/AdamW on the parametrisation against an objective, inside the context's ``edited`` block
when the objective needs the UNet, with every model weight frozen (restored after). :func:`prompt_attack` is the
optimise-then-judge-the-decoded-text path UnlearnDiffAtk and P4D share.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from erasure.attacks.base import AttackError
from erasure.attacks.override import EmbeddingOverride, SlotLayout, check_family, encode_layouts, slot_text
from erasure.pipeline import execution_device
from erasure.sampling import ddim_scheduler, denoising_target

logger = logging.getLogger(__name__)

__all__ = [
    "PARAMETRISATIONS",
    "DenoiseObjective",
    "EmbedObjective",
    "MatchObjective",
    "OptimisationResult",
    "Parametrisation",
    "concept_latents",
    "frozen",
    "make_parametrisation",
    "optimise",
    "project_simplex",
    "prompt_attack",
]

PARAMETRISATIONS: tuple[str, ...] = ("soft", "pez", "simplex", "token")


# --------------------------------------------------------------------------------------------------------------
# Parametrisations
# --------------------------------------------------------------------------------------------------------------


def project_simplex(values: Tensor) -> Tensor:
    """Exact Euclidean projection of each row of ``values`` onto the probability simplex (see module docstring)."""
    wide = values.double()  # float64 inside: theta is a difference of sums of up to V terms
    sorted_values, _ = torch.sort(wide, dim=-1, descending=True)
    cumulative = sorted_values.cumsum(-1) - 1
    index = torch.arange(1, values.shape[-1] + 1, device=values.device, dtype=wide.dtype)
    support = sorted_values - cumulative / index > 0
    rho = (support * index).argmax(-1, keepdim=True)  # the last j where the condition holds (0-based)
    theta = cumulative.gather(-1, rho) / (rho + 1).to(wide.dtype)
    return (wide - theta).clamp_min(0).to(values.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward ``value``; backward the incoming gradient (optionally clipped to ``[-1, 1]``) to ``source``."""

    @staticmethod
    def forward(ctx: Any, source: Tensor, value: Tensor, clip: bool) -> Tensor:
        ctx.clip = clip
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return (grad.clamp(-1.0, 1.0) if ctx.clip else grad), None, None


class Parametrisation(nn.Module):
    """``k`` slot rows from parameters: :meth:`rows` for the forward, :meth:`project_` after each step."""

    kind = "soft"

    def __init__(self, table: Tensor, vocab: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.detach().clone(), persistent=False)
        self.register_buffer("vocab", vocab.clone(), persistent=False)

    def rows(self, generator: torch.Generator | None = None) -> Tensor:
        """The ``[k, d]`` rows of this step."""
        raise NotImplementedError

    def project_(self) -> None:
        """Bring the parameters back to their feasible set (after an optimiser step)."""

    def token_ids(self) -> Tensor:
        """The ``[k]`` vocabulary ids the parameters stand for (nearest by cosine for continuous ones)."""
        rows = self.rows().detach()
        sims = F.normalize(rows, dim=-1) @ F.normalize(self.table[self.vocab], dim=-1).T
        return self.vocab[sims.argmax(-1)]


class SoftRows(Parametrisation):
    """Free vectors ``E``."""

    kind = "soft"

    def __init__(self, table: Tensor, vocab: Tensor, init_ids: Tensor) -> None:
        super().__init__(table, vocab)
        self.weight = nn.Parameter(self.table[init_ids].clone())

    def rows(self, generator: torch.Generator | None = None) -> Tensor:  # noqa: D102
        return self.weight


class PezRows(SoftRows):
    """Free vectors, forward with their nearest vocabulary rows, gradient at the projection applied to ``E``."""

    kind = "pez"

    def rows(self, generator: torch.Generator | None = None) -> Tensor:  # noqa: D102
        with torch.no_grad():
            sims = F.normalize(self.weight, dim=-1) @ F.normalize(self.table[self.vocab], dim=-1).T
            projected = self.table[self.vocab[sims.argmax(-1)]]
        return _StraightThrough.apply(self.weight, projected, False)


class SimplexRows(Parametrisation):
    """One probability vector per slot over the vocabulary; forward with a sampled one-hot (straight-through)."""

    kind = "simplex"

    def __init__(self, table: Tensor, vocab: Tensor, k: int, init_ids: Tensor | None = None) -> None:
        super().__init__(table, vocab)
        probabilities = torch.full((k, len(vocab)), 1.0 / len(vocab))
        if init_ids is not None:  # start at the given tokens' vertices
            where = (vocab[None, :] == init_ids[:, None]).float()
            probabilities = where / where.sum(-1, keepdim=True).clamp_min(1)
        self.weight = nn.Parameter(probabilities)

    def rows(self, generator: torch.Generator | None = None) -> Tensor:  # noqa: D102
        with torch.no_grad():
            drawn = torch.multinomial(self.weight.detach().clamp_min(0).cpu(), 1, generator=generator).squeeze(-1)
            one_hot = F.one_hot(drawn, len(self.vocab)).to(self.weight)
        return _StraightThrough.apply(self.weight, one_hot, True) @ self.table[self.vocab]

    def project_(self) -> None:  # noqa: D102
        with torch.no_grad():
            self.weight.copy_(project_simplex(self.weight))

    def token_ids(self) -> Tensor:  # noqa: D102
        return self.vocab[self.weight.detach().argmax(-1)]


class TokenRow(SoftRows):
    """One new row ``v_*`` (textual inversion): a single soft vector."""

    kind = "token"


def make_parametrisation(
    kind: str, table: Tensor, vocab: Tensor, k: int, init_ids: Tensor | None = None, generator=None
) -> Parametrisation:
    """A parametrisation of ``k`` slot rows (``token``: ``k = 1``); random vocabulary tokens when no init ids.

    Raises:
        AttackError: On an unknown kind.
    """
    if kind not in PARAMETRISATIONS:
        raise AttackError(f"Unknown parametrisation {kind!r}; choose from {', '.join(PARAMETRISATIONS)}.")
    if kind == "token":
        k = 1
    if init_ids is None and kind != "simplex":
        init_ids = vocab[torch.randint(len(vocab), (k,), generator=generator)]
    if init_ids is not None:
        init_ids = torch.as_tensor(init_ids, dtype=torch.long).reshape(-1)[:k]
        if len(init_ids) != k:
            raise AttackError(f"need {k} initial token ids, got {len(init_ids)}.")
    if kind == "simplex":
        return SimplexRows(table, vocab, k, init_ids)
    return {"soft": SoftRows, "pez": PezRows, "token": TokenRow}[kind](table, vocab, init_ids)


# --------------------------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------------------------


def _abar(pipe: Any) -> Tensor:
    return ddim_scheduler(pipe).alphas_cumprod


def _unet(pipe: Any, latents: Tensor, timesteps: Tensor, embeds: Tensor) -> Tensor:
    return pipe.unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]


@dataclass
class DenoiseObjective:
    """The edited model's denoising loss on clean latents (UnlearnDiffAtk, textual inversion); see module doc.

    Attributes:
        latents: ``[M, C, h, w]`` clean latents ``x0`` (VAE-scaled) of base-model images of the concept.
        layout_index: ``[M]``: which layout (prompt) conditions each latent.
        batch_size: Samples per step.
        timesteps: ``None`` draws ``t`` uniformly each step; a ``[S]`` schedule uses ``timesteps[step * S // steps]``
            for every sample of a step (UnlearnDiffAtk's ascending blocks).
    """

    latents: Tensor
    layout_index: Tensor
    batch_size: int = 1
    timesteps: Tensor | None = None
    needs_unet: bool = True

    def loss(self, pipe: Any, embeds: Tensor, step: int, steps: int, generator: torch.Generator) -> Tensor:
        """The step's loss."""
        abar_all = _abar(pipe)
        index = torch.randint(len(self.latents), (self.batch_size,), generator=generator)
        if self.timesteps is None:
            t = torch.randint(len(abar_all), (self.batch_size,), generator=generator)
        else:
            t = self.timesteps[min(step * len(self.timesteps) // max(steps, 1), len(self.timesteps) - 1)]
            t = torch.full((self.batch_size,), int(t), dtype=torch.long)
        x0 = self.latents[index]
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        abar = abar_all[t].to(x0).view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        target = denoising_target(pipe, x0, noise, t)
        output = _unet(pipe, x_t, t.to(x0.device), embeds[self.layout_index[index]])
        return F.mse_loss(output.float(), target.float())


@dataclass
class MatchObjective:
    """Match the base model's prediction for the concept prompt (P4D); see module doc.

    Attributes:
        noisy: ``[M, C, h, w]`` ``x_t``.
        timesteps: ``[M]`` their ``t``.
        targets: ``[M, C, h, w]`` ``f_theta(x_t, t, c)`` of the base model.
        layout_index: ``[M]`` layout of each sample.
        batch_size: Samples per step.
    """

    noisy: Tensor
    timesteps: Tensor
    targets: Tensor
    layout_index: Tensor
    batch_size: int = 1
    needs_unet: bool = True

    def loss(self, pipe: Any, embeds: Tensor, step: int, steps: int, generator: torch.Generator) -> Tensor:
        """The step's loss."""
        index = torch.randint(len(self.noisy), (self.batch_size,), generator=generator)
        output = _unet(pipe, self.noisy[index], self.timesteps[index], embeds[self.layout_index[index]])
        return F.mse_loss(output.float(), self.targets[index].float())

    @classmethod
    def bank(
        cls, ctx: Any, latents: Tensor, prompts: Sequence[str], layout_index: Tensor, count: int, batch_size: int,
        generator: torch.Generator,
    ) -> MatchObjective:  # fmt: skip
        """``count`` triples: ``x_t`` forward-noised from ``latents`` at uniform ``t``, and the base prediction.

        Args:
            ctx: The attack context (the base model is used).
            latents: ``[M, C, h, w]`` clean latents of base images; sample ``i`` uses ``latents[i % M]``.
            prompts: The concept prompt ``c`` of each latent (``P`` in P4D's Eq. 3).
            layout_index: ``[M]`` layout of each latent.
            count: Bank size.
            batch_size: Samples per optimisation step.
            generator: Seeds ``t`` and the noise.
        """
        abar_all = _abar(ctx.pipe)
        pick = torch.arange(count) % len(latents)
        t = torch.randint(len(abar_all), (count,), generator=generator)
        x0 = latents[pick]
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        abar = abar_all[t].to(x0).view(-1, 1, 1, 1)
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        targets = []
        with ctx.model("base") as pipe, torch.no_grad():
            conditioning = ctx.encode(list(prompts)).prompt_embeds
            for start in range(0, count, ctx.batch_size):
                stop = min(start + ctx.batch_size, count)
                cond = conditioning[pick[start:stop]]
                targets.append(_unet(pipe, noisy[start:stop], t[start:stop].to(x0.device), cond))
        return cls(noisy, t.to(x0.device), torch.cat(targets), layout_index[pick], batch_size)


@dataclass
class EmbedObjective:
    """Match target text embeddings: ``|| tau(c') - target ||^2`` per layout (Ring-A-Bell's target); no UNet."""

    targets: Tensor
    needs_unet: bool = False

    def loss(self, pipe: Any, embeds: Tensor, step: int, steps: int, generator: torch.Generator) -> Tensor:
        """The step's loss."""
        return F.mse_loss(embeds.float(), self.targets.to(embeds).float())


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen(pipe: Any) -> Iterator[None]:
    """Every pipeline module's parameters with ``requires_grad=False`` for the block, flags restored after."""
    modules = [m for m in pipe.components.values() if isinstance(m, nn.Module)]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@dataclass
class OptimisationResult:
    """What :func:`optimise` returns.

    Attributes:
        losses: The loss of every step.
        token_ids: The final ``[k]`` token ids (for ``token``/``soft``: the nearest ones, for display).
        rows: The final ``[k, d]`` rows (detached): the soft vectors, or the rows of the chosen tokens.
        evaluations: ``[{step, score, token_ids}]`` from the ``evaluate`` callback.
        best: The evaluation with the highest score, or ``None``.
        snapshots: ``{step: [k, d] rows}`` after each of the ``snapshot_steps`` (a budget curve: what the
            optimisation had found after that many steps; the last step's rows are ``rows``).
    """

    losses: list[float]
    token_ids: Tensor
    rows: Tensor
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    snapshots: dict[int, Tensor] = field(default_factory=dict)


def _current_rows(parametrisation: Parametrisation) -> Tensor:
    """The rows the parametrisation stands for now (continuous ones as they are, discrete ones as vocabulary rows).

    Draws no random numbers, so taking them mid-run leaves the rest of the run unchanged.
    """
    with torch.no_grad():
        if parametrisation.kind in ("soft", "token"):
            return parametrisation.rows().detach().cpu().clone()
        ids = parametrisation.token_ids()
        return parametrisation.table[ids].detach().cpu().clone()


def optimise(
    ctx: Any,
    layouts: Sequence[SlotLayout],
    parametrisation: Parametrisation,
    objective: Any,
    *,
    steps: int,
    lr: float,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    generator: torch.Generator | None = None,
    evaluate: Callable[[Parametrisation], float] | None = None,
    eval_every: int = 0,
    snapshot_steps: Sequence[int] = (),
) -> OptimisationResult:
    """Minimise ``objective`` over the slot rows of ``parametrisation``, shared by every layout.

    Each step: rows from the parametrisation, every layout encoded with them (gradients flow through the text
    encoder to the rows), the objective's loss, one Adam (L2 weight decay, as UnlearnDiffAtk) or AdamW (decoupled,
    as P4D) step, then the parametrisation's projection. With ``evaluate`` and ``eval_every``, ``evaluate(param)``
    scores the current state every ``eval_every`` steps (selector score; higher is better) and the best is kept.
    ``snapshot_steps`` keeps the rows after each of those steps (``snapshots``), so one run gives the whole budget
    curve: the same optimiser state throughout, the same final rows as a run without snapshots.

    Raises:
        AttackError: On ``steps < 1``, a snapshot step outside ``1..steps``, a bad optimiser name, or an SDXL
            pipeline.
    """
    if steps < 1:
        raise AttackError("optimise needs at least one step (a budget of 0 does nothing).")
    if bad := [s for s in snapshot_steps if not 1 <= int(s) <= int(steps)]:
        raise AttackError(f"snapshot step {bad[0]} lies outside the run's 1..{int(steps)} steps.")
    if optimizer not in ("adam", "adamw"):
        raise AttackError(f"optimizer must be adam or adamw, got {optimizer!r}.")
    check_family(ctx.pipe)
    generator = generator or torch.Generator().manual_seed(0)
    device = execution_device(ctx.pipe)
    parametrisation = parametrisation.to(device)
    cls = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    opt = cls(parametrisation.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    evaluations: list[dict[str, Any]] = []
    snapshots: dict[int, Tensor] = {}
    snapshot_steps = {int(s) for s in snapshot_steps}
    model = ctx.model("edited") if objective.needs_unet else contextlib.nullcontext()
    with model, frozen(ctx.pipe), EmbeddingOverride(ctx.pipe.text_encoder) as override:
        for step in range(int(steps)):
            rows = parametrisation.rows(generator)
            embeds = encode_layouts(ctx.pipe, override, layouts, rows)
            loss = objective.loss(ctx.pipe, embeds, step, int(steps), generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            parametrisation.project_()
            losses.append(float(loss.detach()))
            if step + 1 in snapshot_steps:
                snapshots[step + 1] = _current_rows(parametrisation)
            if evaluate is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
                with torch.no_grad():
                    score = float(evaluate(parametrisation))
                evaluations.append(
                    {"step": step + 1, "score": score, "token_ids": parametrisation.token_ids().tolist()}
                )
    best = max(evaluations, key=lambda e: e["score"]) if evaluations else None
    with torch.no_grad():
        ids = parametrisation.token_ids().cpu()
    return OptimisationResult(losses, ids, _current_rows(parametrisation), evaluations, best, snapshots)


# --------------------------------------------------------------------------------------------------------------
# Prompt attacks on the shared loop (UnlearnDiffAtk, P4D)
# --------------------------------------------------------------------------------------------------------------


def concept_latents(ctx: Any, rows: Sequence[Any]) -> Tensor:
    """VAE latents (posterior means, scaled) of the base model's images of ``rows`` (cached images)."""
    from erasure.sampling import images_to_latents

    return images_to_latents(ctx.pipe, ctx.base_images(rows), ctx.size, sample=False)


def prompt_attack(
    ctx: Any,
    attack: str,
    rows: Sequence[Any],
    layouts: Sequence[SlotLayout],
    parametrisation: Parametrisation,
    objective: Any,
    *,
    steps: int,
    lr: float,
    optimizer: str,
    weight_decay: float,
    eval_every: int,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Optimise tokens shared by every row's layout, then judge the decoded text prompts on the edited model.

    ``layouts[i]`` is row ``i``'s layout. Every ``eval_every`` steps the current tokens are decoded, the edited
    model generates the rows, and the selector's mean score is recorded; the best evaluation's tokens (the final
    tokens without evaluations) are the attack's. The reported images come from the decoded *text* (what a user
    can type; BPE may re-tokenise it differently from the optimised ids, as in PEZ and UnlearnDiffAtk).

    Returns:
        ``{hits, images, records, prompts (texts), token_ids, losses, evaluations}``.
    """
    tokenizer = ctx.pipe.tokenizer
    seeds = [row.evaluation_seed for row in rows]

    def texts(ids: Tensor) -> list[str]:
        return [slot_text(tokenizer, layout, ids) for layout in layouts]

    def evaluate(param: Parametrisation) -> float:
        images = ctx.generate("edited", texts(param.token_ids().cpu()), seeds)
        return float(sum(ctx.select_scores(images)) / len(images))

    unique = list(dict.fromkeys(id(layout) for layout in layouts))
    index = torch.tensor([unique.index(id(layout)) for layout in layouts])
    distinct = [next(layout for layout in layouts if id(layout) == key) for key in unique]
    if hasattr(objective, "layout_index"):  # row index -> index of the row's distinct layout
        objective.layout_index = index[objective.layout_index]
    result = optimise(
        ctx, distinct, parametrisation, objective, steps=steps, lr=lr, optimizer=optimizer,
        weight_decay=weight_decay, generator=generator, evaluate=evaluate if eval_every else None,
        eval_every=eval_every,
    )  # fmt: skip
    ids = torch.tensor(result.best["token_ids"]) if result.best else result.token_ids
    prompts = texts(ids)
    images = ctx.generate("edited", prompts, seeds)
    hits = ctx.judge_images(images)
    scores = ctx.select_scores(images)
    records = [
        {
            "attack": attack, "model": "edited", "case_number": row.case_number, "prompt": prompt,
            "seed": row.evaluation_seed, "variant": 0, "params": {"token_ids": ids.tolist()},
            "selector_score": score, "selected": True, "shows_target": hit,
        }
        for row, prompt, score, hit in zip(rows, prompts, scores, hits, strict=True)
    ]  # fmt: skip
    return {
        "hits": hits, "images": images, "records": records, "prompts": prompts, "token_ids": ids.tolist(),
        "losses": result.losses, "evaluations": result.evaluations,
    }  # fmt: skip
