"""`erasure erase`, `erasure export` and `erasure list` end to end on a tiny SD 1.x pipeline saved to disk."""

import json

import pytest
import torch
from safetensors.torch import load_file

from erasure.cli import build_parser, main
from erasure.edit import CONFIG_NAME, Edit, pipeline_tensor
from erasure.export import LORA_WEIGHTS_NAME, lora_state_dict
from erasure.pipeline import load_pipeline
from erasure.testing import save_tiny_pipeline

CONCEPT_TOML = """
[[concept]]
name = "pip"
kind = "character"
erase = ["pip", "a picture of pip"]
preserve = ["zog"]
evaluate = ["a drawing of pip"]
"""


def exit_status(argv):
    """What the shell sees: main's return value, or the code of an argparse exit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd1", "sd1")


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "uce-pip"
    argv = ["erase", "uce", "--model", str(model), "--prompt", "pip", "--prompt", "a picture of pip"]
    argv += ["--preserve", "zog", "--lam", "0.25", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    return out


@pytest.mark.parametrize(("method", "loads_vae"), [("uce", False), ("rece", False), ("esd-x", True)])
def test_erase_loads_the_vae_only_for_methods_that_sample(method, loads_vae, model, tmp_path, monkeypatch):
    import erasure.pipeline
    from erasure.methods import get_method

    loaded = []

    def spy(*args, **kwargs):
        pipe = load_pipeline(*args, **kwargs)
        loaded.append(pipe.vae is not None)
        raise KeyboardInterrupt  # stop before the (slow) erasure: what was loaded is the question here

    monkeypatch.setattr(erasure.pipeline, "load_pipeline", spy)
    argv = ["erase", method, "--model", str(model), "--prompt", "pip", "--out", str(tmp_path / "run"), "--no-progress"]
    assert exit_status(argv) == 130  # the CLI's answer to Ctrl-C
    assert loaded == [loads_vae] and get_method(method).needs_vae is loads_vae
    assert not (tmp_path / "run").exists()


def test_erase_writes_an_edit(run, model):
    edit = Edit.load(run)
    assert edit.config["method"] == "uce"
    assert edit.config["method_config"]["lam"] == 0.25
    assert edit.config["base_model"] == str(model)
    (concept,) = edit.config["request"]["concepts"]
    assert concept["erase"] == ["pip", "a picture of pip"] and concept["preserve"] == ["zog"]
    assert edit.deltas and all(key.endswith(("to_k.weight", "to_v.weight")) for key in edit.deltas)


def test_erase_from_a_concept_file(model, tmp_path, capsys):
    concept = tmp_path / "pip.toml"
    concept.write_text(CONCEPT_TOML)
    out = tmp_path / "run"
    assert main(["erase", "uce", "--model", str(model), "--concept", str(concept), "--out", str(out)]) == 0
    assert "erased pip with uce" in capsys.readouterr().out
    (saved,) = Edit.load(out).config["request"]["concepts"]
    assert saved["evaluate"] == ["a drawing of pip"]  # kept for the evaluator, hidden from the method


def test_float_options_parse_scientific_notation(model):
    args = build_parser().parse_args(["erase", "uce", "--model", "m", "--prompt", "p", "--out", "o", "--lam", "1e-5"])
    assert args.method__lam == pytest.approx(1e-5) and isinstance(args.method__lam, float)
    old = build_parser().parse_args(["erase", "uce", "--model", "m", "--prompt", "p", "--out", "o", "--lamb", "2"])
    assert old.method__lam == 2.0  # the old spelling still works, hidden from --help


def test_erase_help_lists_the_method_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["erase", "uce", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for option in ("--erase-scale", "--preserve-scale", "--lam", "--tokens", "--seed"):
        assert option in text
    assert "(default: 0.5)" in text and "lambda" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["erase", "nope", "--model", "{model}", "--prompt", "pip", "--out", "{out}"], "unknown method 'nope'"),
        (["erase", "uce", "--model", "{tmp}/missing", "--prompt", "pip", "--out", "{out}"], "No such file"),
        (["erase", "uce", "--model", "{model}", "--out", "{out}"], "--concept FILE"),
        (["erase", "uce", "--model", "{model}", "--prompt", "pip", "--out", "{out}", "--lam", "-1"], "lam"),
        (
            ["erase", "uce", "--model", "{model}", "--prompt", "pip", "--out", "{out}", "--lam", "x"],
            "--lam: 'x' is not a number",
        ),
    ],
)
def test_erase_errors_are_one_line_and_write_nothing(argv, message, model, tmp_path, capsys):
    out = tmp_path / "run"
    assert exit_status([a.format(model=model, out=out, tmp=tmp_path) for a in argv]) == 1
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1 and error.startswith("error: ")
    assert not out.exists()


def test_erase_refuses_an_out_folder_that_is_not_an_edit(model, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["erase", "uce", "--model", str(model), "--prompt", "pip", "--out", str(out)]) == 1
    assert "not an edit folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_list_shows_methods_options_and_defaults(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "uce: Unified Concept Editing" in text
    assert "--lam = 0.5" in text and "--tokens = 'last_subject'" in text


def test_export_diffusers_folder_holds_the_edited_weights(run, model, tmp_path):
    out = tmp_path / "edited"
    assert main(["export", str(run), "--format", "diffusers", "--out", str(out), "--device", "cpu"]) == 0
    edited, base, edit = load_pipeline(out), load_pipeline(model), Edit.load(run)
    for key, delta in edit.deltas.items():
        assert torch.allclose(pipeline_tensor(edited, key), pipeline_tensor(base, key) + delta, atol=1e-6)
    untouched = "unet.conv_in.weight"
    assert torch.equal(pipeline_tensor(edited, untouched), pipeline_tensor(base, untouched))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]  # no temporary left


def test_export_single_file_loads_back_edited(run, model, tmp_path):
    out = tmp_path / "edited.safetensors"
    assert main(["export", str(run), "--model", str(model), "--format", "single-file", "--out", str(out)]) == 0
    edited, base, edit = load_pipeline(out, config=model), load_pipeline(model), Edit.load(run)
    for key, delta in edit.deltas.items():
        assert torch.allclose(pipeline_tensor(edited, key), pipeline_tensor(base, key) + delta, atol=1e-6)


def test_export_refuses_to_overwrite(run, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    assert main(["export", str(run), "--format", "lora", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_export_lora_at_full_rank_reconstructs_the_deltas(run, tmp_path):
    out = tmp_path / "lora"
    assert main(["export", str(run), "--format", "lora", "--rank", "64", "--out", str(out)]) == 0
    state = load_file(str(out / LORA_WEIGHTS_NAME))
    config = json.loads((out / "adapter_config.json").read_text())
    edit = Edit.load(run)
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"]
    assert len(state) == 2 * len(edit.deltas)
    for key, delta in edit.deltas.items():
        module = key.removesuffix(".weight")
        assert module.removeprefix("unet.") in config["target_modules"]
        a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        rank = min(64, *delta.shape)  # capped at the layer's own rank: no zero padding
        assert a.shape == (rank, delta.shape[1]) and b.shape == (delta.shape[0], rank)
        assert torch.allclose(b @ a, delta, atol=1e-5 * delta.abs().max().item())


def test_lora_rank_truncation_is_the_best_low_rank_approximation():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 9, generator=generator)
    edit = Edit({"unet.x.weight": delta, "unet.x.bias": torch.ones(12), "unet.norm.weight": torch.ones(9)})
    state, config, skipped = lora_state_dict(edit, rank=3)
    approx = state["unet.x.lora_B.weight"] @ state["unet.x.lora_A.weight"]
    singular = torch.linalg.svdvals(delta.double())
    # Eckart-Young: the error of the best rank-3 approximation is the norm of the dropped singular values
    assert torch.isclose((delta - approx).double().norm(), singular[3:].norm(), rtol=1e-4)
    assert torch.equal(state["unet.x.lora_B.bias"], torch.ones(12)) and config["lora_bias"]
    assert skipped == ["unet.norm.weight"]
    conv = Edit({"unet.c.weight": torch.randn(4, 3, 3, 3, generator=generator)})
    state, _, _ = lora_state_dict(conv, rank=27)
    a, b = state["unet.c.lora_A.weight"], state["unet.c.lora_B.weight"]
    assert a.shape == (4, 3, 3, 3) and b.shape == (4, 4, 1, 1)  # rank 27 capped at min(out 4, in 27)
    assert torch.allclose((b.flatten(1) @ a.flatten(1)).reshape(4, 3, 3, 3), conv.deltas["unet.c.weight"], atol=1e-5)


def test_lora_loads_into_diffusers_and_reproduces_the_edit(run, model, tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    out = tmp_path / "lora"
    assert main(["export", str(run), "--format", "lora", "--rank", "64", "--out", str(out)]) == 0
    pipe, base, edit = load_pipeline(model), load_pipeline(model), Edit.load(run)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for key, delta in edit.deltas.items():
        assert torch.allclose(pipeline_tensor(pipe, key), pipeline_tensor(base, key) + delta, atol=1e-5)


def test_export_needs_an_edit(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--format", "lora", "--out", str(tmp_path / "o")]) == 1
    assert "No edit folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not any(p.name == CONFIG_NAME for p in tmp_path.iterdir())


def test_erase_into_an_existing_edit_is_refused_unless_overwrite(model, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["erase", "uce", "--model", str(model), "--prompt", "pip", "--out", str(run), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    argv = ["erase", "uce", "--model", str(model), "--prompt", "zog", "--out", str(run), "--no-progress"]
    assert exit_status(argv) == 1
    message = capsys.readouterr().err
    assert "already holds an edit" in message and "--overwrite" in message and message.count("\n") == 1
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before, "the old edit is untouched"
    assert exit_status([*argv, "--overwrite"]) == 0
    assert Edit.load(run).config["request"]["concepts"][0]["erase"][0] == "zog"


def test_a_bare_word_is_expanded_unless_switched_off(model, tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    base = ["erase", "uce", "--model", str(model), "--prompt", "zog", "--kind", "character", "--no-progress"]
    assert main([*base, "--out", str(on)]) == 0
    assert main([*base, "--out", str(off), "--expand", "off"]) == 0
    expanded = Edit.load(on).config["request"]["concepts"][0]
    assert expanded["erase"][0] == "zog" and len(expanded["erase"]) > 1 and expanded["expansion"] in ("sd", "toyworld")
    assert Edit.load(on).config["method_config"]["expand"] == "auto"
    plain = Edit.load(off).config["request"]["concepts"][0]
    assert plain["erase"] == ["zog"] and plain["expansion"] == ""


@pytest.mark.parametrize("tamper", ["nan", "method", "fingerprint", "empty"])
def test_export_refuses_broken_or_altered_edits_and_writes_nothing(run, model, tmp_path, capsys, tamper):
    import shutil

    from safetensors.torch import save_file

    edit = tmp_path / "edit"
    shutil.copytree(run, edit)
    config = json.loads((edit / CONFIG_NAME).read_text())
    if tamper == "nan":
        deltas = load_file(edit / "edit.safetensors")
        first = next(iter(deltas))
        deltas[first][0] = float("nan")
        save_file(deltas, edit / "edit.safetensors")
    elif tamper == "method":
        config["method"] = "esd-x-renamed"
    elif tamper == "fingerprint":
        del config["base_fingerprint"]
    else:
        config = {}
    (edit / CONFIG_NAME).write_text(json.dumps(config))
    out = tmp_path / "exported"
    assert exit_status(["export", str(edit), "--model", str(model), "--format", "diffusers", "--out", str(out)]) == 1
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1 and str(edit) in message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["edit"]


def test_export_refuses_a_non_finite_scale(run, model, tmp_path, capsys):
    out = tmp_path / "exported"
    argv = ["export", str(run), "--model", str(model), "--format", "diffusers", "--out", str(out), "--scale", "nan"]
    assert exit_status(argv) != 0  # refused while parsing
    assert "--scale: 'nan' is not a finite number" in capsys.readouterr().err and not out.exists()


def test_a_single_file_model_is_described_by_model_config(run, model, tmp_path, capsys):
    single = tmp_path / "edited.safetensors"
    assert main(["export", str(run), "--model", str(model), "--format", "single-file", "--out", str(single)]) == 0
    out = tmp_path / "again"
    argv = ["erase", "uce", "--model", str(single), "--model-config", str(model), "--prompt", "zog", "--out", str(out)]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    assert Edit.load(out).config["base_model"] == str(single)
    assert main(["erase", "uce", "--model", str(single), "--model-config", str(tmp_path / "nowhere"), "--prompt",
                 "zog", "--out", str(tmp_path / "x")]) == 1  # fmt: skip
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_generation_time_method_saves_a_suppression_that_export_refuses(model, tmp_path, capsys):
    run = tmp_path / "sld"
    argv = ["erase", "sld", "--model", str(model), "--prompt", "pip", "--preset", "strong", "--out", str(run)]
    assert main([*argv, "--no-progress"]) == 0
    assert "generation-time edit, no weights changed" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["edit_config.json"]
    out = tmp_path / "exported"
    assert exit_status(["export", str(run), "--format", "diffusers", "--out", str(out)]) == 1
    message = capsys.readouterr().err
    assert "nothing to export" in message and message.count("\n") == 1 and not out.exists()
