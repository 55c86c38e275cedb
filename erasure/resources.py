"""Where the shipped toy-world checkpoints and prompt files are found, in one documented order.

The toy world's models (``toyworld-sd``, ``toyworld-clip``, ``toyworld-oracle``) and the prompt files
(``prompts/toyworld/pip.toml``, ...) live at the top of the source tree, and a wheel carries them as package data
(``erasure/data/checkpoints``, ``erasure/data/prompts``; see ``pyproject.toml``). Lookup order:

1. the folder named by ``ERASURE_CHECKPOINTS`` (checkpoints) or ``ERASURE_PROMPTS`` (prompt files), if set;
2. the source checkout the package is imported from (``<checkout>/checkpoints``, ``<checkout>/prompts``): an
   editable install or a plain ``python -m erasure`` in a clone;
3. the data installed with the package (``<site-packages>/erasure/data/...``): a normal ``pip install``.

The first place that holds the file wins; when none does, the error lists every place that was looked in.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CHECKPOINTS_VARIABLE", "PROMPTS_VARIABLE", "ResourceNotFoundError", "checkpoint", "prompt_file"]

CHECKPOINTS_VARIABLE = "ERASURE_CHECKPOINTS"
PROMPTS_VARIABLE = "ERASURE_PROMPTS"

_PACKAGE = Path(__file__).resolve().parent


class ResourceNotFoundError(FileNotFoundError):
    """A shipped checkpoint or prompt file is in none of the places :mod:`erasure.resources` looks."""


def _roots(kind: str, variable: str) -> list[Path]:
    roots = []
    if os.environ.get(variable):
        roots.append(Path(os.environ[variable]).expanduser())
    checkout = _PACKAGE.parent
    if (checkout / "pyproject.toml").is_file():
        roots.append(checkout / kind)
    roots.append(_PACKAGE / "data" / kind)
    return roots


def _find(kind: str, variable: str, relative: str | Path) -> Path:
    roots = _roots(kind, variable)
    for root in roots:
        if (root / relative).exists():
            return root / relative
    looked = "; ".join(str(root / relative) for root in roots)
    raise ResourceNotFoundError(
        f"{Path(relative)} is not shipped with this install (looked in: {looked}); set {variable} to the folder "
        "that holds it."
    )


def checkpoint(name: str) -> Path:
    """The folder of a shipped checkpoint (``toyworld-sd``, ``toyworld-clip``, ``toyworld-oracle``).

    Raises:
        ResourceNotFoundError: Naming every folder that was looked in.
    """
    return _find("checkpoints", CHECKPOINTS_VARIABLE, name)


def prompt_file(relative: str | Path) -> Path:
    """A shipped prompt file, by its path under ``prompts/`` (``toyworld/pip.toml``).

    Raises:
        ResourceNotFoundError: Naming every file that was looked for.
    """
    return _find("prompts", PROMPTS_VARIABLE, relative)
