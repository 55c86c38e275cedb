"""The commands that write models, grids and pages: ``demo``, ``export``, ``grid``, ``report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from erasure.cli.options import (
    COMMAND_HELP,
    FINITE_FLOAT,
    MODEL_CONFIG_HELP,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    add_edit_safety_options,
    device_name,
    max_relative_change_of,
)

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
    add_edit_safety_options(parser)
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
        device=device_name(args.device),
        max_relative_change=max_relative_change_of(args),
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
    add_edit_safety_options(parser)
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
        device=device_name(args.device),
        base_check=not args.no_base_check,
        max_relative_change=max_relative_change_of(args),
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
            "(format: see erasure.report); probe folders written by `erasure probe` go into a robustness section "
            "(verdict, per-attack table and recovery chart)."
        ),
    )
    parser.add_argument("folders", type=Path, nargs="+", metavar="DIR", help="evaluation and/or probe folder(s)")
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
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB, {len(args.folders)} folder(s))")
    return 0
