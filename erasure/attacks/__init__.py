"""Registry of attacks and probes: a lowercase name maps to an attack class; presets pick its config.

Every module of this package except the shared ones (:data:`_SHARED_MODULES`) is imported on import and registers
its attacks with :func:`register`, as :mod:`erasure.methods` does for methods::

    @register("trajectory")
    class TrajectoryCompletion(Attack): ...

:func:`get_attack` builds a configured instance: ``get_attack("noise", preset="paper", etas=(1.0, 1.5))``. Every
attack has a ``toy`` preset (the default: fits a 2-core CPU on the toy world) and a ``paper`` preset (the official
values, for GPUs); see each attack's config class.

The shared modules, lowest first: :mod:`~erasure.attacks.base` (configs, results, the attack template, the held-out
rows), :mod:`~erasure.attacks.override` (input-embedding override, token slots), :mod:`~erasure.attacks.cost` (the
cost meter), :mod:`~erasure.attacks.sampler` (the one DDIM sampler), :mod:`~erasure.attacks.judges` (the
evaluation's judges as judge and selector), :mod:`~erasure.attacks.context` (base/edited pair, judging,
negative-prompt suppression), :mod:`~erasure.attacks.optimise` (parametrisations, objectives, the loop),
:mod:`~erasure.attacks.verdict` (metrics and the verdict), :mod:`~erasure.attacks.suite` (``run_probe``),
:mod:`~erasure.attacks.models` (the model under test as an edit) and :mod:`~erasure.attacks.run` (``probe``, the
job of ``erasure probe``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

from erasure.attacks.base import Attack, AttackConfig, AttackError, AttackResult
from erasure.attacks.context import AttackContext
from erasure.attacks.cost import CostMeter

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfig",
    "AttackContext",
    "AttackError",
    "AttackResult",
    "CostMeter",
    "attack_names",
    "get_attack",
    "register",
]

#: Registered name -> attack class.
ATTACKS: dict[str, type[Attack]] = {}

_A = TypeVar("_A", bound=type[Attack])
#: Modules shared by the attacks (everything else in the package is an attack and registers itself).
_SHARED_MODULES = frozenset(
    {
        "base",
        "context",
        "cost",
        "judges",
        "likelihood",
        "models",
        "optimise",
        "override",
        "run",
        "sampler",
        "suite",
        "verdict",
    }
)


def register(name: str) -> Callable[[_A], _A]:
    """Class decorator registering an attack under ``name``.

    Raises:
        ValueError: If the name is not lowercase, is taken by another class, or the class lacks presets.
    """
    if name != name.lower() or not name.strip():
        raise ValueError(f"Attack names are lowercase and non-empty; got {name!r}.")

    def decorator(cls: _A) -> _A:
        if name in ATTACKS and ATTACKS[name] is not cls:
            raise ValueError(f"Attack name '{name}' is already registered by {ATTACKS[name].__name__}.")
        missing = {"toy", "paper"} - set(cls.config_class.PRESETS)
        if missing:
            raise ValueError(f"register('{name}'): {cls.config_class.__name__} lacks preset(s) {sorted(missing)}.")
        ATTACKS[name] = cls
        cls.name = name
        return cls

    return decorator


def attack_names() -> list[str]:
    """Registered attack names, sorted."""
    return sorted(ATTACKS)


def get_attack(name: str, preset: str = "toy", **overrides: Any) -> Attack:
    """A configured attack: its config's ``preset`` values, then ``overrides``.

    Raises:
        ValueError: On an unknown attack, preset or option.
    """
    key = name.lower()
    if key not in ATTACKS:
        raise ValueError(f"unknown attack '{name}'; choose from {', '.join(attack_names()) or '(none registered)'}")
    cls = ATTACKS[key]
    return cls(cls.config_class.from_preset(preset, **overrides))


def _import_attack_modules() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _SHARED_MODULES and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_attack_modules()
