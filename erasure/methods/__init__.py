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
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

from erasure.methods.base import EraseMethod, MethodConfig

__all__ = ["METHODS", "PRESETS", "EraseMethod", "MethodConfig", "get_method", "method_names", "register"]

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


def _import_method_modules() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _SHARED_MODULES and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_method_modules()
