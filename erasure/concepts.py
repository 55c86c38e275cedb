"""What to erase: concepts, erase requests and TOML concept files.

A :class:`Concept` names one thing to erase and the prompts around it, split by who may see them:

* ``erase`` (and ``anchor``, ``preserve``): handed to the erasure method;
* ``evaluate`` and ``evaluate_preserve``: held-out prompts for the evaluator only. :meth:`EraseRequest.for_method`
  empties them, and :meth:`erasure.methods.base.EraseMethod.apply` only ever passes that copy to a method, so a
  method can never train on its test set.

A TOML concept file holds one or more ``[[concept]]`` tables::

    [[concept]]
    name = "Pip"
    kind = "character"
    erase = ["Pip", "a picture of Pip"]
    anchor = ""            # or one anchor per erase prompt: ["a character", "a picture of a character"]
    preserve = ["Zog", "Miro", "a yellow circle"]
    evaluate = ["a drawing of Pip", "an image of Pip"]
    evaluate_preserve = ["a drawing of Zog", "a drawing of a yellow circle"]
    # words = ["Pip"]  # optional: the concept's own words in the prompts (default: the name)
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "Concept",
    "ConceptFileError",
    "EraseRequest",
    "check_encodable",
    "load_concepts",
    "request_from_prompts",
]

KINDS: tuple[str, ...] = ("character", "style", "object", "attribute", "unsafe")
_PROMPT_FIELDS = ("erase", "preserve", "evaluate", "evaluate_preserve", "words")


class ConceptFileError(ValueError):
    """A concept file is missing, is not valid TOML, or has a bad field. The message names the file and field."""


def _prompts(value: Any, field_name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable) or isinstance(value, bytes | Mapping):
        raise ValueError(f"'{field_name}' must be a list of strings, got {type(value).__name__}.")
    prompts = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"'{field_name}' must be a list of strings; {item!r} is a {type(item).__name__}.")
        text = " ".join(item.split())
        if not text:
            raise ValueError(f"'{field_name}' holds an empty prompt; remove it.")
        prompts.append(text)
    return tuple(prompts)


def _anchor(name: str, value: Any) -> str | tuple[str, ...]:
    """A normalised anchor: one string, or a tuple of strings (``""`` allowed: the unconditional prompt)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, Sequence) or not all(isinstance(text, str) for text in texts):
        raise ValueError(
            f"Concept '{name}': 'anchor' must be a string (\"\" for unconditional) or a list of strings, one per "
            f"erase prompt; got {value!r}."
        )
    normalised = tuple(" ".join(text.split()) for text in texts)
    return normalised[0] if isinstance(value, str) else normalised


@dataclass(frozen=True)
class Concept:
    """One concept to erase, with the prompts a method may use and the held-out prompts it may not.

    Whitespace in every text is normalised (stripped, runs collapsed to one space); lists become tuples.

    Attributes:
        name: Display name, also the default concept words (``"Pip"``, ``"Van Gogh"``).
        kind: One of :data:`KINDS`.
        erase: Prompts showing the concept, which a method may use (at least one).
        anchor: What erased prompts should map to; ``""`` means the unconditional (empty) prompt. A list gives
            one anchor per erase prompt, in order (paired anchors: ``"a striped red circle"`` ->
            ``"a red circle"``), so each prompt is steered to itself without the concept rather than to nothing;
            :attr:`erase_anchors` reads either form.
        preserve: Prompts whose outputs must be kept (for example UCE's preservation set).
        evaluate: Held-out prompts of the concept, for evaluation only; never handed to a method.
        evaluate_preserve: Held-out neighbour prompts, for evaluation only.
        words: The concept's own words inside the prompts (for token-level methods); default ``(name,)``.
        expansion: The template set that expanded ``erase`` (:mod:`erasure.expansion`), ``""`` if none did.
    """

    name: str
    kind: str
    erase: tuple[str, ...]
    anchor: str | tuple[str, ...] = ""
    preserve: tuple[str, ...] = ()
    evaluate: tuple[str, ...] = ()
    evaluate_preserve: tuple[str, ...] = ()
    words: tuple[str, ...] = field(default=())
    expansion: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("A concept needs a non-empty 'name'.")
        object.__setattr__(self, "name", " ".join(self.name.split()))
        if self.kind not in KINDS:
            raise ValueError(f"Concept '{self.name}': unknown kind {self.kind!r}; choose from {', '.join(KINDS)}.")
        object.__setattr__(self, "anchor", _anchor(self.name, self.anchor))
        for name in _PROMPT_FIELDS:
            try:
                object.__setattr__(self, name, _prompts(getattr(self, name), name))
            except ValueError as error:
                raise ValueError(f"Concept '{self.name}': {error}") from None
        if not self.erase:
            raise ValueError(f"Concept '{self.name}': 'erase' is empty; give at least one prompt showing the concept.")
        erase = set(self.erase)
        clash = [prompt for prompt in self.preserve if prompt in erase]
        if clash:
            raise ValueError(
                f"Concept '{self.name}': {clash[0]!r} is both an erase and a preserve prompt; a prompt cannot be "
                "erased and kept at once; remove it from one of the lists."
            )
        if isinstance(self.anchor, tuple) and len(self.anchor) != len(self.erase):
            raise ValueError(
                f"Concept '{self.name}': 'anchor' lists {len(self.anchor)} anchor(s) but 'erase' has "
                f"{len(self.erase)} prompt(s); give one anchor per erase prompt, in order, or a single string for "
                "all of them."
            )
        for anchor in dict.fromkeys(self.erase_anchors):
            if anchor in erase:
                raise ValueError(
                    f"Concept '{self.name}': the anchor {anchor!r} is also an erase prompt; anchor to a different "
                    'prompt, or to "" (unconditional).'
                )

    @property
    def erase_anchors(self) -> tuple[str, ...]:
        """The anchor of each erase prompt, aligned with ``erase`` (one shared anchor is repeated)."""
        return self.anchor if isinstance(self.anchor, tuple) else (self.anchor,) * len(self.erase)

    @property
    def concept_words(self) -> tuple[str, ...]:
        """The words that name the concept inside its prompts: ``words``, or the name."""
        return self.words or (self.name,)

    def to_dict(self) -> dict[str, Any]:
        """A JSON/TOML-friendly dict (tuples as lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Concept:
        """Build a concept from :meth:`to_dict` output (or one TOML ``[[concept]]`` table).

        Raises:
            ValueError: On unknown or missing fields, naming them.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"A concept must be a table/dict, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; known fields: {', '.join(known)}.")
        missing = [name for name in ("name", "kind", "erase") if name not in data]
        if missing:
            raise ValueError(f"missing required field(s) {', '.join(map(repr, missing))}.")
        return cls(**dict(data))


