# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before torch is imported)
"""Benchmark the probe on the toy world: for each method x concept, erase, attack, and decide removed or suppressed.

For each concept (``prompts/toyworld/<concept>.toml``) and method (defaults: uce, esd-x, esd-u, resteer and the
``negative-prompt`` baseline; generation-time methods such as ``negative-prompt`` and ``sld`` change no weight, the
probe samples the edited side with them) the script erases the concept from the shipped toy checkpoint at the
method's registered defaults
(``--method-set`` overrides config fields; ``--edit METHOD:CONCEPT=DIR`` loads a saved edit instead), then runs
:func:`erasure.attacks.suite.run_probe` with the suite (``--suite``, default ``quick``) judged by the oracle with the
toy CLIP as the selector, and with ``--reverse`` also judged by the CLIP with the oracle as the selector
(``--reverse-only``: that pairing alone); ``--witness`` has the selector's model judge every reported image too,
as a second opinion whose agreement with the judge the summary reports. Every
held-out prompt gets enough seeds for about ``--images`` images.

Per method x concept x judge, one table row: target rate base / edited / best attack (the attack with the highest
attacked rate) with 95% bootstrap intervals, that attack's gap closed with its interval, the verdict with the
surfaces that bring the concept back, the probe's UNet calls and rows, and its seconds (erasure and probe apart).
For Pip, ``checkpoints/toyworld-sd-without-pip`` (the generator retrained without Pip) is the reference model when
the folder exists (``--reference none`` turns it off). The JSON (``--out``) holds every summary and is rewritten
after each run; each probe's folder (per_image.csv, summary.json, verdict.json, prompts.csv) goes under
``--folders``.

Examples::

    python scripts/probe_toyworld.py --methods uce --concepts pip
    python scripts/probe_toyworld.py --methods uce esd-x@fast negative-prompt --method-set esd-x@fast.preset=fast
    python scripts/probe_toyworld.py --methods uce --concepts pip --suite standard --reverse
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads crawl on a shared machine

import argparse
import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from erasure.attacks.judges import judge_and_selector, load_witness
from erasure.attacks.run import load_concept, parse_settings
from erasure.attacks.suite import SUITES, run_probe
from erasure.concepts import EraseRequest
from erasure.methods import get_method, load_edit

REPO = Path(__file__).resolve().parents[1]
METHODS = ("uce", "esd-x", "esd-u", "resteer", "negative-prompt")
CONCEPTS = ("pip", "striped", "triangle", "red")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS),
        help="registered method names (generation-time ones too: negative-prompt, sld); NAME@LABEL runs NAME again "
        "under another label",
    )  # fmt: skip
    parser.add_argument("--concepts", nargs="+", default=list(CONCEPTS), help="toy concept names or .toml files")
    parser.add_argument(
        "--method-set", dest="method_overrides", action="append", default=[], metavar="METHOD.FIELD=VALUE",
        help="override a config field of one method, e.g. esd-x@fast.preset=fast (VALUE read as JSON)",
    )  # fmt: skip
    parser.add_argument(
        "--edit", dest="edits", action="append", default=[], metavar="METHOD:CONCEPT=DIR",
        help="use this saved edit for METHOD on CONCEPT instead of erasing",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="ATTACK.OPTION=VALUE",
        help="an attack option for every probe (repeatable)",
    )  # fmt: skip
    parser.add_argument("--suite", default="quick", choices=tuple(SUITES), help="attack suite (default quick)")
    parser.add_argument(
        "--attacks", nargs="+", metavar="NAME", help="run exactly these attacks instead of the suite (--suite ignored)"
    )
    parser.add_argument("--preset", default="toy", choices=("toy", "paper"), help="attack budgets (default toy)")
    parser.add_argument("--reverse", action="store_true", help="also judge with the CLIP, selecting with the oracle")
    parser.add_argument(
        "--reverse-only", action="store_true", help="judge only with the CLIP, selecting with the oracle"
    )
    parser.add_argument(
        "--witness", action="store_true",
        help="the selector's model also judges every reported image, as a second opinion (agreement reported)",
    )  # fmt: skip
    parser.add_argument("--no-likelihood", action="store_true", help="skip the likelihood gaps beside the verdict")
    parser.add_argument(
        "--always-attack", action="store_true", help="attack even when the plain prompts already say 'not erased'"
    )
    parser.add_argument("--model", default=str(REPO / "checkpoints/toyworld-sd"), help="toy pipeline folder")
    parser.add_argument("--clip", default=str(REPO / "checkpoints/toyworld-clip"), help="toy CLIP folder")
    parser.add_argument("--oracle", default=str(REPO / "checkpoints/toyworld-oracle"), help="oracle folder")
    parser.add_argument(
        "--reference", default="auto",
        help="reference model for Pip: a folder, 'none', or auto (checkpoints/toyworld-sd-without-pip if present)",
    )  # fmt: skip
    parser.add_argument("--images", type=int, default=64, help="about this many held-out images per concept")
    parser.add_argument("--first-seed", type=int, default=1000, help="first image seed of every held-out prompt")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--batch-size", type=int, default=32, help="images per sampler call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--folders", type=Path, default=REPO / "runs/probe", help="one probe folder per run here")
    parser.add_argument("--out", type=Path, default=REPO / "runs/probe/probe.json", help="JSON results file")
    return parser.parse_args(argv)


def parse_method_overrides(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``["esd-x.iterations=200"]`` -> ``{"esd-x": {"iterations": 200}}``; values are JSON, else text."""
    overrides: dict[str, dict[str, Any]] = {name: {} for name in methods}
    for item in items:
        key, sep, text = item.partition("=")
        method, dot, field = key.strip().rpartition(".")
        if not sep or not dot or method not in overrides:
            raise SystemExit(
                f"--method-set {item!r}: write METHOD.FIELD=VALUE with METHOD one of {', '.join(methods)}"
            )
        try:
            overrides[method][field] = json.loads(text)
        except ValueError:
            overrides[method][field] = text
    return overrides


