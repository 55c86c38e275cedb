"""Registry of erasure methods: a lowercase name maps to a method class and its default config.

Every module of this package except ``base`` and ``closed_form`` is imported on import, and registers its methods
with :func:`register`. One class may be registered under several names with different defaults::

    @register("esd-x", train_method="xattn")
    @register("esd-u", train_method="noxattn")
    class ESD(EraseMethod): ...

:func:`get_method` builds a configured instance: ``get_method("uce", preserve_scale=0.5)``.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from erasure.concepts import EraseRequest
from erasure.edit import CONFIG_NAME, STATE_DICT_METHOD, Edit, EditFormatError, read_edit_config, stack
from erasure.methods.base import EraseMethod, GenerationTimeMethod, MethodConfig
from erasure.suppression import GenerationEdit, is_generation_time

__all__ = [
    "METHODS",
    "PRESETS",
    "EraseMethod",
    "MethodConfig",
    "generation_time_names",
    "get_method",
    "known_method_names",
    "load_edit",
    "method_names",
    "register",
    "replay",
]

#: Registered name -> method class.
METHODS: dict[str, type[EraseMethod]] = {}
#: Registered name -> config overrides of that name (``{}`` for a plain registration).
PRESETS: dict[str, dict[str, Any]] = {}

_M = TypeVar("_M", bound=type[EraseMethod])
_SHARED_MODULES = frozenset({"base", "closed_form"})


def register(name: str, **config_overrides: Any) -> Callable[[_M], _M]:
    """Class decorator registering a method under ``name``, with optional config defaults for that name.

    Raises:
        ValueError: If the name is taken by another class, is not lowercase, or an override is no config field.
    """
    if name != name.lower() or not name.strip():
        raise ValueError(f"Method names are lowercase and non-empty; got {name!r}.")

    def decorator(cls: _M) -> _M:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"Method name '{name}' is already registered by {METHODS[name].__name__}.")
        fields = set(cls.config_class.__dataclass_fields__)
        unknown = sorted(set(config_overrides) - fields)
        if unknown:
            raise ValueError(f"register('{name}'): {cls.config_class.__name__} has no field(s) {', '.join(unknown)}.")
        METHODS[name] = cls
        PRESETS[name] = dict(config_overrides)
        if "name" not in cls.__dict__:
            cls.name = name
        return cls

    return decorator


def method_names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(METHODS)


def get_method(name: str, **overrides: Any) -> EraseMethod:
    """A configured method: the registered defaults of ``name``, then ``overrides``.

    Raises:
        ValueError: On an unknown method name or option.
    """
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose from {', '.join(method_names()) or '(none registered)'}")
    cls = METHODS[key]
    config = cls.config_class.from_dict(PRESETS[key] | overrides)
    method = cls(config)
    method.name = key  # the registered name (presets share one class)
    return method


def known_method_names() -> set[str]:
    """Names an edit config may give as its ``method``: the registered methods, ``stack`` and ``state_dict``."""
    return {*METHODS, "stack", STATE_DICT_METHOD}


def load_edit(folder: str | Path, *, require_fingerprint: bool = True) -> Edit | GenerationEdit:
    """:meth:`erasure.edit.Edit.load`, also refusing an edit whose config names a method erasure does not know.

    Every command that reads an edit goes through here: an unknown method name means the file was altered or
    comes from another tool, and its deltas cannot be trusted to be what the name says. A generation-time edit
    (``"generation_time": true``: a negative prompt, SLD) comes back as its method's
    :class:`~erasure.suppression.GenerationEdit`, rebuilt from the config alone.
    """
    config = read_edit_config(folder)
    if not is_generation_time(config):
        return Edit.load(folder, require_fingerprint=require_fingerprint, known_methods=known_method_names())
    method = METHODS.get(str(config.get("method", "")).lower())
    if method is None or not issubclass(method, GenerationTimeMethod):
        raise EditFormatError(
            f"{folder} is marked generation-time but names method {config.get('method')!r}, which is not a "
            f"generation-time method of erasure ({', '.join(generation_time_names())})."
        )
    for name in ("method_config", "request", "suppression"):
        if name not in config:
            raise EditFormatError(f"{folder / CONFIG_NAME} has no '{name}'; save the edit again.")
    return method.edit_class(config)


def generation_time_names() -> list[str]:
    """Registered methods that change no weight (they suppress at generation time), sorted."""
    return [name for name in method_names() if METHODS[name].generation_time]


def replay(folder_or_config: str | Path | Mapping[str, Any], pipe: Any, **apply_kwargs: Any) -> Edit:
    """Re-run the method recorded in an edit config on ``pipe`` (same method, config and request).

    Args:
        folder_or_config: An edit folder, an ``edit_config.json`` path, or the config dict itself.
        pipe: The base pipeline.
        **apply_kwargs: Passed to :meth:`erasure.methods.base.EraseMethod.apply` (``images``, ``progress``).

    Returns:
        The new edit; with the same seed and base it equals the recorded one (up to non-deterministic kernels).
    """
    if isinstance(folder_or_config, Mapping):
        config = dict(folder_or_config)
    else:
        path = Path(folder_or_config)
        path = path / CONFIG_NAME if path.is_dir() else path
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise EditFormatError(f"Cannot read the edit config {path}: {error}") from error
    if config.get("method") == STATE_DICT_METHOD:
        raise EditFormatError(
            "This edit was made from a state dict (Edit.from_state_dict), not by a method; there is nothing to "
            "replay: apply it with Edit.apply_to."
        )
    if config.get("method") == "stack":
        return stack(replay(part["config"], pipe, **apply_kwargs) for part in config["parts"])
    for name in ("method", "method_config", "request"):
        if name not in config:
            raise EditFormatError(f"The edit config has no '{name}'; it cannot be replayed.")
    method = get_method(config["method"], **config["method_config"])
    request = EraseRequest.from_dict(config["request"])
    apply_kwargs.setdefault("base_model", config.get("base_model", ""))
    return method.apply(pipe, request, **apply_kwargs)


def _import_method_modules() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _SHARED_MODULES and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_method_modules()
