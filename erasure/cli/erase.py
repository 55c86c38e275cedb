"""``erasure erase <method>`` (a sub-command per registered method, options from its config) and ``erasure list``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from erasure.cli.options import (
    COMMAND_HELP,
    FINITE_FLOAT,
    MODEL_CONFIG_HELP,
    device_name,
    number,
)

# --- erase ------------------------------------------------------------------------------------------------------


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse errors of ``parser`` one line on stderr with exit status 1."""

    def error(message: str) -> None:
        if message.startswith("argument METHOD: invalid choice"):
            from erasure.methods import method_names

            chosen = message.split("invalid choice: ", 1)[1].split(" (", 1)[0]
            message = f"unknown method {chosen}; choose from {', '.join(method_names())}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)

    parser.error = error  # type: ignore[method-assign]
    return parser


def _field_type(field: object) -> type:
    """The argparse type of a config field: from its default, else from its annotation (``float | None``)."""
    import dataclasses

    assert isinstance(field, dataclasses.Field)
    default = field.default
    if default is not dataclasses.MISSING and default is not None:
        return type(default)
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    for name, kind in (("bool", bool), ("float", float), ("int", int)):
        if name in annotation.replace(" ", "").split("|"):
            return kind
    return str


_ERASE_FLAGS = {
    *("-h", "--help", "--model", "--model-config", "--concept", "--prompt", "--name", "--kind", "--anchor"),
    *("--preserve", "--images"),
    *("--out", "--overwrite", "--device", "--dtype", "--base-model-name", "--no-progress"),
}


def _method_options(name: str) -> list[tuple[object, str, object]]:
    """``(field, flag, default)`` for each config field of method ``name``, with its registered defaults.

    A field whose flag would clash with an ``erase`` option (a method's own ``anchor`` next to the concept's
    ``--anchor``) is spelled ``--method-<field>``.
    """
    import dataclasses

    from erasure.methods import METHODS, PRESETS

    options = []
    for field in dataclasses.fields(METHODS[name].config_class):
        default = PRESETS[name].get(field.name, field.default)
        if default is dataclasses.MISSING:
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        flag = "--" + field.name.replace("_", "-")
        if flag in _ERASE_FLAGS:
            flag = "--method-" + field.name.replace("_", "-")
        options.append((field, flag, default))
    return options


def _option_type(kind: type) -> object:
    return {int: number(int), float: FINITE_FLOAT}.get(kind, kind)