@dataclass(frozen=True)
class EraseRequest:
    """One or more concepts to erase together.

    Attributes:
        concepts: The concepts; names must be unique.
    """

    concepts: tuple[Concept, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "concepts", tuple(self.concepts))
        if not self.concepts:
            raise ValueError("An erase request needs at least one concept.")
        for concept in self.concepts:
            if not isinstance(concept, Concept):
                raise TypeError(f"EraseRequest takes Concept objects, got {type(concept).__name__}.")
        names = [concept.name for concept in self.concepts]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"Concept name(s) {', '.join(map(repr, duplicates))} appear more than once.")

    def for_method(self) -> EraseRequest:
        """A copy with the held-out ``evaluate`` and ``evaluate_preserve`` prompts emptied."""
        return EraseRequest(
            tuple(
                Concept(
                    name=c.name,
                    kind=c.kind,
                    erase=c.erase,
                    anchor=c.anchor,
                    preserve=c.preserve,
                    words=c.words,
                )
                for c in self.concepts
            )
        )

    @property
    def erase_prompts(self) -> tuple[str, ...]:
        """Every erase prompt of every concept, in order."""
        return tuple(prompt for concept in self.concepts for prompt in concept.erase)

    @property
    def preserve_prompts(self) -> tuple[str, ...]:
        """Every preserve prompt, without repeats, minus any prompt another concept erases."""
        erase = set(self.erase_prompts)
        return tuple(dict.fromkeys(p for c in self.concepts for p in c.preserve if p not in erase))

    def to_dict(self) -> dict[str, Any]:
        """``{"concepts": [concept dicts]}``, JSON-friendly."""
        return {"concepts": [concept.to_dict() for concept in self.concepts]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EraseRequest:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: If the dict has no concept list or a concept is invalid (the message says which).
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("concepts"), Sequence):
            raise ValueError("An erase request dict needs a 'concepts' list.")
        concepts = []
        for index, item in enumerate(data["concepts"]):
            try:
                concepts.append(Concept.from_dict(item))
            except (TypeError, ValueError) as error:
                raise ValueError(f"concept #{index + 1}: {error}") from error
        return cls(tuple(concepts))

    def __add__(self, other: EraseRequest) -> EraseRequest:
        """Both requests' concepts in one request."""
        return EraseRequest(self.concepts + other.concepts)


