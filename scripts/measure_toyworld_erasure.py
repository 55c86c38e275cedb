# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)
"""Measure erasure on the toy world: does the target vanish while its neighbours stay as they were?

For each method x concept (defaults: uce, esd-x, esd-u, resteer x pip, striped, triangle, red) the script loads the
concept file (``prompts/toyworld/<concept>.toml``), runs the method at its registered defaults (``--set`` overrides
config fields), applies the edit, and generates images for the concept's held-out prompts: ``evaluate`` (the target)
and ``evaluate_preserve`` (the neighbours), with the same seeds for the base and the edited model. Every image is
judged twice, by the oracle (a CNN trained on renders) and zero-shot by the toy CLIP, and the script reports:

* target rate: the fraction of target images that still show the target attribute (Pip: ``character == Pip``;
  striped: ``style == striped``; triangle: ``shape == triangle``; red: ``colour == red``);
* neighbour rate: the fraction of neighbour images that show everything their prompt asks for. Characters ask for
  their character (``Zog``); objects for colour, shape, style (no style word means ``plain``, as in the toy
  captions) and no character (``a yellow circle`` -> yellow, circle, plain, none);
* neighbour ratio: edited / base neighbour rate, and ``kept``: the fraction of neighbour images right at base that
  are still right after the edit (paired by seed).

Base and edited models generate from the same prompts and seeds, so the comparison is paired; the generator's own
accuracy is in its model card. Goals (from the issue): target rate <= 5% with neighbours keeping >= 95% of their
base rate. Every run also records the UNet work of the erasure (``unet_rows``: batch rows of every UNet forward
made by ``method.apply``, with and without gradients) and its wall time, so "work for equal erasure" is read off
one table; ``NAME@LABEL`` runs one method under several settings in one call. ``--together`` erases all the
concepts in one request (one multi-concept edit per method) and scores every concept on that one edit.

Examples::

    python scripts/measure_toyworld_erasure.py --methods uce --out runs/measure/uce.json
    python scripts/measure_toyworld_erasure.py --methods esd-x esd-x@fast --set esd-x@fast.preset=fast
    python scripts/measure_toyworld_erasure.py --methods uce --concepts red --set uce.erase_scale=2 --seeds 2
    python scripts/measure_toyworld_erasure.py --methods mace rece --concepts pip striped red --together
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads crawl on a shared machine

import argparse
import dataclasses
import hashlib
import json
import platform
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasure.concepts import Concept, EraseRequest, load_concepts
from erasure.evaluation.functional import bootstrap_interval as rate_interval
from erasure.evaluation.functional import paired_ratio_interval as ratio_interval
from erasure.files import load_training_images
from erasure.generate import generate_paired
from erasure.methods import get_method
from erasure.toyworld.judge import prompt_expectation, prompt_subject, shows, target_attribute, verdict_label

REPO = Path(__file__).resolve().parents[1]
METHODS = ("uce", "esd-x", "esd-u", "resteer")
CONCEPTS = ("pip", "striped", "triangle", "red")
TARGET_RATE_GOAL, NEIGHBOUR_RATIO_GOAL = 0.05, 0.95


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS),
        help="registered method names; NAME@LABEL runs NAME again under another label (esd-x@fast with "
             "--set esd-x@fast.preset=fast)",
    )  # fmt: skip
    parser.add_argument("--concepts", nargs="+", default=list(CONCEPTS), help="toy concept names or .toml files")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="METHOD.FIELD=VALUE",
        help="override a config field of one method, e.g. esd-x.iterations=200 (repeatable; VALUE read as JSON)",
    )  # fmt: skip
    parser.add_argument("--model", default=str(REPO / "checkpoints/toyworld-sd"), help="toy pipeline folder")
    parser.add_argument("--clip", default=str(REPO / "checkpoints/toyworld-clip"), help="toy CLIP folder")
    parser.add_argument("--oracle", default=str(REPO / "checkpoints/toyworld-oracle"), help="oracle folder")
    parser.add_argument("--seeds", type=int, default=None, help="images per prompt (default: enough for --images)")
    parser.add_argument("--images", type=int, default=64, help="target images per prompt set when --seeds is unset")
    parser.add_argument("--first-seed", type=int, default=1000, help="image i has seed first-seed + i")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (diffusers')")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=32, help="generation batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--cache", default=str(REPO / "runs/measure/cache"), help="folder caching base images ('' to turn off)"
    )
    parser.add_argument("--grids", type=Path, default=None, help="folder for base-vs-edited comparison grids")
    parser.add_argument("--out", type=Path, default=REPO / "runs/measure/measure.json", help="JSON results file")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument(
        "--training-images", type=Path, default=None, metavar="DIR",
        help="give the methods these training images: DIR/<concept name>/ per concept, e.g. renders with their "
        "masks from scripts/render_toyworld_images.py (used by MACE and Forget-Me-Not)",
    )  # fmt: skip
    parser.add_argument(
        "--save-edits", type=Path, default=None, metavar="DIR",
        help="also save every edit under DIR/<method>-<concepts> (probe it later with probe_toyworld.py --edit)",
    )  # fmt: skip
    parser.add_argument(
        "--together", action="store_true",
        help="erase every --concepts entry in one request (a multi-concept edit), then score each concept on it",
    )  # fmt: skip
    return parser.parse_args(argv)


def parse_overrides(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``["esd-x.iterations=200"]`` -> ``{"esd-x": {"iterations": 200}}``; values are JSON, else plain text."""
    overrides: dict[str, dict[str, Any]] = {name: {} for name in methods}
    for item in items:
        key, sep, text = item.partition("=")
        method, dot, field = key.strip().rpartition(".")
        if not sep or not dot or method not in overrides:
            raise SystemExit(f"--set {item!r}: write METHOD.FIELD=VALUE with METHOD one of {', '.join(methods)}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        overrides[method][field] = value
    return overrides


# -- what each image should show -------------------------------------------------------------------------------


def rates(base: list[dict], edited: list[dict], prompts: list[str], target: tuple[str, str]) -> dict[str, Any]:
    """Target and neighbour rates of one judge, base vs edited (``prompts`` lists the neighbour prompts)."""
    attribute, value = target
    n_target = len(base) - len(prompts)
    on_target = [[v[attribute] == value for v in vs[:n_target]] for vs in (base, edited)]
    expected = [prompt_expectation(p) for p in prompts]
    right = [[shows(v, e) for v, e in zip(vs[n_target:], expected, strict=True)] for vs in (base, edited)]
    kept = [after for before, after in zip(*right, strict=True) if before]
    by_subject: dict[str, list[int]] = {}
    for prompt, before, after in zip(prompts, *right, strict=True):
        counts = by_subject.setdefault(prompt_subject(prompt), [0, 0, 0])
        counts[0], counts[1], counts[2] = counts[0] + before, counts[1] + after, counts[2] + 1
    by_attribute = {}  # per attribute, over the neighbour images whose prompt asks for it
    for a in ("colour", "shape", "style", "character"):
        rows = [i for i, e in enumerate(expected) if a in e]
        if rows:
            by_attribute[a] = {
                k: float(np.mean([vs[n_target + i][a] == expected[i][a] for i in rows]))
                for k, vs in (("base", base), ("edited", edited))
            }
    base_rate, edited_rate = float(np.mean(right[0])), float(np.mean(right[1]))
    return {
        "target_base": float(np.mean(on_target[0])),
        "target_edited": float(np.mean(on_target[1])),
        "target_edited_ci95": rate_interval(on_target[1]),
        "target_values_edited": dict(Counter(v[attribute] for v in edited[:n_target]).most_common()),
        "neighbour_base": base_rate,
        "neighbour_edited": edited_rate,
        "neighbour_ratio": edited_rate / base_rate if base_rate > 0 else None,
        "neighbour_kept": float(np.mean(kept)) if kept else None,
        "neighbour_ratio_ci95": ratio_interval(right[0], right[1]),
        "neighbour_by_attribute": by_attribute,
        "neighbour_by_subject": {s: {"base": b / n, "edited": e / n, "n": n} for s, (b, e, n) in by_subject.items()},
        "target_images": n_target,
        "neighbour_images": len(prompts),
    }


def compact(verdicts: list[dict[str, str]]) -> list[str]:
    """Verdicts as ``colour|shape|style|character`` strings, for the JSON."""
    return [verdict_label(v) for v in verdicts]


def meets_goals(result: dict[str, Any]) -> bool | None:
    """Target rate <= 5% and neighbours at >= 95% of their base rate; ``None`` if the base model misses the target."""
    ratio = result["neighbour_ratio"]
    if result["target_base"] <= TARGET_RATE_GOAL:
        return None
    return result["target_edited"] <= TARGET_RATE_GOAL and ratio is not None and ratio >= NEIGHBOUR_RATIO_GOAL


# -- models and images -------------------------------------------------------------------------------------------


def load_models(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The toy pipeline, the oracle and the toy CLIP judge."""
    from erasure.evaluation import load_clip
    from erasure.pipeline import load_pipeline
    from erasure.toyworld.quality import ToyClipJudge, load_oracle

    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    oracle = load_oracle(args.oracle, args.device)
    model, preprocess, tokenizer = load_clip(args.clip, device=args.device)
    return pipe, oracle, ToyClipJudge(model, preprocess, tokenizer, args.device)


def concept_cases(concept: Concept, args: argparse.Namespace) -> tuple[list[str], list[int], int, dict[str, int]]:
    """Prompt and seed of every image (target images first), the number of target images, and images per prompt.

    Each prompt gets ``--seeds`` images, or so many that each prompt set has about ``--images`` images. Every image
    has a seed of its own (``first_seed + index``): the toy generator takes much of an object's colour from the
    initial noise, so a few seeds shared by every prompt would make the rates hinge on those seeds.
    """
    if not concept.evaluate or not concept.evaluate_preserve:
        raise SystemExit(f"Concept '{concept.name}' needs evaluate and evaluate_preserve prompts.")
    groups = {"target": concept.evaluate, "neighbour": concept.evaluate_preserve}
    per_prompt = {role: args.seeds or max(1, round(args.images / len(group))) for role, group in groups.items()}
    prompts = [p for role, group in groups.items() for p in group for _ in range(per_prompt[role])]
    seeds = [args.first_seed + i for i in range(len(prompts))]
    return prompts, seeds, len(concept.evaluate) * per_prompt["target"], per_prompt


def make_images(
    pipe: Any, prompts: list[str], seeds: list[int], args: argparse.Namespace, edit: Any = None
) -> np.ndarray:
    """Images of ``prompts`` with their seeds, of the base model or (with ``edit``) the edited one.

    Through the library's one base-vs-edited path (:func:`erasure.generate.generate_paired`: the edit is applied,
    then reverted).
    """
    models = {} if edit is None else {"edited": edit}
    (images,) = generate_paired(
        pipe, models, prompts, seeds, base_label="base" if edit is None else None, steps=args.steps,
        guidance_scale=args.guidance, batch_size=args.batch_size, height=args.size, width=args.size,
        progress=args.progress,
    ).values()  # fmt: skip
    return images


def base_images(pipe: Any, prompts: list[str], seeds: list[int], args: argparse.Namespace) -> np.ndarray:
    """The base model's images, cached under ``--cache`` by a hash of the weights and every generation setting."""
    from erasure.edit import fingerprint

    weights = {
        f"{c}.{n}": t for c in ("unet", "text_encoder", "vae") for n, t in getattr(pipe, c).state_dict().items()
    }
    settings = [
        fingerprint(weights),
        prompts,
        seeds,
        args.steps,
        args.guidance,
        args.size,
        args.batch_size,
        args.device,
    ]
    path = Path(args.cache) / f"base-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:20]}.npy"
    if args.cache and path.is_file():
        return np.load(path)
    images = make_images(pipe, prompts, seeds, args)
    if args.cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, images)
    return images


