"""Replace rows of a text encoder's token embeddings at given positions: how optimised vectors enter a prompt.

:class:`EmbeddingOverride` puts a forward hook on the text encoder's token-embedding table
(``text_model.embeddings.token_embedding`` in transformers 4, ``embeddings.token_embedding`` in 5's
``CLIPTextModel``; :func:`token_embedding` finds it): for the positions it is given it replaces the looked-up rows
``W_E[ids]`` with given vectors and leaves everything else (position embeddings, causal mask, final norm) to the
encoder's own forward. Given the original rows it reproduces the prompt embedding bit for bit. The embedding attacks
(:mod:`erasure.attacks.override` builds their token slots) and AdvUnlearn's inner attack
(:mod:`erasure.methods.advunlearn`) use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EmbeddingOverride", "EmbeddingOverrideError", "token_embedding"]


class EmbeddingOverrideError(ValueError):
    """An encoder without a token-embedding table, or rows that do not fit their positions or batch."""


def token_embedding(text_encoder: nn.Module) -> nn.Embedding:
    """The token-embedding table of a CLIP text encoder (transformers 4 and 5 layouts).

    Raises:
        EmbeddingOverrideError: If none is found.
    """
    for path in ("text_model.embeddings.token_embedding", "embeddings.token_embedding"):
        module: Any = text_encoder
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.Embedding):
            return module
    embedding = text_encoder.get_input_embeddings() if hasattr(text_encoder, "get_input_embeddings") else None
    if isinstance(embedding, nn.Embedding):
        return embedding
    raise EmbeddingOverrideError(f"{type(text_encoder).__name__} has no token-embedding table this library can hook.")


class EmbeddingOverride:
    """A forward hook on the token-embedding table that replaces the rows at given positions (a ``with`` block).

    Inside :meth:`rows` (itself a ``with`` block) every call of the encoder must have the batch size it was given;
    outside it the hook passes everything through, so prompts encoded meanwhile (the unconditional prompt of CFG)
    are untouched.
    """

    def __init__(self, text_encoder: nn.Module) -> None:
        self.embedding = token_embedding(text_encoder)
        self._handle: Any = None
        self._active: tuple[list[Tensor], list[Tensor]] | None = None

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if self._active is None:
            return None
        positions, rows = self._active
        if output.shape[0] != len(positions):
            raise EmbeddingOverrideError(
                f"The override holds rows for {len(positions)} prompts, the encoder got {output.shape[0]}."
            )
        output = output.clone()
        for b, (where, values) in enumerate(zip(positions, rows, strict=True)):
            if len(where):
                output[b, where] = values.to(output.dtype)
        return output

    def __enter__(self) -> EmbeddingOverride:
        self._handle = self.embedding.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._active = None

    @contextlib.contextmanager
    def rows(self, positions: Sequence[Tensor], rows: Sequence[Tensor]) -> Iterator[None]:
        """Override, for prompt ``b`` of each encoder call, the rows at ``positions[b]`` with ``rows[b]``."""
        if len(positions) != len(rows):
            raise EmbeddingOverrideError("give one row tensor per position tensor")
        for where, values in zip(positions, rows, strict=True):
            if values.shape[0] != len(where):
                raise EmbeddingOverrideError(f"{len(where)} positions but {values.shape[0]} rows")
        self._active = ([torch.as_tensor(p, dtype=torch.long) for p in positions], list(rows))
        try:
            yield
        finally:
            self._active = None
