"""``probe``: the job behind ``erasure probe`` and ``erasure attack``, from file paths and spec strings to outputs.

Every input is checked before the expensive work, cheapest first, and a failure names the input and writes
nothing: the output folder (refused if it exists and is not empty, unless ``overwrite``), the concept file (one
concept, with ``evaluate`` prompts), the attacks and their options (a budget of 0 is refused), the judge and the
selector (known kinds, not the same model unless allowed, a model of this concept), then the models (an edit of
another base is refused by its fingerprint). :func:`erasure.attacks.suite.run_probe` then runs the attacks and
writes the folder atomically; the output lock (:func:`erasure.files.output_lock`) is held throughout, so a second
probe into the same folder is refused while one runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from erasure.attacks import ATTACKS, get_attack
from erasure.attacks.base import AttackError, evaluation_rows
from erasure.attacks.judges import judge_and_selector, load_witness, parse_judge_spec
from erasure.attacks.models import load_probe_models
from erasure.attacks.suite import SUITES, check_out, likelihood_config, run_probe
from erasure.concepts import Concept

logger = logging.getLogger(__name__)

__all__ = ["load_concept", "parse_settings", "probe", "summary_table", "verdict_line"]


def parse_settings(items: Sequence[str], attack: str | None = None) -> dict[str, dict[str, Any]]:
    """``ATTACK.OPTION=VALUE`` strings (``OPTION=VALUE`` with ``attack``) as run_probe's ``options``.

    Values are JSON where they parse (``3``, ``1e-3``, ``[1.0, 1.5]``, ``true``), else text.

    Raises:
        AttackError: On a malformed item, naming it.
    """
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        name, dot, option = key.strip().rpartition(".")
        name = name or attack or ""
        if not sep or not option or not name or (attack is not None and dot and name != attack):
            form = "OPTION=VALUE" if attack else "ATTACK.OPTION=VALUE"
            raise AttackError(f"--set {item!r}: write {form}{f' (options of {attack})' if attack else ''}.")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        options.setdefault(name.lower(), {})[option] = value
    return options


def load_concept(path: str | Path) -> Concept:
    """The one concept of a concept file, with held-out prompts.

    Raises:
        AttackError: If the file holds several concepts or the concept has no ``evaluate`` prompts (naming it);
            the loader's ``ConceptFileError`` for a bad file.
    """
    from erasure.concepts import load_concepts

    concepts = load_concepts(path).concepts
    if len(concepts) != 1:
        raise AttackError(
            f"--concept {path}: holds {len(concepts)} concepts; a probe tests one, give a file with one."
        )
    try:
        evaluation_rows(concepts[0])
    except AttackError as error:
        raise AttackError(f"--concept {path}: {error}") from None
    return concepts[0]


def probe(
    *,
    model: str | Path,
    concept: str | Path | Concept,
    out: str | Path,
    judge: str = "oracle",
    selector: str | None = None,
    allow_selector_as_judge: bool = False,
    witness: str | None = None,
    edit: str | Path | None = None,
    weights: str | Path | None = None,
    model2: str | Path | None = None,
    suppression: str | None = None,
    reference: str | Path | None = None,
    suite: str = "quick",
    attacks: Sequence[str] | None = None,
    preset: str = "toy",
    options: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    seed: int = 0,
    device: str = "cpu",
    model_config: str | Path | None = None,
    default_clip: str | None = None,
    require_fingerprint: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Check every input, load judges and models, run the suite (or ``attacks``) and write ``out``.

    Args:
        model: The base pipeline (hub id, diffusers folder, single file).
        concept: A concept file (or a :class:`~erasure.concepts.Concept`).
        out: The output folder.
        judge: Spec of the reporting judge (:mod:`erasure.attacks.judges`).
        selector: Spec of the selector (default: :func:`~erasure.attacks.judges.default_selector`).
        allow_selector_as_judge: Permit selecting with the reporting judge (recorded).
        witness: Spec of a second judge that scores every image the judge scores; the summary reports how often
            they agree (:func:`~erasure.attacks.judges.load_witness`).
        edit: An edit folder under test.
        weights: A partial UNet weights file under test.
        model2: A peer's full checkpoint of the same architecture under test.
        suppression: ``"negative-prompt"``: test the negative-prompt baseline (no weight changes).
        reference: A model that never learned the concept (the capacity control).
        suite: ``quick``, ``standard`` or ``full``.
        attacks: Exactly these attacks instead of a suite.
        preset: Every attack's preset (``toy`` or ``paper``).
        options: Per-attack options (:func:`parse_settings`); an attack's ``seed`` defaults to ``seed``;
            ``likelihood`` holds the likelihood gaps' settings (:func:`~erasure.attacks.suite.run_probe`).
        overwrite: Replace an existing output folder.
        seed: First seed of every held-out prompt's images, and every attack's seed.
        device: Where to run.
        model_config: Configs of a single-file ``model``.
        default_clip: What a bare ``clip`` judge loads.
        require_fingerprint: Refuse an edit without a base fingerprint.
        **settings: Generation settings of :class:`~erasure.attacks.context.AttackContext` (``steps``,
            ``guidance``, ``images_per_prompt``, ``batch_size``, ``size``, ``scale``).

    Returns:
        The summary :func:`~erasure.attacks.suite.run_probe` wrote.

    Raises:
        AttackError: On any bad input above, naming it (nothing is written).
    """
    from erasure.files import output_lock

    out = Path(out)
    check_out(out, overwrite)
    if not (edit or weights or model2 or suppression):
        raise AttackError(
            "Nothing to probe: give the model under test (--edit RUN, --weights FILE or --model2 M2), or "
            "--suppression negative-prompt for the baseline that only hides the concept."
        )
    if suppression and (edit or weights or model2):
        raise AttackError(
            "--suppression tests the base model with a negative prompt; give it without a model under test."
        )
    concept = concept if isinstance(concept, Concept) else load_concept(concept)
    names = list(attacks) if attacks is not None else None
    if names is None and suite not in SUITES:
        raise AttackError(f"Unknown suite {suite!r}; choose from {', '.join(SUITES)}.")
    chosen = names if names is not None else [name for name in SUITES[suite] if name in ATTACKS]
    options = {name.lower(): dict(values) for name, values in (options or {}).items()}
    likelihood_options = options.pop("likelihood", None)  # not an attack: the likelihood gaps' settings
    likelihood_config(likelihood_options, settings.get("likelihood", True))  # bad ones fail here, before loading
    for name in chosen:
        options.setdefault(name, {}).setdefault("seed", int(seed))
    idle = sorted(set(options) - set(chosen))
    if idle:
        raise AttackError(
            f"--set names attack(s) {', '.join(idle)}, which this run does not run ({', '.join(chosen)})."
        )
    for name in options:  # unknown options and budgets of 0 fail here, before any model loads
        get_attack(name, preset, **options[name])
    parse_judge_spec(judge)
    if witness:
        parse_judge_spec(witness)
    with output_lock(out):
        judge_fn, selector_fn = judge_and_selector(
            judge, selector, concept, allow_selector_as_judge=allow_selector_as_judge, default_clip=default_clip,
            device=device,
        )  # fmt: skip
        witness_fn = None
        if witness:
            witness_fn = load_witness(
                witness, concept, judge_fn, selector_fn, default_clip=default_clip, device=device
            )
        models = load_probe_models(
            model, edit=edit, weights=weights, model2=model2, reference=reference, model_config=model_config,
            device=device, require_fingerprint=require_fingerprint,
        )  # fmt: skip
        if suppression:
            settings["suppression"] = suppression
        provenance = {
            "model": str(model),
            "under_test": models.source,
            "reference": str(reference) if reference else None,
        }
        return run_probe(
            models.pipe, models.edit, concept, judge_fn, selector_fn, suite, models.reference, out, preset=preset,
            options=options | ({"likelihood": likelihood_options} if likelihood_options is not None else {}),
            attacks=names, allow_selector_as_judge=allow_selector_as_judge, overwrite=overwrite,
            base_seed=int(seed), provenance=provenance, witness=witness_fn, **settings,
        )  # fmt: skip


