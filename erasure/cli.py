"""Command line: ``erasure <command> ...``. Wiring only; the work lives in the library modules.

Each command is one ``_add_<command>(subparsers)`` function that declares its arguments and sets ``handler`` to a
``_run_<command>(args) -> int`` function. ``COMMANDS`` lists them in the order ``--help`` shows.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from pathlib import Path

from erasure import __version__

MODEL_CONFIG_HELP = (
    "single-file --model only: a diffusers folder (or hub id) of the same architecture whose configs describe it "
    "(needed offline when the configs are not in the Hugging Face cache)"
)


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


# --- demo -------------------------------------------------------------------------------------------------------


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help=COMMAND_HELP["demo"],
        description="Erase Pip from the shipped toy-world checkpoint with UCE, then write a labelled sample grid, "
        "the edit, a base-vs-edited grid, the CLIP evaluation and an HTML report under --out.",
    )
    parser.add_argument(
        "--model", help="pipeline to use (default: the shipped toy world, checkpoints/toyworld-sd; see README)"
    )
    parser.add_argument("--concept", help="concept file (default: the shipped prompts/toyworld/pip.toml)")
    parser.add_argument("--method", default="uce", help="erasure method (default: uce)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--steps", type=POSITIVE_INT, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=NON_NEGATIVE_FLOAT, default=7.5, help="classifier-free guidance scale")
    parser.add_argument(
        "--seeds-per-prompt", type=POSITIVE_INT, default=13, help="seeds per held-out evaluation prompt"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from erasure.demo import run_demo
    from erasure.methods import get_method
    from erasure.resources import checkpoint, prompt_file

    get_method(args.method)  # an unknown name fails now, not after the sample grid
    paths = run_demo(
        args.out,
        model=args.model or str(checkpoint("toyworld-sd")),
        concept=args.concept or prompt_file("toyworld/pip.toml"),
        method=args.method,
        steps=args.steps,
        guidance_scale=args.guidance,
        seeds_per_prompt=args.seeds_per_prompt,
        overwrite=args.overwrite,
    )
    for name, path in paths.items():
        print(f"{name:>10}: {path}")
    return 0


# --- evaluate ---------------------------------------------------------------------------------------------------


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    from erasure.evaluation import CLIP_CHOICES, DEFAULT_CLIP, JUDGE_CHOICES

    choices = "; ".join(f"{name} ({why})" for name, why in CLIP_CHOICES.items())
    judges = "; ".join(f"{name} ({why})" for name, why in JUDGE_CHOICES.items())
    parser = subparsers.add_parser(
        "evaluate",
        help=COMMAND_HELP["evaluate"],
        description=(
            "Generate images from the base model and from each edit (same prompts, same seeds), or read a folder "
            "of images, and score them with CLIP: CLIP score, zero-shot efficacy/specificity/generality, paired "
            "preservation and CMMD. Writes OUT/images/<model>/, OUT/metrics.json and OUT/per_image.csv "
            "(atomically). Scale out with `accelerate launch -m erasure evaluate ...`: the images are split between "
            "the processes and merged in prompt order."
        ),
    )
    parser.add_argument("--model", help="base pipeline: hub id, diffusers folder or .safetensors file")
    parser.add_argument("--model-config", help=MODEL_CONFIG_HELP)
    parser.add_argument(
        "--edit", nargs="+", action="extend", default=[], metavar="RUN", help="edit folder(s); each is one model"
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE",
        help="partial UNet state dict(s) in .safetensors (diffusers names, as ESD's/UCE's scripts save them)",
    )
    parser.add_argument("--concept", type=Path, help="TOML concept file: its evaluate/evaluate_preserve prompts")
    parser.add_argument("--prompts", type=Path, help="prompt CSV (case_number, prompt, evaluation_seed[, ...])")
    parser.add_argument(
        "--images", type=Path, help="score this folder of images (or its subfolders, one per model) instead"
    )
    parser.add_argument(
        "--clip",
        default=None,
        help=f"CLIP as NAME:TAG or a folder (default: the toy CLIP beside a toy-world model, else {DEFAULT_CLIP}). "
        f"Choices: {choices}",
    )
    parser.add_argument(
        "--template",
        action="append",
        dest="templates",
        metavar="TEXT",
        help="zero-shot template with {} for the class (repeatable; default: the CLIP folder's own, else photo "
        "templates)",
    )
    parser.add_argument(
        "--judge",
        nargs="+",
        action="extend",
        default=[],
        dest="judges",
        metavar="NAME[:ARG]",
        help="judge the images beside CLIP: target rate and neighbour rate with n and 95%% bootstrap intervals in "
        f"metrics.json, verdicts in per_image_NAME.csv. Choices: {judges}",
    )
    parser.add_argument(
        "--scales",
        nargs="+",
        type=FINITE_FLOAT,
        metavar="S",
        help="sweep the one --edit over these strengths (0: the base weights, measured like the others; 1: the "
        "edit as made); also writes OUT/sweep.json for the report's trade-off plot",
    )
    parser.add_argument("--steps", type=POSITIVE_INT, default=25, help="denoising steps (default 25)")
    parser.add_argument(
        "--guidance",
        type=NON_NEGATIVE_FLOAT,
        default=None,
        help="classifier-free guidance scale of every image (default: each CSV row's evaluation_guidance where the "
        "file has one, else 7.5; ESD's and UCE's own scripts use 7.5 for every row)",
    )
    parser.add_argument(
        "--seeds-per-prompt",
        type=POSITIVE_INT,
        default=1,
        help="images per prompt: seeds evaluation_seed+i for a CSV row, seeds SEED+i for a concept prompt",
    )
    parser.add_argument(
        "--seed", type=NON_NEGATIVE_INT, default=0, help="first seed of concept-file prompts (default 0)"
    )
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="images per pipeline call / CLIP forward")
    parser.add_argument("--height", type=POSITIVE_INT, help="image height (default: the model's native size)")
    parser.add_argument("--width", type=POSITIVE_INT, help="image width (default: the model's native size)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: accelerate's device)")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"), help="pipeline dtype"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_edit_safety_options(parser)
    parser.set_defaults(handler=_run_evaluate)


def _default_clip(model: str | None) -> str:
    from erasure.evaluation import DEFAULT_CLIP

    if model:
        path = Path(model).expanduser()
        toy_clip = path.parent / "toyworld-clip"
        if path.name == "toyworld-sd" and (toy_clip / "open_clip_config.json").is_file():
            return str(toy_clip)
    return DEFAULT_CLIP


def _run_evaluate(args: argparse.Namespace) -> int:
    from erasure.evaluation import prompt_rows, run_evaluation

    rows, source, images_per_row = prompt_rows(
        args.concept, args.prompts, seeds_per_prompt=args.seeds_per_prompt, seed=args.seed
    )
    out = run_evaluation(
        args.out,
        model=args.model,
        model_config=args.model_config,
        edits=args.edit,
        weights=args.weights,
        rows=rows,
        prompt_source=source,
        images=args.images,
        clip=args.clip or _default_clip(args.model),
        templates=args.templates,
        judges=args.judges,
        scales=args.scales,
        steps=args.steps,
        guidance=args.guidance,
        images_per_row=images_per_row,
        batch_size=args.batch_size,
        height=args.height,
        width=args.width,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=sys.stderr.isatty(),
        base_check=not args.no_base_check,
        max_relative_change=_max_relative_change(args),
    )
    if out is None:  # a non-main process of `accelerate launch`
        return 0
    _print_metrics(out / "metrics.json")
    print(f"wrote {out}")
    return 0


def _print_metrics(path: Path) -> None:
    import json

    document = json.loads(path.read_text(encoding="utf-8"))
    columns = ("clip_score", "efficacy", "specificity", "generality", "harmonic_mean", "paired_preservation", "cmmd")
    width = max(len(label) for label in document["metrics"]) + 2
    print("model".ljust(width) + "".join(name.rjust(21) for name in columns))
    for label, metrics in document["metrics"].items():
        cells = ("-" if metrics.get(n) is None else f"{metrics[n]:.4g}" for n in columns)
        print(label.ljust(width) + "".join(cell.rjust(21) for cell in cells))


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
            "`erasure erase METHOD --help` lists the method's options.",
        )
    )
    methods = parser.add_subparsers(title="methods", dest="method", metavar="METHOD")
    methods.required = True
    for name in method_names():
        cls = METHODS[name]
        summary = (cls.__doc__ or name).strip().splitlines()[0]
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
        sub.add_argument("--images", type=Path, help="folder of concept images (subfolders per concept name)")
        sub.add_argument("--out", type=Path, required=True, help="run folder to write the edit into")
        sub.add_argument("--overwrite", action="store_true", help="replace an edit already in --out")
        sub.add_argument("--device", help="device (default: cuda if available, else cpu)")
        sub.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights")
        sub.add_argument("--base-model-name", help="name of the base model recorded in the edit (default: --model)")
        sub.add_argument("--no-progress", action="store_true", help="no progress bars")
        assert {s for action in sub._actions for s in action.option_strings} <= _ERASE_FLAGS
        _add_method_options(sub, name)
        sub.set_defaults(handler=_run_erase)


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


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
        args.model, device=_device(args.device), dtype=getattr(torch, args.dtype), config=args.model_config
    )
    edit = method.apply(
        pipe, request, images=images, progress=not args.no_progress, base_model=args.base_model_name or str(args.model)
    )
    folder = edit.save(args.out, overwrite=args.overwrite)
    names = ", ".join(c.name for c in request.concepts)
    print(f"erased {names} with {method.name}: {len(edit.deltas)} tensors changed; wrote {folder}")
    return 0


# --- edit safety options (export, grid, evaluate) -----------------------------------------------------------


def _add_edit_safety_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("edit checks (on by default)")
    group.add_argument(
        "--no-base-check", action="store_true",
        help="accept an edit without a base fingerprint (nothing can then verify its base model; recorded)",
    )  # fmt: skip
    group.add_argument(
        "--allow-large-edit", action="store_true",
        help="apply deltas larger than 10x their base tensor (refused by default: broken or altered edits)",
    )  # fmt: skip


def _max_relative_change(args: argparse.Namespace) -> float:
    from erasure.edit import MAX_RELATIVE_CHANGE

    return float("inf") if args.allow_large_edit else MAX_RELATIVE_CHANGE


# --- export -----------------------------------------------------------------------------------------------------


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help=COMMAND_HELP["export"],
        description="Apply a saved edit to its base model and write the result in another format.",
    )
    parser.add_argument("run", type=Path, metavar="RUN", help="run folder holding the edit")
    parser.add_argument("--model", help="base model (default: the one recorded in the edit; LoRA needs none)")
    parser.add_argument("--model-config", help=MODEL_CONFIG_HELP)
    parser.add_argument("--format", required=True, choices=["diffusers", "lora", "single-file"], help="output format")
    parser.add_argument("--out", type=Path, required=True, help="output folder (.safetensors file for single-file)")
    parser.add_argument(
        "--rank", type=POSITIVE_INT, default=16, help="largest LoRA rank (each layer is capped at its own rank)"
    )
    parser.add_argument(
        "--scale", type=FINITE_FLOAT, default=1.0, help="strength of the edit (diffusers, single-file)"
    )
    parser.add_argument("--device", help="device (default: cuda if available, else cpu)")
    _add_edit_safety_options(parser)
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from erasure.export import BIAS_ADAPTER, export_edit
    from erasure.methods import load_edit

    if args.out.exists():  # before the edit is read: the cheapest check first
        raise FileExistsError(f"{args.out} already exists; choose another --out")
    edit = load_edit(args.run, require_fingerprint=not args.no_base_check)
    out, skipped = export_edit(
        edit,
        args.out,
        args.format,
        model=args.model,
        model_config=args.model_config,
        scale=args.scale,
        rank=args.rank,
        device=_device(args.device),
        max_relative_change=_max_relative_change(args),
    )
    if args.format != "lora":
        print(f"wrote {args.format} model to {out}")
        return 0
    note = f" (left out {len(skipped)} tensors a LoRA cannot hold, e.g. {skipped[0]})" if skipped else ""
    print(f"wrote LoRA (rank <= {args.rank}) to {out}{note}")
    if (out / BIAS_ADAPTER).is_dir():
        print(
            f"  the bias changes are a second adapter in {out / BIAS_ADAPTER}: load both with "
            "pipe.load_lora_weights(folder, adapter_name=...) before fuse_lora"
        )
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
        print(f"{name}: {summary}")
        for field, flag, default in _method_options(name):
            print(f"    {flag} = {default!r}  {field.metadata.get('help', '')}")
    return 0


# --- grid -------------------------------------------------------------------------------------------------------


def _add_grid(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "grid",
        help=COMMAND_HELP["grid"],
        description=(
            "Draw a comparison grid: one row per prompt (erased prompts first, then held-out paraphrases, then "
            "preserved neighbours), one column per model (base first, then each --edit), every image of a row from "
            "the same prompt and seed. Either generate (--model, --edit, and --concept or --prompts) or draw saved "
            "images (--images, folders written by `erasure evaluate`). Writes OUT (PNG) and OUT with .json (a "
            "manifest of prompts, seeds, models and settings), atomically."
        ),
    )
    parser.add_argument("--model", help="base pipeline: hub id, diffusers folder or .safetensors file")
    parser.add_argument("--model-config", help=MODEL_CONFIG_HELP)
    parser.add_argument(
        "--edit", nargs="+", action="extend", default=[], metavar="RUN", help="edit folder(s); one column each"
    )
    parser.add_argument("--concept", type=Path, help="TOML concept file: its evaluate/evaluate_preserve prompts")
    parser.add_argument("--prompts", type=Path, help="prompt CSV (case_number, prompt, evaluation_seed[, type])")
    parser.add_argument(
        "--images",
        type=Path,
        nargs="+",
        action="extend",
        default=[],
        metavar="DIR",
        help="draw saved images instead: image folders with manifest.json, or evaluation folders (images/<model>)",
    )
    parser.add_argument(
        "--per-group", type=NON_NEGATIVE_INT, default=4, help="most prompts per group (default 4; 0: all)"
    )
    parser.add_argument(
        "--seed", type=NON_NEGATIVE_INT, default=0, help="concept files: row i uses seed SEED+i (default 0)"
    )
    parser.add_argument("--steps", type=POSITIVE_INT, default=25, help="denoising steps (default 25)")
    parser.add_argument(
        "--guidance", type=NON_NEGATIVE_FLOAT, default=7.5, help="classifier-free guidance scale (default 7.5)"
    )
    parser.add_argument("--scale", type=FINITE_FLOAT, default=1.0, help="strength each edit is applied at (default 1)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="images per pipeline call")
    parser.add_argument(
        "--cell-size", type=POSITIVE_INT, help="image cell height in pixels (default: from the image size)"
    )
    parser.add_argument("--title", help="title above the grid")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--out", type=Path, required=True, help="the grid PNG to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its .json)")
    _add_edit_safety_options(parser)
    parser.set_defaults(handler=_run_grid)


def _run_grid(args: argparse.Namespace) -> int:
    from erasure.comparison import make_grid

    result = make_grid(
        args.out,
        model=args.model,
        model_config=args.model_config,
        edits=args.edit,
        concept=args.concept,
        prompts=args.prompts,
        image_folders=args.images,
        per_group=args.per_group or None,
        seed=args.seed,
        scale=args.scale,
        steps=args.steps,
        guidance=args.guidance,
        batch_size=args.batch_size,
        cell_size=args.cell_size,
        title=args.title,
        device=_device(args.device),
        base_check=not args.no_base_check,
        max_relative_change=_max_relative_change(args),
        progress=args.verbose or sys.stderr.isatty(),
        overwrite=args.overwrite,
    )
    json_name = result.path.with_suffix(".json").name
    print(f"wrote {result.path} and {json_name} ({result.rows} rows x {result.columns} models)")
    return 0


# --- report -----------------------------------------------------------------------------------------------------


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help=COMMAND_HELP["report"],
        description=(
            "Write one HTML file (images inlined, no external assets) with, for each evaluation folder written by "
            "`erasure evaluate`: its comparison grid (DIR/grid.png, else drawn from the saved images), the metrics of "
            "every model with their provenance, and the erasure/preservation trade-off when DIR/sweep.json exists "
            "(format: see erasure.report)."
        ),
    )
    parser.add_argument("folders", type=Path, nargs="+", metavar="DIR", help="evaluation folder(s)")
    parser.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    parser.add_argument("--title", default="Concept erasure report", help="page title")
    parser.add_argument(
        "--per-group", type=POSITIVE_INT, default=4, help="prompts per group in drawn grids (default 4)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from erasure.report import write_report

    path = write_report(args.folders, args.out, title=args.title, per_group=args.per_group, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB, {len(args.folders)} evaluation(s))")
    return 0


# --- command table ----------------------------------------------------------------------------------------------

COMMANDS = {
    "demo": _add_demo,
    "erase": _add_erase,
    "evaluate": _add_evaluate,
    "export": _add_export,
    "list": _add_list,
    "grid": _add_grid,
    "report": _add_report,
}
#: One line per command for ``erasure --help`` (each ``_add_<command>`` uses the same text).
COMMAND_HELP = {
    "demo": "the main job on the shipped toy-world checkpoint",
    "erase": "erase concepts from a model with a method; saves the edit",
    "evaluate": "score base and edited models on the same prompts and seeds",
    "export": "write an edit as a diffusers folder, a LoRA or a single-file checkpoint",
    "list": "list erasure methods with their options and defaults",
    "grid": "labelled image grid: base model against each edit, same prompt and seed per row",
    "report": "one self-contained HTML page of evaluations: grids, metrics, provenance, strength sweeps",
}


def requested_command(argv: list[str]) -> str | None:
    """The command named on the command line (the first word that is not an option), or ``None``."""
    for token in argv:
        if token == "--":
            return None
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``erasure`` argument parser.

    Only the command that ``argv`` names is built in full; the others get a one-line entry, so ``erasure --help``
    and a command that needs no model never import torch, diffusers, transformers or open_clip (building the
    ``erase`` options reads every method's config, which imports the methods). ``argv=None`` builds every command.
    """
    parser = Parser(
        prog="erasure",
        description="Concept erasure for text-to-image diffusion models: erase, evaluate, compare.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"erasure {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    command = requested_command(argv) if argv is not None else None
    for name, add in COMMANDS.items():
        if argv is None or name == command:
            add(subparsers)
        else:
            subparsers.add_parser(name, help=COMMAND_HELP[name])
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's time limit, ``docker stop``, ``kill``), raised where the program is, like Ctrl-C."""


def _terminate_like_interrupt() -> object:
    """Make SIGTERM unwind the stack like Ctrl-C, so every ``finally`` removes its temporaries; the old handler."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``erasure`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # Ctrl-C while the parser is built (method imports take seconds) is an interrupt like any other
        parser = build_parser(argv)
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("interrupted before any work started; nothing was written", file=sys.stderr)
        return 130
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not hasattr(args, "handler"):
        parser.print_help()
        return 0
    previous = _terminate_like_interrupt()
    try:
        return args.handler(args)
    except Terminated:
        print("terminated (SIGTERM); nothing half-written was left behind", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; --verbose shows the traceback
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