def judge_all(oracle: Any, clip_judge: Any, images: np.ndarray) -> dict[str, list[dict[str, str]]]:
    """Verdicts of both judges for each image."""
    from erasure.toyworld.quality import oracle_predict

    return {"oracle": oracle_predict(oracle, images), "clip": clip_judge.predict(images)}


def save_grid(folder: Path, concept: Concept, columns: dict[str, np.ndarray], prompts: list[str], seeds: list[int],
              n_target: int) -> None:  # fmt: skip
    """A comparison grid of the first 6 target ("erased": they name the concept) and 6 neighbour images."""
    from erasure.grid import comparison_grid
    from erasure.grid import save_grid as write_grid

    rows = list(range(min(6, n_target))) + list(range(n_target, min(n_target + 6, len(prompts))))
    image = comparison_grid(
        {label: images[rows] for label, images in columns.items()}, [prompts[i] for i in rows],
        ["erased" if i < n_target else "preserved" for i in rows], [seeds[i] for i in rows],
        title=f"toy world: erasing {concept.name}",
    )  # fmt: skip
    write_grid(image, folder / f"{concept.name.lower()}.png", {"concept": concept.name, "models": list(columns)})


# -- the measurement --------------------------------------------------------------------------------------------


def measure_method(
    name: str,
    overrides: dict[str, Any],
    pipe: Any,
    judges: tuple,
    concept: Concept,
    case: tuple,
    base: dict,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], np.ndarray]:
    """Erase ``concept`` with method ``name``, generate the held-out images with the edit and judge them."""
    method, edit, work = erase(name, overrides, pipe, EraseRequest((concept,)), args)
    work["overrides"] = overrides
    return score(name, method, edit, work, pipe, judges, concept, case, base, args)


