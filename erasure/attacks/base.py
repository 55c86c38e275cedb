"""What every attack and probe shares: configs with presets, the attack template, results, and the held-out rows.

An attack is an :class:`AttackConfig` subclass (fields with ``help``, a ``toy`` and a ``paper`` preset) plus an
:class:`Attack` subclass implementing :meth:`Attack._run`. :meth:`Attack.run` does the common work: checks the
concept, meters the cost (:mod:`erasure.attacks.cost`), seeds the attack, and stamps the :class:`AttackResult`.
The models, judge and selector an attack works with are an :class:`erasure.attacks.context.AttackContext`.

Every image is judged on the concept's held-out ``evaluate`` prompts (:func:`evaluation_rows`), image ``j`` of a
prompt with seed ``base_seed + j`` (the rows :func:`erasure.prompt_sets.rows_from_request` makes, so ``erasure
evaluate``'s images are the same ones).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from erasure.concepts import Concept, EraseRequest
from erasure.prompt_sets import PromptRow, rows_from_request

logger = logging.getLogger(__name__)

__all__ = [
    "MODELS",
    "SURFACES",
    "Attack",
    "AttackConfig",
    "AttackError",
    "AttackResult",
    "Judge",
    "Selector",
    "adversarial_row",
    "evaluation_rows",
    "mentions",
    "replace_words",
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
    #: Whether the attack implements ``control`` (its run on the base model); others refuse the option.
    CONTROL: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.control and not self.CONTROL:
            raise AttackError(
                f"{type(self).__name__}: this attack has no base-model control run (control=True is implemented by "
                "the noise and inpainting probes)."
            )
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
# Prompts
# --------------------------------------------------------------------------------------------------------------


def check_checkpoints(owner: str, checkpoints: Sequence[int]) -> None:
    """Refuse budget-curve checkpoints that are not increasing positive step counts (``owner`` names the config).

    Raises:
        AttackError: Naming ``owner``.
    """
    points = list(checkpoints)
    if points != sorted(set(points)) or any(point < 1 for point in points):
        raise AttackError(f"{owner}: checkpoints must be increasing positive step counts, got {points}.")


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


def neighbour_rows(concept: Concept, images_per_prompt: int = 1, base_seed: int = 0) -> list[PromptRow]:
    """The concept's held-out neighbour rows (``evaluate_preserve`` prompts), as ``erasure evaluate`` makes them.

    Each row's ``concept`` is the class its prompt should show (:func:`erasure.prompt_sets.rows_from_request`); an
    empty list when the concept has no ``evaluate_preserve`` prompts.
    """
    if images_per_prompt < 1:
        raise AttackError(f"images_per_prompt must be at least 1, got {images_per_prompt}.")
    rows = rows_from_request(EraseRequest((concept,)), images_per_prompt, base_seed)
    return [row for row in rows if row.row_type == "preserved"]


def replace_words(prompt: str, words: Sequence[str], replacement: str) -> str:
    """``prompt`` with each whole-word, case-insensitive occurrence of ``words`` (longest first) replaced."""
    for word in sorted(words, key=len, reverse=True):
        prompt = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", replacement, prompt, flags=re.IGNORECASE)
    return " ".join(prompt.split())


def mentions(prompt: str, words: Sequence[str]) -> bool:
    """Whether ``prompt`` names one of ``words`` as whole words (any case)."""
    return any(re.search(rf"(?<!\w){re.escape(w)}(?!\w)", prompt, flags=re.IGNORECASE) for w in words)


def adversarial_row(row: PromptRow, prompt: str, attack: str, seed: int | None = None, **extra: str) -> PromptRow:
    """An adversarial prompt as a row of the field's schema, replayable by ``erasure evaluate --prompts``.

    The held-out ``row``'s case number, concept, type, classes and extra columns (anchor, erased concept) are kept,
    so a replay scores it as the row it attacks; ``extra["attack"]`` names the attack.
    """
    seed = row.evaluation_seed if seed is None else int(seed)
    columns = dict(row.extra) | {key: str(value) for key, value in extra.items()} | {"attack": attack}
    return PromptRow(row.case_number, prompt, seed, row.concept, row.row_type, row.classes, columns)


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
        reference_hits: The same attack on a model that never learned the concept, when the attack ran it itself
            (the inpainting probe fills the same base images with the reference), or ``None``.
        records: One dict per generated image (``attack, model, case_number, prompt, seed, variant, params,
            selector_score, selected, shows_target``).
        prompts: Adversarial prompts as rows of the field's CSV schema (``extra["attack"]`` set), for replay.
        embeddings: Learned vectors (``{token: [d]}`` for textual inversion, ``{"rows": [k, d]}`` for soft prompts).
        images: The attacked images the judge scored, uint8 ``(N, H, W, 3)``.
        curve: For attacks with a budget axis (relearning, concept inversion): ``[{steps, target_rate, hits}, ...]``.
        neighbour_cost: For probes that change sampling (:meth:`AttackContext.neighbour_cost
            <erasure.attacks.context.AttackContext.neighbour_cost>`): the neighbour ratio with the probe's sampling
            applied to both models, or ``None``.
        notes: Losses and anything else worth keeping (JSON-friendly).
        cost: :meth:`CostMeter.summary` of the run.
    """

    attack: str
    surface: str
    config: dict[str, Any]
    rows: list[PromptRow]
    hits: list[bool]
    base_hits: list[bool] | None = None
    reference_hits: list[bool] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[PromptRow] = field(default_factory=list)
    embeddings: dict[str, Tensor] = field(default_factory=dict)
    images: np.ndarray | None = None
    curve: list[dict[str, Any]] | None = None
    neighbour_cost: dict[str, Any] | None = None
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

    def run(self, ctx: Any, concept: Concept) -> AttackResult:
        """Run the attack on ``ctx``'s edited model for ``concept`` and judge it on the held-out rows.

        ``ctx`` is an :class:`erasure.attacks.context.AttackContext` (not imported here: the context builds on
        this module).

        The pipeline holds its base weights again afterwards, also on failure; the global RNG is left untouched.

        Raises:
            AttackError: On a concept without evaluate prompts, or bad settings.
        """
        rows = evaluation_rows(concept, ctx.images_per_prompt, ctx.base_seed)
        self.check(ctx)
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

    def check(self, ctx: Any) -> None:
        """Hook: raise :class:`AttackError` if the config cannot run in ``ctx`` (checked before any generation)."""

    def _run(self, ctx: Any, concept: Concept, rows: list[PromptRow]) -> AttackResult:
        """The attack's hook: return an :class:`AttackResult` whose ``hits`` align with ``rows``."""
        raise NotImplementedError

    def result(self, rows: list[PromptRow], hits: list[bool], **fields: Any) -> AttackResult:
        """An :class:`AttackResult` stamped with this attack's name and surface."""
        return AttackResult(self.name, self.surface, self.config.to_dict(), list(rows), list(hits), **fields)
