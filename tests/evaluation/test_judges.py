"""Judges: their metrics against a plain count, the wiring into runs, and the toy world's oracle."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erasure.cli import main
from erasure.evaluation import EvaluationError, Verdict, judge_metrics, run_evaluation
from erasure.files import save_images
from erasure.prompt_sets import PromptRow

REPO = Path(__file__).resolve().parents[2]


def test_judge_metrics_are_plain_rates_with_bootstrap_intervals():
    from erasure.evaluation import bootstrap_interval, paired_ratio_interval

    roles = ["erased"] * 3 + ["generality"] + ["preserved"] * 4 + ["other"]
    base = [Verdict(shows_target=True)] * 4 + [Verdict(follows_prompt=f) for f in (True, True, False, True)]
    base += [Verdict(shows_target=True, follows_prompt=True)]
    edited = [Verdict(shows_target=t) for t in (False, True, None, False)]
    edited += [Verdict(follows_prompt=f) for f in (True, False, True, None)] + [Verdict(follows_prompt=False)]
    metrics = judge_metrics("j", edited, roles, reference=base)
    assert metrics["j_target_rate"] == pytest.approx(1 / 3) and metrics["j_target_n"] == 3  # None is not judged
    low, high = bootstrap_interval([False, True, False])
    assert (metrics["j_target_rate_ci95_low"], metrics["j_target_rate_ci95_high"]) == (low, high)
    assert metrics["j_neighbour_rate"] == pytest.approx(2 / 3) and metrics["j_neighbour_n"] == 3
    # paired: the three preserved images both models were judged on; base 2 of 3 right, edited 2 of 3
    assert metrics["j_neighbour_ratio"] == pytest.approx(1.0)
    low, high = paired_ratio_interval([True, True, False], [True, False, True])
    assert (metrics["j_neighbour_ratio_ci95_low"], metrics["j_neighbour_ratio_ci95_high"]) == (low, high)
    alone = judge_metrics("j", base, roles)
    assert alone["j_target_rate"] == 1.0 and alone["j_neighbour_ratio"] is None
    nothing = judge_metrics("j", [Verdict()], ["erased"])
    assert (
        nothing["j_target_rate"] is None and nothing["j_target_n"] == 0 and nothing["j_target_rate_ci95_low"] is None
    )


# --------------------------------------------------------------------------------------------------------------
# Wiring: a stand-in judge on given images
# --------------------------------------------------------------------------------------------------------------

ROWS = [("a drawing of Pip", "erased", "Pip"), ("an image of Pip", "erased", "Pip"),
        ("a drawing of Zog", "preserved", "Zog"), ("a drawing of Miro", "preserved", "Miro")]  # fmt: skip


def write_model_images(folder, colours):
    images = np.zeros((len(ROWS), 32, 32, 3), np.uint8)
    for image, colour in zip(images, colours, strict=True):
        image[:] = colour
        image[:2, :2] = 255 - np.asarray(colour, np.uint8)  # a mark: one flat colour is a degenerate image
    records = [
        {"case_number": i, "index": 0, "seed": 40 + i, "prompt": prompt,
         "row": {"evaluation_seed": 40 + i, "concept": concept, "type": kind}}
        for i, (prompt, kind, concept) in enumerate(ROWS)
    ]  # fmt: skip
    save_images(folder, images, records, {"model": folder.name, "steps": 25, "guidance": 7.5})


RED, BLUE = (230, 0, 0), (0, 0, 230)


@pytest.fixture
def judged(tmp_path, monkeypatch):
    from evaluation_helpers import save_tiny_clip

    from erasure.evaluation import judges

    monkeypatch.setitem(judges.JUDGES, "redness", "evaluation_helpers:RednessJudge")
    write_model_images(tmp_path / "images" / "base", [RED, RED, BLUE, BLUE])  # target shown, neighbours right
    write_model_images(tmp_path / "images" / "uce", [BLUE, RED, BLUE, RED])  # one target left, one neighbour lost
    clip = save_tiny_clip(tmp_path / "clip")
    return run_evaluation(tmp_path / "eval", images=tmp_path / "images", clip=str(clip), judges=["redness:x"],
                          progress=False)  # fmt: skip


def test_a_judge_adds_its_rates_provenance_and_verdicts(judged):
    document = json.loads((judged / "metrics.json").read_text())
    base, uce = document["metrics"]["base"], document["metrics"]["uce"]
    assert (base["redness_target_rate"], uce["redness_target_rate"]) == (1.0, 0.5)
    assert base["redness_target_n"] == uce["redness_target_n"] == 2
    assert (base["redness_neighbour_rate"], uce["redness_neighbour_rate"]) == (1.0, 0.5)
    assert uce["redness_neighbour_ratio"] == 0.5 and base["redness_neighbour_ratio"] == 1.0
    assert uce["redness_target_rate_ci95_low"] <= 0.5 <= uce["redness_target_rate_ci95_high"]
    assert "clip_score" in uce and "efficacy" in uce  # CLIP still scores every image
    assert document["judges"]["redness"]["argument"] == "x" and document["judges"]["redness"]["bootstrap"]
    assert document["files"] == {"per_image": "per_image.csv", "per_image_redness": "per_image_redness.csv"}
    with open(judged / "per_image_redness.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["model"], r["case_number"], r["verdict"]) for r in rows][:5] == [
        ("base", "0", "red"), ("base", "1", "red"), ("base", "2", "not red"), ("base", "3", "not red"),
        ("uce", "0", "not red"),
    ]  # fmt: skip
    assert rows[4]["shows_target"] == "0" and rows[2]["follows_prompt"] == "1" and rows[0]["follows_prompt"] == ""


def test_without_a_judge_the_document_is_unchanged(tmp_path):
    from evaluation_helpers import save_tiny_clip

    write_model_images(tmp_path / "images" / "base", [RED] * 4)
    out = run_evaluation(tmp_path / "eval", images=tmp_path / "images", clip=str(save_tiny_clip(tmp_path / "c")))
    document = json.loads((out / "metrics.json").read_text())
    assert list(document) == ["schema_version", "kind", "created", "clip", "generation", "prompts", "models",
                              "metrics", "reference", "versions", "num_processes", "files"]  # fmt: skip
    assert not [k for k in document["metrics"]["base"] if k.startswith("redness")]
    assert not list(out.glob("per_image_*.csv"))


def test_an_unknown_judge_or_a_missing_oracle_is_a_clear_error(tmp_path, capsys):
    from evaluation_helpers import save_tiny_clip

    with pytest.raises(EvaluationError, match="Unknown judge 'gpt'; choose from oracle"):
        run_evaluation(tmp_path / "out", images=tmp_path, judges=["gpt"])
    write_model_images(tmp_path / "images", [RED] * 4)
    argv = ["evaluate", "--images", str(tmp_path / "images"), "--judge", f"oracle:{tmp_path / 'none'}", "--out",
            str(tmp_path / "out"), "--clip", str(save_tiny_clip(tmp_path / "clip"))]  # fmt: skip
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "No toy-world oracle in" in error and "looked for oracle_config.json" in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------
# The toy world's oracle
# --------------------------------------------------------------------------------------------------------------


def render(character=None, **attributes):
    from erasure.toyworld.render import make_scene
    from erasure.toyworld.render import render as draw

    return draw(make_scene(np.random.default_rng(0), character=character, **attributes))


def test_the_oracle_judges_targets_and_prompts_of_toy_rows():
    from erasure.toyworld.judge import OracleJudge

    judge = OracleJudge(device="cpu")
    images = np.stack([render("Pip"), render("Zog"), render(shape="circle", colour="red", style="plain"),
                       render("Zog"), render("Pip")])  # fmt: skip
    extra = {"erased_concept": "Pip"}
    rows = [
        PromptRow(0, "an image of Pip", 0, concept="Pip", row_type="erased", extra=extra),
        PromptRow(1, "an image of Pip", 0, concept="Pip", row_type="erased", extra=extra),
        PromptRow(2, "a drawing of a red circle", 0, concept="a red circle", row_type="preserved", extra=extra),
        PromptRow(3, "an image of Zog", 0, concept="Zog", row_type="preserved", extra=extra),
        PromptRow(4, "a photo of a cat", 0, concept="cat", row_type="preserved"),
    ]
    verdicts = judge.judge(images, rows)
    assert [v.shows_target for v in verdicts[:4]] == [True, False, False, False]
    assert [v.follows_prompt for v in verdicts[2:4]] == [True, True]
    assert verdicts[4].follows_prompt is None and verdicts[4].shows_target is None  # outside the toy world
    assert verdicts[0].label == "yellow|circle|plain|Pip"
    assert judge.describe()["kind"] == "toyworld-oracle" and len(judge.describe()["fingerprint"]) == 64


RED_CIRCLE = {"colour": "red", "shape": "circle", "style": "plain", "character": "none"}


@pytest.mark.parametrize(
    ("concept", "expected"),
    [("striped", {"style": "striped"}), ("red", {"colour": "red"}), ("a red circle", RED_CIRCLE)],
)
def test_a_toy_concept_names_what_its_images_show(concept, expected):
    from erasure.toyworld.judge import _target_expectation

    assert _target_expectation(concept) == expected and _target_expectation("van Gogh") is None


def test_evaluate_with_the_oracle_on_the_toy_world(tmp_path):
    out = tmp_path / "oracle"
    argv = ["evaluate", "--model", str(REPO / "checkpoints" / "toyworld-sd"), "--concept",
            str(REPO / "prompts" / "toyworld" / "pip.toml"), "--judge", "oracle", "--steps", "4", "--device", "cpu",
            "--batch-size", "8", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    document = json.loads((out / "metrics.json").read_text())
    assert document["clip"]["model"].endswith("toyworld-clip")  # the toy CLIP beside the toy model, as before
    assert document["judges"]["oracle"]["model"].endswith("toyworld-oracle")
    base = document["metrics"]["base"]
    roles = document["prompts"]["roles"]
    assert base["oracle_target_n"] == roles.get("erased", 0) + roles.get("generality", 0) > 0
    assert base["oracle_neighbour_n"] == roles["preserved"]
    assert (
        0.0
        <= base["oracle_target_rate_ci95_low"]
        <= base["oracle_target_rate"]
        <= base["oracle_target_rate_ci95_high"]
    )
    assert base["oracle_neighbour_ratio"] is not None  # the base against itself
    with open(out / "per_image_oracle.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == document["prompts"]["images_per_model"]


def test_blank_images_are_flagged_and_not_scored(tmp_path, monkeypatch, caplog):
    """A broken model (NaN weights decode to black) must not be called a perfect erasure."""
    from evaluation_helpers import save_tiny_clip

    from erasure.evaluation import judges

    monkeypatch.setitem(judges.JUDGES, "redness", "evaluation_helpers:RednessJudge")
    write_model_images(tmp_path / "images" / "base", [RED, RED, BLUE, BLUE])
    write_model_images(tmp_path / "images" / "broken", [BLUE, RED, BLUE, RED])
    broken = tmp_path / "images" / "broken"
    for png in broken.glob("*.png"):  # every image of the broken model one flat black
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    with caplog.at_level("WARNING", logger="erasure.evaluation.results"):
        out = run_evaluation(tmp_path / "eval", images=tmp_path / "images", clip=str(save_tiny_clip(tmp_path / "c")),
                             judges=["redness:x"], progress=False)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["base"]["n_degenerate"] == 0 and metrics["base"]["efficacy"] is not None
    assert metrics["broken"]["n_degenerate"] == 4 and metrics["broken"]["n_images"] == 0
    assert metrics["broken"]["efficacy"] is None and metrics["broken"]["redness_target_rate"] is None
    with open(out / "per_image.csv", newline="") as handle:
        flags = {(r["model"], r["case_number"]): r["degenerate"] for r in csv.DictReader(handle)}
    assert set(flags[("broken", str(i))] for i in range(4)) == {"1"} and flags[("base", "0")] == "0"
    assert "broken: 4 of 4 images are blank or constant" in caplog.text


def test_degenerate_images_are_one_flat_colour():
    from erasure.evaluation.functional import degenerate_images

    flat = np.full((2, 8, 8, 3), (200, 10, 10), np.uint8)
    noisy = flat.copy()
    noisy[1, 0, 0, 1] += 3
    assert degenerate_images(flat) == [True, True] and degenerate_images(noisy) == [True, False]


def test_an_evaluation_removes_a_killed_runs_temporaries_and_refuses_a_live_writer(tmp_path):
    import os
    import subprocess
    import sys

    from evaluation_helpers import save_tiny_clip

    from erasure.files import OutputBusyError

    write_model_images(tmp_path / "images" / "base", [RED, RED, BLUE, BLUE])
    clip = str(save_tiny_clip(tmp_path / "c"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".eval.{dead.pid}.0123456789ab.tmp"
    (stale / "images").mkdir(parents=True)
    (tmp_path / ".eval.lock").write_text(f"{os.getppid()}\n")  # a live process holds the output
    with pytest.raises(OutputBusyError, match="another process"):
        run_evaluation(tmp_path / "eval", images=tmp_path / "images", clip=clip, progress=False)
    (tmp_path / ".eval.lock").unlink()
    out = run_evaluation(tmp_path / "eval", images=tmp_path / "images", clip=clip, progress=False)
    assert (out / "metrics.json").is_file() and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".eval")) == []