def load_concepts(path: str | Path) -> EraseRequest:
    """Read a TOML concept file (one or more ``[[concept]]`` tables).

    Args:
        path: The ``.toml`` file.

    Returns:
        The request holding every concept of the file, in file order.

    Raises:
        ConceptFileError: The file is missing or unreadable, is not TOML, or a concept is invalid; the message
            names the file, the concept and the field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConceptFileError(f"Concept file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConceptFileError(f"Could not read concept file {path}: {error}") from error
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConceptFileError(f"{path} is not valid TOML: {error}") from error
    unknown = sorted(set(data) - {"concept"})
    if unknown:
        raise ConceptFileError(
            f"{path}: unexpected top-level key(s) {', '.join(map(repr, unknown))}; write each concept as a "
            "[[concept]] table."
        )
    tables = data.get("concept")
    if not isinstance(tables, list) or not tables:
        raise ConceptFileError(f"{path} has no [[concept]] table; add one with name, kind and erase.")
    concepts = []
    for index, table in enumerate(tables):
        label = f"concept #{index + 1}" + (f" ('{table['name']}')" if isinstance(table.get("name"), str) else "")
        try:
            concepts.append(Concept.from_dict(table))
        except (TypeError, ValueError) as error:
            raise ConceptFileError(f"{path}, {label}: {error}") from error
    try:
        return EraseRequest(tuple(concepts))
    except ValueError as error:
        raise ConceptFileError(f"{path}: {error}") from error


def request_from_prompts(
    prompts: str | Sequence[str],
    *,
    name: str | None = None,
    kind: str = "object",
    anchor: str = "",
    preserve: Sequence[str] = (),
) -> EraseRequest:
    """A one-concept request from prompts given on the command line.

    Args:
        prompts: Erase prompts; the first also names the concept unless ``name`` is given.
        name: Concept name (and concept words).
        kind: One of :data:`KINDS`.
        anchor: Target prompt of the erased prompts (``""``: unconditional).
        preserve: Prompts to keep.

    Returns:
        The request.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("Give at least one prompt to erase.")
    return EraseRequest(
        (Concept(name=name or prompts[0], kind=kind, erase=tuple(prompts), anchor=anchor, preserve=tuple(preserve)),)
    )


#: Fewer characters per token than this: the tokenizer spells the word in fragments (single letters, bytes of a
#: CJK character or emoji) rather than knowing it; common words and names take one to three tokens.
PIECEWISE_LETTERS_PER_TOKEN = 2.0


def _token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text of each token, without BPE's word-end (``</w>``) and word-start (``Ġ``) marks; ``[]`` if unknown."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return []
    return [str(piece).removesuffix("</w>").removeprefix("\u0120") for piece in convert(list(ids))]


def _special_ids(tokenizer: Any) -> set[int]:
    return {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}


def check_encodable(tokenizer: Any, request: EraseRequest) -> None:
    """Check that the tokenizer can represent every concept word and method-visible prompt of ``request``.

    Args:
        tokenizer: A (CLIP) tokenizer of the pipeline.
        request: The request (usually :meth:`EraseRequest.for_method` of it).

    Raises:
        ValueError: If a concept word encodes to nothing or to the unknown token, or a prompt is longer than the
            text encoder reads (``model_max_length`` tokens, start and end included).
    """
    limit = int(getattr(tokenizer, "model_max_length", 77) or 77)
    unk = getattr(tokenizer, "unk_token_id", None)
    special = _special_ids(tokenizer)
    for concept in request.concepts:
        for word in concept.concept_words:
            ids = [i for i in tokenizer(word, add_special_tokens=False).input_ids if i not in special]
            if not ids:
                raise ValueError(f"Concept '{concept.name}': the word {word!r} encodes to no token at all.")
            if unk is not None and unk in ids and unk not in special:
                raise ValueError(
                    f"Concept '{concept.name}': the word {word!r} has no token in this tokenizer's vocabulary "
                    "(it encodes to the unknown token); spell it differently."
                )
            pieces = _token_pieces(tokenizer, ids)
            letters = len("".join(word.split()))
            if pieces and len(pieces) > 1 and letters / len(pieces) < PIECEWISE_LETTERS_PER_TOKEN:
                logger.warning(
                    "Concept '%s': the tokenizer spells %r piece by piece (%d tokens: %s), so the model has no "
                    "token for it and likely never learned it as a word; erasing it changes what those pieces mean "
                    "in every prompt that contains them.",
                    concept.name,
                    word,
                    len(pieces),
                    " ".join(piece or "?" for piece in pieces[:12]),
                )
        texts = [*concept.erase, *concept.preserve, *concept.evaluate, *concept.evaluate_preserve]
        for text in [*dict.fromkeys(anchor for anchor in concept.erase_anchors if anchor), *texts]:
            ids = tokenizer(text, add_special_tokens=True, truncation=False).input_ids
            if len(ids) > limit:
                raise ValueError(
                    f"Concept '{concept.name}': the prompt {text[:60]!r} is {len(ids)} tokens long; the text "
                    f"encoder reads at most {limit} (start and end included); shorten it."
                )
