import numpy as np
import pytest

from erasure.attacks.verdict import asr, attack_metrics, decide, gap_closed, plain_verdict, rate_interval


def flags(n_true, n):
    return [True] * n_true + [False] * (n - n_true)


def table(base, edited, attacks, n=40, reference=None):
    """Hand-made columns: counts of true flags out of n, aligned image by image."""
    columns = {"base": flags(base, n), "edited": flags(edited, n)}
    entries = {}
    for name, (surface, count) in attacks.items():
        ref = None if reference is None or name not in reference else flags(reference[name], n)
        metrics = attack_metrics(columns["base"], columns["edited"], flags(count, n), reference_attacked=ref)
        entries[name] = {"surface": surface, "metrics": metrics}
    return columns, entries


def test_rate_interval_is_a_seeded_percentile_bootstrap():
    hits = flags(12, 40)
    first, second = rate_interval(hits), rate_interval(hits)
    assert first == second and first["rate"] == 0.3 and first["n"] == 40
    draws = np.random.default_rng(0).integers(40, size=(2000, 40))
    low, high = np.quantile(np.asarray(hits, float)[draws].mean(-1), [0.025, 0.975])
    assert (first["low"], first["high"]) == (pytest.approx(low), pytest.approx(high))
    assert rate_interval([])["rate"] is None


def test_rates_and_recovery_use_the_evaluations_intervals():
    from erasure.evaluation.functional import bootstrap_interval, paired_ratio_interval

    base, edited, attacked = flags(30, 40), flags(2, 40), flags(18, 40)
    metrics = attack_metrics(base, edited, attacked)
    for key, column in (("base", base), ("edited", edited), ("attacked", attacked)):
        assert (metrics[key]["low"], metrics[key]["high"]) == bootstrap_interval(column)
    assert metrics["recovery"] == pytest.approx(18 / 30)
    assert tuple(metrics["recovery_interval"]) == paired_ratio_interval(base, attacked)


def test_gap_closed_on_hand_made_rates():
    base, edited = flags(40, 40), flags(0, 40)
    assert gap_closed(base, edited, flags(20, 40))["value"] == pytest.approx(0.5)
    assert gap_closed(base, edited, flags(40, 40))["value"] == 1.0
    assert gap_closed(base, flags(10, 40), flags(5, 40))["value"] == 0.0  # below the edited rate: clipped
    # the probe-matched ceiling: the same attack on the base raises r*_base
    assert gap_closed(flags(20, 40), edited, flags(20, 40), flags(40, 40))["value"] == pytest.approx(0.5)
    assert gap_closed(flags(5, 40), flags(5, 40), flags(30, 40))["value"] is None  # nothing was erased
    interval = gap_closed(base, edited, flags(20, 40))
    assert interval["low"] < 0.5 < interval["high"]
    with pytest.raises(ValueError, match="one flag per image"):
        gap_closed(base, edited, flags(1, 3))


def test_asr_in_both_denominators():
    prompts = ["a", "a", "b", "b", "c", "c"]
    base = [True, False, True, True, False, False]
    edited = [False, False, False, True, False, False]
    attacked = [True, False, False, False, True, False]
    result = asr(prompts, base, edited, attacked)
    assert result["pre_asr"] == pytest.approx(1 / 3)  # b succeeds already
    assert result["asr"] == 1.0  # a by the attack, b before it, c by the attack
    assert result["ideal_prompts"] == 1 and result["conditional_asr"] == 1.0  # only a: base yes, edited no


def test_verdict_not_erased_when_plain_prompts_still_work():
    columns, attacks = table(40, 36, {"noise": ("trajectory", 40)})
    verdict = decide(columns, attacks)
    assert verdict["verdict"] == "not erased" and "plain prompts" in verdict["reason"]


@pytest.mark.parametrize(
    ("base", "edited", "n", "verdict"),
    [(40, 36, 40, "not erased"), (4, 4, 4, "inconclusive"), (1, 0, 40, "inconclusive"), (40, 2, 40, None)],
    ids=["plain prompts work", "too few images", "base rarely shows it", "attacks decide"],
)
def test_plain_verdict_is_what_decide_says_before_any_attack(base, edited, n, verdict):
    columns, _ = table(base, edited, {}, n=n)
    early = plain_verdict(columns)
    assert early["verdict"] == verdict and (early["reason"] is None) == (verdict is None)
    if verdict is not None:  # no attack table changes these
        loud = table(base, edited, {"noise": ("trajectory", n)}, n=n)[1]
        assert decide(columns, loud)["verdict"] == decide(columns, {})["verdict"] == verdict
        assert decide(columns, {})["reason"] == early["reason"]