def parse_edits(items: list[str]) -> dict[tuple[str, str], Path]:
    """``["uce:pip=runs/uce-pip"]`` -> ``{("uce", "pip"): Path("runs/uce-pip")}``."""
    edits = {}
    for item in items:
        key, sep, folder = item.partition("=")
        method, colon, concept = key.partition(":")
        if not sep or not colon or not method or not concept:
            raise SystemExit(f"--edit {item!r}: write METHOD:CONCEPT=DIR")
        edits[(method, concept)] = Path(folder)
    return edits


def concept_path(name: str) -> Path:
    """A concept name (``pip``) -> ``prompts/toyworld/pip.toml``; a path is kept."""
    return Path(name) if name.endswith(".toml") else REPO / "prompts" / "toyworld" / f"{name}.toml"


def reference_for(concept_name: str, choice: str) -> Path | None:
    """The reference model of a concept: the generator trained without Pip, for Pip only."""
    if choice == "none":
        return None
    if choice != "auto":
        return Path(choice)
    folder = REPO / "checkpoints" / "toyworld-sd-without-pip"
    return folder if concept_name.lower() == "pip" and (folder / "model_index.json").is_file() else None


def best_attack(summary: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    """The attack with the highest attacked target rate (ties: the larger gap-closed lower bound)."""

    def key(item: tuple[str, dict[str, Any]]) -> tuple[float, float]:
        metrics = item[1]["metrics"]
        low = metrics["gap_closed"]["low"]
        return metrics["attacked"]["rate"] or 0.0, -math.inf if low is None else low

    if not summary["attacks"]:
        return None, None
    name, entry = max(summary["attacks"].items(), key=key)
    return name, entry


def rate(entry: dict[str, Any] | None) -> str:
    """``98% [95%, 100%]``."""
    if not entry or entry.get("rate") is None:
        return "-"
    return f"{entry['rate']:.0%} [{entry['low']:.0%}, {entry['high']:.0%}]"


def gap(entry: dict[str, Any] | None) -> str:
    """``0.80 [0.60, 0.95]``."""
    if not entry or entry.get("value") is None:
        return "-"
    return f"{entry['value']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"


HEADER = (
    "| method | concept | judge / selector | target rate base | edited | best attack | gap closed | verdict "
    "| UNet calls (rows) | seconds (erase + probe) |"
)


def table_row(run: dict[str, Any]) -> str:
    """One markdown row of a run."""
    summary = run["summary"]
    name, entry = best_attack(summary)
    verdict = summary["verdict"]
    surfaces = f" ({', '.join(verdict['surfaces'])})" if verdict.get("surfaces") else ""
    attack = f"{name}: {rate(entry['metrics']['attacked'])}" if entry else "-"
    cost = summary["cost"]
    cells = [
        run["method"], run["concept"], f"{run['judge']} / {run['selector']}", rate(summary["columns"]["base"]),
        rate(summary["columns"]["edited"]), attack, gap(entry["metrics"]["gap_closed"]) if entry else "-",
        verdict["verdict"] + surfaces, f"{cost['unet_forwards']:,} ({cost['unet_forward_rows']:,})",
        f"{run['erase_seconds']:.0f} + {run['probe_seconds']:.0f}",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages that make the numbers (the evaluator's own record)."""
    from erasure.evaluation.results import package_versions

    return {"platform": platform.platform(), **package_versions(extra=("numpy",))}


def main(argv: list[str] | None = None) -> int:
    """Run the matrix; print a table row per run and rewrite the JSON after each."""
    from erasure.pipeline import load_pipeline

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # which attack is running, with a time stamp: these runs take many minutes each
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("erasure.attacks").setLevel(logging.INFO)
    overrides = parse_method_overrides(args.method_overrides, args.methods)
    edits = parse_edits(args.edits)
    options = parse_settings(args.settings)
    for name in args.methods:  # a bad method or option fails before any work
        get_method(name.split("@", 1)[0], **overrides[name])
    pairings = [] if args.reverse_only else [(f"oracle:{args.oracle}", f"clip:{args.clip}")]
    if args.reverse or args.reverse_only:
        pairings.append((f"clip:{args.clip}", f"oracle:{args.oracle}"))
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    report: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "versions": versions(),
                              "threads": torch.get_num_threads(), "runs": []}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    print("|" + "---|" * (HEADER.count("|") - 1), flush=True)
    for concept_name in args.concepts:
        concept = load_concept(concept_path(concept_name))
        per_prompt = max(1, math.ceil(args.images / len(concept.evaluate)))
        reference_path = reference_for(concept.name, args.reference)
        reference = load_pipeline(reference_path, device=args.device) if reference_path else None
        judges = {pair: judge_and_selector(*pair, concept, device=args.device) for pair in pairings}
        witnesses = {
            pair: load_witness(pair[1], concept, *judges[pair], device=args.device) if args.witness else None
            for pair in pairings
        }
        for method in args.methods:
            started = time.monotonic()
            if (method, concept_name) in edits:
                edit = load_edit(edits[(method, concept_name)])
            else:
                edit = get_method(method.split("@", 1)[0], **overrides[method]).apply(
                    pipe, EraseRequest((concept,)), progress=False, base_model=args.model
                )
            erase_seconds = time.monotonic() - started
            for (judge_spec, selector_spec), (judge, selector) in judges.items():
                label = f"{method}-{concept_name}-{judge_spec.partition(':')[0]}".replace("@", "_")
                started = time.monotonic()
                summary = run_probe(
                    pipe, edit, concept, judge, selector, args.suite, reference, args.folders / label,
                    preset=args.preset, options=options, overwrite=True, steps=args.steps, guidance=args.guidance,
                    images_per_prompt=per_prompt, base_seed=args.first_seed, batch_size=args.batch_size,
                    provenance={"model": args.model, "method": method, "reference": str(reference_path or "")},
                    likelihood=not args.no_likelihood, attacks=args.attacks,
                    always_attack=args.always_attack, witness=witnesses[(judge_spec, selector_spec)],
                )  # fmt: skip
                run = {
                    "method": method, "concept": concept.name, "judge": judge_spec.partition(":")[0],
                    "selector": selector_spec.partition(":")[0], "images_per_prompt": per_prompt,
                    "reference": str(reference_path) if reference_path else None,
                    "erase_seconds": round(erase_seconds, 1), "probe_seconds": round(time.monotonic() - started, 1),
                    "folder": str(args.folders / label), "summary": summary,
                }  # fmt: skip
                report["runs"].append(run)
                print(table_row(run), flush=True)
                args.out.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
