"""Generation-time edits: methods that suppress a concept while sampling and change no weight.

A negative prompt or Safe Latent Diffusion hides a concept from the usual prompts without touching the model, so
they are the baselines that make "removed from the weights" versus "only hidden" visible. They are saved like a
weight edit (an ``edit_config.json``, marked ``"generation_time": true``, with no ``edit.safetensors``) and used
like one: ``with edit.applied(pipe): ...`` makes :func:`erasure.generate.generate` sample with the suppression
(and with nothing else changed), which is how the evaluator, the grid, the demo and the report see them. They are
never exported as weights, and every output that records a model labels them ``generation-time``.

Subclasses (one per method, in :mod:`erasure.methods`) implement two hooks:

* :meth:`GenerationEdit.pipeline_kwargs`: extra arguments of the pipeline call (``negative_prompt``);
* :meth:`GenerationEdit.guidance`: a context manager active during the pipeline call (SLD's noise-prediction
  hook).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from erasure import __version__
from erasure.edit import CONFIG_NAME, check_output_folder
from erasure.files import atomic_path, output_lock

logger = logging.getLogger(__name__)

#: The config key that marks a generation-time edit.
GENERATION_TIME_KEY = "generation_time"

_ACTIVE: weakref.WeakKeyDictionary[Any, tuple[GenerationEdit, float]] = weakref.WeakKeyDictionary()


class GenerationEditError(ValueError):
    """A generation-time edit was used where weights are needed, at a strength it has not, or twice at once."""


def active_generation_edit(pipe: Any) -> tuple[GenerationEdit, float] | None:
    """The generation-time edit applied to ``pipe`` and its scale, or ``None``."""
    return _ACTIVE.get(pipe)


class GenerationEdit:
    """A suppression applied while sampling; no weight changes.

    Attributes:
        config: JSON-friendly metadata, as a weight edit's: ``method``, ``method_config``, ``request``,
            ``base_model``, ``family``, plus ``generation_time: true``.
        deltas: Always empty (read-only): a generation-time edit changes no tensor.
    """

    #: Scales this edit can be applied at; ``None``: any scale >= 0.
    allowed_scales: tuple[float, ...] | None = None

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config: dict[str, Any] = dict(config)
        self.config[GENERATION_TIME_KEY] = True
        self.config.setdefault("erasure_version", __version__)
        self.config.setdefault("created", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        self.deltas: Mapping[str, Any] = MappingProxyType({})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.config.get('method')!r})"

    @property
    def method_config(self) -> dict[str, Any]:
        """The method's settings."""
        return dict(self.config.get("method_config", {}))

    # -- the hooks --------------------------------------------------------------------------------------------

    def pipeline_kwargs(self, pipe: Any, scale: float) -> dict[str, Any]:
        """Extra keyword arguments of the diffusers pipeline call, one value per image (``negative_prompt``)."""
        return {}

    def guidance(
        self, pipe: Any, guidance_scale: float, scale: float, first_step: int = 0
    ) -> contextlib.AbstractContextManager:
        """A context manager active during one sampling run that starts at step ``first_step`` (default: none)."""
        return contextlib.nullcontext()

    # -- application ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def applied(self, pipe: Any, scale: float = 1.0, **ignored: Any) -> Iterator[Any]:
        """Sample ``pipe`` with this suppression inside the block.

        Weight-edit options such as ``max_relative_change`` are accepted and ignored: there are no weights to limit.

        Raises:
            GenerationEditError: On a scale the method has no meaning for, or another generation-time edit already
                applied to ``pipe``.
        """
        scale = float(scale)
        if scale < 0 or (self.allowed_scales is not None and scale not in self.allowed_scales):
            allowed = ", ".join(f"{s:g}" for s in self.allowed_scales or ()) or "a number >= 0"
            raise GenerationEditError(
                f"A {self.config.get('method')} edit has no strength {scale:g}; use {allowed} (0: off, 1: on)."
            )
        if pipe in _ACTIVE:
            raise GenerationEditError(
                f"{_ACTIVE[pipe][0]!r} is already applied to this pipeline; apply one generation-time edit at a time."
            )
        _ACTIVE[pipe] = (self, scale)
        try:
            yield pipe
        finally:
            _ACTIVE.pop(pipe, None)

    def check_base(self, pipe: Any) -> None:
        """Nothing to check: a generation-time edit holds no tensor of a base model and fits any pipeline."""

    def apply_to(self, pipe: Any, **_: Any) -> None:
        """Refuse: a generation-time edit cannot be applied as weights; use :meth:`applied` around generation."""
        raise GenerationEditError(
            f"{self.config.get('method')} is a generation-time edit: it changes no weights; sample inside "
            "`with edit.applied(pipe):` (erasure generate, evaluate, grid and probe do this for you)."
        )

    # -- files ------------------------------------------------------------------------------------------------

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``edit_config.json`` (and nothing else) into ``folder`` atomically.

        The rules of :meth:`erasure.edit.Edit.save` for existing folders apply.
        """
        folder = Path(folder)
        with output_lock(folder):
            check_output_folder(folder, overwrite)
            with atomic_path(folder) as temporary:
                temporary.mkdir()
                text = json.dumps(json.loads(json.dumps(self.config, default=str)), indent=2, sort_keys=True)
                (temporary / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
        logger.info("Saved %r to %s.", self, folder)
        return folder


def is_generation_time(config: Mapping[str, Any]) -> bool:
    """Whether an edit config describes a generation-time edit."""
    return bool(config.get(GENERATION_TIME_KEY))
