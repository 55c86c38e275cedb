"""The evaluation's judges as the attacks' judge and selector: the toy oracle and the CLIP zero-shot evaluator.

An :class:`~erasure.attacks.context.AttackContext` takes a *judge* (``images -> list[bool]``: shows the target) and
a *selector* (``images -> list[float]``, higher = more target-like). This module builds both, for one concept, from
the spec strings ``erasure evaluate`` uses:

* ``oracle`` / ``oracle:DIR``: the toy world's oracle (:class:`erasure.toyworld.judge.OracleJudge`, the shipped
  ``toyworld-oracle`` by default). Judge: the oracle's ``shows_target`` for a row whose erased concept is this one
  (the attribute value a toy concept names: Pip -> ``character == Pip``). Selector: the oracle's probability of
  that value (the product over the attributes a whole-subject concept asks for). Concepts outside the toy world
  are refused: the oracle has no model of them.
* ``clip`` / ``clip:NAME:TAG`` / ``clip:DIR``: zero-shot CLIP through :class:`erasure.evaluation.Evaluator` (the
  CLIP :func:`erasure.evaluation.load_clip` loads, with the templates its folder declares). The candidates are the
  classes :func:`erasure.prompt_sets.rows_from_request` gives the concept's rows: its name, its neighbours
  (``preserve`` prompts) and its anchor. Judge: the image's top-1 class is the concept; selector: the concept's
  zero-shot probability. A bare ``clip`` is the caller's ``default_clip`` (the command line passes the toy CLIP
  beside a toy checkpoint), else :data:`erasure.evaluation.clip.DEFAULT_CLIP`.

Each callable carries ``source`` (the resolved spec: kind plus the model folder or ``name:tag``) and ``describe()``,
so the context can tell a selector that is the judge under another name, and every run records which judge
reported and which selected. :func:`judge_and_selector` refuses a selector with the judge's source unless
``allow_selector_as_judge`` (selecting with the reporting judge counts its false positives as successes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasure.attacks.base import AttackError, evaluation_rows
from erasure.concepts import Concept
from erasure.prompt_sets import PromptRow

__all__ = [
    "JUDGE_KINDS",
    "ConceptJudge",
    "JudgeSpec",
    "default_selector",
    "describe_callable",
    "judge_and_selector",
    "load_concept_judge",
    "parse_judge_spec",
    "same_judge",
]

#: Judge kinds and what each is, for ``--help``.
JUDGE_KINDS: dict[str, str] = {
    "oracle": "the toy world's oracle (oracle:DIR for another oracle folder); toy-world concepts only",
    "clip": "zero-shot CLIP: the concept against its neighbours and anchor (clip:NAME:TAG or clip:DIR)",
}


@dataclass(frozen=True)
class JudgeSpec:
    """A parsed judge spec.

    Attributes:
        kind: ``oracle`` or ``clip``.
        argument: What follows the first ``:`` (a folder, or a CLIP ``NAME:TAG``), or ``None``.
        text: The spec as given.
    """

    kind: str
    argument: str | None
    text: str

    def names_same_model(self, other: JudgeSpec) -> bool:
        """Whether both specs say the same model (kind and argument; ``text`` may differ in spelling only)."""
        return (self.kind, self.argument) == (other.kind, other.argument)


def parse_judge_spec(spec: str) -> JudgeSpec:
    """Split ``KIND[:ARG]``; nothing is loaded.

    Raises:
        AttackError: On an empty spec or an unknown kind, naming the spec and the known kinds.
    """
    text = str(spec or "").strip()
    kind, _, argument = text.partition(":")
    if kind not in JUDGE_KINDS:
        raise AttackError(f"Unknown judge {text!r}; choose from {', '.join(JUDGE_KINDS)} (oracle:DIR, clip:NAME:TAG).")
    return JudgeSpec(kind, argument.strip() or None, text)


def _oracle_expectation(concept: Concept) -> dict[str, str]:
    """The attributes an image must show to show ``concept``, or :class:`AttackError` outside the toy world."""
    from erasure.toyworld.captions import all_subjects
    from erasure.toyworld.judge import subject_expectation, target_attribute

    try:
        attribute, value = target_attribute(concept.name)
        return {attribute: value}
    except ValueError:
        if concept.name in all_subjects():
            return subject_expectation(concept.name)
    raise AttackError(
        f"The toy-world oracle has no model of concept '{concept.name}' (it knows the toy characters, styles, "
        "shapes, colours and subjects); judge it with clip or clip:NAME:TAG."
    )


class ConceptJudge:
    """One loaded judging model, bound to one concept: :meth:`shows_target` and :meth:`target_score`.

    Attributes:
        kind: ``oracle`` or ``clip``.
        source: The resolved spec (kind and model), equal for two judges of the same model.
        concept: The concept's name.
    """

    kind = ""

    def __init__(self, source: str, concept: Concept) -> None:
        self.source = source
        self.concept = concept.name

    def shows_target(self, images: np.ndarray) -> list[bool]:
        """Whether each uint8 ``(N, H, W, 3)`` image shows the concept."""
        raise NotImplementedError

    def target_score(self, images: np.ndarray) -> list[float]:
        """How target-like each image is (a probability; higher = more)."""
        raise NotImplementedError

    def follows_prompt(self, images: np.ndarray, rows: Sequence[PromptRow]) -> list[bool | None]:
        """Whether each image shows what its row's prompt asks for (``None``: the judge cannot tell).

        For neighbour rows (:func:`erasure.attacks.base.neighbour_rows`): the neighbour rate of ``erasure
        evaluate``, here under whatever sampling a probe applies.
        """
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Provenance: kind, source, concept, and the model's own description."""
        return {"kind": self.kind, "source": self.source, "concept": self.concept}