def erase(name: str, overrides: dict[str, Any], pipe: Any, request: EraseRequest, args: argparse.Namespace) -> tuple:
    """``(method, edit, work)``: the erasure of ``request``, with its UNet rows and seconds."""
    method = get_method(registered_name(name), **overrides)
    rows = {"unet_rows": 0, "unet_rows_with_grad": 0, "unet_forwards": 0}

    def count_rows(module: Any, inputs: tuple) -> None:  # UNet work: batch rows of every forward
        rows["unet_forwards"] += 1
        rows["unet_rows"] += int(inputs[0].shape[0])
        rows["unet_rows_with_grad"] += int(inputs[0].shape[0]) if torch.is_grad_enabled() else 0

    images = None
    if args.training_images is not None:  # DIR/<concept name>/: one folder per concept (NAME.mask.png masks)
        images = {c.name: load_training_images(args.training_images / c.name) for c in request.concepts}
        images = images if len(images) > 1 else next(iter(images.values()))
    hook = pipe.unet.register_forward_pre_hook(count_rows)
    started = time.monotonic()
    try:
        edit = method.apply(pipe, request, images=images, progress=args.progress, base_model=args.model)
    finally:
        hook.remove()
    seconds = round(time.monotonic() - started, 1)
    if args.save_edits is not None:  # e.g. for scripts/probe_toyworld.py --edit METHOD:CONCEPT=DIR
        label = "-".join([name.replace("@", "_"), *(c.name for c in request.concepts)])
        edit.save(args.save_edits / label, overwrite=True)
    return method, edit, rows | {"erase_seconds": seconds}


