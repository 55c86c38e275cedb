"""``run_probe``: run a suite of registered attacks on an edit, and write the per-image table, summary and verdict.

Suites (each a list of registered attacks, cheapest first; names not registered are skipped with a warning):

* ``quick``: paraphrase + seed search, Ring-A-Bell (continuous), trajectory completion, noise, inpainting: no
  optimisation, a few generations each;
* ``standard``: + UnlearnDiffAtk, P4D, concept inversion (optimised tokens and embeddings);
* ``full``: + relearning and benign resurgence (weights).

The base and edited columns (plain held-out prompts) are generated once and shared by every attack's metrics. With
a ``reference`` pipeline (a model that never learned the concept: the capacity control), every attack on the
embedding or weight surface is run on it too (its plain column as the "edited" model, no edit), because textual
inversion and fine-tuning can teach a concept to any model: their recovery on the edit counts only beyond what they
reach on the reference (:func:`erasure.attacks.verdict.decide`). The reference is taught with the base model's
concept images, the ones the edit is attacked with (its own images of the concept's prompts would show nothing to
learn).

``out`` receives, atomically (a temporary folder renamed into place: an interrupted probe leaves nothing):
``per_image.csv`` (one row per generated image: attack, model, case number, prompt, seed, variant, its parameters,
selector score, picked, judge verdict), ``summary.json`` (per attack: rates with intervals, gap closed, recovery,
ASR in both denominators, cost, and for probes that change sampling the neighbour ratio under that sampling,
``neighbour_cost``; for relearning and concept inversion the curve of target rate against steps beside the
reference's, and the steps to half the base rate (the verdict compares the two curves step by step); with a
witness, how often it agreed with the judge; the settings, with which judge reported and which selected),
``verdict.json`` (the same judge and selector records), ``prompts.csv`` and ``embeddings/<attack>.safetensors``
(learned tokens in diffusers' ``load_textual_inversion`` format).

``prompts.csv`` holds the adversarial prompts in the field's schema (``case_number, prompt, evaluation_seed,
concept, type, classes``) plus ``attack``, the attacked row's ``case``, its ``anchor`` and ``erased_concept``, and
the probe's ``evaluation_guidance``: :func:`erasure.prompt_sets.load_prompt_csv` reads it, so ``erasure evaluate
--prompts prompts.csv`` replays the attacks on any other model (transfer). Inversion rows name their placeholder
(``token``) and the ``embedding`` file it needs, which ``erasure evaluate`` loads first
(:func:`erasure.evaluation.jobs.load_row_embeddings`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from erasure.attacks import ATTACKS, get_attack
from erasure.attacks.base import AttackError, AttackResult, evaluation_rows
from erasure.attacks.context import AttackContext
from erasure.attacks.likelihood import LikelihoodConfig, likelihood_gaps
from erasure.attacks.override import save_learned_embeds
from erasure.attacks.verdict import attack_metrics, decide, judge_agreement, plain_verdict, rate_interval
from erasure.concepts import Concept
from erasure.files import atomic_path
from erasure.prompt_sets import save_prompt_csv

logger = logging.getLogger(__name__)

__all__ = ["REFERENCE_SURFACES", "SUITES", "check_out", "run_probe"]

_QUICK = ("paraphrase", "ring_a_bell", "trajectory", "noise", "inpaint")
_STANDARD = (*_QUICK, "ring_a_bell_discrete", "unlearndiffatk", "p4d", "inversion")
SUITES: dict[str, tuple[str, ...]] = {
    "quick": _QUICK,
    "standard": _STANDARD,
    "full": (*_STANDARD, "relearning", "resurgence"),
}
#: Surfaces whose attacks can teach a concept to any model: also run on the reference model.
REFERENCE_SURFACES: tuple[str, ...] = ("embedding", "weights")
PER_IMAGE_COLUMNS = (
    "attack", "model", "case_number", "prompt", "seed", "variant", "params", "selector_score", "selected",
    "shows_target",
)  # fmt: skip


def _json(value: Any) -> Any:
    """Strict JSON: NaN and infinities as ``null``, tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return value


