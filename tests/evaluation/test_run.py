"""``erasure evaluate`` and ``run_evaluation`` on a tiny pipeline with a tiny open_clip model: files, seeds,
guidance, given images, weights files, the library's own validation, and ``EvaluationConfig``."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from evaluation_helpers import save_tiny_clip
from PIL import Image

from erasure.cli import main
from erasure.edit import Edit, fingerprint, pipeline_tensor
from erasure.evaluation import PER_IMAGE_COLUMNS
from erasure.prompt_sets import PromptRow, save_prompt_csv
from erasure.testing import save_tiny_pipeline, tiny_pipeline


def attn2_keys(unet):
    return [k for k in unet.state_dict() if ".attn2.to_k." in k or ".attn2.to_v." in k]


ROWS = [
    PromptRow(0, "a drawing of Pip", 11, concept="Pip", row_type="erased", extra={"anchor": "a photo"}),
    PromptRow(1, "a picture of Pip", 12, concept="Pip", row_type="erased", extra={"anchor": "a photo"}),
    PromptRow(4, "a drawing of Zog", 13, concept="Zog", row_type="preserved", extra={"anchor": ""}),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model = save_tiny_pipeline(root / "sd", "sd1")
    clip = save_tiny_clip(root / "clip")
    prompts = save_prompt_csv(ROWS, root / "prompts.csv")
    pipe = tiny_pipeline("sd1")
    key = f"unet.{attn2_keys(pipe.unet)[0]}"
    base = fingerprint({key: pipeline_tensor(pipe, key)})
    noise = torch.randn(pipeline_tensor(pipe, key).shape, generator=torch.Generator().manual_seed(0))
    delta = noise * (3 * pipeline_tensor(pipe, key).norm() / noise.norm())  # 3x the tensor: a strong, valid edit
    edit = Edit({key: delta}, {"method": "uce", "base_fingerprint": base, "base_model": "tiny"}).save(root / "edit")
    other = tiny_pipeline("sd1", seed=1)
    foreign = {"method": "uce", "base_fingerprint": fingerprint({key: pipeline_tensor(other, key)})}
    foreign_edit = Edit({key: delta}, foreign).save(root / "foreign")
    return {"model": model, "clip": clip, "prompts": prompts, "edit": edit, "foreign": foreign_edit, "root": root}


def evaluate_args(assets, out, *extra):
    common = ["--clip", str(assets["clip"]), "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu"]
    return ["evaluate", "--out", str(out), *common, *extra]


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "eval"
    argv = evaluate_args(assets, out, "--model", str(assets["model"]), "--edit", str(assets["edit"]))
    assert main([*argv, "--prompts", str(assets["prompts"]), "--seeds-per-prompt", "2", "--batch-size", "4"]) == 0
    return out


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_writes_images_metrics_and_per_image_rows(run, assets):
    document = json.loads((run / "metrics.json").read_text())
    assert document["schema_version"] == 1 and list(document["metrics"]) == ["base", "edit"]
    assert document["clip"]["model"] == str(assets["clip"]) and document["clip"]["templates"]
    assert document["generation"]["seeds"] == [11, 12, 12, 13, 13, 14]  # evaluation_seed + i, row by row
    assert (document["generation"]["steps"], document["generation"]["height"]) == (2, 32)
    assert document["generation"]["guidance"] == 7.5  # no --guidance and no evaluation_guidance column
    assert document["prompts"]["rows"] == 3 and document["prompts"]["images_per_model"] == 6
    assert len(document["prompts"]["sha256"]) == 64
    assert document["models"]["edit"]["edit_fingerprint"] and document["models"]["edit"]["base_fingerprint"]
    assert set(document["versions"]) >= {"torch", "diffusers", "transformers", "open_clip", "erasure"}
    base, edited = document["metrics"]["base"], document["metrics"]["edit"]
    assert base["paired_preservation"] == pytest.approx(1.0) and base["cmmd"] == pytest.approx(0.0, abs=1e-9)
    assert edited["paired_preservation"] < 1.0 and edited["cmmd"] > 0.0
    names = sorted(p.name for p in (run / "images" / "edit").iterdir())
    assert names == ["0_0.png", "0_1.png", "1_0.png", "1_1.png", "4_0.png", "4_1.png", "manifest.json"]
    rows = read_csv(run / "per_image.csv")
    assert tuple(rows[0]) == PER_IMAGE_COLUMNS and len(rows) == 12
    assert [r["model"] for r in rows] == ["base"] * 6 + ["edit"] * 6
    assert all((run / r["image"]).is_file() for r in rows)
    assert {r["clip_model"] for r in rows} == {str(assets["clip"])}
    scores = [float(r["clip_score"]) for r in rows if r["model"] == "edit"]
    assert np.mean(scores) == pytest.approx(edited["clip_score"])
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]  # the temporary folder was renamed


def test_evaluate_images_match_direct_generation(run, assets):
    from erasure.files import load_image
    from erasure.generate import generate
    from erasure.pipeline import load_pipeline

    pipe = load_pipeline(assets["model"])
    direct = generate(pipe, ["a drawing of Pip", "a drawing of Zog"], [12, 14], steps=2, height=32, width=32)
    saved = np.stack([load_image(run / "images" / "base" / name) for name in ("0_1.png", "4_1.png")])
    assert np.abs(direct.astype(int) - saved.astype(int)).max() <= 1


def test_rescoring_the_image_folder_gives_the_same_metrics(run, assets, tmp_path):
    out = tmp_path / "rescore"
    assert main(evaluate_args(assets, out, "--images", str(run / "images"))) == 0
    again = json.loads((out / "metrics.json").read_text())
    first = json.loads((run / "metrics.json").read_text())
    assert again["prompts"]["kind"] == "manifest" and again["generation"]["steps"] == 2
    for label in ("base", "edit"):
        for name, value in first["metrics"][label].items():
            expected = value if value is None else pytest.approx(value, rel=1e-5, abs=1e-7)
            assert again["metrics"][label][name] == expected, (label, name)


def test_rows_evaluation_guidance_is_used_unless_guidance_is_given(assets, tmp_path):
    from erasure.files import load_image
    from erasure.generate import generate
    from erasure.pipeline import load_pipeline

    rows = [  # ESD's prompt files carry a per-row guidance scale
        PromptRow(0, "a drawing of Pip", 11, concept="Pip", row_type="erased", extra={"evaluation_guidance": "2.0"}),
        PromptRow(1, "a drawing of Zog", 12, concept="Zog", row_type="preserved", extra={"evaluation_guidance": "9"}),
        PromptRow(2, "a picture of Pip", 13, concept="Pip", row_type="erased", extra={"evaluation_guidance": "2.0"}),
    ]
    prompts = save_prompt_csv(rows, tmp_path / "guided.csv")
    argv = [*evaluate_args(assets, tmp_path / "rows", "--model", str(assets["model"])), "--prompts", str(prompts)]
    assert main([*argv, "--batch-size", "3"]) == 0  # one batch holding two scales: split into one call per scale
    document = json.loads((tmp_path / "rows" / "metrics.json").read_text())
    assert document["generation"]["guidance"] == "per-row"
    per_image = read_csv(tmp_path / "rows" / "per_image.csv")
    assert [float(r["guidance"]) for r in per_image] == [2.0, 9.0, 2.0]
    pipe = load_pipeline(assets["model"])
    saved = np.stack([load_image(tmp_path / "rows" / "images" / "base" / f"{i}_0.png") for i in range(3)])
    for i, (row, scale) in enumerate(zip(rows, (2.0, 9.0, 2.0), strict=True)):
        direct = generate(
            pipe, [row.prompt], [row.evaluation_seed], steps=2, guidance_scale=scale, height=32, width=32
        )
        assert np.abs(direct[0].astype(int) - saved[i].astype(int)).max() <= 1, i
    other = generate(pipe, [rows[1].prompt], [12], steps=2, guidance_scale=2.0, height=32, width=32)
    assert np.abs(other[0].astype(int) - saved[1].astype(int)).max() > 1  # the scale mattered

    assert main([*evaluate_args(assets, tmp_path / "fixed", "--model", str(assets["model"])), "--prompts",
                 str(prompts), "--guidance", "4"]) == 0  # fmt: skip
    fixed = json.loads((tmp_path / "fixed" / "metrics.json").read_text())
    assert fixed["generation"]["guidance"] == 4.0
    assert {float(r["guidance"]) for r in read_csv(tmp_path / "fixed" / "per_image.csv")} == {4.0}


def test_a_bad_evaluation_guidance_is_a_clear_error(assets, tmp_path, capsys):
    bad = [PromptRow(3, "a drawing of Pip", 1, extra={"evaluation_guidance": "strong"})]
    prompts = save_prompt_csv(bad, tmp_path / "bad.csv")
    argv = [*evaluate_args(assets, tmp_path / "out", "--model", str(assets["model"])), "--prompts", str(prompts)]
    assert main(argv) != 0
    assert "row 3: evaluation_guidance is 'strong'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_evaluate_from_a_concept_file_and_a_weights_file(assets, tmp_path):
    from safetensors.torch import save_file

    concept = tmp_path / "pip.toml"
    concept.write_text(
        '[[concept]]\nname = "Pip"\nkind = "character"\nerase = ["Pip"]\npreserve = ["Zog"]\n'
        'evaluate = ["a drawing of Pip", "a yellow circle"]\nevaluate_preserve = ["a drawing of Zog"]\n'
    )
    pipe = tiny_pipeline("sd1")
    key = attn2_keys(pipe.unet)[0]
    save_file({key: pipe.unet.state_dict()[key] * 0}, str(tmp_path / "esd.safetensors"))
    out = tmp_path / "concept"
    argv = evaluate_args(assets, out, "--model", str(assets["model"]), "--weights", str(tmp_path / "esd.safetensors"))
    assert main([*argv, "--concept", str(concept)]) == 0
    document = json.loads((out / "metrics.json").read_text())
    assert document["prompts"]["roles"] == {"erased": 1, "generality": 1, "preserved": 1}
    assert document["models"]["esd"]["kind"] == "weights" and len(document["models"]["esd"]["weights_sha256"]) == 64
    metrics = document["metrics"]["esd"]
    assert metrics["paired_preservation"] < 1.0
    assert all(metrics[name] is not None for name in ("efficacy", "generality", "specificity", "harmonic_mean"))


def no_output(out):
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_inputs_are_one_line_errors_and_write_nothing(assets, tmp_path, capsys):
    model = ["--model", str(assets["model"])]
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("case_number,prompt\n0,a\n")
    (tmp_path / "empty").mkdir()
    mixed = tmp_path / "mixed"
    for name, size in (("base", 32), ("edit", 16)):
        (mixed / name).mkdir(parents=True)
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(mixed / name / "0_0.png")
    cases = [
        (["--images", str(tmp_path / "empty")], "holds no images"),
        ([*model, "--prompts", str(bad_csv)], "has no 'evaluation_seed' column"),
        ([*model, "--prompts", str(assets["prompts"]), "--clip", "ViT-Q-99:openai"], "Unknown CLIP model"),
        (["--images", str(mixed), "--prompts", str(assets["prompts"])], "16x16 images but the other folders 32x32"),
        ([*model, "--prompts", str(assets["prompts"]), "--edit", str(assets["foreign"])], "weights differ"),
        ([*model], "Say what to evaluate"),
    ]
    for index, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{index}"
        argv = evaluate_args(assets, out, *extra)
        if "--clip" in extra:
            position = argv.index("--clip")
            del argv[position : position + 2]  # keep only the bad --clip
        assert main(argv) == 1, extra
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, (extra, error)
        assert no_output(out), extra


def test_existing_output_folder_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(evaluate_args(assets, out, "--model", str(assets["model"]), "--prompts", str(assets["prompts"]))) == 1
    assert "exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_a_previous_run(run, assets, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(run, out)
    (out / "stale.txt").write_text("old")
    argv = evaluate_args(assets, out, "--images", str(run / "images" / "base"), "--overwrite")
    assert main(argv) == 0
    assert not (out / "stale.txt").exists()
    assert list(json.loads((out / "metrics.json").read_text())["metrics"]) == ["base"]


# --------------------------------------------------------------------------------------------------------------
# The library: EvaluationConfig, its validation, prompt_rows
# --------------------------------------------------------------------------------------------------------------


def test_a_config_object_and_keywords_run_the_same_evaluation(run, assets, tmp_path):
    from erasure.evaluation import EvaluationConfig, run_evaluation

    settings = {"images": run / "images", "clip": str(assets["clip"]), "device": "cpu", "progress": False}
    by_keywords = run_evaluation(tmp_path / "keywords", **settings)
    by_config = run_evaluation(tmp_path / "config", config=EvaluationConfig(**settings))
    first, second = (json.loads((folder / "metrics.json").read_text()) for folder in (by_keywords, by_config))
    assert first["metrics"] == second["metrics"] and first["models"] == second["models"]
    again = run_evaluation(tmp_path / "replaced", config=EvaluationConfig(**settings), batch_size=2)
    assert json.loads((again / "metrics.json").read_text())["metrics"].keys() == first["metrics"].keys()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"model": "m"}, "Say what to evaluate"),
        ({"model": "m", "images": "x", "rows": ROWS}, "drop --model"),
        ({"rows": ROWS}, "--model is required"),
        ({"images": "x", "edits": ["e"]}, "need a model to generate with"),
        ({"model": "m", "rows": ROWS, "steps": 0}, "steps must be a whole number of at least 1"),
        ({"model": "m", "rows": ROWS, "guidance": float("nan")}, "--guidance must be a finite number"),
        ({"model": "m", "rows": ROWS, "dtype": "float8"}, "Unknown dtype 'float8'"),
        ({"model": "m", "rows": ROWS, "templates": ["a photo"]}, "exactly one '{}'"),
        ({"model": "m", "rows": ROWS, "judges": ["gpt"]}, "Unknown judge 'gpt'"),
        ({"model": "m", "rows": ROWS, "scales": [0, 1]}, "give exactly one --edit"),
        ({"model": "m", "rows": ROWS, "edits": ["a", "b"], "scales": [1]}, "give exactly one --edit"),
        ({"model": "m", "rows": ROWS, "edits": ["a"], "scales": [0, float("inf")]}, "finite strengths"),
    ],
)
def test_the_library_refuses_inconsistent_settings_before_reading_anything(settings, message, tmp_path):
    from erasure.evaluation import EvaluationConfig, EvaluationError, run_evaluation

    with pytest.raises(EvaluationError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        EvaluationConfig(**settings)
    with pytest.raises(EvaluationError):
        run_evaluation(tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()


def test_prompt_rows_from_a_concept_file_or_a_csv(assets, tmp_path):
    from erasure.evaluation import EvaluationError, prompt_rows

    concept = tmp_path / "pip.toml"
    concept.write_text(
        '[[concept]]\nname = "Pip"\nkind = "character"\nerase = ["Pip"]\nevaluate = ["a drawing of Pip"]\n'
        'evaluate_preserve = ["Zog"]\n'
    )
    rows, source, per_row = prompt_rows(concept, seeds_per_prompt=3, seed=5)
    assert [r.evaluation_seed for r in rows] == [5, 6, 7, 5, 6, 7] and per_row == 1 and source.kind == "concepts"
    rows, source, per_row = prompt_rows(prompts=assets["prompts"], seeds_per_prompt=2)
    assert len(rows) == 3 and per_row == 2 and source.kind == "csv" and len(source.sha256) == 64
    assert prompt_rows() == (None, None, 1)
    with pytest.raises(EvaluationError, match="not both"):
        prompt_rows(concept, assets["prompts"])
    with pytest.raises(EvaluationError, match="at least 1"):
        prompt_rows(prompts=assets["prompts"], seeds_per_prompt=0)


def test_weights_results_equal_loading_the_state_dict_into_the_unet(assets, tmp_path):
    # --weights is applied as an Edit (delta = W_file - W_base): the images equal those of the peer's own loading,
    # pipe.unet.load_state_dict(weights, strict=False).
    from safetensors.torch import save_file

    from erasure.files import load_image
    from erasure.generate import generate
    from erasure.pipeline import load_pipeline

    pipe = load_pipeline(assets["model"])
    key = attn2_keys(pipe.unet)[0]
    weights = {key: pipe.unet.state_dict()[key] * -2}
    save_file(weights, str(tmp_path / "esd.safetensors"))
    out = tmp_path / "weights"
    argv = evaluate_args(assets, out, "--model", str(assets["model"]), "--weights", str(tmp_path / "esd.safetensors"))
    assert main([*argv, "--prompts", str(assets["prompts"])]) == 0
    pipe.unet.load_state_dict(weights, strict=False)
    direct = generate(pipe, [row.prompt for row in ROWS], [row.evaluation_seed for row in ROWS], steps=2, height=32,
                      width=32)  # fmt: skip
    saved = np.stack([load_image(out / "images" / "esd" / f"{row.case_number}_0.png") for row in ROWS])
    assert np.abs(direct.astype(int) - saved.astype(int)).max() <= 1
    document = json.loads((out / "metrics.json").read_text())
    assert document["models"]["esd"]["kind"] == "weights" and document["models"]["esd"]["tensors"] == 1


def test_the_package_and_the_commands_help_import_no_heavy_library():
    import subprocess
    import sys

    code = (
        "import sys\nimport erasure.evaluation\nfrom erasure.cli import main\ntry:\n    main(['evaluate', '--help'])\n"
        "except SystemExit:\n    pass\nprint([m for m in ('torch', 'diffusers', 'open_clip') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_printed_table_carries_each_rates_n_and_interval(run, capsys):
    from erasure.cli.evaluate import _print_metrics

    document = json.loads((run / "metrics.json").read_text())
    _print_metrics(run / "metrics.json")
    out = capsys.readouterr().out
    for label, metrics in document["metrics"].items():
        line = next(line for line in out.splitlines() if line.startswith(label + " "))
        for name in ("efficacy", "specificity", "generality"):
            if metrics[name] is not None:
                assert f"n={metrics[name + '_n']}" in line
                low, high = metrics[name + "_ci95_low"], metrics[name + "_ci95_high"]
                assert low <= metrics[name] <= high and f"[{low:.2f}, {high:.2f}]" in line
    assert "higher is better" in out


def test_the_same_command_twice_gives_identical_images_and_metrics(run, assets, tmp_path):
    again = tmp_path / "again"
    argv = evaluate_args(assets, again, "--model", str(assets["model"]), "--edit", str(assets["edit"]))
    assert main([*argv, "--prompts", str(assets["prompts"]), "--seeds-per-prompt", "2", "--batch-size", "4"]) == 0
    first, second = sorted((run / "images").rglob("*.png")), sorted((again / "images").rglob("*.png"))
    assert [p.relative_to(run) for p in first] == [p.relative_to(again) for p in second] and first
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))
    one, two = (json.loads((folder / "metrics.json").read_text()) for folder in (run, again))
    one.pop("created"), two.pop("created")
    assert one["metrics"] == two["metrics"] and one["generation"] == two["generation"]
    strip = [{k: v for k, v in row.items() if k != "image"} for row in read_csv(run / "per_image.csv")]
    assert strip == [{k: v for k, v in row.items() if k != "image"} for row in read_csv(again / "per_image.csv")]
