"""The input-embedding override and token slots: how embedding attacks put their vectors into a prompt.

**Override** (:mod:`erasure.embedding_override`, shared with AdvUnlearn's inner attack).
:class:`EmbeddingOverride` puts a forward hook on the text encoder's token-embedding table
(``text_model.embeddings.token_embedding`` in transformers 4, ``embeddings.token_embedding`` in 5's
``CLIPTextModel``; :func:`token_embedding` finds it): for the positions it is given it replaces the looked-up rows
``W_E[ids]`` with given vectors, and leaves everything else (position embeddings, causal mask, final norm) to the
encoder's own forward, so one code path serves both layouts. Given the original rows it reproduces the prompt
embedding bit for bit (tested). :func:`encode_layouts` encodes slot layouts with given rows (gradients flow to the
rows).

**Slots** (:func:`build_slots`) place ``k`` optimised tokens in a prompt: ``prefix`` ``[SOT, s_1..s_k, prompt,
EOT]`` (UnlearnDiffAtk's ``prefix_k``), ``suffix``, ``replace`` (each occurrence of the concept words becomes ``k``
slots), ``interleave`` (one slot before every ``every`` prompt tokens: P4D-K, slots at ``1, 1 + (every+1), ...``)
and ``free`` (``[SOT, s_1..s_k, EOT]``: P4D-N, Ring-A-Bell's discrete search). :func:`slot_text` decodes a layout
with chosen tokens into the prompt a user would type.

**New tokens** (:func:`added_token`, :func:`placeholder_layout`, :func:`save_learned_embeds`): a placeholder added
to the tokenizer for a block (textual inversion), and the learned row exported in the format diffusers'
``load_textual_inversion`` reads. The parametrisations, objectives and the optimisation loop are in
:mod:`erasure.attacks.optimise`.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from erasure.attacks.base import AttackError
from erasure.embedding_override import EmbeddingOverride, token_embedding
from erasure.pipeline import ModelFamily, detect_family, execution_device

__all__ = [
    "SLOT_PLACES",
    "EmbeddingOverride",
    "SlotLayout",
    "added_token",
    "build_slots",
    "check_family",
    "encode_ids",
    "encode_layouts",
    "placeholder_layout",
    "save_learned_embeds",
    "slot_text",
    "token_embedding",
    "vocabulary_ids",
]

SLOT_PLACES: tuple[str, ...] = ("prefix", "suffix", "replace", "interleave", "free")


# --------------------------------------------------------------------------------------------------------------
# Slots
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotLayout:
    """A tokenised prompt with slots for optimised tokens.

    Attributes:
        input_ids: ``[L]`` ids (``L = model_max_length``), the slots holding a filler id.
        slots: ``[k]`` positions of the slots, ascending.
        length: Tokens before the padding (start and end included).
        prompt: The prompt it was built from.
        place: How the slots were placed (:data:`SLOT_PLACES`).
    """

    input_ids: Tensor
    slots: Tensor
    length: int
    prompt: str
    place: str

    def with_tokens(self, ids: Tensor) -> Tensor:
        """``input_ids`` with ``ids[:k]`` written into the slots."""
        out = self.input_ids.clone()
        out[self.slots] = ids[: len(self.slots)].to(out.dtype)
        return out


def _special_ids(tokenizer: Any) -> set[int]:
    return {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else []


def build_slots(
    tokenizer: Any,
    prompt: str,
    k: int,
    place: str = "prefix",
    *,
    words: Sequence[str] = (),
    every: int = 3,
    filler: int | None = None,
) -> SlotLayout:
    """Tokenise ``prompt`` with ``k`` slots placed as ``place`` says (see the module docstring).

    CLIP's tokenizer splits text into words before BPE, so tokenising the pieces around whole words gives the same
    ids as tokenising the prompt: a slot layout with the original rows is the prompt.

    Args:
        tokenizer: The pipeline's CLIP tokenizer.
        prompt: The prompt.
        k: Slots per place (``prefix``, ``suffix``, ``free``: in all; ``replace``: per occurrence of the words;
            ignored by ``interleave``, whose count follows the prompt's length).
        place: One of :data:`SLOT_PLACES`.
        words: The concept words (``replace``).
        every: Prompt tokens between slots (``interleave``).
        filler: Id written into the slots (the end token by default); the override replaces its row.

    Raises:
        AttackError: On an unknown place, ``k < 1``, words absent from the prompt, or a layout longer than the
            encoder reads.
    """
    if place not in SLOT_PLACES:
        raise AttackError(f"Unknown slot place {place!r}; choose from {', '.join(SLOT_PLACES)}.")
    if k < 1 or every < 1:
        raise AttackError(f"A slot layout needs k >= 1 and every >= 1 (got k={k}, every={every}).")
    filler = tokenizer.eos_token_id if filler is None else int(filler)
    body: list[int | None] = []  # None marks a slot
    if place == "prefix":
        body = [None] * k + _encode_text(tokenizer, prompt)
    elif place == "suffix":
        body = _encode_text(tokenizer, prompt) + [None] * k
    elif place == "free":
        body = [None] * k
    elif place == "interleave":
        ids = _encode_text(tokenizer, prompt)
        for i, token in enumerate(ids):
            if i % every == 0:
                body.append(None)
            body.append(token)
    else:
        pattern = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        if not pattern or not re.search(rf"(?<!\w)({pattern})(?!\w)", prompt, flags=re.IGNORECASE):
            raise AttackError(f"The prompt {prompt!r} does not name the concept words {list(words)}; cannot replace.")
        for i, piece in enumerate(re.split(rf"(?<!\w)(?:{pattern})(?!\w)", prompt, flags=re.IGNORECASE)):
            if i:
                body.extend([None] * k)
            body.extend(_encode_text(tokenizer, piece))
    limit = int(tokenizer.model_max_length)
    length = len(body) + 2
    if length > limit:
        raise AttackError(
            f"The prompt {prompt[:60]!r} with its slots is {length} tokens; the text encoder reads at most {limit}."
        )
    ids = [tokenizer.bos_token_id, *(filler if t is None else t for t in body), tokenizer.eos_token_id]
    slots = [i + 1 for i, t in enumerate(body) if t is None]
    ids += [tokenizer.pad_token_id] * (limit - len(ids))
    return SlotLayout(torch.tensor(ids), torch.tensor(slots, dtype=torch.long), length, prompt, place)


def placeholder_layout(tokenizer: Any, text: str, token_id: int) -> SlotLayout:
    """The layout of ``text`` whose slots are the positions of token ``token_id`` (textual inversion captions).

    Raises:
        AttackError: If the text does not contain the token.
    """
    limit = int(tokenizer.model_max_length)
    ids = list(tokenizer(text, padding="max_length", max_length=limit, truncation=True).input_ids)
    slots = [i for i, t in enumerate(ids) if t == int(token_id)]
    if not slots:
        raise AttackError(f"The caption {text!r} does not contain the placeholder token.")
    length = len(tokenizer(text, truncation=True, max_length=limit).input_ids)
    return SlotLayout(torch.tensor(ids), torch.tensor(slots, dtype=torch.long), length, text, "token")


@contextlib.contextmanager
def added_token(pipe: Any, token: str, init_row: Tensor) -> Iterator[int]:
    """Add ``token`` to the tokenizer and a row for it (initialised to ``init_row``) for the block; yields its id.

    On exit the tokenizer is the original object again and the table is resized back, so every other tensor of the
    pipeline is bit for bit what it was.

    Raises:
        AttackError: If the tokenizer already knows the token.
    """
    check_family(pipe)
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    if token in tokenizer.get_vocab():
        raise AttackError(f"The tokenizer already has a token {token!r}; choose another placeholder.")
    original_tokenizer, size = tokenizer, len(tokenizer)
    pipe.tokenizer = copy.deepcopy(tokenizer)
    try:
        pipe.tokenizer.add_tokens([token])
        token_id = pipe.tokenizer.convert_tokens_to_ids(token)
        encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
        with torch.no_grad():
            token_embedding(encoder).weight[token_id] = init_row.to(token_embedding(encoder).weight)
        yield int(token_id)
    finally:
        pipe.tokenizer = original_tokenizer
        if len(token_embedding(encoder).weight) != size:
            encoder.resize_token_embeddings(size, mean_resizing=False)


def save_learned_embeds(path: Any, token: str, vector: Tensor) -> Any:
    """Write ``{token: [1, d]}`` as safetensors, the file diffusers' ``pipe.load_textual_inversion(path)`` reads."""
    from safetensors.torch import save_file

    from erasure.files import atomic_path

    with atomic_path(path) as temporary:
        save_file({token: vector.detach().reshape(1, -1).float().cpu().contiguous()}, str(temporary))
    return path


def slot_text(tokenizer: Any, layout: SlotLayout, ids: Tensor) -> str:
    """The prompt a user would type for ``layout`` with ``ids`` in its slots (special tokens dropped)."""
    full = layout.with_tokens(ids)[: layout.length]
    special = _special_ids(tokenizer)
    # no "clean-up" of spaces before punctuation: it is for WordPiece and would rewrite a BPE prompt
    text = tokenizer.decode([int(i) for i in full if int(i) not in special], clean_up_tokenization_spaces=False)
    return " ".join(text.replace("</w>", " ").split())  # a tokenizer without CLIP's BPE decoder keeps the marks


def vocabulary_ids(tokenizer: Any) -> Tensor:
    """The ids a discrete attack may choose: the whole vocabulary but the start, end and pad tokens."""
    special = _special_ids(tokenizer)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)