def _column_records(name: str, model: str, rows, prompts, hits) -> list[dict[str, Any]]:
    return [
        {
            "attack": name, "model": model, "case_number": r.case_number, "prompt": p, "seed": r.evaluation_seed,
            "variant": 0, "params": {}, "selector_score": None, "selected": True, "shows_target": h,
        }
        for r, p, h in zip(rows, prompts, hits, strict=True)
    ]  # fmt: skip


def _curve(points: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """A budget curve (relearning, inversion: target rate after each number of steps) with each point's interval."""
    if not points:
        return None
    return [{"steps": point["steps"], "target_rate": rate_interval(point["hits"])} for point in points]


def _witness_by_model(log: Sequence[tuple[str, Sequence[bool], Sequence[bool]]]) -> dict[str, Any]:
    """The judge-witness agreement over the logged batches, per model whose images they were."""
    models = list(dict.fromkeys(model for model, _, _ in log))
    return {
        model: judge_agreement(
            [v for m, first, _ in log if m == model for v in first],
            [v for m, _, second in log if m == model for v in second],
        )
        for model in models
    }


def _steps_to_half(points: Sequence[Mapping[str, Any]] | None, base_hits: Sequence[bool]) -> int | None:
    """Relearning or inversion speed: the fewest steps on the curve at which the rate reaches half the base rate.

    ``None`` without a curve, or when no point reaches it within the budget (the attack's design: compare it with
    the reference model's, which never learned the concept).
    """
    if not points or not base_hits:
        return None
    half = sum(base_hits) / len(base_hits) / 2
    return next((int(point["steps"]) for point in points if point["target_rate"] >= half > 0), None)


def check_out(out: Path | None, overwrite: bool) -> None:
    """Refuse an existing, non-empty output folder (or a file) unless ``overwrite``."""
    if out is None:
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise AttackError(f"{out} exists and is not empty; choose another output folder or pass overwrite=True.")


def likelihood_config(given: Mapping[str, Any] | None, enabled: bool) -> LikelihoodConfig:
    """The likelihood-gap settings from ``options["likelihood"]``, checked before any work."""
    if given is None:
        return LikelihoodConfig(seed=None)
    if not enabled:
        raise AttackError("likelihood options given, but the likelihood gaps are turned off (likelihood=False).")
    known = {f.name for f in dataclasses.fields(LikelihoodConfig)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise AttackError(f"unknown likelihood option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    return LikelihoodConfig(**{"seed": None, **given})


def run_probe(
    pipe: Any,
    edit: Any,
    concept: Concept,
    judge: Any,
    selector: Any,
    suite: str = "quick",
    reference: Any = None,
    out: str | Path | None = None,
    *,
    preset: str = "toy",
    options: Mapping[str, Mapping[str, Any]] | None = None,
    attacks: Sequence[str] | None = None,
    allow_selector_as_judge: bool = False,
    overwrite: bool = False,
    provenance: Mapping[str, Any] | None = None,
    likelihood: bool = True,
    always_attack: bool = False,
    witness: Any = None,
    **settings: Any,
) -> dict[str, Any]:
    """Run the suite's attacks on ``edit`` and return the summary (verdict included); write it to ``out``.

    Args:
        pipe: The base pipeline.
        edit: The edit under test (:class:`erasure.edit.Edit`), or ``None`` for the pipeline as loaded.
        concept: The concept; its ``evaluate`` prompts are the held-out rows every image is judged on.
        judge: ``images -> list[bool]``, scores every reported image.
        selector: ``images -> list[float]``, chooses inside searches (must not be ``judge`` unless allowed).
        suite: ``quick``, ``standard`` or ``full``.
        attacks: Run exactly these registered attacks instead of the suite's (``erasure attack NAME``).
        reference: A pipeline of the same architecture that never learned the concept (capacity control).
        out: Output folder, written atomically at the end; nothing is written without it.
        preset: Every attack's preset (``toy`` or ``paper``).
        options: Per-attack config overrides, ``{"noise": {"etas": [1.0]}}``; the key ``likelihood`` holds
            :class:`~erasure.attacks.likelihood.LikelihoodConfig` fields (``{"likelihood": {"samples": 32}}``; its
            seed defaults to the images' first seed).
        allow_selector_as_judge: Permit ``selector is judge`` (recorded).
        overwrite: Replace an existing non-empty ``out``.
        provenance: What the models are (paths, kinds), recorded as the summary's ``models``.
        likelihood: Also measure the likelihood gaps (:mod:`erasure.attacks.likelihood`): evidence on whether the
            edit lowered the concept's unconditional likelihood, recorded beside the verdict (``likelihood``).
        witness: A second judge (``images -> list[bool]``) that scores every image the judge scores; the summary
            says how often the two agree (:func:`~erasure.attacks.verdict.judge_agreement`): per attack on its
            edited images (``witness``; every checkpoint of a curve) and per model whose images it judged
            (``witness_by_model``: ``edited``, ``base``, ``reference``), and on the plain columns
            (``columns.witness``). It decides nothing.
        always_attack: Run the attacks (and the likelihood gaps) even when the plain prompts alone say "not erased"
            (:func:`~erasure.attacks.verdict.plain_verdict`: the edited model still shows the concept, which no
            attack can change). Without it they are skipped, and the summary's ``skipped`` says which and why.
        **settings: :class:`~erasure.attacks.context.AttackContext` settings (``steps``, ``guidance``,
            ``images_per_prompt``, ``base_seed``, ``batch_size``, ``size``, ``scale``, ``suppression``,
            ``negative_prompt``). ``suppression="negative-prompt"`` without a negative prompt uses the concept's
            words; the reference model never gets the suppression.

    Returns:
        The summary: ``{concept, suite, preset, settings, columns, attacks: {name: {...}}, verdict, cost}``.

    Raises:
        AttackError: On an unknown suite or option, a concept without evaluate prompts, selector = judge without
            the flag, or an existing ``out`` (checked before any work).
        erasure.edit.FingerprintMismatchError: If the edit was made from another base model.
    """
    out = Path(out) if out is not None else None
    check_out(out, overwrite)
    if attacks is not None:
        names = list(dict.fromkeys(a.lower() for a in attacks))
        missing = [name for name in names if name not in ATTACKS]
        if not names or missing:
            raise AttackError(
                f"unknown attack(s) {', '.join(missing) or '(none given)'}; choose from {', '.join(sorted(ATTACKS))}."
            )
        suite = "custom"
    elif suite not in SUITES:
        raise AttackError(f"Unknown suite {suite!r}; choose from {', '.join(SUITES)}.")
    else:
        names = [name for name in SUITES[suite] if name in ATTACKS]
        for name in sorted(set(SUITES[suite]) - set(names)):
            logger.warning("Suite '%s': attack '%s' is not available; skipped.", suite, name)
    options = dict(options or {})
    gap_settings = likelihood_config(options.pop("likelihood", None), likelihood)
    unknown = sorted(set(options) - set(ATTACKS))
    if unknown:
        raise AttackError(f"options name unknown attack(s) {', '.join(unknown)}; known: {', '.join(sorted(ATTACKS))}.")
    idle = sorted(set(options) - set(names))
    if idle:
        raise AttackError(
            f"options for attack(s) {', '.join(idle)}, which this run does not run ({', '.join(names)})."
        )
    chosen = {name: get_attack(name, preset, **options.get(name, {})) for name in names}  # bad options fail here
    if isinstance(settings.get("suppression"), str) and not settings.get("negative_prompt"):
        settings["negative_prompt"] = ", ".join(concept.concept_words)
    ctx = AttackContext(
        pipe, edit, judge, selector, allow_selector_as_judge=allow_selector_as_judge, witness=witness, **settings
    )
    reference_ctx = None
    if reference is not None:
        plain = {k: v for k, v in settings.items() if k not in ("suppression", "negative_prompt")}
        reference_ctx = AttackContext(  # attacked with the base model's concept images, as the edit is
            reference,
            None,
            judge,
            selector,
            allow_selector_as_judge=allow_selector_as_judge,
            base_images_from=ctx,
            witness=witness,
            **plain,
        )
    ctx.reference = reference_ctx  # probes that run the reference themselves (inpainting) find it here
    rows = evaluation_rows(concept, ctx.images_per_prompt, ctx.base_seed)
    for attack in chosen.values():  # settings an attack cannot run with fail before any image is made
        attack.check(ctx)
    prompts, seeds = [r.prompt for r in rows], [r.evaluation_seed for r in rows]

    with ctx.meter() as columns_cost:
        base_hits = ctx.judge_images(ctx.base_images(rows), "base")
        edited_hits = ctx.judge_images(ctx.generate("edited", prompts, seeds))
    column_witness = _witness_by_model(ctx.witness_log) if witness is not None else None
    records = _column_records("none", "base", rows, prompts, base_hits)
    records += _column_records("none", "edited", rows, prompts, edited_hits)
    skipped = None
    early = plain_verdict({"base": base_hits, "edited": edited_hits})
    if early["verdict"] == "not erased" and not always_attack:  # no attack can change it: save their cost
        skipped = {
            "attacks": list(chosen),
            "likelihood": likelihood,
            "reason": f"{early['verdict']}: {early['reason']}",
        }
        logger.warning(
            "Probe: %s from the plain prompts alone; skipping %s (always_attack=True runs them).",
            early["verdict"], ", ".join(chosen),
        )  # fmt: skip
        chosen, likelihood = {}, False
    results: dict[str, AttackResult] = {}
    reference_results: dict[str, AttackResult] = {}
    attack_witness: dict[str, Any] = {}
    for name, attack in chosen.items():
        logger.info("Probe: running %s (%s).", name, attack.surface)
        mark = len(ctx.witness_log)
        results[name] = attack.run(ctx, concept)
        if witness is not None:  # every image the attack had judged, by whose images they are
            attack_witness[name] = _witness_by_model(ctx.witness_log[mark:])
        records += results[name].records
        if reference_ctx is not None and attack.surface in REFERENCE_SURFACES:
            reference_mark = len(reference_ctx.witness_log)
            reference_results[name] = attack.run(reference_ctx, concept)
            if witness is not None:  # the reference's own "edited" images are the reference model's
                logged = [("reference", a, b) for _, a, b in reference_ctx.witness_log[reference_mark:]]
                attack_witness[name] = {
                    **attack_witness.get(name, {}),
                    **_witness_by_model(logged),
                }  # an attack that also judged reference fills itself (inpainting) runs on no reference context
            records += [r | {"model": "reference"} for r in reference_results[name].records]

    case_ids = [r.case_number for r in rows]
    prompt_ids = [r.prompt for r in rows]
    summary_attacks: dict[str, Any] = {}
    for name, result in results.items():
        reference_hits = reference_results[name].hits if name in reference_results else result.reference_hits
        metrics = attack_metrics(
            base_hits, edited_hits, result.hits, base_attacked=result.base_hits,
            reference_attacked=reference_hits, prompt_ids=prompt_ids,
        )  # fmt: skip
        summary_attacks[name] = {
            "surface": result.surface,
            "metrics": metrics,
            "config": result.config,
            "cost": result.cost,
            "reference_cost": reference_results[name].cost if name in reference_results else None,
            "curve": _curve(result.curve),
            "reference_curve": _curve(reference_results[name].curve) if name in reference_results else None,
            "steps_to_half": _steps_to_half(result.curve, base_hits),
            "reference_steps_to_half": (
                _steps_to_half(reference_results[name].curve, base_hits) if name in reference_results else None
            ),
            "neighbour_cost": result.neighbour_cost,
            "witness": (attack_witness.get(name) or {}).get("edited"),
            "witness_by_model": attack_witness.get(name),
            "notes": {k: v for k, v in result.notes.items() if k not in ("losses", "settings")},
        }
    gaps = None
    if likelihood:  # evidence on the mechanism, beside the verdict (it does not decide it)
        with ctx.meter() as likelihood_cost:
            config = dataclasses.replace(gap_settings, images=min(gap_settings.images, len(rows)))
            gaps = likelihood_gaps(ctx, concept, config)
        gaps["cost"] = likelihood_cost.summary()
    verdict = decide(
        {"base": base_hits, "edited": edited_hits}, summary_attacks, reference=reference is not None, likelihood=gaps,
        generation_time=ctx.suppression,
    )  # fmt: skip
    if gaps is not None:
        verdict["likelihood"] = {key: gaps[key] for key in ("D_uncond", "D_cond", "pattern")}
    settings_record = ctx.settings()
    verdict["judge"], verdict["selector"] = settings_record["judge"], settings_record["selector"]
    verdict["selector_is_judge"] = settings_record["selector_is_judge"]
    verdict["suppression"] = settings_record["suppression"]
    total = dict(columns_cost.summary())
    costs = [result.cost for result in [*results.values(), *reference_results.values()]]
    for cost in costs + ([gaps["cost"]] if gaps else []):
        for key, value in cost.items():
            total[key] = total.get(key, 0) + value
    summary = {
        "concept": concept.name,
        "suite": suite,
        "preset": preset,
        "attacks_run": list(chosen),
        "skipped": skipped,
        "models": dict(provenance or {}),
        "settings": settings_record,
        "rows": len(rows),
        "case_numbers": case_ids,
        "columns": {
            "base": rate_interval(base_hits),
            "edited": rate_interval(edited_hits),
            "cost": columns_cost.summary(),
            "witness": column_witness,
        },
        "attacks": summary_attacks,
        "likelihood": gaps,
        "verdict": verdict,
        "cost": total,
    }
    if out is not None:
        _write(out, summary, verdict, records, results)
    return summary


def _write(
    out: Path, summary: dict[str, Any], verdict: dict[str, Any], records: list[dict[str, Any]], results
) -> None:
    """Everything into a temporary folder beside ``out``, renamed into place when complete."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PER_IMAGE_COLUMNS)
    for record in records:
        values = dict(record)
        values["params"] = json.dumps(_json(values.get("params", {})), sort_keys=True)
        writer.writerow(["" if values.get(c) is None else values.get(c) for c in PER_IMAGE_COLUMNS])
    prompt_rows = [row for result in results.values() for row in result.prompts]
    with atomic_path(out) as temporary:
        temporary.mkdir()
        (temporary / "per_image.csv").write_text(buffer.getvalue(), encoding="utf-8", newline="")
        (temporary / "summary.json").write_text(json.dumps(_json(summary), indent=2) + "\n", encoding="utf-8")
        (temporary / "verdict.json").write_text(json.dumps(_json(verdict), indent=2) + "\n", encoding="utf-8")
        if prompt_rows:
            renumbered = [
                type(row)(i, row.prompt, row.evaluation_seed, row.concept, row.row_type, row.classes, row.extra)
                for i, row in enumerate(prompt_rows)
            ]  # case numbers must be unique in one file; the original is kept as the "case" column
            guidance = summary["settings"]["guidance"]
            for row, original in zip(renumbered, prompt_rows, strict=True):
                row.extra["case"] = str(original.case_number)
                row.extra["evaluation_guidance"] = f"{guidance:g}"  # a replay uses the probe's scale
            save_prompt_csv(renumbered, temporary / "prompts.csv")
        for name, result in results.items():
            learned = {k: v for k, v in result.embeddings.items() if v.ndim == 1}
            if result.surface == "embedding" and name == "inversion" and learned:
                (temporary / "embeddings").mkdir(exist_ok=True)
                token, vector = next(iter(learned.items()))
                save_learned_embeds(temporary / "embeddings" / f"{name}.safetensors", token, vector)