def _rate(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("rate") is None:
        return "-"
    return f"{entry['rate']:.0%} [{entry['low']:.0%}, {entry['high']:.0%}]"


def _gap(entry: Mapping[str, Any]) -> str:
    if entry.get("value") is None:
        return "-"
    return f"{entry['value']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"


def verdict_line(summary: Mapping[str, Any]) -> str:
    """The verdict in one line: ``suppressed: <reason>``."""
    verdict = summary["verdict"]
    return f"{verdict['verdict']}: {verdict['reason']}"


def summary_table(summary: Mapping[str, Any]) -> list[str]:
    """A short text table of a probe summary: per attack, its surface, target rate, gap closed, state and cost.

    The first two rows are the plain held-out prompts on the base and edited models (their generation cost on the
    ``edited`` row), the last the whole probe's cost.
    """
    columns, total = summary["columns"], summary["cost"]
    states = summary["verdict"].get("attacks", {})
    head = ("attack", "surface", "target rate", "gap closed", "state", "UNet rows", "seconds")
    plain = columns["cost"]
    lines = [
        ("base", "-", _rate(columns["base"]), "-", "-", "", ""),
        ("edited", "-", _rate(columns["edited"]), "-", "-", f"{plain['unet_forward_rows']:,}",
         f"{plain['seconds']:.0f}"),
    ]  # fmt: skip
    for name, entry in summary["attacks"].items():
        metrics, cost = entry["metrics"], entry["cost"]
        lines.append(
            (name, entry["surface"], _rate(metrics["attacked"]), _gap(metrics["gap_closed"]),
             states.get(name, {}).get("state", "-"), f"{cost['unet_forward_rows']:,}", f"{cost['seconds']:.0f}")
        )  # fmt: skip
    lines.append(("total", "", "", "", "", f"{total['unet_forward_rows']:,}", f"{total['seconds']:.0f}"))
    widths = [max(len(str(row[i])) for row in [head, *lines]) for i in range(len(head))]
    table = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [head, *lines]]  # fmt: skip
    for name, entry in summary["attacks"].items():
        cost = entry.get("neighbour_cost")
        if cost and cost.get("ratio") is not None:
            low, high = cost["ratio_interval"] or (None, None)
            interval = f" [{low:.2f}, {high:.2f}]" if low is not None else ""
            sampling = ", ".join(f"{k} {v:g}" for k, v in cost["sampling"].items())
            ratio = f"ratio {cost['ratio']:.2f}{interval}, {cost['n']} images"
            table.append(f"neighbours under {name} ({sampling}): {ratio}")
    for name, entry in summary["attacks"].items():  # how fast fine-tuning brings it back, beside the reference
        if entry.get("curve"):
            reference = {point["steps"]: point for point in entry.get("reference_curve") or []}
            points = []
            for point in entry["curve"]:
                other = reference.get(point["steps"])
                extra = f" (reference {_rate(other['target_rate'])})" if other else ""
                points.append(f"{point['steps']} steps {_rate(point['target_rate'])}{extra}")

            def steps(value: int | None) -> str:
                return "> budget" if value is None else str(value)

            half = f"; half the base rate after {steps(entry.get('steps_to_half'))} steps"
            if entry.get("reference_curve"):
                half += f" (reference {steps(entry.get('reference_steps_to_half'))})"
            table.append(f"{name} curve: " + "; ".join(points) + half)
    witnessed = [("plain prompts, edited", (columns.get("witness") or {}).get("edited"))]
    witnessed += [(name, entry.get("witness")) for name, entry in summary["attacks"].items()]
    if (summary.get("settings") or {}).get("witness_is_selector") and any(a for _, a in witnessed):
        table.append(
            "the witness is the selector: it judged images picked by its own scores (its rates are upper bounds)"
        )
    for name, agreement in witnessed:
        if agreement:
            judge_rate, witness_rate = agreement["judge_rate"]["rate"], agreement["witness_rate"]["rate"]
            table.append(
                f"witness on {name}: agrees on {agreement['agreement']['rate']:.0%} of {agreement['images']} images "
                f"(target: judge {judge_rate:.0%}, witness {witness_rate:.0%})"
            )
    skipped = summary.get("skipped")
    if skipped:
        table.append(
            f"not run: {', '.join(skipped['attacks'])} (the plain prompts decided; --always-attack runs them)"
        )
    return table
