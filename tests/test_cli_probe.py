"""``erasure probe`` and ``erasure attack`` on tiny saved pipelines: outputs end to end, and bad input refused.

The tiny pipeline draws 64x64 images, so the shipped toy oracle can judge them (as noise: no verdict but
"inconclusive" is expected) with the shipped toy CLIP as the selector; budgets are cut to seconds with ``--set``.
"""

import csv
import json

import pytest
from safetensors.torch import save_file

from erasure.cli import main
from erasure.resources import checkpoint, prompt_file
from erasure.testing import save_tiny_pipeline, tiny_pipeline

CLIP = f"clip:{checkpoint('toyworld-clip')}"
FAST = ["--steps", "2", "--seeds-per-prompt", "1", "--batch-size", "8"]
QUICK = [
    "--set", "paraphrase.rewordings=1", "--set", "paraphrase.seeds=1", "--set", "ring_a_bell.etas=[3.0]",
    "--set", "trajectory.handoffs=[1]", "--set", "noise.etas=[1.5]", "--set", "noise.variance_scales=[1.0]",
]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model, a UCE edit of it, the same edit as a weights file and as a full peer checkpoint, and an
    edit of another base."""
    from erasure.concepts import load_concepts
    from erasure.methods import get_method

    root = tmp_path_factory.mktemp("world")
    model = save_tiny_pipeline(root / "model")
    pipe = tiny_pipeline("sd1")
    request = load_concepts(prompt_file("toyworld/pip.toml"))
    edit = get_method("uce").apply(pipe, request)
    edit.save(root / "run")
    with edit.applied(pipe):
        save_file({k[len("unet.") :]: pipe.unet.get_parameter(k[len("unet.") :]).detach().contiguous()
                   for k in edit.deltas}, str(root / "weights.safetensors"))  # fmt: skip
        pipe.save_pretrained(root / "peer", safe_serialization=True)
    other = tiny_pipeline("sd1", seed=1)
    get_method("uce").apply(other, request).save(root / "other-run")
    (root / "no-evaluate.toml").write_text('[[concept]]\nname = "Pip"\nkind = "character"\nerase = ["Pip"]\n')
    (root / "van-gogh.toml").write_text(
        '[[concept]]\nname = "Van Gogh"\nkind = "style"\nerase = ["Van Gogh"]\nevaluate = ["a painting by Van Gogh"]\n'
    )
    return {"model": str(model), "root": root, "concept": str(prompt_file("toyworld/pip.toml"))}


def probe_args(world, out, *extra, command=("probe", "--suite", "quick")):
    return [*command, "--model", world["model"], "--concept", world["concept"], "--judge", "oracle",
            "--selector", CLIP, "--out", str(out), *FAST, *extra]  # fmt: skip


def test_a_quick_probe_writes_its_tables_and_prints_the_verdict(world, tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(probe_args(world, out, "--edit", str(world["root"] / "run"), *QUICK, "--no-likelihood")) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("verdict: inconclusive: only 2 images")  # two evaluate prompts x one seed
    assert "paraphrase" in printed and "gap closed" in printed
    assert {p.name for p in out.iterdir()} >= {"summary.json", "verdict.json", "per_image.csv", "prompts.csv"}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["attacks"]) == {"paraphrase", "ring_a_bell", "trajectory", "noise", "inpaint"}
    assert summary["settings"]["judge"]["kind"] == "oracle" and summary["settings"]["selector"]["kind"] == "clip"
    assert summary["models"]["under_test"]["kind"] == "edit" and summary["columns"]["base"]["n"] == 2
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["judge"]["spec"] == "oracle" and verdict["selector"]["spec"] == CLIP
    with open(out / "per_image.csv", newline="") as file:
        assert {row["attack"] for row in csv.DictReader(file)} == {"none", *summary["attacks"]}
    assert summary["likelihood"] is None and "likelihood" not in verdict  # --no-likelihood
    neighbours = summary["attacks"]["noise"]["neighbour_cost"]  # the oracle's neighbour test, under eta 1.5
    assert neighbours["sampling"] == {"eta": 1.5, "variance_scale": 1.0} and neighbours["n"] > 0
    assert all(summary["attacks"][name]["neighbour_cost"] is None for name in ("paraphrase", "trajectory"))
    from erasure.attacks.run import summary_table

    summary["attacks"]["noise"]["neighbour_cost"] |= {"ratio": 0.5, "ratio_interval": [0.25, 1.0], "n": 4}
    assert "neighbours under noise (eta 1.5, variance_scale 1): ratio 0.50 [0.25, 1.00], 4 images" in "\n".join(
        summary_table(summary)
    )


@pytest.mark.parametrize("under_test", ["--weights", "--model2", "--suppression"])
def test_one_attack_on_each_kind_of_model_under_test(world, tmp_path, under_test, capsys):
    value = {"--weights": "weights.safetensors", "--model2": "peer", "--suppression": None}[under_test]
    chosen = [under_test, str(world["root"] / value) if value else "negative-prompt"]
    out = tmp_path / "attack"
    argv = probe_args(
        world, out, *chosen, "--set", "handoffs=[1]", "--no-likelihood", command=("attack", "trajectory")
    )
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["attacks"]) == ["trajectory"] and summary["suite"] == "custom"
    assert summary["likelihood"] is None
    kind = summary["models"]["under_test"]["kind"]
    assert kind == {"--weights": "weights", "--model2": "model2", "--suppression": "base"}[under_test]
    if under_test != "--suppression":
        assert summary["models"]["under_test"]["tensors"] > 0
    else:
        assert summary["settings"]["negative_prompt"] == "Pip"


def test_a_probe_with_named_attacks_runs_exactly_those(world, tmp_path):
    out = tmp_path / "probe"
    argv = probe_args(world, out, "--edit", str(world["root"] / "run"), "--attacks", "trajectory", "inpaint",
                      "--set", "trajectory.handoffs=[1]", "--set", "likelihood.samples=2")  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["attacks"]) == ["trajectory", "inpaint"] and summary["suite"] == "custom"
    assert summary["likelihood"]["samples"] == 2


def test_a_witness_judges_the_same_images_and_the_table_says_how_often_they_agree(world, tmp_path, capsys):
    out = tmp_path / "probe"
    argv = probe_args(world, out, "--edit", str(world["root"] / "run"), "--attacks", "trajectory",
                      "--set", "trajectory.handoffs=[1]", "--no-likelihood", "--witness", CLIP)  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    witness = summary["attacks"]["trajectory"]["witness"]
    assert witness["images"] == 2  # the attacked image of each of the two rows
    assert witness["judge_rate"]["rate"] == summary["attacks"]["trajectory"]["metrics"]["attacked"]["rate"]
    assert summary["settings"]["witness_is_selector"] is True  # the CLIP both selects and witnesses here
    assert "the witness is the selector" in printed
    assert summary["columns"]["witness"]["edited"]["images"] == 2
    assert summary["settings"]["witness"]["spec"] == CLIP and summary["settings"]["witness"]["kind"] == "clip"
    assert f"witness on trajectory: agrees on {witness['agreement']['rate']:.0%} of {witness['images']}" in printed


BAD = [
    (["--edit", "{root}/run", "--witness", "oracle"], "the judge's own model"),
    (["--edit", "{root}/run", "--witness", "human"], "Unknown judge 'human'"),
    (["--edit", "{root}/other-run"], "--edit {root}/other-run"),
    (["--edit", "{root}/run", "--concept", "{root}/no-evaluate.toml"], "no evaluate prompts"),
    (["--edit", "{root}/run", "--judge", "human"], "Unknown judge 'human'"),
    (["--edit", "{root}/run", "--concept", "{root}/van-gogh.toml", "--selector", "clip"], "no model of concept"),
    (["--edit", "{root}/run", "--selector", "oracle"], "selector is the judge"),
    (["--edit", "{root}/run", "--set", "paraphrase.seeds=0"], "budget of 0"),
    (["--edit", "{root}/run", "--set", "inversion.steps=10"], "does not run"),
    (["--edit", "{root}/run", "--set", "paraphrase"], "ATTACK.OPTION=VALUE"),
    (["--edit", "{root}/run", "--set", "trajectory.handoffs=[5]"], "exceed the 2 DDIM steps"),
    (["--edit", "{root}/run", "--attacks", "trajectory", "bogus"], "unknown attack 'bogus'"),
    (["--edit", "{root}/run", "--set", "likelihood.draws=3"], "unknown likelihood option(s) draws"),
    (["--model2", "{model}"], "nothing to probe"),
    (["--weights", "{root}/missing.safetensors"], "missing.safetensors"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[message for _, message in BAD])
def test_bad_input_is_named_and_nothing_is_written(world, tmp_path, capsys, extra, message):
    out = tmp_path / "out" / "probe"
    fill = {"root": str(world["root"]), "model": world["model"]}
    argv = probe_args(world, out, *(item.format(**fill) for item in extra))  # a later --concept wins
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message.format(**fill) in error and error.count("\n") == 1
    assert not out.exists() and not any((tmp_path / "out").iterdir() if (tmp_path / "out").exists() else [])


def test_an_existing_output_is_refused_without_overwrite(world, tmp_path, capsys):
    out = tmp_path / "probe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(probe_args(world, out, "--edit", str(world["root"] / "run"))) == 1
    assert "exists and is not empty" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow  # the whole toy benchmark on a tiny world: ~10 s
def test_the_benchmark_script_prints_a_row_per_method_and_concept(world, tmp_path, capsys):
    from conftest import load_script

    script = load_script("probe_toyworld.py")
    out = tmp_path / "probe.json"
    settings = [item for item in QUICK if item != "--set"]
    argv = [
        "--model", world["model"], "--methods", "uce", "negative-prompt", "--concepts", "pip",
        "--edit", f"uce:pip={world['root'] / 'run'}", "--images", "2", "--steps", "2", "--batch-size", "8",
        "--reference", "none", "--folders", str(tmp_path / "runs"), "--out", str(out), "--no-likelihood",
        *(part for item in settings for part in ("--set", item)),
    ]  # fmt: skip
    assert script.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| uce") or "negative" in line]
    assert len(rows) == 2 and all("inconclusive" in row and "oracle / clip" in row for row in rows)
    report = json.loads(out.read_text())
    assert [(r["method"], r["concept"]) for r in report["runs"]] == [("uce", "Pip"), ("negative-prompt", "Pip")]
    assert report["runs"][1]["summary"]["settings"]["suppression"] == "negative-prompt"
    assert (tmp_path / "runs" / "uce-pip-oracle" / "verdict.json").is_file()
