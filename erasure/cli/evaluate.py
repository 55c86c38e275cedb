"""``erasure evaluate``: score base and edited models on the same prompts and seeds."""

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
    max_relative_change_of,
)

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
    add_edit_safety_options(parser)
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
        max_relative_change=max_relative_change_of(args),
    )
    if out is None:  # a non-main process of `accelerate launch`
        return 0
    _print_metrics(out / "metrics.json")
    print(f"wrote {out}")
    return 0


def _print_metrics(path: Path) -> None:
    """One line per model: each rate with its image count and 95% interval, then the continuous scores."""
    import json

    document = json.loads(path.read_text(encoding="utf-8"))
    rates = ("efficacy", "specificity", "generality")
    scores = ("clip_score", "paired_preservation", "cmmd")
    width = max(len(label) for label in document["metrics"]) + 2
    print("model".ljust(width) + "".join(name.rjust(27) for name in rates) + "".join(n.rjust(20) for n in scores))
    for label, metrics in document["metrics"].items():
        cells = []
        for name in rates:
            value, low, high = metrics.get(name), metrics.get(f"{name}_ci95_low"), metrics.get(f"{name}_ci95_high")
            interval = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
            cells.append("-" if value is None else f"{value:.2f}{interval} n={metrics.get(f'{name}_n', 0)}")
        cells += ["-" if metrics.get(n) is None else f"{metrics[n]:.4g}" for n in scores]
        line = label.ljust(width) + "".join(c.rjust(27) for c in cells[:3]) + "".join(c.rjust(20) for c in cells[3:])
        if metrics.get("n_degenerate"):
            line += f"  ({metrics['n_degenerate']} blank/constant images not scored)"
        print(line)
    print("efficacy, generality: share of target images no longer classified as the target (higher is better); "
          "specificity: neighbours still classified as themselves (higher is better).")  # fmt: skip
