"""The report's robustness section, from a real (tiny) probe folder: verdict, one row per attack, recovery chart."""

import json
import re

import pytest
from attack_helpers import CONCEPT, brightness_judge, red_selector, tiny, tiny_edit

from erasure.attacks.suite import run_probe
from erasure.report import ReportError, render_report
from erasure.report.robustness import is_probe_folder, load_probe, recovery_svg


@pytest.fixture(scope="module")
def probe_folder(tmp_path_factory):
    pipe = tiny()
    out = tmp_path_factory.mktemp("probe") / "probe"
    run_probe(
        pipe, tiny_edit(pipe), CONCEPT, brightness_judge, red_selector, out=out, attacks=["trajectory"],
        steps=2, options={"trajectory": {"handoffs": (1,)}, "likelihood": {"samples": 2, "images": 2}},
    )  # fmt: skip
    return out


def test_a_probe_folder_becomes_a_robustness_section(probe_folder):
    assert is_probe_folder(probe_folder) and not is_probe_folder(probe_folder.parent)
    probe = load_probe(probe_folder)
    page = render_report([probe_folder])
    section = page[page.index("<section id='robustness'>") :]
    assert probe.verdict["verdict"] in section and "href='#robustness'" in page
    rows = re.findall(r"<tr><td>([a-z_ ]+)</td>", section)
    assert rows == ["plain prompts", "trajectory"]
    assert "Likelihood gaps:" in section and probe.summary["likelihood"]["pattern"] in section
    chart = recovery_svg(probe)
    assert chart.count("<rect") == 1 and "base " in chart and "edited " in chart


def test_a_broken_probe_folder_is_a_clear_error(probe_folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text((probe_folder / "summary.json").read_text(), encoding="utf-8")
    (broken / "verdict.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ReportError, match="verdict.json cannot be read"):
        render_report([broken])
    (broken / "verdict.json").write_text(json.dumps({"no": "verdict"}), encoding="utf-8")
    with pytest.raises(ReportError, match="no attacks or no verdict"):
        render_report([broken])


def test_the_neighbour_cost_of_an_attack_is_a_column(probe_folder, tmp_path):
    copy = tmp_path / "probe"
    copy.mkdir()
    summary = json.loads((probe_folder / "summary.json").read_text())
    summary["attacks"]["trajectory"]["neighbour_cost"] = {"ratio": 0.75, "ratio_interval": [0.5, 1.0], "n": 8}
    (copy / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (copy / "verdict.json").write_text((probe_folder / "verdict.json").read_text(), encoding="utf-8")
    section = render_report([copy])
    assert "<th>neighbour ratio under the attack</th>" in section and "<td>0.75 [0.50, 1.00]</td>" in section
    assert "<td>–</td>" in render_report([probe_folder])  # not measured: a dash, never a number


def test_a_witness_adds_its_agreement_column(probe_folder, tmp_path):
    from erasure.attacks.verdict import judge_agreement

    copy = tmp_path / "probe"
    copy.mkdir()
    summary = json.loads((probe_folder / "summary.json").read_text())
    summary["settings"]["witness"] = {"role": "judge", "spec": "clip"}
    summary["attacks"]["trajectory"]["witness"] = judge_agreement([True, False, True, True], [True, True, False, True])
    (copy / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (copy / "verdict.json").write_text((probe_folder / "verdict.json").read_text(), encoding="utf-8")
    section = render_report([copy])
    assert "<th>second judge (witness)</th>" in section
    assert "<td>agrees on 50% of 4; sees the target in 75%</td>" in section
    assert "second judge" not in render_report([probe_folder])  # no witness: no column


def test_asr_is_shown_in_both_denominators(probe_folder, tmp_path):
    from erasure.attacks.verdict import asr

    copy = tmp_path / "probe"
    copy.mkdir()
    summary = json.loads((probe_folder / "summary.json").read_text())
    prompts = ["a", "a", "b", "b", "c", "c"]  # a: erased, then recovered; b: never erased; c: erased, held
    base, edited = [True, True, True, True, True, False], [False, False, True, False, False, False]
    summary["attacks"]["trajectory"]["metrics"]["asr"] = asr(prompts, base, edited, [True, False, False] * 2)
    (copy / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (copy / "verdict.json").write_text((probe_folder / "verdict.json").read_text(), encoding="utf-8")
    section = render_report([copy])
    assert "<td>67% of 3 / 50% of 2</td>" in section  # UnlearnDiffAtk: a and b of 3; P4D: a of the erased a, c


def test_a_relearning_curve_is_drawn_beside_the_references():
    from erasure.attacks.verdict import rate_interval
    from erasure.report.robustness import curve_svg

    def curve(*counts):
        return [{"steps": s, "target_rate": rate_interval([True] * c + [False] * (4 - c))} for s, c in counts]

    attack = {"curve": curve((10, 1), (25, 2), (50, 4)), "reference_curve": curve((10, 0), (25, 0), (50, 1))}
    chart = curve_svg("relearning", attack)
    assert chart.startswith("<svg") and chart.count("<polyline") == 2 and chart.count("<circle") == 6
    assert "edited, 50 steps: 100%" in chart and "reference (never learned it), 50 steps: 25%" in chart
    assert curve_svg("relearning", attack | {"reference_curve": None}).count("<polyline") == 1
    assert curve_svg("trajectory", {"curve": None}) == ""
