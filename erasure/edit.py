"""Edits: the weight changes an erasure method made, as deltas of the touched tensors only.

An :class:`Edit` holds ``new - old`` (float32) for each tensor a method changed, keyed ``unet.<diffusers name>``,
``text_encoder.<name>`` or ``text_encoder_2.<name>``, plus a JSON config: the method and its config, the erase
request, the base model, its family, a fingerprint of the base tensors, the method's stats, the erasure version
and the creation time. On disk an edit is a folder with ``edit.safetensors`` and ``edit_config.json``.

Because an edit is a delta, scaling (``apply_to(pipe, scale=0.5)``), reverting, stacking and replaying come free;
full diffusers folders, LoRA adapters and single-file checkpoints are export formats (see the CLI's ``export``).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import weakref
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from erasure import __version__
from erasure.files import atomic_path, output_lock

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Edit",
    "EditFormatError",
    "FingerprintMismatchError",
    "fingerprint",
    "pipeline_tensor",
    "stack",
]

WEIGHTS_NAME = "edit.safetensors"
CONFIG_NAME = "edit_config.json"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

#: A delta larger than this many times its base tensor (root-mean-square values) is refused when applied: no method of
#: the field moves a tensor that far, and a tampered or diverged edit does (``max_relative_change`` overrides).
STATE_DICT_METHOD = "state_dict"  # the method name of an edit made from a peer's tensors (from_state_dict)
MAX_RELATIVE_CHANGE = 10.0
#: Sizes are root-mean-square values; a base tensor smaller than this counts as this size.
RMS_FLOOR = 0.01


class FingerprintMismatchError(ValueError):
    """The pipeline's tensors are not the ones the edit was made from."""


class EditFormatError(ValueError):
    """An edit folder is missing, incomplete or corrupt, or a folder cannot be overwritten by an edit."""


