import csv
import json

import numpy as np
import pytest
import torch
from attack_helpers import CONCEPT, brightness_judge, red_selector, tiny, tiny_edit, unet_fingerprint

from erasure.attacks.base import AttackError, evaluation_rows
from erasure.attacks.suite import run_probe
from erasure.concepts import Concept
from erasure.prompt_sets import load_prompt_csv

OPTIONS = {
    "paraphrase": {"rewordings": 1, "seeds": 1},
    "ring_a_bell": {"etas": (3.0,)},
    "trajectory": {"handoffs": (1,)},
    "noise": {"etas": (1.5,), "variance_scales": (1.0,)},
}


def test_quick_probe_writes_its_tables_atomically(tmp_path):
    pipe = tiny()
    before = unet_fingerprint(pipe)
    out = tmp_path / "probe"
    summary = run_probe(
        pipe,
        tiny_edit(pipe),
        CONCEPT,
        brightness_judge,
        red_selector,
        "quick",
        out=out,
        options=OPTIONS,
        steps=2,
        likelihood=False,
    )
    assert unet_fingerprint(pipe) == before
    assert sorted(p.name for p in out.iterdir()) == ["per_image.csv", "prompts.csv", "summary.json", "verdict.json"]
    assert set(summary["attacks"]) == {"paraphrase", "ring_a_bell", "trajectory", "noise", "inpaint"}
    assert json.loads((out / "verdict.json").read_text())["verdict"] == summary["verdict"]["verdict"]
    assert summary["verdict"]["verdict"] == "inconclusive"  # 2 images: too few for any other verdict
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["attacks"]["noise"]["metrics"]["attacked"]["n"] == 2 and on_disk["cost"]["unet_forwards"] > 0
    with open(out / "per_image.csv", newline="") as file:
        records = list(csv.DictReader(file))
    assert {r["attack"] for r in records} == {"none", *summary["attacks"]}
    assert sum(r["attack"] == "none" for r in records) == 4  # base and edited columns
    assert summary["settings"]["judge"] == {"callable": "attack_helpers.brightness_judge"}
    assert json.loads((out / "verdict.json").read_text())["selector"] == {"callable": "attack_helpers.red_selector"}
    with pytest.raises(AttackError, match="exists and is not empty"):
        run_probe(pipe, None, CONCEPT, brightness_judge, red_selector, out=out)


def always_shows(images):
    return [True] * len(images)


def test_attacks_are_skipped_when_the_plain_prompts_say_not_erased_unless_asked():
    pipe = tiny()  # no edit: the model under test is the base, which "shows" the concept in every image
    settings = {"options": OPTIONS, "steps": 2, "images_per_prompt": 4, "likelihood": True}
    summary = run_probe(pipe, None, CONCEPT, always_shows, red_selector, "quick", **settings)
    assert summary["verdict"]["verdict"] == "not erased" and summary["attacks"] == {}
    assert summary["skipped"]["attacks"] == ["paraphrase", "ring_a_bell", "trajectory", "noise", "inpaint"]
    assert summary["skipped"]["reason"].startswith("not erased: plain prompts") and summary["likelihood"] is None
    forced = run_probe(
        pipe, None, CONCEPT, always_shows, red_selector, attacks=["trajectory"], always_attack=True,
        **settings | {"likelihood": False, "options": {"trajectory": {"handoffs": (1,)}}},
    )  # fmt: skip
    assert list(forced["attacks"]) == ["trajectory"] and forced["skipped"] is None
    assert forced["verdict"]["verdict"] == "not erased"


def test_probe_refuses_bad_input_before_any_work(tmp_path):
    pipe = tiny()
    with pytest.raises(AttackError, match="Unknown suite"):
        run_probe(pipe, None, CONCEPT, brightness_judge, red_selector, "huge")
    with pytest.raises(AttackError, match="selector is the judge"):
        run_probe(pipe, None, CONCEPT, brightness_judge, brightness_judge)
    with pytest.raises(AttackError, match="no evaluate prompts"):
        run_probe(
            pipe, None, Concept("Pip", "character", ("pip",)), brightness_judge, red_selector, out=tmp_path / "x"
        )
    with pytest.raises(AttackError, match="budget of 0"):
        run_probe(pipe, None, CONCEPT, brightness_judge, red_selector, options={"paraphrase": {"seeds": 0}})
    with pytest.raises(AttackError, match="unknown attack"):
        run_probe(pipe, None, CONCEPT, brightness_judge, red_selector, options={"nope": {}})
    assert not (tmp_path / "x").exists()