class _OracleConceptJudge(ConceptJudge):
    kind = "oracle"

    def __init__(self, folder: str | None, concept: Concept, device: Any) -> None:
        from erasure.toyworld.judge import OracleJudge

        self.expected = _oracle_expectation(concept)  # refuse a concept the oracle cannot see before loading
        try:
            self.oracle = OracleJudge(folder, device=device)
        except FileNotFoundError as error:
            raise AttackError(f"judge 'oracle{':' + folder if folder else ''}': {error}") from error
        super().__init__(f"oracle:{self.oracle.folder.resolve()}", concept)
        self._rows_concept = concept.name

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:3] != (64, 64):
            raise AttackError(
                f"The toy-world oracle reads 64x64 images; got {tuple(images.shape[1:3])}. Judge this model with clip."
            )
        return images

    def shows_target(self, images: np.ndarray) -> list[bool]:  # noqa: D102
        images = self._check(images)
        concept = self._rows_concept
        rows = [PromptRow(i, "", 0, concept, extra={"erased_concept": concept}) for i in range(len(images))]
        return [bool(v.shows_target) for v in self.oracle.judge(images, rows)]

    def follows_prompt(self, images: np.ndarray, rows: Sequence[PromptRow]) -> list[bool | None]:  # noqa: D102
        return [v.follows_prompt for v in self.oracle.judge(self._check(images), rows)]

    @torch.no_grad()
    def target_score(self, images: np.ndarray) -> list[float]:  # noqa: D102
        from erasure.toyworld.models import ORACLE_HEADS, to_tensor

        images = self._check(images)
        model = self.oracle.oracle.eval()
        device = next(model.parameters()).device
        scores = []
        for start in range(0, len(images), self.oracle.batch_size):
            logits = model(to_tensor(images[start : start + self.oracle.batch_size]).to(device))
            score = torch.ones(logits[next(iter(logits))].shape[0])
            for attribute, value in self.expected.items():
                probabilities = logits[attribute].float().softmax(-1).cpu()
                score = score * probabilities[:, ORACLE_HEADS[attribute].index(value)]
            scores += score.tolist()
        return scores

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return super().describe() | {"expects": dict(self.expected), "model": self.oracle.describe()}


