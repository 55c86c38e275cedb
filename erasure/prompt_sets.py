"""Evaluation prompt sets: the CSV schema the field already uses, and prompt rows built from concept files.

The schema is ESD's (``rohitgandikota/erasing``, ``data/*.csv``): one row per prompt with

* ``case_number``: an integer id, unique in the file; images are saved as ``{case_number}_{i}.png``;
* ``prompt``: the text;
* ``evaluation_seed``: the seed of the row's first image (image ``i`` uses ``evaluation_seed + i``).

Optional columns read here: ``concept`` (the class the image should show, for zero-shot judging; when absent, the
first of ``artist``, ``class``, ``label_str`` stands in, as UCE's and ESD's files name it), ``type`` (``erased``,
``preserved``, ... see :data:`ROLE_OF_TYPE`) and ``classes`` (``|``-separated candidate classes of the row's
zero-shot judgement). Every other column (ESD's ``evaluation_guidance``, UCE's ``artist``, MACE's ``type``, I2P's
``categories`` ...) is kept unchanged in :attr:`PromptRow.extra`, so the official files of ESD, UCE and MACE load
as they are; ``erasure evaluate`` generates each row at its ``evaluation_guidance`` unless ``--guidance`` is given.
A leading unnamed column (the index pandas writes) stands in for a missing ``case_number``, as in MACE's
``prompts_csv/*.csv``; otherwise it is dropped.

Example:
    >>> rows = load_prompt_csv("prompts/toyworld/pip.csv")
    >>> rows[0].prompt, rows[0].evaluation_seed
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasure.files import atomic_write_text

__all__ = [
    "CLASS_SEPARATOR",
    "FALLBACK_ANCHOR",
    "REQUIRED_COLUMNS",
    "ROLES",
    "ROLE_OF_TYPE",
    "PromptFileError",
    "PromptRow",
    "file_sha256",
    "load_prompt_csv",
    "role_of",
    "rows_from_request",
    "save_prompt_csv",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("case_number", "prompt", "evaluation_seed")
#: Columns that stand in for ``concept`` when a file has none (UCE/ESD: artist; UCE imagenette: class).
CONCEPT_ALIASES: tuple[str, ...] = ("artist", "class", "label_str")
CLASS_SEPARATOR = "|"
#: Class text used when a concept's anchor is the unconditional prompt ``""`` or paired (one per erase prompt).
FALLBACK_ANCHOR = "a photo"

#: Roles an image plays in the erasure metrics.
ROLES: tuple[str, ...] = ("erased", "generality", "preserved", "other")
#: ``type`` column values (lower case) and the role they mean. UCE's ``holdout`` rows are artists left out of the
#: edit, so they count as preserved; MACE's ``others`` likewise. ``generality`` rows are held-out phrasings of an
#: erased concept (prompts that describe it without naming it).
ROLE_OF_TYPE: dict[str, str] = {
    "erased": "erased",
    "erase": "erased",
    "target": "erased",
    "generality": "generality",
    "paraphrase": "generality",
    "heldout_phrasing": "generality",
    "preserved": "preserved",
    "preserve": "preserved",
    "neighbour": "preserved",
    "neighbor": "preserved",
    "others": "preserved",
    "other_concepts": "preserved",
    "holdout": "preserved",
}

_INDEX_HEADERS = ("", "Unnamed: 0")
_CORE = frozenset({*REQUIRED_COLUMNS, "concept", "type", "classes"})


class PromptFileError(ValueError):
    """A prompt CSV is missing, unreadable, lacks a required column or holds a bad value; the message says where."""


def role_of(type_: str) -> str:
    """The metric role (one of :data:`ROLES`) of a ``type`` column value; unknown or empty types are ``other``."""
    return ROLE_OF_TYPE.get(type_.strip().lower(), "other")


@dataclass(frozen=True)
class PromptRow:
    """One row of an evaluation prompt set.

    Attributes:
        case_number: Integer id, unique within a set; names the images ``{case_number}_{i}.png``.
        prompt: The prompt.
        evaluation_seed: Seed of the row's first image; image ``i`` of the row uses ``evaluation_seed + i``.
        concept: The class the image should show (zero-shot target), ``""`` when unknown.
        row_type: Free-form row type, the CSV's ``type`` column (``erased``, ``preserved``, ``generality``, UCE's
            ``holdout``, MACE's ``others``).
        classes: Candidate classes of the row's zero-shot judgement (include ``concept``); empty: decided by the
            evaluator from the whole set.
        extra: Every other column, unchanged (strings), in file order.
    """

    case_number: int
    prompt: str
    evaluation_seed: int
    concept: str = ""
    row_type: str = ""
    classes: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "extra", dict(self.extra))

    @property
    def role(self) -> str:
        """Metric role of the row (see :func:`role_of`)."""
        return role_of(self.row_type)

    @property
    def anchor(self) -> str:
        """The anchor text of an erased row (``extra["anchor"]``), ``""`` if none."""
        return self.extra.get("anchor", "")


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: Seeds and case numbers must fit a signed 64-bit integer: ``torch.Generator.manual_seed`` takes no more.
INTEGER_RANGE = (-(2**63), 2**64 - 1)


def _integer(text: str, column: str, path: Path, line: int) -> int:
    value = text.strip()
    try:
        number: float | int = int(value)
    except ValueError:
        try:  # pandas writes integer columns holding NaN as floats: "3542.0"
            number = float(value)
        except ValueError:
            number = float("nan")
        if not number.is_integer():
            message = f"{path}, line {line}: column '{column}' must be an integer, got {text!r}."
            raise PromptFileError(message) from None
        number = int(number)
    low, high = INTEGER_RANGE
    if not low <= number <= high:
        raise PromptFileError(
            f"{path}, line {line}: column '{column}' holds {text.strip()[:30]}, which does not fit 64 bits "
            f"(a seed must lie in [{low}, {high}])."
        )
    return number


def load_prompt_csv(path: str | Path) -> list[PromptRow]:
    """Read an evaluation prompt CSV (ESD/UCE/MACE schema, see the module docstring).

    Args:
        path: The ``.csv`` file (UTF-8, with or without a byte-order mark).

    Returns:
        The rows, in file order.

    Raises:
        PromptFileError: The file is missing or unreadable, lacks a required column (the message names the file
            and the column), holds a non-integer seed or case number, repeats a case number, or has no rows.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptFileError(f"Prompt file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PromptFileError(f"Could not read prompt file {path}: {error}") from error
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise PromptFileError(
            f"Prompt file {path} is empty; it needs the columns {', '.join(REQUIRED_COLUMNS)}."
        ) from None
    except csv.Error as error:
        raise PromptFileError(f"{path} is not a valid CSV file: {error}") from error
    index_column = header[0] if header and header[0] in _INDEX_HEADERS else None
    for column in REQUIRED_COLUMNS:
        if column not in header and not (column == "case_number" and index_column is not None):
            raise PromptFileError(
                f"{path} has no '{column}' column (its columns: {', '.join(repr(h) for h in header)}); a prompt "
                f"CSV needs {', '.join(REQUIRED_COLUMNS)}."
            )
    case_column = "case_number" if "case_number" in header else index_column
    concept_column = "concept" if "concept" in header else next((a for a in CONCEPT_ALIASES if a in header), None)
    extra_columns = [(i, h) for i, h in enumerate(header) if h not in _CORE and h not in _INDEX_HEADERS]
    position = {name: i for i, name in reversed(list(enumerate(header)))}  # first occurrence wins

    rows: list[PromptRow] = []
    seen: dict[int, int] = {}
    try:
        for values in reader:
            line = reader.line_num
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) < len(header):
                values = values + [""] * (len(header) - len(values))

            def cell(name: str | None, values: list[str] = values) -> str:
                return values[position[name]] if name is not None and name in position else ""

            case_number = _integer(cell(case_column), case_column or "case_number", path, line)
            if case_number in seen:
                raise PromptFileError(
                    f"{path}, line {line}: case_number {case_number} repeats line {seen[case_number]}; case numbers "
                    "name the images and must be unique."
                )
            seen[case_number] = line
            classes = tuple(c.strip() for c in cell("classes").split(CLASS_SEPARATOR) if c.strip())
            rows.append(
                PromptRow(
                    case_number=case_number,
                    prompt=cell("prompt"),
                    evaluation_seed=_integer(cell("evaluation_seed"), "evaluation_seed", path, line),
                    concept=cell(concept_column).strip(),
                    row_type=cell("type").strip(),
                    classes=classes,
                    extra={name: values[i] for i, name in extra_columns},
                )
            )
    except csv.Error as error:
        raise PromptFileError(f"{path}, line {reader.line_num}: not valid CSV: {error}") from error
    if not rows:
        raise PromptFileError(f"Prompt file {path} has a header but no rows.")
    return rows