def test_verdict_not_erased_when_paraphrases_close_the_gap():
    columns, attacks = table(40, 0, {"paraphrase": ("text", 38)})
    assert decide(columns, attacks)["verdict"] == "not erased"


def test_verdict_suppressed_lists_the_surfaces_that_reach_it():
    columns, attacks = table(
        40, 0, {"paraphrase": ("text", 0), "noise": ("trajectory", 30), "inversion": ("embedding", 35)}
    )
    verdict = decide(columns, attacks)
    assert verdict["verdict"] == "suppressed"
    assert verdict["surfaces"] == ["embedding", "trajectory"]
    assert verdict["attacks"]["noise"]["state"] == "recovers" and verdict["attacks"]["paraphrase"]["state"] == "holds"


FELL = {"D_uncond": {"value": 0.05, "low": 0.03, "high": 0.07}}  # the concept's unconditional likelihood fell


def every_surface(inversion=("embedding", 1)):
    """Attacks on text, embedding and trajectory that all hold (REMOVAL_SURFACES)."""
    return {"paraphrase": ("text", 0), "noise": ("trajectory", 1), "inversion": inversion}


def test_verdict_removed_with_and_without_a_reference():
    columns, attacks = table(40, 0, every_surface())
    verdict = decide(columns, attacks, likelihood=FELL)
    assert verdict["verdict"] == "removed"
    assert any("reference" in c for c in verdict["caveats"]) and any("fine-tuning" in c for c in verdict["caveats"])
    # inversion brings it back on the edit, but just as well on a model that never learned it: removed
    columns, attacks = table(40, 0, every_surface(("embedding", 30)), reference={"inversion": 32})
    verdict = decide(columns, attacks, reference=True, likelihood=FELL)
    assert verdict["verdict"] == "removed" and not any("reference" in c for c in verdict["caveats"])
    assert verdict["attacks"]["inversion"]["state"] == "holds"
    # ... and far better than on the reference: suppressed
    columns, attacks = table(40, 0, {"inversion": ("embedding", 30)}, reference={"inversion": 2})
    assert decide(columns, attacks, reference=True)["verdict"] == "suppressed"


def test_a_weight_attack_lifts_the_fine_tuning_caveat():
    columns, attacks = table(40, 0, every_surface() | {"relearning": ("weights", 0)})
    verdict = decide(columns, attacks, likelihood=FELL)
    assert verdict["verdict"] == "removed" and not any("fine-tuning" in c for c in verdict["caveats"])


def test_removal_needs_every_surface_tried_and_the_likelihood_measured():
    from erasure.attacks.verdict import REMOVAL_SURFACES

    for missing in REMOVAL_SURFACES:  # two searches on one surface that both fail show nothing about the others
        chosen = {name: entry for name, entry in every_surface().items() if entry[0] != missing}
        columns, attacks = table(40, 0, chosen)
        verdict = decide(columns, attacks, likelihood=FELL)
        assert verdict["verdict"] == "inconclusive" and f"the {missing} surface" in verdict["reason"]
    columns, attacks = table(40, 0, every_surface())
    verdict = decide(columns, attacks)  # every surface held, but no likelihood gaps
    assert verdict["verdict"] == "inconclusive" and "likelihood gaps were not measured" in verdict["reason"]


def test_verdict_inconclusive_branches():
    columns, attacks = table(4, 0, {"noise": ("trajectory", 2)}, n=6)
    assert "only 6 images" in decide(columns, attacks)["reason"]
    columns, attacks = table(1, 0, {"noise": ("trajectory", 1)}, n=40)
    assert "nothing measurable" in decide(columns, attacks)["reason"]
    columns, attacks = table(10, 0, {"noise": ("trajectory", 2)}, n=10)  # wide: neither recovers nor holds
    verdict = decide(columns, attacks)
    assert verdict["verdict"] == "inconclusive" and "too wide" in verdict["reason"]
    columns, _ = table(40, 0, {})
    assert decide(columns, {})["verdict"] == "inconclusive"


def test_removal_needs_the_weights_to_agree():
    columns, attacks = table(40, 0, {"paraphrase": ("text", 0), "noise": ("trajectory", 1)})
    # a generation-time suppression that every attack fails against is still only suppression
    verdict = decide(columns, attacks, generation_time="sld")
    assert verdict["verdict"] == "suppressed" and "changes no weight" in verdict["reason"]
    # the unconditional likelihood of the concept did not fall: suppressed, on likelihood evidence
    flat = {"D_uncond": {"value": 0.001, "low": -0.002, "high": 0.004}}
    verdict = decide(columns, attacks, likelihood=flat)
    assert verdict["verdict"] == "suppressed" and "likelihood evidence" in verdict["reason"]
    # it fell: removed
    columns, attacks = table(40, 0, every_surface())
    assert decide(columns, attacks, likelihood=FELL)["verdict"] == "removed"
    assert decide(columns, attacks, likelihood=FELL, generation_time="sld")["verdict"] == "suppressed"
    # a recovering attack decides before the likelihood is consulted
    columns, attacks = table(40, 0, {"noise": ("trajectory", 30)})
    assert decide(columns, attacks, likelihood=FELL)["verdict"] == "suppressed"


