"""Prompt expansion: a concept given by a bare word becomes the phrasings in which users will ask for it.

A method that sees only the word ``triangle`` edits the embedding of ``triangle`` alone, which differs from the
embedding of the same word inside ``a red triangle``; the concept then survives in most phrasings. UCE's official
script expands each concept into five templates (``--expand_prompts``), MACE into about thirty. Every method here
gets the same expansion, before it sees the request (:meth:`erasure.methods.base.EraseMethod.apply`), controlled by
the ``expand`` option every method has:

* ``sd``: the field's templates for real Stable Diffusion, per concept kind (UCE's ``--expand_prompts`` lists: for
  styles "painting by X", "art by X", ...; for every other kind "image of X", "photo of X", ...);
* ``toyworld``: the toy world's own phrasings, from its caption grammar (:mod:`erasure.toyworld.captions`): every
  subject phrase of the world that contains the word (``triangle`` -> ``a red triangle``, ``a striped blue
  triangle``, ...; a character's name is its own subject), in the erase templates ``{x}`` and ``a picture of {x}``
  (the other two caption templates are kept for held-out evaluation, as in the shipped concept files);
* ``auto`` (default): ``toyworld`` for a pipeline with the toy tokenizer, else ``sd``;
* ``off``: no expansion.

Only concepts with fewer than :data:`MINIMUM_ERASE_PROMPTS` erase prompts are expanded (a concept file that lists
its phrasings is used as written), and never one with paired anchors (one anchor per prompt is a deliberate
pairing no template can extend). The expanded prompts follow the given ones; an anchor that is a non-empty
prompt is expanded with the same template, as UCE expands its guide concepts, and an empty anchor stays empty.
Expansions that are preserve prompts of the concept, or repeat a prompt up to letter case (CLIP tokenizers
lower-case their input), are dropped. The concept records the template set it was
expanded with (``Concept.expansion``), so the edit's config shows it and a replay does not expand twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from erasure.concepts import Concept, EraseRequest

#: Concepts with fewer erase prompts than this are expanded.
MINIMUM_ERASE_PROMPTS = 3
TEMPLATE_SETS: tuple[str, ...] = ("auto", "sd", "toyworld", "off")

_OBJECT_TEMPLATES = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")
#: The field's templates per concept kind (UCE, official ``uce_sd_erase.py --expand_prompts``).
SD_TEMPLATES: dict[str, tuple[str, ...]] = {
    "style": ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"),
    "character": _OBJECT_TEMPLATES,
    "object": _OBJECT_TEMPLATES,
    "attribute": _OBJECT_TEMPLATES,
    "unsafe": _OBJECT_TEMPLATES,
}


def toyworld_phrasings(words: str) -> list[str]:
    """Every erase-template phrasing of every toy-world subject that contains ``words`` (case-insensitive).

    Returns an empty list for words the toy world has no subject for.
    """
    from erasure.toyworld.captions import ERASE_TEMPLATES, all_subjects

    wanted = words.lower().split()
    if not wanted:
        return []
    subjects = []
    for subject in all_subjects():
        tokens = subject.lower().split()
        if any(tokens[i : i + len(wanted)] == wanted for i in range(len(tokens) - len(wanted) + 1)):
            subjects.append(subject)
    return [template.format(x=subject) for subject in subjects for template in ERASE_TEMPLATES]


def _expanded_prompts(concept: Concept, templates: str) -> list[tuple[str, str]]:
    """``(prompt, anchor)`` pairs to add for ``concept``: templated concept words, each with its anchor."""
    pairs = []
    anchor = concept.anchor
    for word in concept.concept_words:
        if templates == "toyworld":
            pairs += [(prompt, anchor) for prompt in toyworld_phrasings(word)]
        else:
            for template in SD_TEMPLATES[concept.kind]:
                pairs.append((template.format(word), template.format(anchor) if anchor else ""))
    return pairs


def _key(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def expand_concept(concept: Concept, templates: str, minimum: int = MINIMUM_ERASE_PROMPTS) -> Concept:
    """``concept`` with its erase prompts expanded by the template set ``templates`` (``sd`` or ``toyworld``).

    A concept that already has ``minimum`` erase prompts, has paired anchors, or was expanded before, is returned
    unchanged.
    """
    if templates not in ("sd", "toyworld"):
        raise ValueError(f"Unknown template set {templates!r}; choose from sd, toyworld.")
    if concept.expansion or len(concept.erase) >= minimum or isinstance(concept.anchor, tuple):
        return concept
    erase, anchors = list(concept.erase), list(concept.erase_anchors)
    blocked = {_key(prompt) for prompt in (*concept.preserve, *erase)}  # CLIP tokenizers ignore case
    for prompt, anchor in _expanded_prompts(concept, templates):
        if _key(prompt) in blocked or _key(prompt) == _key(anchor):
            continue
        blocked.add(_key(prompt))
        erase.append(prompt)
        anchors.append(anchor)
    if len(erase) == len(concept.erase):  # the template set has nothing new for this concept
        return concept
    paired = len(set(anchors)) > 1
    return dataclasses.replace(
        concept, erase=tuple(erase), anchor=tuple(anchors) if paired else concept.anchor, expansion=templates
    )


def is_toyworld_tokenizer(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is the toy world's.

    That is: a vocabulary of under a thousand entries (CLIP's has 49,408) in which every word of the toy captions
    is one whole-word token.
    """
    from erasure.toyworld.tokenizer import CAPTION_WORDS

    try:
        vocabulary = tokenizer.get_vocab()
    except AttributeError:
        return False
    return len(vocabulary) < 1000 and all(f"{word.lower()}</w>" in vocabulary for word in CAPTION_WORDS)


def resolve_templates(choice: str, tokenizers: Sequence[Any]) -> str:
    """The template set ``choice`` stands for with these tokenizers: ``auto`` -> ``toyworld`` or ``sd``."""
    if choice not in TEMPLATE_SETS:
        raise ValueError(f"expand must be one of {', '.join(TEMPLATE_SETS)}, got {choice!r}.")
    if choice != "auto":
        return choice
    return "toyworld" if tokenizers and all(is_toyworld_tokenizer(t) for t in tokenizers) else "sd"


def expand_request(request: EraseRequest, templates: str, minimum: int = MINIMUM_ERASE_PROMPTS) -> EraseRequest:
    """Every concept of ``request`` through :func:`expand_concept` (``templates="off"``: the request as given)."""
    if templates == "off":
        return request
    return EraseRequest(tuple(expand_concept(concept, templates, minimum) for concept in request.concepts))
