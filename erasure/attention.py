"""Cross-attention discovery and concept-token positions.

In diffusers' UNets every transformer block holds ``attn1`` (self-attention over image tokens) and ``attn2``
(cross-attention from image tokens to the text encoder's token embeddings). Methods that edit or watch how text
enters the image (UCE, MACE, Forget-Me-Not) reach cross-attention through :func:`cross_attention_modules`, and
find the prompt positions of a concept with :func:`token_indices`.

Watching cross-attention goes through processors, never through monkeypatched ``forward``:
:func:`swapped_cross_attention` installs a processor on every ``attn2`` module and puts the saved ones back on exit
(diffusers' ``set_default_attn_processor`` refuses to run once custom processors are installed, so it cannot be
used to undo a swap). :class:`AttentionProbsProcessor` computes the attention probabilities explicitly and hands them
to a :class:`CrossAttentionRecorder`, which keeps what a method needs (with gradients), for example the attention
mass on a concept's tokens for Forget-Me-Not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AttentionProbsProcessor",
    "CrossAttentionRecorder",
    "cross_attention_modules",
    "record_cross_attention",
    "swapped_cross_attention",
    "token_indices",
    "token_mask",
]


def cross_attention_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every cross-attention module of a UNet, by its module name.

    Args:
        unet: A diffusers ``UNet2DConditionModel``.

    Returns:
        ``{name: Attention}`` for each module whose name ends with ``attn2``, in module order (for example
        ``down_blocks.1.attentions.0.transformer_blocks.0.attn2``).
    """
    return {name: module for name, module in unet.named_modules() if name.split(".")[-1] == "attn2"}


def _word_ids(tokenizer: Any, text: str) -> list[int]:
    special = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
    return [i for i in tokenizer(text, add_special_tokens=False).input_ids if i not in special]


def token_indices(tokenizer: Any, prompt: str, words: str | Sequence[str] | None = None) -> list[int]:
    """Positions of a concept's own tokens in the encoded prompt (start token at position 0).

    CLIP tokenizes each whitespace-separated word on its own (lowercased), so a word's tokens are the same inside
    a prompt as alone; each occurrence of each word's token sequence is found in the prompt's tokens.

    Args:
        tokenizer: The pipeline's (CLIP) tokenizer.
        prompt: The prompt as fed to the text encoder.
        words: The concept's words (``"Van Gogh"`` or ``["Pip"]``); ``None`` for every token of the prompt.

    Returns:
        Sorted positions into the padded sequence the text encoder sees; never the start, end or padding
        tokens. Empty if no word occurs in the prompt.
    """
    ids = tokenizer(prompt, add_special_tokens=True, truncation=True).input_ids
    special = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
    if words is None:
        return [position for position, token in enumerate(ids) if token not in special]
    if isinstance(words, str):
        words = [words]
    found: set[int] = set()
    for word in words:
        pattern = _word_ids(tokenizer, word)
        if not pattern:
            continue
        for start in range(len(ids) - len(pattern) + 1):
            if ids[start : start + len(pattern)] == pattern:
                found.update(range(start, start + len(pattern)))
    return sorted(position for position in found if ids[position] not in special)


# --------------------------------------------------------------------------------------------------------------
# Processor swapping and attention recording
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def swapped_cross_attention(
    unet: torch.nn.Module, make_processor: Callable[[str, torch.nn.Module], Any]
) -> Iterator[dict[str, Any]]:
    """Install a processor on every cross-attention module; put the previous processors back on exit.

    Only ``attn2`` modules are touched, each restored to the very processor object it had (also on errors), so
    swaps nest and other processors (``attn1``, LoRA, xformers) survive.

    Args:
        unet: A diffusers ``UNet2DConditionModel``.
        make_processor: ``(module name, attention module) -> processor``, called once per ``attn2`` module.

    Yields:
        ``{module name: installed processor}``.
    """
    modules = cross_attention_modules(unet)
    saved = {name: module.processor for name, module in modules.items()}
    installed: dict[str, Any] = {}
    try:
        for name, module in modules.items():
            installed[name] = make_processor(name, module)
            module.set_processor(installed[name])
        yield installed
    finally:
        for name, module in modules.items():
            module.set_processor(saved[name])


def token_mask(indices: Sequence[Sequence[int]], length: int = 77, device: torch.device | str | None = None) -> Tensor:
    """A ``[B, length]`` boolean mask with ``True`` at each row's token positions (from :func:`token_indices`)."""
    mask = torch.zeros(len(indices), length, dtype=torch.bool, device=device)
    for row, positions in enumerate(indices):
        if positions:
            mask[row, list(positions)] = True
    return mask