def save_prompt_csv(rows: Sequence[PromptRow], path: str | Path) -> Path:
    """Write rows as a prompt CSV that :func:`load_prompt_csv` reads back to equal rows (atomically).

    Columns: ``case_number, prompt, evaluation_seed``, then ``concept``, ``type`` and ``classes`` when any row has
    one, then every ``extra`` column in first-seen order (a row without one of them reads back with ``""``).

    Args:
        rows: The rows.
        path: Destination ``.csv``.

    Returns:
        The path written.
    """
    path = Path(path)
    columns = {"concept": "concept", "type": "row_type"}  # CSV column -> PromptRow field
    optional = [name for name, attribute in columns.items() if any(getattr(row, attribute) for row in rows)]
    if any(row.classes for row in rows):
        optional.append("classes")
    extra = list(dict.fromkeys(key for row in rows for key in row.extra))
    clash = [key for key in extra if key in _CORE or key in _INDEX_HEADERS]
    if clash:
        raise ValueError(f"extra column {clash[0]!r} clashes with a schema column; rename it.")
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*REQUIRED_COLUMNS, *optional, *extra])
    for row in rows:
        values: dict[str, Any] = {
            "concept": row.concept,
            "type": row.row_type,
            "classes": CLASS_SEPARATOR.join(row.classes),
        }
        writer.writerow(
            [row.case_number, row.prompt, row.evaluation_seed, *(values[n] for n in optional)]
            + [row.extra.get(key, "") for key in extra]
        )
    atomic_write_text(path, buffer.getvalue(), newline="")
    return path


