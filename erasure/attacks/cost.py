"""The cost meter: UNet and text-encoder work counted by hooks, so attacks compare by budget, not only by success.

:class:`CostMeter` counts UNet forward calls and batch rows, UNet backward calls and rows, text-encoder passes
(forward and backward) and seconds, by forward hooks on the modules (a backward is counted when the gradient
reaches the module's output). :meth:`erasure.attacks.context.AttackContext.meter` makes one;
:meth:`erasure.attacks.base.Attack.run` meters every attack.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import Tensor

from erasure.attacks.override import token_embedding

__all__ = ["CostMeter"]


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, tuple | list):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    sample = getattr(value, "sample", None)
    return sample if isinstance(sample, Tensor) else None


class CostMeter:
    """Counts UNet and text-encoder work while active (a ``with`` block), by hooks on the modules.

    Counted per module (``unet``, ``text_encoder``; SDXL's ``text_encoder_2`` adds to the text-encoder counts):
    ``*_forwards`` (calls), ``*_forward_rows`` (batch rows: a CFG step of ``B`` images is one call of ``2B``
    rows), ``*_backwards`` and ``*_backward_rows`` (a backward reached the module's output; for the text encoder,
    its token-embedding output, where attacks put their gradients), and ``seconds`` of wall time. Meters nest:
    each counts everything run inside its block.
    """

    COUNTERS: ClassVar[tuple[str, ...]] = tuple(
        f"{module}_{kind}"
        for module in ("unet", "text_encoder")
        for kind in ("forwards", "forward_rows", "backwards", "backward_rows")
    )

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.counts: dict[str, float] = dict.fromkeys(self.COUNTERS, 0)
        self.counts["seconds"] = 0.0
        self._handles: list[Any] = []
        self._started: float | None = None

    def _count(self, module: str, kind: str, rows: int) -> None:
        self.counts[f"{module}_{kind}s"] += 1
        self.counts[f"{module}_{kind}_rows"] += int(rows)

    def _forward_hook(self, module_name: str, watch_output: bool) -> Callable[..., None]:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            first = _first_tensor(list(args) + list(kwargs.values()))
            rows = int(first.shape[0]) if first is not None and first.ndim else 1
            self._count(module_name, "forward", rows)
            out = _first_tensor(output)
            if watch_output and out is not None and out.requires_grad:
                out.register_hook(lambda grad: self._count(module_name, "backward", grad.shape[0]) or None)

        return hook

    def _embedding_hook(self, module: Any, args: tuple, output: Any) -> None:
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(lambda grad: self._count("text_encoder", "backward", grad.shape[0]) or None)

    def __enter__(self) -> CostMeter:
        self._handles.append(self.pipe.unet.register_forward_hook(self._forward_hook("unet", True), with_kwargs=True))
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(self.pipe, name, None)
            if encoder is None:
                continue
            self._handles.append(
                encoder.register_forward_hook(self._forward_hook("text_encoder", False), with_kwargs=True)
            )
            self._handles.append(token_embedding(encoder).register_forward_hook(self._embedding_hook))
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._started is not None:
            self.counts["seconds"] += time.perf_counter() - self._started
            self._started = None

    def summary(self) -> dict[str, float]:
        """The counts so far (seconds include the running block)."""
        counts = dict(self.counts)
        if self._started is not None:
            counts["seconds"] += time.perf_counter() - self._started
        return {key: (round(value, 3) if key == "seconds" else int(value)) for key, value in counts.items()}
