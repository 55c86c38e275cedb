import csv
import json

import pytest
from attack_helpers import CONCEPT, brightness_judge, red_selector, tiny, tiny_edit, unet_fingerprint

from erasure.attacks.base import AttackError
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
        pipe, tiny_edit(pipe), CONCEPT, brightness_judge, red_selector, "quick", out=out, options=OPTIONS, steps=2
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
    assert {row.extra["attack"] for row in load_prompt_csv(out / "prompts.csv")} == {"paraphrase"}
    with pytest.raises(AttackError, match="exists and is not empty"):
        run_probe(pipe, None, CONCEPT, brightness_judge, red_selector, out=out)


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