def _mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words, ignoring case."""
    return bool(phrase) and re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, flags=re.IGNORECASE) is not None


def _dedupe(items: Iterable[str]) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for item in items:
        if item and item.lower() not in {k.lower() for k in out}:
            out[item] = None
    return tuple(out)


def rows_from_request(
    request: Any,
    seeds_per_prompt: int = 1,
    base_seed: int = 0,
    fallback_anchor: str = FALLBACK_ANCHOR,
) -> list[PromptRow]:
    """Evaluation rows from an erase request's held-out prompts.

    For each concept, in order:

    * each ``evaluate`` prompt becomes an ``erased`` row if it names the concept (one of its
      :attr:`~erasure.concepts.Concept.concept_words`, as whole words, any case) and a ``generality`` row
      otherwise (a held-out phrasing that describes the concept without naming it);
    * each ``evaluate_preserve`` prompt becomes a ``preserved`` row.

    Zero-shot classes of every row of a concept: the concept's name, its ``preserve`` prompts (less those that
    mention another preserve prompt, as ``a picture of Zog`` mentions ``Zog``), its anchor (or
    ``fallback_anchor`` for the unconditional anchor ``""`` and for paired anchors, which differ per erase prompt
    and so name no single class), and any ``evaluate_preserve`` prompt that mentions none
    of these (it is then its own class). An erased/generality row's true class is the concept's name; a preserved
    row's is the longest class it mentions (the prompt itself when none).

    Args:
        request: An :class:`erasure.concepts.EraseRequest`.
        seeds_per_prompt: Rows per prompt; row ``j`` of a prompt has seed ``base_seed + j``.
        base_seed: Seed of each prompt's first row.
        fallback_anchor: Anchor class text for concepts anchored to the empty prompt or with paired anchors.

    Returns:
        Rows numbered ``0, 1, ...`` in the order above, each with ``extra["anchor"]`` (the anchor class text of
        erased/generality rows, ``""`` for preserved rows).

    Raises:
        ValueError: If the request has no ``evaluate`` or ``evaluate_preserve`` prompt at all.
    """
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be at least 1, got {seeds_per_prompt}.")
    rows: list[PromptRow] = []
    for concept in request.concepts:
        shared = dict.fromkeys(concept.erase_anchors)
        anchor = (next(iter(shared)) if len(shared) == 1 else "") or fallback_anchor
        # A preserve prompt that mentions another ("a picture of Zog" beside "Zog") is a phrasing, not a class.
        preserve = [p for p in concept.preserve if not any(q != p and _mentions(p, q) for q in concept.preserve)]
        known = _dedupe([concept.name, *preserve, anchor])
        own_class = [
            p for p in concept.evaluate_preserve if not any(_mentions(p, c) for c in known if c != concept.name)
        ]
        classes = _dedupe([*known, *own_class])
        entries: list[tuple[str, str, str]] = []  # (prompt, type, true class)
        for prompt in concept.evaluate:
            named = any(_mentions(prompt, word) for word in concept.concept_words)
            entries.append((prompt, "erased" if named else "generality", concept.name))
        for prompt in concept.evaluate_preserve:
            mentioned = [c for c in classes if c != concept.name and _mentions(prompt, c)]
            entries.append((prompt, "preserved", max(mentioned, key=len) if mentioned else prompt))
        for prompt, type_, true_class in entries:
            for j in range(seeds_per_prompt):
                rows.append(
                    PromptRow(
                        case_number=len(rows),
                        prompt=prompt,
                        evaluation_seed=base_seed + j,
                        concept=true_class,
                        row_type=type_,
                        classes=classes,
                        extra={"anchor": anchor if type_ != "preserved" else "", "erased_concept": concept.name},
                    )
                )
    if not rows:
        raise ValueError(
            "The concept file has no evaluate or evaluate_preserve prompts; add held-out prompts to evaluate with, "
            "or pass a prompt CSV."
        )
    return rows


def check_unique_cases(rows: Sequence[PromptRow], where: str = "the prompt set") -> None:
    """Raise :class:`PromptFileError` if two rows share a case number (they would name the same images)."""
    seen: set[int] = set()
    for row in rows:
        if row.case_number in seen:
            raise PromptFileError(f"{where} repeats case_number {row.case_number}; case numbers must be unique.")
        seen.add(row.case_number)


def rows_as_dicts(rows: Sequence[PromptRow]) -> list[Mapping[str, Any]]:
    """Rows as plain dicts (for JSON manifests)."""
    return [
        {
            "case_number": r.case_number,
            "prompt": r.prompt,
            "evaluation_seed": r.evaluation_seed,
            "concept": r.concept,
            "type": r.row_type,
            "classes": list(r.classes),
            "extra": dict(r.extra),
        }
        for r in rows
    ]