def _add_method_options(parser: argparse.ArgumentParser, name: str) -> None:
    """One option per field of the method's config dataclass (type from its default or annotation)."""
    from erasure.methods import METHODS

    cls = METHODS[name]
    group = parser.add_argument_group(f"{name} options", (cls.__doc__ or "").strip().splitlines()[0])
    for field, flag, default in _method_options(name):
        help_text = field.metadata.get("help", "")
        help_text += f" (default: {default!r})" if default is not None else ""
        kind = _field_type(field)
        dest = f"method__{field.name}"
        aliases = [  # old spellings of a renamed option, accepted but not shown
            "--" + old.replace("_", "-") for old, new in cls.config_class.renamed_options.items() if new == field.name
        ]
        for alias in aliases:
            group.add_argument(
                alias, dest=dest, type=_option_type(kind), default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            choices = field.metadata.get("choices")
            group.add_argument(
                flag,
                dest=dest,
                type=_option_type(kind),
                default=default,
                choices=choices,
                metavar=kind.__name__.upper(),
                help=help_text,
            )


def _add_erase(subparsers: argparse._SubParsersAction) -> None:
    from erasure.methods import METHODS, method_names

    parser = _one_line_errors(
        subparsers.add_parser(
            "erase",
            help=COMMAND_HELP["erase"],
            description="Erase concepts with a method and save the weight change (an edit) to --out. "
            "Generation-time methods (negative-prompt, sld) change no weight: they save a suppression that "
            "evaluate, grid and the report apply while sampling. `erasure erase METHOD --help` lists the method's "
            "options.",
        )
    )
    methods = parser.add_subparsers(title="methods", dest="method", metavar="METHOD")
    methods.required = True
    for name in method_names():
        cls = METHODS[name]
        summary = (cls.__doc__ or name).strip().splitlines()[0]
        summary += " [generation-time: no weights change]" if cls.generation_time else ""
        sub = _one_line_errors(methods.add_parser(name, help=summary, description=summary))
        sub.add_argument("--model", required=True, help="hub id, diffusers folder or single-file .safetensors")
        sub.add_argument("--model-config", help=MODEL_CONFIG_HELP)
        # keep in sync with _ERASE_FLAGS: method options with these names get a --method- prefix
        what = sub.add_argument_group("what to erase (a concept file, or prompts)")
        what.add_argument(
            "--concept", action="append", type=Path, default=[], metavar="FILE", help="TOML concept file"
        )
        what.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt to erase (repeat)")
        what.add_argument("--name", help="concept name of --prompt (default: the first prompt)")
        what.add_argument("--kind", default="object", help="concept kind of --prompt")
        what.add_argument(
            "--anchor", default="", help="what --prompt maps to ('' = unconditional; one per prompt: a concept file)"
        )
        what.add_argument("--preserve", nargs="+", action="extend", default=[], metavar="P", help="prompts to keep")
        sub.add_argument(
            "--images", type=Path,
            help="folder of concept images (subfolders per concept name; NAME.mask.png beside NAME.png marks the "
            "concept's region, for MACE)",
        )  # fmt: skip
        sub.add_argument("--out", type=Path, required=True, help="run folder to write the edit into")
        sub.add_argument("--overwrite", action="store_true", help="replace an edit already in --out")
        sub.add_argument("--device", help="device (default: cuda if available, else cpu)")
        sub.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights")
        sub.add_argument("--base-model-name", help="name of the base model recorded in the edit (default: --model)")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")
        assert {s for action in sub._actions for s in action.option_strings} <= _ERASE_FLAGS
        _add_method_options(sub, name)
        sub.set_defaults(handler=_run_erase)


def _run_erase(args: argparse.Namespace) -> int:
    from erasure.edit import CONFIG_NAME
    from erasure.files import output_lock

    if bool(args.concept) == bool(args.prompt):
        raise ValueError("give either --concept FILE (repeatable) or --prompt TEXT (repeatable), not both or neither")
    if args.out.exists() and (
        not args.out.is_dir() or (any(args.out.iterdir()) and not (args.out / CONFIG_NAME).exists())
    ):
        raise FileExistsError(f"{args.out} exists and is not an edit folder; choose another --out")
    if (args.out / CONFIG_NAME).is_file() and not args.overwrite:  # refused before any work starts
        raise FileExistsError(f"{args.out} already holds an edit; choose another --out, or pass --overwrite")
    with output_lock(args.out):  # a second erase into the same --out is refused now, not after its work
        return _erase(args)


def _erase(args: argparse.Namespace) -> int:
    import torch

    from erasure.concepts import EraseRequest, load_concepts, request_from_prompts
    from erasure.files import load_training_images
    from erasure.methods import get_method
    from erasure.pipeline import load_pipeline

    if args.concept:
        requests = [load_concepts(path) for path in args.concept]
        request = EraseRequest(tuple(c for r in requests for c in r.concepts))
    else:
        request = request_from_prompts(
            args.prompt, name=args.name, kind=args.kind, anchor=args.anchor, preserve=args.preserve
        )
    overrides = {
        key.removeprefix("method__"): value for key, value in vars(args).items() if key.startswith("method__")
    }
    try:
        method = get_method(args.method, **overrides)
    except ValueError as error:  # a config's own check names its field: say the option the user typed
        message = str(error)
        for field, flag, _ in _method_options(args.method):
            if message.startswith(f"{field.name} "):
                message = flag + message[len(field.name) :]
        raise ValueError(message) from None
    images = load_training_images(args.images) if args.images is not None else None
    pipe = load_pipeline(
        args.model,
        device=device_name(args.device),
        dtype=getattr(torch, args.dtype),
        config=args.model_config,
        progress=not args.no_progress,
        without_vae=not method.needs_vae,
    )
    edit = method.apply(
        pipe, request, images=images, progress=not args.no_progress, base_model=args.base_model_name or str(args.model)
    )
    folder = edit.save(args.out, overwrite=args.overwrite)
    names = ", ".join(c.name for c in request.concepts)
    if method.generation_time:
        print(f"suppressing {names} with {method.name}: a generation-time edit, no weights changed; wrote {folder}")
    else:
        print(f"erased {names} with {method.name}: {len(edit.deltas)} tensors changed; wrote {folder}")
    return 0


# --- list -------------------------------------------------------------------------------------------------------


def _add_list(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help=COMMAND_HELP["list"])
    parser.set_defaults(handler=_run_list)


def _run_list(args: argparse.Namespace) -> int:
    from erasure.methods import METHODS, method_names

    for name in method_names():
        cls = METHODS[name]
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        summary += " [generation-time: no weights change]" if cls.generation_time else ""
        print(f"{name}: {summary}")
        for field, flag, default in _method_options(name):
            print(f"    {flag} = {default!r}  {field.metadata.get('help', '')}")
    return 0
