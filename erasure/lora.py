"""Low-rank adapters run as forward hooks: ``W x + B (A x)`` while the weights themselves stay untouched.

MACE trains one rank-``r`` LoRA per concept on the cross-attention keys/values (its stage 2) and relearning
(MemoRa-style) constrains a fine-tune to rank ``r``. Both start the same way as Hu et al. (2021, Sec. 4.1): ``A``
Gaussian, ``B`` zero, so the adapted model equals the unadapted one at step 0 and the first gradient moves ``B``.
Running the adapter as a hook rather than adding ``B A`` into ``W`` keeps the base weights bit-identical, so the
change is read back exactly as ``B A`` (:func:`lora_deltas`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["lora_deltas", "lora_hooks"]


@contextlib.contextmanager
def lora_hooks(
    model: torch.nn.Module,
    parameters: dict[str, torch.nn.Parameter],
    rank: int,
    generator: torch.Generator,
    a_std: float | None = None,
) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Add a rank-``rank`` adapter to each 2-D weight while the block runs; yield ``{key: (A, B)}``.

    Args:
        model: The module holding the weights (a UNet); ``parameters`` are keyed ``<prefix>.<submodule>.weight``
            and the hook goes on ``<submodule>`` (the prefix, e.g. ``unet.``, is dropped).
        parameters: The 2-D weights ``W`` [out, in] to adapt.
        rank: ``r``, the adapter rank.
        generator: Draws ``A`` (``B`` starts at zero).
        a_std: The standard deviation of ``A``'s entries; ``1/sqrt(in)`` when not given. diffusers'
            ``LoRALinearLayer`` (which MACE's official code uses) draws ``1/rank``; with Adam, ``B`` moves about
            ``lr`` per step whatever ``A`` is, so ``B A`` grows in proportion to this scale.

    Yields:
        The trainable factors ``A`` [r, in] and ``B`` [out, r] (``requires_grad``), on each weight's device and dtype.

    Raises:
        ValueError: A weight that is not 2-D.
    """
    factors, handles = {}, []
    try:
        for key, parameter in parameters.items():
            if parameter.ndim != 2:
                raise ValueError(f"a LoRA adapts 2-D weights only; {key} has {parameter.ndim} dimensions.")
            module = model.get_submodule(key.partition(".")[2].removesuffix(".weight"))
            std = a_std if a_std is not None else 1 / math.sqrt(parameter.shape[1])
            a = torch.randn(rank, parameter.shape[1], generator=generator) * std
            a = a.to(parameter).requires_grad_(True)
            b = torch.zeros(parameter.shape[0], rank).to(parameter).requires_grad_(True)
            handles.append(module.register_forward_hook(lambda m, args, out, a=a, b=b: out + (args[0] @ a.T) @ b.T))
            factors[key] = (a, b)
        yield factors
    finally:
        for handle in handles:
            handle.remove()


def lora_deltas(factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """``{key: B A}``: each adapter's weight change, detached."""
    return {key: (b.detach() @ a.detach()) for key, (a, b) in factors.items()}