class CrossAttentionRecorder:
    """Collects cross-attention probabilities ``A = softmax(Q K^T / sqrt(d))`` from :class:`AttentionProbsProcessor`.

    Per module call it keeps (with the autograd graph, so they can be losses):

    * ``mass``: for each batch item, the attention mass on the masked tokens, ``sum_{k in mask} A[h, q, k]``,
      averaged over heads ``h`` and image queries ``q`` (a fraction in ``[0, 1]``);
    * ``sum_of_squares``: ``sum_{b, h, q, k in mask} A[b, h, q, k]^2``;
    * with ``keep_probs``, the detached ``[B, heads, Q, K]`` probabilities themselves.

    Attributes:
        token_mask: ``[B, K]`` or ``[K]`` boolean mask of the tokens of interest (for example from
            :func:`token_mask`); ``None`` records only probabilities (with ``keep_probs``).
        keep_probs: Keep the detached probabilities in :attr:`probs`.
        masses: ``(module name, [B] mass)`` per call.
        squares: ``(module name, scalar)`` per call.
        probs: ``(module name, [B, heads, Q, K])`` per call, when ``keep_probs``.
    """

    def __init__(self, token_mask: Tensor | None = None, keep_probs: bool = False) -> None:
        self.token_mask = token_mask
        self.keep_probs = keep_probs
        self.masses: list[tuple[str, Tensor]] = []
        self.squares: list[tuple[str, Tensor]] = []
        self.probs: list[tuple[str, Tensor]] = []

    def reset(self) -> None:
        """Forget everything recorded (the mask stays)."""
        self.masses, self.squares, self.probs = [], [], []

    def __call__(self, name: str, probs: Tensor) -> None:
        """Record one module's ``[B, heads, Q, K]`` attention probabilities."""
        if self.keep_probs:
            self.probs.append((name, probs.detach()))
        if self.token_mask is None:
            return
        mask = self.token_mask.to(probs.device)
        if mask.ndim == 1:
            mask = mask.unsqueeze(0)
        if mask.shape[-1] != probs.shape[-1] or mask.shape[0] not in (1, probs.shape[0]):
            raise ValueError(
                f"token_mask has shape {tuple(mask.shape)} but the attention has batch {probs.shape[0]} and "
                f"{probs.shape[-1]} tokens; give one row (or one per batch item) of {probs.shape[-1]} tokens."
            )
        selected = probs * mask[:, None, None, :].to(probs.dtype)
        self.masses.append((name, selected.sum(-1).float().mean(dim=(1, 2))))
        self.squares.append((name, selected.float().square().sum()))

    def mass(self) -> Tensor:
        """``[B]`` attention mass on the masked tokens, averaged over every recorded module call."""
        if not self.masses:
            raise RuntimeError("Nothing recorded: set token_mask and run the UNet inside record_cross_attention.")
        return torch.stack([mass for _, mass in self.masses]).mean(0)

    def sum_of_squares(self) -> Tensor:
        """Scalar ``sum A^2`` over the masked tokens of every recorded module call."""
        if not self.squares:
            raise RuntimeError("Nothing recorded: set token_mask and run the UNet inside record_cross_attention.")
        return torch.stack([square for _, square in self.squares]).sum()


class AttentionProbsProcessor:
    """An attention processor that materialises the attention probabilities and passes them to a recorder.

    It computes what diffusers' default ``AttnProcessor`` computes (group/spatial norms, masks, residual, output
    rescaling included) with the probabilities as an explicit tensor, so gradients flow through the recorder.

    Args:
        recorder: Called as ``recorder(name, probs)`` with ``[B, heads, Q, K]`` probabilities.
        name: The module's name, passed to the recorder.
    """

    def __init__(self, recorder: Callable[[str, Tensor], None], name: str) -> None:
        self.recorder = recorder
        self.name = name

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Attention forward, recording the probabilities."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, key_length = context.shape[0], context.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)  # [B*heads, Q, K]
        self.recorder(self.name, probs.view(batch_size, attn.heads, *probs.shape[1:]))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def record_cross_attention(
    unet: torch.nn.Module, recorder: CrossAttentionRecorder | Callable[[str, Tensor], None]
) -> Iterator[CrossAttentionRecorder | Callable[[str, Tensor], None]]:
    """Record every cross-attention's probabilities into ``recorder`` while the block runs.

    Example:
        >>> recorder = CrossAttentionRecorder(token_mask(indices))
        >>> with record_cross_attention(pipe.unet, recorder):
        ...     pipe.unet(latents, t, encoder_hidden_states=embeds)
        >>> recorder.mass()

    Yields:
        The recorder.
    """
    with swapped_cross_attention(unet, lambda name, _: AttentionProbsProcessor(recorder, name)):
        yield recorder