def score(
    name: str, method: Any, edit: Any, work: dict[str, Any], pipe: Any, judges: tuple, concept: Concept, case: tuple,
    base: dict, args: argparse.Namespace,
) -> tuple[dict[str, Any], np.ndarray]:  # fmt: skip
    """Generate ``concept``'s held-out images with ``edit`` and judge them against the base images."""
    prompts, seeds, n_target, _ = case
    started = time.monotonic()
    images = make_images(pipe, prompts, seeds, args, edit=edit)
    generate_seconds = time.monotonic() - started
    verdicts = judge_all(*judges, images)
    target = target_attribute(concept)
    result = {
        "method": name,
        "concept": concept.name,
        "config": method.config.to_dict(),
        **work,
        "together": [c["name"] for c in edit.config.get("request", {}).get("concepts", [])],
        "generate_seconds": round(generate_seconds, 1),
        "edited_tensors": len(edit.deltas),
        "edit_stats": edit.config.get("stats", {}),
        "target": {"attribute": target[0], "value": target[1]},
        "judges": {j: rates(base[j], verdicts[j], prompts[n_target:], target) for j in verdicts},
        "edited_verdicts": {j: compact(v) for j, v in verdicts.items()},
    }
    result["meets_goals"] = {j: meets_goals(r) for j, r in result["judges"].items()}
    return result, images