class _ClipConceptJudge(ConceptJudge):
    kind = "clip"

    def __init__(self, clip: str, concept: Concept, device: Any) -> None:
        from erasure.evaluation import ClipLoadError, Evaluator, default_templates, load_clip, parse_clip_spec

        name, tag = parse_clip_spec(clip)
        folder = Path(name.removeprefix("local-dir:")).expanduser()
        resolved = str(folder.resolve()) if folder.is_dir() else name
        try:
            model, preprocess, tokenizer = load_clip(name, tag, device=device)
        except (ClipLoadError, OSError, RuntimeError) as error:
            raise AttackError(f"judge 'clip:{clip}': {error}") from error
        self.templates = default_templates(name)
        self.evaluator = Evaluator(model, preprocess, tokenizer, templates=self.templates, device=device)
        super().__init__(f"clip:{resolved}" + (f":{tag}" if tag else ""), concept)
        row = evaluation_rows(concept)[0]
        self.classes, self.anchor = tuple(row.classes), row.anchor
        self.name, self.tag = name, tag

    def _per_image(self, images: np.ndarray, rows: Sequence[PromptRow] | None = None) -> list[dict[str, Any]]:
        """The evaluator's per-image scores, against the concept (``rows=None``) or each row's own class."""
        if rows is None:
            prompts = truth = [self.concept] * len(images)
            classes = [self.classes] * len(images)
        else:
            prompts, truth, classes = [r.prompt for r in rows], [r.concept for r in rows], [r.classes for r in rows]
        self.evaluator.reset()
        try:
            self.evaluator.update(images, prompts, concepts=truth, classes=classes)
            return self.evaluator.per_image()
        finally:
            self.evaluator.reset()

    def shows_target(self, images: np.ndarray) -> list[bool]:  # noqa: D102
        return [entry["correct"] == 1 for entry in self._per_image(images)]

    def target_score(self, images: np.ndarray) -> list[float]:  # noqa: D102
        return [float(entry["target_prob"]) for entry in self._per_image(images)]

    def follows_prompt(self, images: np.ndarray, rows: Sequence[PromptRow]) -> list[bool | None]:
        """Zero-shot top-1 over the row's classes is the row's own class, as ``erasure evaluate``'s specificity."""
        if len(images) != len(rows):
            raise AttackError(f"got {len(images)} images for {len(rows)} rows; give one row per image.")
        correct = [entry["correct"] for entry in self._per_image(images, rows)]
        return [None if flag is None else flag == 1 for flag in correct]

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return super().describe() | {
            "clip": self.name,
            "pretrained": self.tag,
            "templates": list(self.templates),
            "classes": list(self.classes),
            "logit_scale": self.evaluator.logit_scale,
        }


def load_concept_judge(
    spec: str | JudgeSpec, concept: Concept, *, default_clip: str | None = None, device: Any = "cpu"
) -> ConceptJudge:
    """Load the judging model of ``spec`` for ``concept``.

    Raises:
        AttackError: On an unknown spec, a concept the judge has no model of (the oracle outside the toy world), a
            concept without evaluate prompts, or a model that cannot be loaded (the message names the spec).
    """
    parsed = spec if isinstance(spec, JudgeSpec) else parse_judge_spec(spec)
    if parsed.kind == "oracle":
        return _OracleConceptJudge(parsed.argument, concept, device)
    from erasure.evaluation.clip import DEFAULT_CLIP

    evaluation_rows(concept)  # no evaluate prompts: refused before a CLIP is loaded
    return _ClipConceptJudge(parsed.argument or default_clip or DEFAULT_CLIP, concept, device)


class _Role:
    """A judge's or selector's callable over a :class:`ConceptJudge`, with its ``source`` and ``describe()``."""

    role = ""

    def __init__(self, model: ConceptJudge, spec: str) -> None:
        self.model, self.spec, self.source = model, spec, model.source

    def describe(self) -> dict[str, Any]:
        """The role, the spec as given, and the model's provenance."""
        return {"role": self.role, "spec": self.spec} | self.model.describe()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class _JudgeRole(_Role):
    role = "judge"

    def __call__(self, images: np.ndarray) -> list[bool]:
        return self.model.shows_target(images)

    def follows_prompt(self, images: np.ndarray, rows: Sequence[PromptRow]) -> list[bool | None]:
        """The model's :meth:`ConceptJudge.follows_prompt`: the neighbour test beside the target test."""
        return self.model.follows_prompt(images, rows)


class _SelectorRole(_Role):
    role = "selector"

    def __call__(self, images: np.ndarray) -> list[float]:
        return self.model.target_score(images)


def same_judge(judge: Any, selector: Any) -> bool:
    """Whether ``selector`` is ``judge``: the same object, or callables of this module over the same model."""
    if selector is judge:
        return True
    source = getattr(judge, "source", None)
    return source is not None and source == getattr(selector, "source", None)


def default_selector(judge: str, concept: Concept) -> str:
    """The selector when none is named: CLIP for the oracle; the oracle for CLIP on toy-world concepts.

    Raises:
        AttackError: For a CLIP judge of a concept outside the toy world (name a second CLIP as the selector).
    """
    kind = parse_judge_spec(judge).kind
    if kind == "oracle":
        return "clip"
    try:
        _oracle_expectation(concept)
    except AttackError:
        raise AttackError(
            f"No default selector for judge {judge!r} on concept '{concept.name}': name one that is not the judge "
            "(--selector clip:ViT-B-32-quickgelu:openai), or pass --allow-selector-as-judge."
        ) from None
    return "oracle"


