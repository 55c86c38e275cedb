"""Edit-strength sweeps: every scale, 0 included, generated on the base's seeds and measured; sweep.json."""

import json

import numpy as np
import pytest
from evaluation_helpers import save_strong_edit, save_tiny_clip

from erasure.cli import main
from erasure.files import load_image
from erasure.prompt_sets import PromptRow, save_prompt_csv
from erasure.testing import save_tiny_pipeline, tiny_pipeline

ROWS = [
    PromptRow(0, "a drawing of Pip", 11, concept="Pip", row_type="erased", extra={"anchor": "a photo"}),
    PromptRow(1, "a picture of Pip", 12, concept="Pip", row_type="erased", extra={"anchor": "a photo"}),
    PromptRow(4, "a drawing of Zog", 13, concept="Zog", row_type="preserved", extra={"anchor": ""}),
]
SETTINGS = {"steps": 2, "height": 32, "width": 32, "device": "cpu", "batch_size": 4, "progress": False}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return {
        "root": root,
        "model": save_tiny_pipeline(root / "sd", "sd1"),
        "clip": save_tiny_clip(root / "clip"),
        "edit": save_strong_edit(tiny_pipeline("sd1"), root / "edit"),
        "prompts": save_prompt_csv(ROWS, root / "prompts.csv"),
    }


@pytest.fixture(scope="module")
def sweep(assets):
    from erasure.evaluation import run_sweep

    return run_sweep(
        assets["root"] / "out", model=str(assets["model"]), edit=assets["edit"], scales=(0, 0.5, 1), rows=ROWS,
        clip=str(assets["clip"]), metadata={"concept": "Pip"}, **SETTINGS,
    )  # fmt: skip


def images(folder):
    return np.stack([load_image(folder / f"{row.case_number}_0.png") for row in ROWS])


def test_every_scale_is_a_model_of_one_run_on_the_base_seeds(sweep):
    document = json.loads((sweep / "metrics.json").read_text())
    labels = ["base", "edit-scale-0", "edit-scale-0.5", "edit-scale-1"]
    assert list(document["metrics"]) == labels and document["reference"] == "base"
    assert [document["models"][label].get("scale") for label in labels] == [None, 0.0, 0.5, 1.0]
    assert document["generation"]["seeds"] == [11, 12, 13]
    # scale 0 is the base weights exactly (test_edit): its images are the base's, read back and scored like the others
    np.testing.assert_array_equal(images(sweep / "images" / "edit-scale-0"), images(sweep / "images" / "base"))
    assert np.abs(images(sweep / "images" / "edit-scale-1").astype(int) - images(sweep / "images" / "base")).max() > 1


def test_the_base_point_is_measured_not_assumed(sweep):
    document = json.loads((sweep / "metrics.json").read_text())
    sweep_file = json.loads((sweep / "sweep.json").read_text())
    assert sweep_file["format"] == "erasure-sweep/1" and sweep_file["method"] == "uce"
    assert sweep_file["concept"] == "Pip" and sweep_file["edit"].endswith("edit")
    points = sweep_file["points"]
    assert [p["scale"] for p in points] == [0.0, 0.5, 1.0]
    for point, label in zip(points, ["edit-scale-0", "edit-scale-0.5", "edit-scale-1"], strict=True):
        assert point == {"scale": point["scale"], **document["metrics"][label], "evaluation": str(sweep)}
    base, zero = document["metrics"]["base"], points[0]
    assert zero["paired_preservation"] == pytest.approx(1.0, abs=1e-12) and zero["cmmd"] == pytest.approx(
        0.0, abs=1e-12
    )
    for name, value in base.items():  # the same images: every metric of the base model
        if name not in ("paired_preservation", "cmmd") and not name.startswith(("paired_preservation_", "cmmd_")):
            assert zero[name] == (value if value is None else pytest.approx(value, rel=1e-12)), name
    assert points[2]["paired_preservation"] < 1.0 and points[2]["cmmd"] > 0.0


def test_a_sweep_point_equals_an_ordinary_evaluation_of_the_edit(sweep, assets):
    from erasure.evaluation import run_evaluation

    plain = run_evaluation(
        assets["root"] / "plain", model=str(assets["model"]), edits=[assets["edit"]], rows=ROWS,
        clip=str(assets["clip"]), **SETTINGS,
    )  # fmt: skip
    np.testing.assert_array_equal(images(plain / "images" / "edit"), images(sweep / "images" / "edit-scale-1"))
    ordinary = json.loads((plain / "metrics.json").read_text())["metrics"]["edit"]
    swept = json.loads((sweep / "metrics.json").read_text())["metrics"]["edit-scale-1"]
    assert swept == ordinary


def test_the_report_reads_the_sweep(sweep):
    from erasure.report import load_sweep, render_report

    points, meta = load_sweep(sweep / "sweep.json")
    assert [p["scale"] for p in points] == [0.0, 0.5, 1.0] and meta["method"] == "uce"
    text = render_report([sweep])
    assert "Strength sweep" in text and text.count("<svg") == 2


def test_the_command_sweeps_one_edit(assets, tmp_path, capsys):
    common = ["evaluate", "--model", str(assets["model"]), "--prompts", str(assets["prompts"]), "--clip",
              str(assets["clip"]), "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu"]  # fmt: skip
    assert main([*common, "--edit", str(assets["edit"]), "--scales", "0", "1", "--out", str(tmp_path / "s")]) == 0
    points = json.loads((tmp_path / "s" / "sweep.json").read_text())["points"]
    assert [p["scale"] for p in points] == [0.0, 1.0]
    capsys.readouterr()
    for extra in ([], ["--edit", str(assets["edit"]), str(assets["edit"])]):
        assert main([*common, *extra, "--scales", "0", "1", "--out", str(tmp_path / "bad")]) == 1
        error = capsys.readouterr().err
        assert "--scales sweeps one edit" in error and error.count("\n") == 1
        assert not (tmp_path / "bad").exists()