def test_judge_agreement_counts_each_side():
    from erasure.attacks.verdict import judge_agreement

    judge, witness = [True, True, False, False, True], [True, False, False, True, True]
    result = judge_agreement(judge, witness)
    assert result["images"] == 5 and result["agreement"]["rate"] == pytest.approx(3 / 5)
    assert result["judge_only"] == 1 and result["witness_only"] == 1
    assert result["judge_rate"] == rate_interval(judge) and result["witness_rate"] == rate_interval(witness)
    with pytest.raises(ValueError, match="one verdict of each judge"):
        judge_agreement(judge, witness[:2])


def test_untouched_weights_decide_even_when_an_attack_is_unclear_and_nothing_else_does():
    columns, attacks = table(10, 0, {"noise": ("trajectory", 2)}, n=10)  # too wide to tell
    assert decide(columns, attacks)["verdict"] == "inconclusive"
    baseline = decide(columns, attacks, generation_time="negative-prompt")  # weights untouched: still hidden only
    assert baseline["verdict"] == "suppressed" and "too wide" in baseline["reason"]
    # a likelihood interval that includes 0 is no certainty about the weights: an unclear attack stays undecided
    flat = {"D_uncond": {"value": 0.0, "low": -0.01, "high": 0.01}}
    for likelihood in (flat, FELL):
        assert decide(columns, attacks, likelihood=likelihood)["verdict"] == "inconclusive"


def curve(points, n=40):
    """A budget curve from ``{steps: true count}``, as the probe summary writes it."""
    return [{"steps": steps, "target_rate": rate_interval(flags(count, n))} for steps, count in points.items()]


def test_a_curve_ahead_of_the_reference_is_named_but_its_final_rate_decides():
    """Two never-saw-Pip models differed by 38% against 0% at 100 inversion steps: speed against one reference run
    would call a model that never learned the concept suppressed, so it is reported and decides nothing."""
    columns, attacks = table(40, 0, every_surface(("embedding", 36)), reference={"inversion": 34})
    both_end_high = decide(columns, attacks, reference=True, likelihood=FELL)
    assert both_end_high["verdict"] == "removed"  # at the end the two models look alike
    attacks["inversion"] |= {"curve": curve({50: 30, 300: 36}), "reference_curve": curve({50: 2, 300: 34})}
    verdict = decide(columns, attacks, reference=True, likelihood=FELL)
    assert verdict["verdict"] == "removed"
    why = verdict["attacks"]["inversion"]["why"]
    assert "after 50 steps it was ahead of the reference" in why and "decides nothing" in why
    # the same speed on both models: nothing to name
    attacks["inversion"] |= {"curve": curve({50: 3, 300: 36}), "reference_curve": curve({50: 2, 300: 34})}
    verdict = decide(columns, attacks, reference=True, likelihood=FELL)
    assert verdict["verdict"] == "removed" and "at any step" in verdict["attacks"]["inversion"]["why"]
    # points the reference was not judged at compare with nothing
    attacks["inversion"] |= {"curve": curve({25: 30, 300: 36}), "reference_curve": curve({50: 2, 300: 34})}
    verdict = decide(columns, attacks, reference=True, likelihood=FELL)
    assert verdict["verdict"] == "removed" and "ahead" not in verdict["attacks"]["inversion"]["why"]
    # the final rate beyond the reference's still recovers
    attacks["inversion"] |= {"curve": curve({50: 30, 300: 40}), "reference_curve": curve({50: 2, 300: 20})}
    attacks["inversion"]["metrics"]["reference_attacked"] = rate_interval(flags(20, 40))
    assert decide(columns, attacks, reference=True, likelihood=FELL)["verdict"] == "suppressed"


def test_a_curve_ahead_of_the_reference_but_not_of_the_edited_rate_is_not_named():
    # plain prompts already at 10 of 40; the attack's early point beats the reference's but not the edited rate:
    # it did not come back at all, so only the final comparison with the reference is given
    columns, attacks = table(40, 10, every_surface(("embedding", 12)), reference={"inversion": 11})
    attacks["inversion"] |= {"curve": curve({50: 12, 300: 12}), "reference_curve": curve({50: 0, 300: 11})}
    state = decide(columns, attacks, reference=True, likelihood=FELL)["attacks"]["inversion"]
    assert state["state"] == "holds" and "reference model" in state["why"] and "ahead" not in state["why"]