def judge_and_selector(
    judge: str,
    selector: str | None,
    concept: Concept,
    *,
    allow_selector_as_judge: bool = False,
    default_clip: str | None = None,
    device: Any = "cpu",
) -> tuple[Any, Any]:
    """The judge and selector callables of two specs, for ``concept`` (one model when both name the same).

    Args:
        judge: The reporting judge's spec (``oracle``, ``oracle:DIR``, ``clip``, ``clip:NAME:TAG``, ``clip:DIR``).
        selector: The selector's spec; ``None`` for :func:`default_selector` (the judge itself when allowed and
            there is no other).
        concept: The concept judged.
        allow_selector_as_judge: Permit a selector with the judge's model (recorded by the context).
        default_clip: What a bare ``clip`` loads (see module docstring).
        device: Where to run the judges.

    Returns:
        ``(judge, selector)``: callables with ``source`` and ``describe()``.

    Raises:
        AttackError: On a bad spec, a concept a judge has no model of, or a selector that is the judge without
            ``allow_selector_as_judge`` (checked before the selector's model is loaded when the specs are equal).
    """
    judge_spec = parse_judge_spec(judge)
    if selector is None:
        try:
            selector = default_selector(judge, concept)
        except AttackError:
            if not allow_selector_as_judge:
                raise
            selector = judge
    selector_spec = parse_judge_spec(selector)
    same_spec = selector_spec.names_same_model(judge_spec)
    if same_spec and not allow_selector_as_judge:
        raise AttackError(_SAME_MESSAGE.format(spec=judge_spec.text))
    judge_model = load_concept_judge(judge_spec, concept, default_clip=default_clip, device=device)
    if same_spec:
        selector_model = judge_model
    else:
        selector_model = load_concept_judge(selector_spec, concept, default_clip=default_clip, device=device)
        if selector_model.source == judge_model.source:  # two spellings of one model
            if not allow_selector_as_judge:
                raise AttackError(_SAME_MESSAGE.format(spec=f"{judge_spec.text} and {selector_spec.text}"))
            selector_model = judge_model
    return _JudgeRole(judge_model, judge_spec.text), _SelectorRole(selector_model, selector_spec.text)


_SAME_MESSAGE = (
    "The selector is the judge ({spec}): a search that selects with the judge it is scored by reports the judge's "
    "false positives as successes. Name another selector, or pass --allow-selector-as-judge "
    "(allow_selector_as_judge=True) to do it anyway (it is recorded)."
)


def load_witness(
    spec: str, concept: Concept, judge: Any, selector: Any, *, default_clip: str | None = None, device: Any = "cpu"
) -> Any:
    """A second-opinion judge of ``spec`` (``images -> list[bool]``), to score every image beside ``judge``.

    The selector's model is reused when ``spec`` names it (the CLIP that steers the searches can also say what it
    sees in the reported images: it still decides nothing).

    Raises:
        AttackError: On a bad spec, or one that names the judge's own model (a second opinion needs another).
    """
    parsed = parse_judge_spec(spec)

    def same_spec(role: Any) -> bool:
        return isinstance(role, _Role) and parse_judge_spec(role.spec).names_same_model(parsed)

    refusal = f"--witness {spec} is the judge's own model; a second opinion must come from another."
    if same_spec(judge):  # refused before any model is loaded
        raise AttackError(refusal)
    if same_spec(selector):
        return _JudgeRole(selector.model, parsed.text)
    model = load_concept_judge(parsed, concept, default_clip=default_clip, device=device)
    if model.source == getattr(judge, "source", None):  # another spelling of the judge's model
        raise AttackError(refusal)
    if isinstance(selector, _Role) and model.source == selector.source:
        model = selector.model  # another spelling of the selector's: one model in memory
    return _JudgeRole(model, parsed.text)


def describe_callable(function: Any) -> dict[str, Any]:
    """What a judge or selector callable is, for results: its ``describe()``, else its qualified name."""
    if hasattr(function, "describe"):
        return dict(function.describe())
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return {"callable": f"{getattr(function, '__module__', '')}.{name}".lstrip(".")}
