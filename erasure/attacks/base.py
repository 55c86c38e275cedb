"""What every attack and probe shares: configs with presets, the base/edited context, results and the cost meter.

An attack is an :class:`AttackConfig` subclass (fields with ``help``, a ``toy`` and a ``paper`` preset) plus an
:class:`Attack` subclass implementing :meth:`Attack._run`. :meth:`Attack.run` does the common work: checks the
concept, meters the cost, and stamps the result.

:class:`AttackContext` holds one pipeline and the edit under test. ``ctx.model("base")`` and
``ctx.model("edited")`` are ``with`` blocks in which the pipeline holds that model's weights: the edit is applied
(:meth:`erasure.edit.Edit.apply_to`) only inside an ``edited`` block and reverted bit for bit when it ends, also on
failure, so no second UNet is needed and the pipeline always ends as it was given. Every image an attack reports is
judged by ``ctx.judge`` (``images -> list[bool]``: shows the target); choices made inside a search (best variant,
early stop) use ``ctx.selector`` (``images -> list[float]``, higher = more target-like). The two must differ: a
search that selects with the judge that then scores it reports "exists a variant the judge accepts", inflated by
the judge's own false positives (pitfall 1 of UnlearnDiffAtk's and WhenAreConceptsErased's code); the context
refuses it unless ``allow_selector_as_judge=True``, and the result records it.

Every image is judged on the concept's held-out ``evaluate`` prompts, image ``j`` of a prompt with seed
``base_seed + j`` (the rows :func:`erasure.prompt_sets.rows_from_request` makes, so ``erasure evaluate``'s images
are the same ones), through one sampler (:mod:`erasure.attacks.sampler`), so base, edited and attacked columns
differ only by what the attack changed.

:class:`CostMeter` counts the work: UNet forward calls and batch rows, UNet backward calls and rows, text-encoder
passes (forward and backward) and seconds, by forward hooks on the modules (a backward is counted when the gradient
reaches the module's output), so attacks compare by budget, not only by success.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from erasure.concepts import Concept, EraseRequest
from erasure.diffusion import Conditioning, encode_prompts
from erasure.edit import Edit
from erasure.prompt_sets import PromptRow, rows_from_request

logger = logging.getLogger(__name__)

__all__ = [
    "MODELS",
    "SURFACES",
    "Attack",
    "AttackConfig",
    "AttackContext",
    "AttackError",
    "AttackResult",
    "CostMeter",
    "Judge",
    "Selector",
    "evaluation_rows",
    "replace_words",
    "token_embedding",
]

#: What an attack changes to bring the concept back (the verdict lists the surfaces that reach it).
SURFACES: tuple[str, ...] = ("text", "embedding", "weights", "trajectory")
#: The two models of a context.
MODELS: tuple[str, ...] = ("base", "edited")

Judge = Callable[[np.ndarray], Sequence[bool]]
Selector = Callable[[np.ndarray], Sequence[float]]


class AttackError(ValueError):
    """Bad input to an attack: the message names what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AttackConfig:
    """Settings of an attack. Subclasses add fields (``metadata={"help": ...}``) and fill :attr:`PRESETS`.

    ``PRESETS["paper"]`` holds the official values (for GPUs), ``PRESETS["toy"]`` a budget that fits a 2-core CPU
    on the toy world; a preset only lists the fields it sets, the rest keep their defaults.
    """

    seed: int = field(default=0, metadata={"help": "seed of every random choice of the attack"})
    control: bool = field(
        default=False,
        metadata={"help": "also run the attack on the base model (the probe-matched ceiling of the gap closed)"},
    )

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"toy": {}, "paper": {}}
    #: Fields that are budgets (iterations, variants): each must be at least 1.
    BUDGETS: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name in self.BUDGETS:
            value = getattr(self, name)
            values = value if isinstance(value, tuple | list) else (value,)
            if isinstance(value, tuple | list) and not value:
                raise AttackError(f"{type(self).__name__}: '{name}' is empty; an attack with no budget does nothing.")
            for item in values:
                if not isinstance(item, int | float) or item < 1:
                    raise AttackError(
                        f"{type(self).__name__}: '{name}' must be at least 1 (got {value!r}); an attack with a "
                        "budget of 0 does nothing."
                    )
        self.validate()

    def validate(self) -> None:
        """Subclass hook: raise :class:`AttackError` for bad values."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-friendly dict."""
        return {key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttackConfig:
        """Build from a dict; unknown keys raise :class:`AttackError` naming the known ones."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise AttackError(f"{cls.__name__} has no option(s) {', '.join(unknown)}; known: {', '.join(known)}.")
        values = {}
        for key, value in data.items():
            default = known[key].default
            values[key] = tuple(value) if isinstance(value, list) and isinstance(default, tuple) else value
        return cls(**values)

    @classmethod
    def from_preset(cls, preset: str = "toy", **overrides: Any) -> AttackConfig:
        """The preset's values, then ``overrides``.

        Raises:
            AttackError: On an unknown preset or option.
        """
        if preset not in cls.PRESETS:
            raise AttackError(f"{cls.__name__} has no preset {preset!r}; choose from {', '.join(cls.PRESETS)}.")
        return cls.from_dict(cls.PRESETS[preset] | overrides)


# --------------------------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------------------------


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, tuple | list):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    sample = getattr(value, "sample", None)
    return sample if isinstance(sample, Tensor) else None


def token_embedding(text_encoder: torch.nn.Module) -> torch.nn.Embedding:
    """The token-embedding table of a CLIP text encoder (transformers 4 and 5 layouts).

    Raises:
        AttackError: If none is found.
    """
    for path in ("text_model.embeddings.token_embedding", "embeddings.token_embedding"):
        module: Any = text_encoder
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, torch.nn.Embedding):
            return module
    embedding = text_encoder.get_input_embeddings() if hasattr(text_encoder, "get_input_embeddings") else None
    if isinstance(embedding, torch.nn.Embedding):
        return embedding
    raise AttackError(f"{type(text_encoder).__name__} has no token-embedding table this library can hook.")


class CostMeter:
    """Counts UNet and text-encoder work while active (a ``with`` block), by hooks on the modules.

    Counted per module (``unet``, ``text_encoder``; SDXL's ``text_encoder_2`` adds to the text-encoder counts):
    ``*_forwards`` (calls), ``*_forward_rows`` (batch rows: a CFG step of ``B`` images is one call of ``2B``
    rows), ``*_backwards`` and ``*_backward_rows`` (a backward reached the module's output; for the text encoder,
    its token-embedding output, where attacks put their gradients), and ``seconds`` of wall time. Meters nest:
    each counts everything run inside its block.
    """

    COUNTERS: ClassVar[tuple[str, ...]] = tuple(
        f"{module}_{kind}"
        for module in ("unet", "text_encoder")
        for kind in ("forwards", "forward_rows", "backwards", "backward_rows")
    )

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.counts: dict[str, float] = dict.fromkeys(self.COUNTERS, 0)
        self.counts["seconds"] = 0.0
        self._handles: list[Any] = []
        self._started: float | None = None

    def _count(self, module: str, kind: str, rows: int) -> None:
        self.counts[f"{module}_{kind}s"] += 1
        self.counts[f"{module}_{kind}_rows"] += int(rows)

    def _forward_hook(self, module_name: str, watch_output: bool) -> Callable[..., None]:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            first = _first_tensor(list(args) + list(kwargs.values()))
            rows = int(first.shape[0]) if first is not None and first.ndim else 1
            self._count(module_name, "forward", rows)
            out = _first_tensor(output)
            if watch_output and out is not None and out.requires_grad:
                out.register_hook(lambda grad: self._count(module_name, "backward", grad.shape[0]) or None)

        return hook

    def _embedding_hook(self, module: Any, args: tuple, output: Any) -> None:
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(lambda grad: self._count("text_encoder", "backward", grad.shape[0]) or None)

    def __enter__(self) -> CostMeter:
        self._handles.append(self.pipe.unet.register_forward_hook(self._forward_hook("unet", True), with_kwargs=True))
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(self.pipe, name, None)
            if encoder is None:
                continue
            self._handles.append(
                encoder.register_forward_hook(self._forward_hook("text_encoder", False), with_kwargs=True)
            )
            self._handles.append(token_embedding(encoder).register_forward_hook(self._embedding_hook))
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._started is not None:
            self.counts["seconds"] += time.perf_counter() - self._started
            self._started = None

    def summary(self) -> dict[str, float]:
        """The counts so far (seconds include the running block)."""
        counts = dict(self.counts)
        if self._started is not None:
            counts["seconds"] += time.perf_counter() - self._started
        return {key: (round(value, 3) if key == "seconds" else int(value)) for key, value in counts.items()}


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------


def evaluation_rows(concept: Concept, images_per_prompt: int = 1, base_seed: int = 0) -> list[PromptRow]:
    """The held-out rows every attack is judged on: each ``evaluate`` prompt x ``images_per_prompt`` seeds.

    The same rows (case numbers, seeds) as :func:`erasure.prompt_sets.rows_from_request`'s erased and generality
    rows, so the base and edited columns are the images ``erasure evaluate`` makes.

    Raises:
        AttackError: If the concept has no ``evaluate`` prompts.
    """
    if not concept.evaluate:
        raise AttackError(
            f"Concept '{concept.name}' has no evaluate prompts; attacks are judged on held-out prompts: add an "
            "'evaluate' list to its concept file."
        )
    if images_per_prompt < 1:
        raise AttackError(f"images_per_prompt must be at least 1, got {images_per_prompt}.")
    rows = rows_from_request(EraseRequest((concept,)), images_per_prompt, base_seed)
    return [row for row in rows if row.row_type in ("erased", "generality")]


def replace_words(prompt: str, words: Sequence[str], replacement: str) -> str:
    """``prompt`` with each whole-word, case-insensitive occurrence of ``words`` (longest first) replaced."""
    for word in sorted(words, key=len, reverse=True):
        prompt = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", replacement, prompt, flags=re.IGNORECASE)
    return " ".join(prompt.split())


def mentions(prompt: str, words: Sequence[str]) -> bool:
    """Whether ``prompt`` names one of ``words`` as whole words (any case)."""
    return any(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", prompt, flags=re.IGNORECASE) for w in words)


# --------------------------------------------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------------------------------------------


class AttackContext:
    """The pipeline, the edit under test, the judge and selector, and the generation settings of a probe.

    Args:
        pipe: The base pipeline (as loaded; it ends every call with these weights).
        edit: The edit under test; ``None`` tests the pipeline as loaded (edited = base).
        judge: ``images -> list[bool]``: each uint8 ``(H, W, 3)`` image shows the target. Scores every
            reported image.
        selector: ``images -> list[float]``, higher = more target-like; used inside searches only.
        allow_selector_as_judge: Permit ``selector is judge`` (the result then says so).
        steps: DDIM steps of every generation.
        guidance: CFG scale of every generation.
        images_per_prompt: Seeds per evaluate prompt (image ``j`` has seed ``base_seed + j``).
        base_seed: Seed of each prompt's first image.
        batch_size: Images per sampler call.
        size: Image side (the model's native size by default).
        scale: Strength at which the edit is applied.

    Raises:
        AttackError: If judge or selector is not callable, or they are the same without the flag.
        erasure.edit.FingerprintMismatchError: If the edit was made from another base model.
    """

    def __init__(
        self,
        pipe: Any,
        edit: Edit | None,
        judge: Judge,
        selector: Selector,
        *,
        allow_selector_as_judge: bool = False,
        steps: int = 25,
        guidance: float = 7.5,
        images_per_prompt: int = 1,
        base_seed: int = 0,
        batch_size: int = 16,
        size: int | None = None,
        scale: float = 1.0,
    ) -> None:
        if not callable(judge) or not callable(selector):
            raise AttackError("judge and selector must both be callables taking a uint8 (N, H, W, 3) image array.")
        if selector is judge and not allow_selector_as_judge:
            raise AttackError(
                "The selector is the judge: a search that selects with the judge it is scored by reports the judge's "
                "false positives as successes. Pass a different selector, or allow_selector_as_judge=True "
                "(--allow-same-judge) to do it anyway (it is recorded)."
            )
        if int(steps) < 1 or int(batch_size) < 1 or int(images_per_prompt) < 1:
            raise AttackError("steps, batch_size and images_per_prompt must each be at least 1.")
        if edit is not None:
            edit.check_base(pipe)
        self.pipe = pipe
        self.edit = edit
        self.judge = judge
        self.selector = selector
        self.selector_is_judge = selector is judge
        self.steps = int(steps)
        self.guidance = float(guidance)
        self.images_per_prompt = int(images_per_prompt)
        self.base_seed = int(base_seed)
        self.batch_size = int(batch_size)
        self.size = size
        self.scale = float(scale)
        self._state = "base"
        self._base_cache: dict[tuple[str, int], np.ndarray] = {}

    def settings(self) -> dict[str, Any]:
        """The generation settings, for results."""
        return {
            "steps": self.steps,
            "guidance": self.guidance,
            "images_per_prompt": self.images_per_prompt,
            "base_seed": self.base_seed,
            "size": self.size,
            "edit_scale": self.scale,
            "selector_is_judge": self.selector_is_judge,
            "sampler": "ddim",
        }

    # -- models --------------------------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """Which model the pipeline holds now: ``base`` or ``edited``."""
        return self._state

    @contextlib.contextmanager
    def model(self, which: str) -> Iterator[Any]:
        """The pipeline holding ``which`` model's weights for the block (``base`` or ``edited``); yields it.

        Blocks nest: ``model("base")`` inside an ``edited`` block reverts the edit for its duration and applies it
        again after. The edit is applied exactly around its use and reverted bit for bit, also on failure.
        """
        if which not in MODELS:
            raise AttackError(f"model must be one of {', '.join(MODELS)}, got {which!r}.")
        if which == self._state or self.edit is None:
            previous = self._state
            self._state = which
            try:
                yield self.pipe
            finally:
                self._state = previous
            return
        if which == "edited":
            self.edit.apply_to(self.pipe, scale=self.scale, check=False)  # checked once, in __init__
        else:
            self.edit.revert(self.pipe)
        self._state = which
        try:
            yield self.pipe
        finally:
            if which == "edited":
                self.edit.revert(self.pipe)
                self._state = "base"
            else:
                self.edit.apply_to(self.pipe, scale=self.scale, check=False)
                self._state = "edited"

    def meter(self) -> CostMeter:
        """A fresh :class:`CostMeter` on this pipeline (enter it with ``with``)."""
        return CostMeter(self.pipe)

    # -- generation ----------------------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Prompt embeddings of the pipeline's text encoder (which no edit of a UNet changes)."""
        return encode_prompts(self.pipe, list(prompts))

    def generate(
        self,
        which: str,
        conditioning: Conditioning | Sequence[str],
        seeds: Sequence[int],
        **sample_kwargs: Any,
    ) -> np.ndarray:
        """Images of model ``which`` from prompts (or embeddings) and seeds, in batches, via :func:`sample`.

        Args:
            which: ``base`` or ``edited``.
            conditioning: One prompt, or one embedding row, per seed.
            seeds: One seed per image.
            **sample_kwargs: Passed to :func:`erasure.attacks.sampler.sample` (``eta``, ``on_step`` ...).

        Returns:
            uint8 ``(N, H, W, 3)``.
        """
        from erasure.attacks.sampler import decode, sample, seeded_noise

        if len(conditioning) != len(seeds):
            raise AttackError(f"got {len(conditioning)} prompts for {len(seeds)} seeds; give one per image.")
        images = []
        with self.model(which) as pipe:
            for start in range(0, len(seeds), self.batch_size):
                stop = min(start + self.batch_size, len(seeds))
                part = conditioning[start:stop]
                cond = self.encode(part) if not isinstance(part, Conditioning) else part
                latents, generators = seeded_noise(pipe, seeds[start:stop], self.size)
                settings = {"steps": self.steps, "guidance": self.guidance} | sample_kwargs
                latents = sample(pipe, cond, latents, generators=generators, **settings)
                images.append(decode(pipe, latents))
        return np.concatenate(images)

    def base_images(self, rows: Sequence[PromptRow]) -> np.ndarray:
        """The base model's images of ``rows`` (prompt, seed), generated once per context and cached."""
        missing = [row for row in rows if (row.prompt, row.evaluation_seed) not in self._base_cache]
        missing = list({(r.prompt, r.evaluation_seed): r for r in missing}.values())
        if missing:
            made = self.generate("base", [r.prompt for r in missing], [r.evaluation_seed for r in missing])
            for row, image in zip(missing, made, strict=True):
                self._base_cache[(row.prompt, row.evaluation_seed)] = image
        return np.stack([self._base_cache[(row.prompt, row.evaluation_seed)] for row in rows])

    # -- judging -------------------------------------------------------------------------------------------------

    def judge_images(self, images: np.ndarray) -> list[bool]:
        """The judge's verdicts (one bool per image); checks the judge's answer."""
        verdicts = list(self.judge(images))
        if len(verdicts) != len(images):
            raise AttackError(f"The judge returned {len(verdicts)} verdicts for {len(images)} images.")
        return [bool(v) for v in verdicts]

    def select_scores(self, images: np.ndarray) -> list[float]:
        """The selector's scores (one float per image, higher = more target-like)."""
        scores = [float(s) for s in self.selector(images)]
        if len(scores) != len(images):
            raise AttackError(f"The selector returned {len(scores)} scores for {len(images)} images.")
        return scores

    def best_of(
        self,
        rows: Sequence[PromptRow],
        variants: Sequence[np.ndarray],
        params: Sequence[Mapping[str, Any] | Sequence[Mapping[str, Any]]],
        *,
        model: str,
        attack: str,
    ) -> tuple[list[bool], np.ndarray, list[dict[str, Any]]]:
        """Pick each row's best variant by the selector, then judge only the picked images.

        Args:
            rows: The evaluation rows.
            variants: ``V`` arrays of ``len(rows)`` images each (variant ``v`` of row ``i`` is ``variants[v][i]``).
            params: Per variant, one dict describing it (recorded), or one dict per row; a ``prompt`` or ``seed``
                key overrides the row's in the record.
            model: ``base`` or ``edited`` (recorded).
            attack: The attack's name (recorded).

        Returns:
            ``(hits, picked images, records)``: one hit per row (the judge on the picked variant, ASR@V), and one
            record per (variant, row), with its selector score, whether it was picked, and the judge's verdict on
            the picked ones.
        """
        if len(variants) != len(params) or not variants:
            raise AttackError("best_of needs one parameter dict per variant, and at least one variant.")
        scores = np.array([self.select_scores(images) for images in variants])  # (V, N)
        best = scores.argmax(0)  # ties: the first variant
        picked = np.stack([variants[v][i] for i, v in enumerate(best)])
        hits = self.judge_images(picked)
        records = []
        for v, shared in enumerate(params):
            for i, row in enumerate(rows):
                description = shared if isinstance(shared, Mapping) else shared[i]
                chosen = int(best[i]) == v
                records.append(
                    {
                        "attack": attack,
                        "model": model,
                        "case_number": row.case_number,
                        "prompt": description.get("prompt", row.prompt),
                        "seed": description.get("seed", row.evaluation_seed),
                        "variant": v,
                        "params": {k: val for k, val in description.items() if k not in ("prompt", "seed")},
                        "selector_score": float(scores[v, i]),
                        "selected": chosen,
                        "shows_target": hits[i] if chosen else None,
                    }
                )
        return hits, picked, records


# --------------------------------------------------------------------------------------------------------------
# Results and the attack template
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AttackResult:
    """What an attack found, judged on the evaluation rows.

    Attributes:
        attack: Registered name.
        surface: One of :data:`SURFACES`.
        config: The attack's config.
        rows: The evaluation rows, aligned with ``hits``.
        hits: The judge's verdict on the attacked edited model's image of each row (after selection).
        base_hits: The same attack on the base model (``control``), or ``None``.
        records: One dict per generated image (``attack, model, case_number, prompt, seed, variant, params,
            selector_score, selected, shows_target``).
        prompts: Adversarial prompts as rows of the field's CSV schema (``extra["attack"]`` set), for replay.
        embeddings: Learned vectors (``{token: [d]}`` for textual inversion, ``{"rows": [k, d]}`` for soft prompts).
        images: The attacked images the judge scored, uint8 ``(N, H, W, 3)``.
        curve: For attacks with a budget axis (relearning): ``[{steps, target_rate, hits}, ...]``.
        notes: Losses and anything else worth keeping (JSON-friendly).
        cost: :meth:`CostMeter.summary` of the run.
    """

    attack: str
    surface: str
    config: dict[str, Any]
    rows: list[PromptRow]
    hits: list[bool]
    base_hits: list[bool] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[PromptRow] = field(default_factory=list)
    embeddings: dict[str, Tensor] = field(default_factory=dict)
    images: np.ndarray | None = None
    curve: list[dict[str, Any]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)

    @property
    def target_rate(self) -> float | None:
        """Fraction of rows whose attacked image shows the target."""
        return sum(self.hits) / len(self.hits) if self.hits else None


class Attack:
    """Base class of attacks and probes: subclasses set ``surface``/``config_class`` and implement :meth:`_run`.

    Attributes:
        name: Registry name (set by :func:`erasure.attacks.register`).
        surface: What the attack changes (:data:`SURFACES`).
        config_class: The attack's :class:`AttackConfig` subclass.
        config: This instance's settings.
    """

    name: ClassVar[str] = "base"
    surface: ClassVar[str] = "text"
    config_class: ClassVar[type[AttackConfig]] = AttackConfig

    def __init__(self, config: AttackConfig | None = None) -> None:
        config = self.config_class.from_preset("toy") if config is None else config
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}."
            )
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, config={self.config})"

    def run(self, ctx: AttackContext, concept: Concept) -> AttackResult:
        """Run the attack on ``ctx``'s edited model for ``concept`` and judge it on the held-out rows.

        The pipeline holds its base weights again afterwards, also on failure; the global RNG is left untouched.

        Raises:
            AttackError: On a concept without evaluate prompts, or bad settings.
        """
        rows = evaluation_rows(concept, ctx.images_per_prompt, ctx.base_seed)
        if ctx.state != "base":
            raise AttackError("Run attacks from outside any ctx.model(...) block.")
        with ctx.meter() as meter, torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            result = self._run(ctx, concept, rows)
        result.cost = meter.summary()
        result.config = self.config.to_dict()
        result.notes.setdefault("settings", ctx.settings())
        for prompt_row in result.prompts:
            prompt_row.extra.setdefault("attack", self.name)
        return result

    def _run(self, ctx: AttackContext, concept: Concept, rows: list[PromptRow]) -> AttackResult:
        """The attack's hook: return an :class:`AttackResult` whose ``hits`` align with ``rows``."""
        raise NotImplementedError

    def result(self, rows: list[PromptRow], hits: list[bool], **fields: Any) -> AttackResult:
        """An :class:`AttackResult` stamped with this attack's name and surface."""
        return AttackResult(self.name, self.surface, self.config.to_dict(), list(rows), list(hits), **fields)