def registered_name(label: str) -> str:
    """``esd-x@fast`` -> ``esd-x``: the method a label runs."""
    return label.split("@", 1)[0]


def concept_path(name: str) -> Path:
    """A concept name (``pip``) -> ``prompts/toyworld/pip.toml``; a path is kept."""
    return Path(name) if name.endswith(".toml") else REPO / "prompts" / "toyworld" / f"{name}.toml"


def format_row(result: dict[str, Any]) -> str:
    """One table line per judge."""
    lines = []
    for judge, r in result["judges"].items():
        ratio = "   -" if r["neighbour_ratio"] is None else f"{r['neighbour_ratio']:4.2f}"
        kept = "   -" if r["neighbour_kept"] is None else f"{r['neighbour_kept']:4.2f}"
        lines.append(
            f"{result['method']:<14} {result['concept']:<9} {judge:<6} "
            f"{r['target_base']:5.1%} -> {r['target_edited']:5.1%}   {r['neighbour_base']:5.1%} -> "
            f"{r['neighbour_edited']:5.1%}  {ratio}  {kept}  {result['erase_seconds']:7.1f}  "
            f"{result['unet_rows']:8d}  "
            f"{ {True: 'yes', False: 'no', None: 'n/a'}[result['meets_goals'][judge]] }"
        )
    return "\n".join(lines)


HEADER = (
    f"{'method':<14} {'concept':<9} {'judge':<6} {'target base->edited':<19}  {'neighbours base->edited':<23} "
    "ratio  kept  erase_s  unet_rows  goal"
)


