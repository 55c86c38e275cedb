"""What every command shares: a parser that never guesses, checked number types, the shared options."""

from __future__ import annotations

import argparse
import math

MODEL_CONFIG_HELP = (
    "single-file --model only: a diffusers folder (or hub id) of the same architecture whose configs describe it "
    "(needed offline when the configs are not in the Hugging Face cache)"
)

#: One line per command for ``erasure --help`` (each command's ``add`` function uses the same text).
COMMAND_HELP = {
    "demo": "the main job on the shipped toy-world checkpoint",
    "erase": "erase concepts from a model with a method; saves the edit",
    "evaluate": "score base and edited models on the same prompts and seeds",
    "export": "write an edit as a diffusers folder, a LoRA or a single-file checkpoint",
    "list": "list erasure methods with their options and defaults",
    "grid": "labelled image grid: base model against each edit, same prompt and seed per row",
    "report": "one self-contained HTML page of evaluations: grids, metrics, provenance, strength sweeps",
    "probe": "attack an erased model: is the concept removed from the weights or only suppressed? (verdict)",
    "attack": "run one attack or probe of erasure probe on an erased model",
}


# --- parsing: strict option names and checked numbers -------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that never guesses.

    No prefix matching (``--erase-scal`` is not taken for ``--erase-scale``), and an unknown option is named with
    the nearest known one.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102
        namespace, extras = super().parse_known_args(args, namespace)
        unknown = [item for item in extras if item.startswith("-")]
        if unknown and self._subparsers is None:  # leaf parsers report; a parent passes extras down
            import difflib

            flags = [flag for action in self._actions for flag in action.option_strings]
            option = unknown[0].split("=", 1)[0]
            nearest = difflib.get_close_matches(option, flags, n=1, cutoff=0.6)
            hint = f"; did you mean {nearest[0]}?" if nearest else f"; `{self.prog} --help` lists the options"
            self.error(f"unrecognized option {option}{hint}")
        return namespace, extras


def number(kind: type, *, minimum: float | None = None, above: float | None = None):
    """An argparse type: ``kind`` (int or float), finite, ``>= minimum`` / ``> above`` when given."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be greater than {above:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = number(int, minimum=1)
NON_NEGATIVE_INT = number(int, minimum=0)
FINITE_FLOAT = number(float)
NON_NEGATIVE_FLOAT = number(float, minimum=0)


# --- edit safety options (export, grid, evaluate) -----------------------------------------------------------


def add_edit_safety_options(parser: argparse.ArgumentParser) -> None:
    """``--no-base-check`` and ``--allow-large-edit``: the two deliberate ways past the edit checks."""
    group = parser.add_argument_group("edit checks (on by default)")
    group.add_argument(
        "--no-base-check", action="store_true",
        help="accept an edit without a base fingerprint (nothing can then verify its base model; recorded)",
    )  # fmt: skip
    group.add_argument(
        "--allow-large-edit", action="store_true",
        help="apply deltas larger than 10x their base tensor (refused by default: broken or altered edits)",
    )  # fmt: skip


def max_relative_change_of(args: argparse.Namespace) -> float:
    """The edit size limit the arguments ask for (none with ``--allow-large-edit``)."""
    from erasure.edit import MAX_RELATIVE_CHANGE

    return float("inf") if args.allow_large_edit else MAX_RELATIVE_CHANGE


def device_name(name: str | None) -> str:
    """The ``--device`` value, or ``cuda`` when available, else ``cpu``."""
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")