def fingerprint(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``tensors``, in sorted name order.

    Args:
        tensors: Named tensors (any device or dtype).

    Returns:
        A hex digest; equal exactly when every name, shape, dtype and bit is equal.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pipeline_tensor(pipe: Any, key: str) -> torch.nn.Parameter:
    """The parameter a delta key names, e.g. ``unet.mid_block.attentions.0....to_k.weight``.

    Raises:
        KeyError: If the pipeline has no such component or parameter.
    """
    component_name, _, name = key.partition(".")
    component = getattr(pipe, component_name, None) if component_name in COMPONENTS else None
    if not isinstance(component, torch.nn.Module):
        raise KeyError(f"'{key}' names no component of this pipeline (expected one of {', '.join(COMPONENTS)}).")
    candidates = [name]
    if component_name.startswith("text_encoder"):  # transformers >= 5.6 drops CLIPTextModel's "text_model." prefix
        candidates.append(name.removeprefix("text_model.") if name.startswith("text_model.") else f"text_model.{name}")
    for candidate in candidates:
        try:
            return component.get_parameter(candidate)
        except AttributeError:
            continue
    raise KeyError(f"The pipeline's {component_name} has no parameter '{name}'.")


def edited_rows(pipe: Any, key: str, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The part of the tensor ``key`` names that a delta of ``shape`` edits: all, or a grown token table's first rows.

    A token-embedding table grows when tokens are added after the edit was made (a textual-inversion placeholder,
    ``load_textual_inversion``): the edit's rows are the first ``shape[0]`` (the vocabulary it was made on) and the
    added rows are not the edit's. Any other shape mismatch returns the whole tensor for the caller to refuse.

    Raises:
        KeyError: If the pipeline has no such component or parameter.
    """
    parameter = pipeline_tensor(pipe, key)
    grown = (
        key.endswith("token_embedding.weight")
        and parameter.ndim == len(shape) == 2
        and parameter.shape[1] == shape[1]
        and parameter.shape[0] > shape[0]
    )
    return parameter[: shape[0]] if grown else parameter


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class Edit:
    """Weight deltas of the touched tensors plus metadata.

    Attributes:
        deltas: ``{key: new - old}`` (float32, CPU) for each changed tensor.
        config: JSON-friendly metadata: ``method``, ``method_config``, ``request``, ``base_model``, ``family``,
            ``base_fingerprint``, ``stats``, ``erasure_version``, ``created`` (a stack has ``parts`` instead).
        applied_scale: The scale of the current application, or ``None`` when not applied.
    """

    def __init__(self, deltas: Mapping[str, Tensor], config: Mapping[str, Any] | None = None) -> None:
        self.deltas: dict[str, Tensor] = {
            key: value.detach().to("cpu", torch.float32).contiguous() for key, value in deltas.items()
        }
        self.config: dict[str, Any] = dict(config or {})
        self.config.setdefault("erasure_version", __version__)
        self.config.setdefault("created", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        self.applied_scale: float | None = None
        self._originals: dict[str, Tensor] | None = None
        self._pipe_ref: weakref.ref | None = None

    def __repr__(self) -> str:
        size = sum(delta.numel() for delta in self.deltas.values())
        return f"Edit(method={self.config.get('method')!r}, tensors={len(self.deltas)}, values={size})"

    # -- application -----------------------------------------------------------------------------------------

    def _fingerprint_checks(self) -> list[tuple[list[str], str | None]]:
        """``(keys, fingerprint)`` pairs to verify: one for a plain edit, one per part for a stack."""
        if "parts" in self.config:
            return [(list(part.get("keys", [])), part.get("base_fingerprint")) for part in self.config["parts"]]
        return [(list(self.deltas), self.config.get("base_fingerprint"))]

    def check_base(self, pipe: Any) -> None:
        """Raise :class:`FingerprintMismatchError` unless ``pipe`` holds the base tensors of this edit."""
        self._check_shapes(pipe)
        for keys, expected in self._fingerprint_checks():
            if expected is None:
                continue
            try:
                current = {key: edited_rows(pipe, key, self.deltas[key].shape) for key in keys}
            except KeyError as error:
                raise FingerprintMismatchError(
                    f"This edit does not fit the pipeline: {error.args[0]} (edit made from "
                    f"{self.config.get('base_model') or 'an unnamed model'})."
                ) from None
            if fingerprint(current) != expected:
                raise FingerprintMismatchError(
                    f"The pipeline's weights differ from those the edit was made from "
                    f"({self.config.get('base_model') or 'unnamed base'}, {len(keys)} tensors): load the same base "
                    "model, revert other edits first, or pass check=False to apply anyway."
                )

    def _check_shapes(self, pipe: Any) -> None:
        base = self.config.get("base_model") or "an unnamed model"
        for key, delta in self.deltas.items():
            try:
                parameter = edited_rows(pipe, key, delta.shape)
            except KeyError as error:
                raise FingerprintMismatchError(
                    f"This edit does not fit the pipeline: {error.args[0]} (edit made from {base})."
                ) from None
            if parameter.shape != delta.shape:
                raise FingerprintMismatchError(
                    f"This edit does not fit the pipeline: {key} has shape {tuple(parameter.shape)} here but "
                    f"{tuple(delta.shape)} in the edit (made from {base})."
                )

    def apply_to(
        self, pipe: Any, scale: float = 1.0, check: bool = True, max_relative_change: float = MAX_RELATIVE_CHANGE
    ) -> None:
        """Add ``scale * delta`` to the pipeline's tensors, in place.

        The touched tensors are kept, so :meth:`revert` restores them bit for bit.

        Args:
            pipe: The pipeline holding the base weights.
            scale: Strength of the edit; 0 leaves the weights unchanged, 1 is the edit as made.
            check: Verify the base fingerprint first.
            max_relative_change: Refuse a delta whose root-mean-square value exceeds this multiple of its base
                tensor's (``rms(scale * delta) > max_relative_change * max(rms(W0), RMS_FLOOR)``); ``math.inf``
                for a user who means it.

        Raises:
            FingerprintMismatchError: If ``check`` and the pipeline's tensors are not the edit's base.
            ValueError: If ``scale`` is not finite, or a delta is implausibly large for its tensor.
            RuntimeError: If this edit is already applied (revert it first).
        """
        if self._originals is not None:
            raise RuntimeError("This edit is already applied; call revert(pipe) before applying it again.")
        if not math.isfinite(float(scale)):
            raise ValueError(f"The edit's scale must be a finite number, got {scale}.")
        if check:
            self.check_base(pipe)
        else:
            self._check_shapes(pipe)
        parameters = {key: edited_rows(pipe, key, d.shape) for key, d in self.deltas.items()}
        for key, parameter in parameters.items():
            # root-mean-square sizes; a tensor the base holds at (near) zero, such as a fresh bias, counts as 0.01
            change = abs(float(scale)) * float(self.deltas[key].norm()) / max(self.deltas[key].numel(), 1) ** 0.5
            size = max(float(parameter.detach().float().norm()) / max(parameter.numel(), 1) ** 0.5, RMS_FLOOR)
            if change > max_relative_change * size:
                raise ValueError(
                    f"The edit changes {key} by {change / size:.3g} times its own size (limit "
                    f"{max_relative_change:g}); the edit is broken or was altered. Pass max_relative_change="
                    "math.inf (--allow-large-edit) if you mean it."
                )
        originals = {key: parameter.detach().to("cpu", copy=True) for key, parameter in parameters.items()}
        with torch.no_grad():
            for key, parameter in parameters.items():
                edited = originals[key].float() + float(scale) * self.deltas[key]
                parameter.copy_(edited.to(parameter.dtype))
        self._originals = originals
        self._pipe_ref = weakref.ref(pipe)
        self.applied_scale = float(scale)

    def revert(self, pipe: Any) -> None:
        """Restore the tensors :meth:`apply_to` changed, bit for bit.

        Raises:
            RuntimeError: If the edit is not applied to this pipeline.
        """
        if self._originals is None or self._pipe_ref is None or self._pipe_ref() is not pipe:
            raise RuntimeError("This edit is not applied to this pipeline; nothing to revert.")
        with torch.no_grad():
            for key, original in self._originals.items():
                edited_rows(pipe, key, original.shape).copy_(original)
        self._originals = None
        self._pipe_ref = None
        self.applied_scale = None

    @contextlib.contextmanager
    def applied(
        self, pipe: Any, scale: float = 1.0, check: bool = True, max_relative_change: float = MAX_RELATIVE_CHANGE
    ) -> Iterator[Any]:
        """Apply the edit for the duration of a ``with`` block and revert it after, also when the block fails.

        Arguments as :meth:`apply_to`. Yields ``pipe``.
        """
        self.apply_to(pipe, scale=scale, check=check, max_relative_change=max_relative_change)
        try:
            yield pipe
        finally:
            self.revert(pipe)

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Tensor], pipe: Any, component: str = "unet", source: str = ""
    ) -> Edit:
        """The edit that turns ``pipe``'s current weights into ``state`` (a peer's partial state dict).

        ``delta = state[name] - W[name]`` for each tensor, computed in float64 and stored in float32, so applying the
        edit reproduces the peer's tensors up to float32 rounding (exactly where a value is within a factor of two
        of the base's, by Sterbenz's lemma). The base fingerprint is taken from ``pipe``, so the edit refuses
        any other base model.

        Args:
            state: ``{parameter name of component: tensor}`` (diffusers names, no component prefix).
            pipe: The base pipeline the state dict was made from.
            component: Which pipeline component the names belong to (``unet`` or ``text_encoder``).
            source: Where the tensors came from (a file path), recorded in the config.

        Raises:
            KeyError: If a name is not a tensor of the component.
            ValueError: If a shape differs from the model's.
        """
        deltas, current = {}, {}
        for name, tensor in state.items():
            key = f"{component}.{name}"
            parameter = pipeline_tensor(pipe, key)
            if tuple(tensor.shape) != tuple(parameter.shape):
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)} but the model's has {tuple(parameter.shape)}; "
                    "the tensors come from a different base model."
                )
            current[key] = parameter
            deltas[key] = (tensor.detach().double().cpu() - parameter.detach().double().cpu()).float()
        config = {
            "method": STATE_DICT_METHOD,
            "method_config": {"source": str(source), "component": component},
            "base_fingerprint": fingerprint(current),
        }
        return cls(deltas, config)

    # -- files -----------------------------------------------------------------------------------------------

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``edit.safetensors`` and ``edit_config.json`` into ``folder``, atomically.

        Both files are written to a temporary folder beside ``folder``, which is then renamed into place, so a
        crash leaves either the old folder or the new one, never a mix. An existing edit folder is replaced only
        with ``overwrite`` (a repeated command line must not cost a user an hour-long run); an existing non-empty
        folder that is not an edit is always refused.

        Args:
            folder: Destination folder.
            overwrite: Replace an edit already saved in ``folder``.

        Returns:
            The folder.

        Raises:
            EditFormatError: If ``folder`` exists and is a file, a non-edit folder, or an edit (without
                ``overwrite``).
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        with output_lock(folder):  # the checks and the write as one step: no other writer in between
            check_output_folder(folder, overwrite)
            with atomic_path(folder) as temporary:
                temporary.mkdir()
                tensors = {key: delta.contiguous() for key, delta in self.deltas.items()}
                save_file(tensors, str(temporary / WEIGHTS_NAME), metadata={"format": "pt", "kind": "erasure-edit"})
                text = json.dumps(_json_safe(self.config), indent=2, sort_keys=True)
                (temporary / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")
        logger.info("Saved %r to %s.", self, folder)
        return folder

    @classmethod
    def load(
        cls, folder: str | Path, *, require_fingerprint: bool = True, known_methods: Collection[str] | None = None
    ) -> Edit:
        """Read an edit folder written by :meth:`save` (safetensors only; nothing is unpickled), and validate it.

        Validation (:func:`validate_edit`): the config names a method (one of ``known_methods`` when given:
        :func:`erasure.methods.load_edit` passes the registered names), every delta is finite, and the
        base fingerprint is there -- without it nothing could tell that the edit is applied to the model it was
        made from. ``require_fingerprint=False`` accepts an edit without one; the caller must record that the check
        was skipped in whatever it writes (``base_check: skipped``).

        Raises:
            EditFormatError: If the folder or a file is missing, a file is corrupt, or validation fails.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        weights_path = folder / WEIGHTS_NAME
        config = read_edit_config(folder)
        if config.get("generation_time"):
            raise EditFormatError(
                f"{folder} holds a generation-time edit ({config.get('method')}): it changes no weights; load it "
                "with erasure.methods.load_edit."
            )
        if not weights_path.is_file():
            raise EditFormatError(f"{folder} is not a complete edit: {weights_path.name} is missing.")
        try:
            deltas = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise EditFormatError(f"{weights_path} is corrupt ({error}); save the edit again.") from error
        bad = [key for key in deltas if key.partition(".")[0] not in COMPONENTS]
        if bad:
            raise EditFormatError(f"{weights_path} holds {bad[0]!r}, which is not an edit key; is it an edit?")
        validate_edit(
            deltas, config, where=str(folder), require_fingerprint=require_fingerprint, known_methods=known_methods
        )
        return cls(deltas, config)