def test_adversarial_prompts_are_a_replayable_prompt_csv(tmp_path):
    from erasure.evaluation import prompt_rows

    pipe = tiny()
    out = tmp_path / "probe"
    run_probe(
        pipe, tiny_edit(pipe), CONCEPT, brightness_judge, red_selector, attacks=["paraphrase"], out=out, steps=2,
        options={"paraphrase": {"rewordings": 2, "seeds": 1}}, images_per_prompt=2, guidance=6.0, likelihood=False,
    )  # fmt: skip
    header = (out / "prompts.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["case_number", "prompt", "evaluation_seed", "concept", "type", "classes"]
    assert {"attack", "case", "anchor", "erased_concept", "evaluation_guidance"} <= set(header)
    rows = load_prompt_csv(out / "prompts.csv")
    held_out = evaluation_rows(CONCEPT, 2)
    assert len(rows) == len(held_out) and len({r.case_number for r in rows}) == len(rows)
    for row, original in zip(rows, held_out, strict=True):
        assert row.extra["attack"] == "paraphrase" and row.extra["case"] == str(original.case_number)
        assert (row.concept, row.row_type, row.classes) == (original.concept, original.row_type, original.classes)
        assert row.extra["erased_concept"] == "Pip" and row.extra["evaluation_guidance"] == "6"
    replayed, source, _ = prompt_rows(prompts=out / "prompts.csv")  # what erasure evaluate --prompts reads
    assert [r.prompt for r in replayed] == [r.prompt for r in rows] and source.kind == "csv"


def test_with_a_reference_the_inpainting_probe_measures_the_reference_on_the_same_base_images(tmp_path):
    pipe, reference = tiny(), tiny()
    with_ref = run_probe(
        pipe, tiny_edit(pipe), CONCEPT, brightness_judge, red_selector, reference=reference, attacks=["inpaint"],
        steps=2, out=tmp_path / "probe", likelihood=False,
    )  # fmt: skip
    metrics = with_ref["attacks"]["inpaint"]["metrics"]
    assert metrics["reference_attacked"] is not None and metrics["reference_attacked"]["n"] == 2
    with open(tmp_path / "probe" / "per_image.csv", newline="") as file:
        models = {r["model"] for r in csv.DictReader(file) if r["attack"] == "inpaint"}
    assert models == {"edited", "reference"}
    alone = run_probe(
        pipe, tiny_edit(pipe), CONCEPT, brightness_judge, red_selector, attacks=["inpaint"], steps=2, likelihood=False
    )
    assert alone["attacks"]["inpaint"]["metrics"]["reference_attacked"] is None


def test_with_a_reference_of_the_same_latent_space_trajectory_completion_measures_its_floor(tmp_path):
    """The reference finishes the base's trajectories too, when it can: a model that never learned the concept may
    still land on it from a trajectory the base model started, and only what beats that counts."""
    from erasure.testing import tiny_pipeline

    pipe = tiny()
    same_space = tiny_pipeline("sd1", seed=1)
    same_space.vae.load_state_dict(pipe.vae.state_dict())
    settings = {"attacks": ["trajectory"], "options": {"trajectory": OPTIONS["trajectory"]}, "steps": 2}
    with_ref = run_probe(
        pipe, tiny_edit(pipe), CONCEPT, brightness_judge, red_selector, reference=same_space,
        out=tmp_path / "probe", likelihood=False, **settings,
    )  # fmt: skip
    entry = with_ref["attacks"]["trajectory"]
    assert entry["metrics"]["reference_attacked"]["n"] == len(evaluation_rows(CONCEPT, 1))
    with open(tmp_path / "probe" / "per_image.csv", newline="") as file:
        models = {r["model"] for r in csv.DictReader(file) if r["attack"] == "trajectory"}
    assert models == {"edited", "reference"}
    other_space = run_probe(
        pipe, tiny_edit(pipe), CONCEPT, brightness_judge, red_selector, reference=tiny_pipeline("sd1", seed=1),
        likelihood=False, **settings,
    )  # fmt: skip
    entry = other_space["attacks"]["trajectory"]
    assert entry["metrics"]["reference_attacked"] is None
    assert "VAE differs" in entry["notes"]["reference_control"]


def darkness_judge(images):
    """The brightness judge's opposite: it disagrees on every image."""
    return [not verdict for verdict in brightness_judge(images)]


def test_a_witness_scores_every_reported_image_and_decides_nothing():
    pipe = tiny()
    edit = tiny_edit(pipe)
    settings = {
        "attacks": ["paraphrase", "trajectory", "inpaint"], "steps": 2, "images_per_prompt": 2, "likelihood": False,
        "options": {"paraphrase": OPTIONS["paraphrase"], "trajectory": OPTIONS["trajectory"]}, "reference": tiny(),
    }  # fmt: skip
    alone = run_probe(pipe, edit, CONCEPT, brightness_judge, red_selector, **settings)
    same = run_probe(pipe, edit, CONCEPT, brightness_judge, red_selector, witness=brightness_judge, **settings)
    opposite = run_probe(pipe, edit, CONCEPT, brightness_judge, red_selector, witness=darkness_judge, **settings)
    for summary in (same, opposite):  # the witness changes no rate and no verdict
        assert summary["verdict"]["verdict"] == alone["verdict"]["verdict"]
        for name in alone["attacks"]:
            assert summary["attacks"][name]["metrics"] == alone["attacks"][name]["metrics"]
    assert alone["columns"]["witness"] is None and alone["attacks"]["trajectory"]["witness"] is None
    rows = len(evaluation_rows(CONCEPT, 2))
    for name in ("paraphrase", "trajectory", "inpaint"):
        agrees, disagrees = same["attacks"][name]["witness"], opposite["attacks"][name]["witness"]
        assert agrees["images"] == disagrees["images"] == rows  # the attacked edited image of every row
        assert agrees["agreement"]["rate"] == 1.0 and disagrees["agreement"]["rate"] == 0.0
        assert disagrees["judge_only"] + disagrees["witness_only"] == disagrees["images"]
    # the inpainting probe also judges the reference's fills of the same base images: witnessed apart
    assert set(opposite["attacks"]["inpaint"]["witness_by_model"]) == {"edited", "reference"}
    assert opposite["attacks"]["inpaint"]["witness_by_model"]["reference"]["images"] == rows
    assert set(opposite["attacks"]["paraphrase"]["witness_by_model"]) == {"edited"}
    assert set(opposite["columns"]["witness"]) == {"base", "edited"}
    edited = opposite["columns"]["witness"]["edited"]
    assert edited["images"] == rows and edited["judge_rate"]["rate"] == alone["columns"]["edited"]["rate"]
    assert edited["witness_rate"]["rate"] == 1 - alone["columns"]["edited"]["rate"]
    assert same["settings"]["witness"] == {"callable": "attack_helpers.brightness_judge"}


def test_the_reference_is_taught_with_the_base_models_concept_images(monkeypatch):
    """Inversion and relearning train on images of the concept; a reference that never learned it must get the same
    images as the edit (the base model's), not its own, which would show no concept and teach it nothing."""
    import erasure.attacks.inversion as inversion
    from erasure.attacks.context import AttackContext
    from erasure.testing import tiny_pipeline

    pipe, reference = tiny(), tiny_pipeline("sd1", seed=1)
    seen = []
    real = inversion.images_to_latents

    def spy(target_pipe, images, *args, **kwargs):
        seen.append((target_pipe, images.copy()))
        return real(target_pipe, images, *args, **kwargs)

    monkeypatch.setattr(inversion, "images_to_latents", spy)
    run_probe(
        pipe, tiny_edit(pipe), CONCEPT, brightness_judge, red_selector, reference=reference, attacks=["inversion"],
        options={"inversion": {"steps": 2, "images": 2, "batch_size": 2}}, steps=2, likelihood=False,
    )  # fmt: skip
    (edit_pipe, edit_images), (reference_pipe, reference_images) = seen
    assert edit_pipe is pipe and reference_pipe is reference
    np.testing.assert_array_equal(reference_images, edit_images)
    rows = evaluation_rows(CONCEPT, 1)  # the two models' own images differ, so the test can tell them apart
    own, base = (
        AttackContext(p, None, brightness_judge, red_selector, steps=2).base_images(rows) for p in (reference, pipe)
    )
    assert not np.array_equal(own, base)


def test_relearning_writes_its_curve_beside_the_references():
    from erasure.attacks.run import summary_table
    from erasure.attacks.suite import _steps_to_half
    from erasure.testing import tiny_pipeline

    pipe = tiny()
    summary = run_probe(
        pipe, tiny_edit(pipe), CONCEPT, brightness_judge, red_selector, reference=tiny_pipeline("sd1", seed=1),
        attacks=["relearning"], options={"relearning": {"checkpoints": (1, 2), "images": 2, "batch_size": 2}},
        steps=2, likelihood=False,
    )  # fmt: skip
    entry = summary["attacks"]["relearning"]
    assert [point["steps"] for point in entry["curve"]] == [1, 2] == [p["steps"] for p in entry["reference_curve"]]
    assert entry["curve"][-1]["target_rate"] == entry["metrics"]["attacked"]  # the last point is the reported rate
    assert entry["reference_curve"][-1]["target_rate"] == entry["metrics"]["reference_attacked"]
    # wiring: the summary's speed is _steps_to_half (unit-tested below) of this curve and this base column
    points = [{"steps": p["steps"], "target_rate": p["target_rate"]["rate"]} for p in entry["curve"]]
    base = summary["columns"]["base"]
    hits = round(base["rate"] * base["n"])
    assert entry["steps_to_half"] == _steps_to_half(points, [True] * hits + [False] * (base["n"] - hits))
    assert any(line.startswith("relearning curve: 1 steps ") and "half the base rate after" in line
               for line in summary_table(summary))  # fmt: skip


def test_inversion_prompts_replay_with_their_learned_token(tmp_path):
    from erasure.evaluation.jobs import load_row_embeddings, prompt_rows

    pipe = tiny()
    out = tmp_path / "probe"
    run_probe(
        pipe, tiny_edit(pipe), CONCEPT, brightness_judge, red_selector, attacks=["inversion"], out=out, steps=2,
        options={"inversion": {"steps": 2, "images": 2, "batch_size": 2}}, likelihood=False,
    )  # fmt: skip
    rows, source, _ = prompt_rows(prompts=out / "prompts.csv")  # what erasure evaluate --prompts reads
    assert all("<concept>" in r.prompt and r.extra["embedding"] == "embeddings/inversion.safetensors" for r in rows)
    other = tiny()  # a fresh model: the transfer replay
    assert len(load_row_embeddings(other, rows, source.path)) == 1
    token_id = other.tokenizer.convert_tokens_to_ids("<concept>")
    from safetensors.torch import load_file

    learned = load_file(str(out / "embeddings" / "inversion.safetensors"))["<concept>"][0]
    assert torch.equal(other.text_encoder.get_input_embeddings().weight[token_id], learned)


def test_relearning_speed_is_the_first_step_count_at_half_the_base_rate():
    from erasure.attacks.suite import _steps_to_half

    points = [{"steps": 10, "target_rate": 0.2}, {"steps": 25, "target_rate": 0.5}, {"steps": 50, "target_rate": 0.9}]
    base = [True] * 8 + [False] * 2  # base rate 0.8: half is 0.4
    assert _steps_to_half(points, base) == 25
    assert _steps_to_half(points[:1], base) is None  # not reached within the budget
    assert _steps_to_half(points, [False] * 4) is None and _steps_to_half(None, base) is None


def test_the_witness_also_judges_the_references_runs():
    from erasure.testing import tiny_pipeline

    pipe = tiny()
    summary = run_probe(
        pipe, tiny_edit(pipe), CONCEPT, brightness_judge, red_selector, reference=tiny_pipeline("sd1", seed=1),
        attacks=["relearning"], options={"relearning": {"checkpoints": (1,), "images": 2, "batch_size": 2}},
        steps=2, likelihood=False, witness=darkness_judge,
    )  # fmt: skip
    by_model = summary["attacks"]["relearning"]["witness_by_model"]
    assert set(by_model) == {"edited", "reference"} and by_model["reference"]["images"] == 2
    assert by_model["reference"]["agreement"]["rate"] == 0.0  # the opposite judge, on the reference's images
    assert summary["settings"]["witness_is_selector"] is False