def markdown_row(result: dict[str, Any]) -> str:
    """One README table row: method, concept, then per judge target rate base -> edited [95%] and ratio [95%]."""

    def interval(values: list[float] | None, percent: bool) -> str:
        if not values:
            return ""
        low, high = values
        return f" [{low:.0%}, {high:.0%}]" if percent else f" [{low:.2f}, {high:.2f}]"

    cells = [result["method"], result["concept"]]
    for judge in ("oracle", "clip"):
        r = result["judges"][judge]
        goal = result["meets_goals"][judge] and judge == "oracle"
        target = f"{r['target_base']:.0%} → {r['target_edited']:.0%}{interval(r.get('target_edited_ci95'), True)}"
        ratio = "-" if r["neighbour_ratio"] is None else f"{r['neighbour_ratio']:.2f}"
        ratio += interval(r.get("neighbour_ratio_ci95"), False)
        cells += [f"**{target}**" if goal else target, f"**{ratio}**" if goal else ratio]
    cells.append(f"{result['unet_rows']:,}")
    return "| " + " | ".join(cells) + " |"


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages that make the numbers (the evaluator's own record)."""
    from erasure.evaluation.results import package_versions

    return {"platform": platform.platform(), **package_versions(extra=("numpy", "safetensors"))}


def main(argv: list[str] | None = None) -> int:
    """Run the measurement matrix; print the table and write the JSON after each run."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.overrides, args.methods)
    for name in args.methods:
        get_method(registered_name(name), **overrides[name])  # fail on a bad name or option before any work
    pipe, oracle, clip_judge = load_models(args)
    report: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "goals": {"target_rate_max": TARGET_RATE_GOAL, "neighbour_ratio_min": NEIGHBOUR_RATIO_GOAL},
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "concepts": {},
        "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    if args.together:
        return measure_together(args, overrides, pipe, (oracle, clip_judge), report)
    for concept_name in args.concepts:
        (concept, *_) = load_concepts(concept_path(concept_name)).concepts
        case = concept_cases(concept, args)
        prompts, seeds, n_target, per_prompt = case
        started = time.monotonic()
        images = base_images(pipe, prompts, seeds, args)
        base = judge_all(oracle, clip_judge, images)
        report["concepts"][concept_name] = {
            "name": concept.name,
            "file": str(concept_path(concept_name)),
            "images_per_prompt": per_prompt,
            "target_prompts": list(concept.evaluate),
            "neighbour_prompts": list(concept.evaluate_preserve),
            "base_generate_seconds": round(time.monotonic() - started, 1),
            "images": [[p, s] for p, s in zip(prompts, seeds, strict=True)],
            "base_verdicts": {j: compact(v) for j, v in base.items()},
        }
        columns = {"base": images}
        for name in args.methods:
            result, columns[name] = measure_method(
                name, overrides[name], pipe, (oracle, clip_judge), concept, case, base, args
            )
            report["runs"].append({"concept_file": str(concept_path(concept_name)), **result})
            print(format_row(result), flush=True)
            print("  " + markdown_row(result), flush=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        if args.grids:
            save_grid(args.grids, concept, columns, prompts, seeds, n_target)
    print(f"wrote {args.out}")
    return 0


def without_erased_neighbours(concept: Concept, concepts: list[Concept], report: dict[str, Any]) -> Concept:
    """``concept`` with the neighbour prompts that name another of ``concepts`` (a whole word) removed."""
    others = [word for other in concepts if other is not concept for word in other.concept_words]
    pattern = re.compile(r"\b(" + "|".join(re.escape(word) for word in others) + r")\b", re.IGNORECASE)
    kept = tuple(p for p in concept.evaluate_preserve if not (others and pattern.search(p)))
    dropped = [p for p in concept.evaluate_preserve if p not in kept]
    report.setdefault("dropped_neighbours", {})[concept.name] = dropped
    if not kept:
        raise SystemExit(f"--together: every neighbour prompt of {concept.name} names another erased concept.")
    return dataclasses.replace(concept, evaluate_preserve=kept)


def measure_together(
    args: argparse.Namespace, overrides: dict[str, dict[str, Any]], pipe: Any, judges: tuple, report: dict[str, Any]
) -> int:
    """``--together``: per method, one edit of every concept at once, scored on each concept's prompts.

    A concept's neighbour prompts that name another erased concept ("an image of Zog" for Pip, when Zog is erased
    too) are targets of the same edit, not neighbours: they are left out of that concept's neighbour set (the
    report lists them under ``dropped_neighbours``).
    """
    concepts = [load_concepts(concept_path(name)).concepts[0] for name in args.concepts]
    concepts = [without_erased_neighbours(concept, concepts, report) for concept in concepts]
    cases, bases = {}, {}
    for concept in concepts:
        cases[concept.name] = concept_cases(concept, args)
        prompts, seeds, _, per_prompt = cases[concept.name]
        bases[concept.name] = judge_all(*judges, base_images(pipe, prompts, seeds, args))
        report["concepts"][concept.name] = {"images_per_prompt": per_prompt, "target_prompts": list(concept.evaluate)}
    for name in args.methods:
        method, edit, work = erase(name, overrides[name], pipe, EraseRequest(tuple(concepts)), args)
        work["overrides"] = overrides[name]
        for concept in concepts:
            result, _ = score(name, method, edit, work, pipe, judges, concept, cases[concept.name],
                              bases[concept.name], args)  # fmt: skip
            report["runs"].append(result)
            print(format_row(result), flush=True)
            print("  " + markdown_row(result), flush=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