def check_output_folder(folder: Path, overwrite: bool) -> None:
    """Refuse to write an edit over a file, a folder that is not an edit, or (without ``overwrite``) an edit.

    Raises:
        EditFormatError: Naming the folder and what to do.
    """
    if not folder.exists():
        return
    if not folder.is_dir():
        raise EditFormatError(f"{folder} exists and is a file; choose another output folder.")
    if any(folder.iterdir()) and not (folder / CONFIG_NAME).is_file():
        raise EditFormatError(
            f"{folder} exists and is not an edit folder (no {CONFIG_NAME}); refusing to overwrite it: choose another "
            "output folder."
        )
    if (folder / CONFIG_NAME).is_file() and not overwrite:
        raise EditFormatError(
            f"{folder} already holds an edit; choose another output folder, or replace it with overwrite=True "
            "(erasure erase --overwrite)."
        )


def read_edit_config(folder: str | Path) -> dict[str, Any]:
    """The JSON object of ``folder/edit_config.json``.

    Raises:
        EditFormatError: If the folder or the file is missing, or the file is corrupt or not a JSON object.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EditFormatError(f"No edit folder at {folder}.")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise EditFormatError(f"{folder} is not a complete edit: {CONFIG_NAME} is missing.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EditFormatError(f"{config_path} is corrupt ({error}); save the edit again.") from error
    if not isinstance(config, dict):
        raise EditFormatError(f"{config_path} does not hold a JSON object; save the edit again.")
    return config


def validate_edit(
    deltas: Mapping[str, Tensor],
    config: Mapping[str, Any],
    *,
    where: str = "the edit",
    require_fingerprint: bool = True,
    known_methods: Collection[str] | None = None,
) -> None:
    """Refuse an edit whose metadata is incomplete or tampered with, or whose deltas are not finite.

    Checks: ``method`` is named, and is one of ``known_methods`` when given (a stack's parts too; ``stack`` and
    ``state_dict`` are always known); a stack lists ``parts`` that cover its
    tensors; every delta is finite; with ``require_fingerprint``, every base fingerprint is present.

    Raises:
        EditFormatError: Naming the field or tensor that failed.
    """
    method = config.get("method")
    if not isinstance(method, str) or not method:
        raise EditFormatError(f"{where}: edit_config.json has no 'method'; it is incomplete or was altered.")
    known = None if known_methods is None else {*known_methods, "stack", STATE_DICT_METHOD}
    parts = config.get("parts") if method == "stack" else None
    if method == "stack" and not isinstance(parts, list):
        raise EditFormatError(f"{where}: a stacked edit must list its 'parts' in edit_config.json.")
    for name in [method] + [str((part.get("config") or {}).get("method", "")) for part in parts or []]:
        if known is not None and name not in known:
            raise EditFormatError(
                f"{where}: edit_config.json names method {name!r}, which erasure does not know "
                f"(known: {', '.join(sorted(known))}); the file was altered or comes from another tool."
            )
    if require_fingerprint:
        fingerprints = [part.get("base_fingerprint") for part in parts] if parts else [config.get("base_fingerprint")]
        if not all(isinstance(value, str) and value for value in fingerprints):
            raise EditFormatError(
                f"{where}: edit_config.json has no base_fingerprint, so nothing can check that the edit is applied "
                "to the model it was made from; pass --no-base-check (recorded in the output) to use it anyway."
            )
    for key, delta in deltas.items():
        if not torch.isfinite(delta).all():
            bad = int((~torch.isfinite(delta)).sum())
            raise EditFormatError(f"{where}: {key} holds {bad} non-finite values (NaN or inf); the edit is broken.")


def stack(edits: Iterable[Edit]) -> Edit:
    """Combine edits of the same base model into one: deltas are summed, configs listed under ``parts``.

    The stack checks each part's base fingerprint over that part's own tensors when applied.

    Raises:
        ValueError: If no edits are given or they come from different model families.
    """
    edits = list(edits)
    if not edits:
        raise ValueError("stack() needs at least one edit.")
    families = {edit.config.get("family") for edit in edits} - {None}
    if len(families) > 1:
        raise ValueError(f"Cannot stack edits of different model families: {', '.join(sorted(families))}.")
    deltas: dict[str, Tensor] = {}
    parts: list[dict[str, Any]] = []
    for edit in edits:
        for key, delta in edit.deltas.items():
            if key in deltas and deltas[key].shape != delta.shape:
                raise ValueError(f"Cannot stack: {key} has different shapes in the edits.")
            deltas[key] = deltas[key] + delta if key in deltas else delta.clone()
        if "parts" in edit.config:  # a stack of stacks is a flat stack
            parts.extend(edit.config["parts"])
        else:
            keys = sorted(edit.deltas)
            parts.append(
                {"keys": keys, "base_fingerprint": edit.config.get("base_fingerprint"), "config": edit.config}
            )
    config = {
        "method": "stack",
        "parts": parts,
        "family": next(iter(families), None),
        "base_model": edits[0].config.get("base_model", ""),
    }
    return Edit(deltas, config)
