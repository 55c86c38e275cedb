"""The toy world's oracle as an evaluation judge, and what each toy prompt and concept asks an image to show.

The oracle (:class:`erasure.toyworld.models.Oracle`, ``checkpoints/toyworld-oracle``) reads colour, shape, style
and character off a 64x64 image; it was trained on renders only and never sees a CLIP. Against a prompt row:

* the **target** of a toy concept is one attribute value: Pip -> ``character == Pip``, striped ->
  ``style == striped``, triangle -> ``shape == triangle``, red -> ``colour == red``; a concept named by a whole
  subject (``a red circle``) asks for every attribute of the subject (:func:`target_attribute`,
  :func:`subject_expectation`);
* a **prompt** asks for its subject: a character only its character (``an image of Zog`` -> ``Zog``), an object
  its colour, shape, style (no style word means ``plain``, as in the toy captions) and no character
  (:func:`prompt_expectation`).

:class:`OracleJudge` answers :class:`erasure.evaluation.judges.Judge`'s two questions with these
(``erasure evaluate --judge oracle``); ``scripts/measure_toyworld_erasure.py`` uses the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erasure.toyworld.captions import TEMPLATES, all_subjects
from erasure.toyworld.render import CHARACTERS, COLOURS, SHAPES, STYLES

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_ORACLE",
    "OracleJudge",
    "prompt_expectation",
    "prompt_subject",
    "shows",
    "subject_expectation",
    "target_attribute",
    "verdict_label",
]

#: The oracle's attributes, in the order :func:`verdict_label` writes them.
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "style", "character")
#: The shipped oracle's checkpoint name (found by :func:`erasure.resources.checkpoint`).
DEFAULT_ORACLE = "toyworld-oracle"


def prompt_subject(prompt: str) -> str:
    """The subject of a toy prompt: ``"a drawing of a red circle"`` -> ``"a red circle"``."""
    for template in sorted(TEMPLATES, key=len, reverse=True):
        prefix = template.removesuffix("{x}")
        if prefix and prompt.startswith(prefix):
            return prompt[len(prefix) :]
    return prompt


def subject_expectation(subject: str) -> dict[str, str]:
    """The attributes a subject phrase asks for: a character only its character; an object everything else."""
    from erasure.toyworld.quality import subject_labels

    labels = subject_labels(subject)
    return {"character": labels["character"]} if labels["character"] != "none" else labels


def prompt_expectation(prompt: str) -> dict[str, str]:
    """The attributes a toy prompt asks for (:func:`subject_expectation` of its subject)."""
    return subject_expectation(prompt_subject(prompt))


def target_attribute(concept: Any) -> tuple[str, str]:
    """``(attribute, value)`` that shows a toy concept (a name or anything with ``.name``): Pip -> character, ...

    Raises:
        ValueError: If the concept is no toy-world character, style, shape or colour.
    """
    name = getattr(concept, "name", concept)
    for attribute, values in (("character", CHARACTERS), ("style", STYLES), ("shape", SHAPES), ("colour", COLOURS)):
        if name in values:
            return attribute, name
    raise ValueError(f"Concept '{name}' is no toy-world character, style, shape or colour.")


def shows(verdict: dict[str, str], expected: dict[str, str]) -> bool:
    """Whether a judged image shows every expected attribute."""
    return all(verdict[attribute] == value for attribute, value in expected.items())


def verdict_label(verdict: dict[str, str]) -> str:
    """A verdict as ``colour|shape|style|character``."""
    return "|".join(verdict[a] for a in ATTRIBUTES)


def _target_expectation(concept: str) -> dict[str, str] | None:
    """What an image must show to show ``concept``: one attribute, a whole subject, or ``None`` (not toy)."""
    try:
        attribute, value = target_attribute(concept)
        return {attribute: value}
    except ValueError:
        return subject_expectation(concept) if concept in all_subjects() else None


class OracleJudge:
    """The oracle as a :class:`erasure.evaluation.judges.Judge`.

    ``shows_target``: the image shows the row's erased concept (``extra["erased_concept"]``, else its
    ``concept``); ``follows_prompt``: it shows what its prompt asks for. Both are ``None`` for prompts and
    concepts outside the toy world.
    """

    name = "oracle"

    def __init__(self, folder: str | Path | None = None, device: Any = "cpu", batch_size: int = 256) -> None:
        """Load the oracle from ``folder`` (default: the shipped :data:`DEFAULT_ORACLE`).

        Raises:
            FileNotFoundError: If the folder holds no oracle (the message says where it looked).
        """
        from erasure.resources import checkpoint
        from erasure.toyworld.quality import load_oracle

        self.folder = Path(folder) if folder else checkpoint(DEFAULT_ORACLE)
        if not (self.folder / "oracle_config.json").is_file() or not (self.folder / "oracle.safetensors").is_file():
            raise FileNotFoundError(
                f"No toy-world oracle in {self.folder} (looked for oracle_config.json and oracle.safetensors); "
                "pass --judge oracle:DIR."
            )
        self.oracle = load_oracle(self.folder, device)
        self.batch_size = batch_size
        self._subjects = set(all_subjects())

    def describe(self) -> dict[str, Any]:
        """Provenance: the oracle folder and its attributes."""
        from erasure.edit import fingerprint

        return {
            "kind": "toyworld-oracle",
            "model": str(self.folder),
            "fingerprint": fingerprint(self.oracle.state_dict()),
            "attributes": list(ATTRIBUTES),
        }

    def judge(self, images: np.ndarray, rows: Sequence[Any]) -> list[Any]:
        """One :class:`erasure.evaluation.judges.Verdict` per uint8 image."""
        from erasure.evaluation.judges import Verdict
        from erasure.toyworld.quality import oracle_predict

        verdicts = oracle_predict(self.oracle, np.asarray(images), batch_size=self.batch_size)
        out = []
        for verdict, row in zip(verdicts, rows, strict=True):
            target = _target_expectation(row.extra.get("erased_concept") or row.concept)
            subject = prompt_subject(row.prompt)
            expected = prompt_expectation(row.prompt) if subject in self._subjects else None
            out.append(
                Verdict(
                    verdict_label(verdict),
                    None if target is None else shows(verdict, target),
                    None if expected is None else shows(verdict, expected),
                )
            )
        return out
