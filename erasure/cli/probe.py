"""``erasure probe`` and ``erasure attack``: is the concept removed from the weights, or only hidden?"""

from __future__ import annotations

import argparse
from pathlib import Path

from erasure.cli.options import (
    COMMAND_HELP,
    FINITE_FLOAT,
    MODEL_CONFIG_HELP,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    device_name,
)

# --- shared options ---------------------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, set_form: str) -> None:
    from erasure.attacks.judges import JUDGE_KINDS

    judges = "; ".join(f"{name}: {why}" for name, why in JUDGE_KINDS.items())
    parser.add_argument("--model", required=True, help="base pipeline: hub id, diffusers folder or .safetensors file")
    parser.add_argument("--model-config", help=MODEL_CONFIG_HELP)
    under_test = parser.add_argument_group("the model under test (one of)").add_mutually_exclusive_group(required=True)
    under_test.add_argument(
        "--edit", metavar="RUN",
        help="an edit folder (erasure erase's output) of --model; a generation-time edit (negative-prompt, sld) "
        "probes --model sampled with it",
    )  # fmt: skip
    under_test.add_argument("--weights", metavar="FILE", help="a partial UNet state dict (.safetensors) of --model")
    under_test.add_argument("--model2", metavar="M2", help="a peer's full checkpoint of --model's architecture")
    under_test.add_argument(
        "--suppression", choices=("negative-prompt",),
        help="no model under test: --model generating with the concept as negative prompt (the baseline that only "
        "hides it)",
    )  # fmt: skip
    parser.add_argument("--concept", type=Path, required=True, help="TOML concept file (its evaluate prompts)")
    parser.add_argument("--judge", default="oracle", help=f"the reporting judge (default oracle). {judges}")
    parser.add_argument(
        "--selector", help="the judge searches select with (default: clip for the oracle, the oracle for clip)"
    )
    parser.add_argument(
        "--allow-selector-as-judge", action="store_true",
        help="let searches select with the reporting judge (inflates success by its false positives; recorded)",
    )  # fmt: skip
    parser.add_argument(
        "--witness", metavar="JUDGE",
        help="a second judge (e.g. clip beside the oracle) that scores every image the judge scores; the summary "
        "says how often they agree, image by image; it decides nothing",
    )  # fmt: skip
    parser.add_argument("--reference", metavar="M", help="a model that never learned the concept (capacity control)")
    parser.add_argument("--preset", default="toy", choices=("toy", "paper"), help="attack budgets (default toy)")
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar=set_form,
        help="an attack option (repeat), e.g. noise.etas=[1.0,1.5]; likelihood.samples=32 sets the likelihood "
        "gaps' (t, eps) draws per image, likelihood.images their images per set; values are JSON or text",
    )  # fmt: skip
    parser.add_argument("--seeds-per-prompt", type=POSITIVE_INT, default=8, help="images per evaluate prompt (8)")
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="first image seed and attack seed (0)")
    parser.add_argument("--steps", type=POSITIVE_INT, default=25, help="DDIM steps of every image (25)")
    parser.add_argument("--guidance", type=FINITE_FLOAT, default=7.5, help="CFG scale of every image (7.5)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="images per sampler call (16)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--no-base-check", action="store_true", help="accept an edit without a base fingerprint (recorded)"
    )
    parser.add_argument(
        "--no-likelihood", action="store_true",
        help="skip the likelihood gaps (did the concept's unconditional likelihood fall?); without them the "
        "verdict cannot say 'removed', only 'inconclusive' when every attack holds",
    )  # fmt: skip


def _probe(args: argparse.Namespace, suite: str, attacks: list[str] | None, settings: dict) -> int:
    from erasure.attacks.run import probe, summary_table, verdict_line
    from erasure.cli.evaluate import _default_clip

    summary = probe(
        model=args.model, concept=args.concept, out=args.out, judge=args.judge, selector=args.selector,
        allow_selector_as_judge=args.allow_selector_as_judge, witness=args.witness, edit=args.edit,
        weights=args.weights, model2=args.model2, suppression=args.suppression, reference=args.reference,
        suite=suite, attacks=attacks,
        preset=args.preset, options=settings, overwrite=args.overwrite, seed=args.seed,
        device=device_name(args.device), model_config=args.model_config, default_clip=_default_clip(args.model),
        require_fingerprint=not args.no_base_check, steps=args.steps, guidance=args.guidance,
        images_per_prompt=args.seeds_per_prompt, batch_size=args.batch_size,
        **({"likelihood": False} if getattr(args, "no_likelihood", False) else {}),
        always_attack=getattr(args, "always_attack", True),  # erasure attack NAME: the user asked for it
    )  # fmt: skip
    print(f"verdict: {verdict_line(summary)}")
    print("\n".join(summary_table(summary)))
    print(f"wrote {args.out}")
    return 0


# --- probe ------------------------------------------------------------------------------------------------------


def _add_probe(subparsers: argparse._SubParsersAction) -> None:
    from erasure.attacks.suite import SUITES

    suites = "; ".join(f"{name}: {', '.join(attacks)}" for name, attacks in SUITES.items())
    parser = subparsers.add_parser(
        "probe",
        help=COMMAND_HELP["probe"],
        description=(
            "Run a suite of attacks and probes on an erased model and decide: not erased, suppressed (with the "
            "surfaces that bring it back: text, embedding, weights, trajectory), removed, or inconclusive. Writes "
            "OUT/summary.json, verdict.json, per_image.csv and prompts.csv (the adversarial prompts, replayable "
            f"with erasure evaluate --prompts), atomically. Suites: {suites}."
        ),
    )
    parser.add_argument("--suite", default="quick", choices=tuple(SUITES), help="which attacks (default quick)")
    parser.add_argument(
        "--attacks", nargs="+", metavar="NAME",
        help="run exactly these registered attacks instead of a suite, e.g. --attacks paraphrase inpaint "
        "unlearndiffatk inversion (erasure list attacks names them)",
    )  # fmt: skip
    parser.add_argument(
        "--always-attack", action="store_true",
        help="run the attacks even when the plain prompts already say 'not erased' (the edited model still shows "
        "the concept, which no attack can change); without it they are skipped and the summary says so",
    )  # fmt: skip
    _add_common(parser, "ATTACK.OPTION=VALUE")
    parser.set_defaults(handler=_run_probe)


def _run_probe(args: argparse.Namespace) -> int:
    from erasure.attacks.run import parse_settings

    return _probe(args, args.suite, args.attacks, parse_settings(args.settings))


# --- attack -----------------------------------------------------------------------------------------------------


def _add_attack(subparsers: argparse._SubParsersAction) -> None:
    from erasure.attacks import attack_names

    parser = subparsers.add_parser(
        "attack",
        help=COMMAND_HELP["attack"],
        description="Run one attack or probe on an erased model; writes the same files as erasure probe.",
    )
    parser.add_argument("name", choices=attack_names(), metavar="NAME", help=f"one of {', '.join(attack_names())}")
    _add_common(parser, "OPTION=VALUE")
    parser.set_defaults(handler=_run_attack)


def _run_attack(args: argparse.Namespace) -> int:
    from erasure.attacks.run import parse_settings

    return _probe(args, "custom", [args.name], parse_settings(args.settings, attack=args.name))