def check_family(pipe: Any) -> None:
    """Raise :class:`AttackError` for SDXL pipelines (two text encoders), which embedding attacks do not handle."""
    if detect_family(pipe) is ModelFamily.SDXL:
        raise AttackError(
            "Embedding attacks support SD 1.x and 2.x pipelines; SDXL's two text encoders are not handled yet."
        )


def encode_ids(pipe: Any, input_ids: Tensor, lengths: Sequence[int] | None = None) -> Tensor:
    """``[B, L, d]`` prompt embeddings of token ids, computed as the pipeline's ``encode_prompt`` does (SD 1/2).

    Args:
        pipe: An SD 1.x/2.x pipeline.
        input_ids: ``[B, L]`` ids.
        lengths: Tokens before the padding of each row (for encoders configured with an attention mask).
    """
    check_family(pipe)
    encoder = pipe.text_encoder
    device = execution_device(pipe)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        positions = torch.arange(input_ids.shape[1])
        lengths = lengths or [input_ids.shape[1]] * input_ids.shape[0]
        mask = (positions[None] < torch.tensor(lengths)[:, None]).long().to(device)
    embeds = encoder(input_ids.to(device), attention_mask=mask)[0]
    return embeds.to(dtype=encoder.dtype, device=device)


def encode_layouts(pipe: Any, override: EmbeddingOverride, layouts: Sequence[SlotLayout], rows: Tensor) -> Tensor:
    """Prompt embeddings of ``layouts`` with ``rows[:k_b]`` in the slots of layout ``b`` (gradients flow to rows)."""
    ids = torch.stack([layout.input_ids for layout in layouts])
    with override.rows([layout.slots for layout in layouts], [rows[: len(layout.slots)] for layout in layouts]):
        return encode_ids(pipe, ids, [layout.length for layout in layouts])
