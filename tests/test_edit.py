import json
import math
import os

import pytest
import torch

import erasure.files as files_module
from erasure.concepts import request_from_prompts
from erasure.edit import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Edit,
    EditFormatError,
    FingerprintMismatchError,
    fingerprint,
    pipeline_tensor,
    stack,
)
from erasure.methods import get_method, load_edit, replay
from erasure.testing import tiny_pipeline

KEY_A = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
KEY_B = "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
KEY_T = "text_encoder.final_layer_norm.weight"
KEY_T_OLD = "text_encoder.text_model.final_layer_norm.weight"  # transformers < 5.6 names


@pytest.fixture
def pipe():
    return tiny_pipeline("sd1")


def snapshot(pipe):
    return {
        f"{name}.{key}": value.clone()
        for name in ("unet", "text_encoder")
        for key, value in getattr(pipe, name).state_dict().items()
    }


def assert_same(pipe, state):
    current = snapshot(pipe)
    assert current.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(current[key], value), key


def make_edit(pipe, keys=(KEY_A, KEY_B), seed=0):
    generator = torch.Generator().manual_seed(seed)
    deltas = {key: torch.randn(pipeline_tensor(pipe, key).shape, generator=generator) * 0.1 for key in keys}
    base = {key: pipeline_tensor(pipe, key) for key in keys}
    return Edit(deltas, {"method": "uce", "base_fingerprint": fingerprint(base), "family": "sd1"})


def test_fingerprint_sees_names_shapes_dtypes_and_bits():
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    base = fingerprint(tensors)
    assert fingerprint({"b": tensors["b"].clone(), "a": tensors["a"].clone()}) == base  # order-free, by value
    flipped = tensors["a"].clone()
    flipped.view(torch.int32)[0, 0] ^= 1  # one bit
    assert fingerprint(tensors | {"a": flipped}) != base
    assert fingerprint(tensors | {"a": tensors["a"].reshape(3, 2)}) != base
    assert fingerprint(tensors | {"a": tensors["a"].double()}) != base
    assert fingerprint({"c": tensors["a"], "b": tensors["b"]}) != base
    assert fingerprint({"a": tensors["a"].bfloat16()}) != fingerprint({"a": tensors["a"].half()})


def test_apply_scale_and_revert(pipe):
    state = snapshot(pipe)
    edit = make_edit(pipe)
    edit.apply_to(pipe, scale=0.5)
    assert edit.applied_scale == 0.5
    for key, value in state.items():
        if key in edit.deltas:
            assert torch.allclose(pipeline_tensor(pipe, key), value + 0.5 * edit.deltas[key], atol=1e-7)
        else:
            assert torch.equal(snapshot(pipe)[key], value), key
    with pytest.raises(RuntimeError, match="already applied"):
        edit.apply_to(pipe)
    edit.revert(pipe)
    assert_same(pipe, state)
    assert edit.applied_scale is None
    with pytest.raises(RuntimeError, match="not applied"):
        edit.revert(pipe)


def test_revert_is_bit_exact_even_when_adding_back_would_not_be(pipe):
    state = snapshot(pipe)
    edit = make_edit(pipe)
    edit.deltas[KEY_A] = edit.deltas[KEY_A] * 1e6  # x + d - d != x in floating point
    edit.apply_to(pipe, scale=1.0, max_relative_change=math.inf)
    edit.revert(pipe)
    assert_same(pipe, state)


def test_scale_zero_is_a_no_op(pipe):
    state = snapshot(pipe)
    edit = make_edit(pipe)
    edit.apply_to(pipe, scale=0.0)
    assert_same(pipe, state)


def test_fingerprint_mismatch_is_one_clear_line(pipe):
    edit = make_edit(pipe)
    with torch.no_grad():
        pipeline_tensor(pipe, KEY_B)[0, 0] += 1.0
    state = snapshot(pipe)
    with pytest.raises(FingerprintMismatchError) as info:
        edit.apply_to(pipe)
    assert "\n" not in str(info.value) and "differ" in str(info.value)
    assert_same(pipe, state)  # nothing applied
    edit.apply_to(pipe, check=False)  # the user may insist
    edit.revert(pipe)
    assert_same(pipe, state)


def test_edit_for_another_architecture_is_refused(pipe):
    edit = make_edit(pipe)
    with pytest.raises(FingerprintMismatchError, match="does not fit"):
        edit.apply_to(tiny_pipeline("sdxl"))


def test_save_load_round_trip(pipe, tmp_path):
    edit = make_edit(pipe, keys=(KEY_A, KEY_T))
    folder = edit.save(tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]
    loaded = Edit.load(folder)
    assert loaded.deltas.keys() == edit.deltas.keys()
    for key in edit.deltas:
        assert torch.equal(loaded.deltas[key], edit.deltas[key])
    assert loaded.config == json.loads(json.dumps(edit.config))
    assert "erasure_version" in loaded.config and "created" in loaded.config
    loaded.apply_to(pipe)  # the fingerprint survives the trip


def test_save_replaces_an_edit_only_when_told_and_refuses_other_folders(pipe, tmp_path):
    first, second = make_edit(pipe, seed=1), make_edit(pipe, seed=2)
    folder = first.save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(EditFormatError, match="already holds an edit"):
        second.save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    second.save(folder, overwrite=True)
    assert torch.equal(Edit.load(folder).deltas[KEY_A], second.deltas[KEY_A])
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.txt").write_text("keep me")
    with pytest.raises(EditFormatError, match="not an edit folder"):
        first.save(other)
    assert [p.name for p in other.iterdir()] == ["holiday.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    first.save(empty)
    assert (empty / WEIGHTS_NAME).is_file()


def test_crash_while_writing_leaves_the_old_edit_intact(pipe, tmp_path, monkeypatch):
    import safetensors.torch

    old = make_edit(pipe, seed=1)
    folder = old.save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        make_edit(pipe, seed=2).save(folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left behind

    with pytest.raises(OSError, match="disk full"):  # a fresh folder: nothing at all is left
        make_edit(pipe, seed=2).save(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_crash_while_swapping_folders_restores_the_old_edit(pipe, tmp_path, monkeypatch):
    folder = make_edit(pipe, seed=1).save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_replace, calls = os.replace, []

    def flaky_replace(source, target):
        calls.append(source)
        if len(calls) == 2:  # moving the new folder into place
            raise OSError("power cut")
        return real_replace(source, target)

    monkeypatch.setattr(files_module.os, "replace", flaky_replace)  # edits are saved through erasure.files
    with pytest.raises(OSError, match="power cut"):
        make_edit(pipe, seed=2).save(folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_load_errors_are_clear(pipe, tmp_path):
    with pytest.raises(EditFormatError, match="No edit folder"):
        Edit.load(tmp_path / "missing")
    folder = make_edit(pipe).save(tmp_path / "run")
    (folder / WEIGHTS_NAME).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(EditFormatError, match="corrupt"):
        Edit.load(folder)
    folder = make_edit(pipe).save(tmp_path / "run2")
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(EditFormatError, match="corrupt"):
        Edit.load(folder)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(EditFormatError, match="edit_config.json is missing"):
        Edit.load(folder)


def test_load_refuses_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "lora"
    folder.mkdir()
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text("{}")
    with pytest.raises(EditFormatError, match="not an edit key"):
        Edit.load(folder)


def test_stack_sums_deltas_and_checks_each_base(pipe):
    state = snapshot(pipe)
    first, second = make_edit(pipe, keys=(KEY_A, KEY_B), seed=1), make_edit(pipe, keys=(KEY_B, KEY_T), seed=2)
    both = stack([first, second])
    assert set(both.deltas) == {KEY_A, KEY_B, KEY_T}
    assert torch.equal(both.deltas[KEY_B], first.deltas[KEY_B] + second.deltas[KEY_B])
    assert torch.equal(both.deltas[KEY_A], first.deltas[KEY_A])
    assert [part["keys"] for part in both.config["parts"]] == [sorted(first.deltas), sorted(second.deltas)]
    both.apply_to(pipe)
    for key in both.deltas:
        assert torch.allclose(pipeline_tensor(pipe, key), state[key] + both.deltas[key], atol=1e-6)
    both.revert(pipe)
    assert_same(pipe, state)
    with torch.no_grad():
        pipeline_tensor(pipe, KEY_T)[0] += 1  # only the second part's base changed
    with pytest.raises(FingerprintMismatchError):
        both.apply_to(pipe)
    with pytest.raises(ValueError, match="different model families"):
        stack([first, Edit({}, {"family": "sdxl"})])


def test_replay_reproduces_the_edit(pipe, tmp_path):
    request = request_from_prompts(["pip", "a picture of pip"], preserve=["zog"])
    edit = get_method("uce", lam=0.25).apply(pipe, request, base_model="tiny-sd1")
    folder = edit.save(tmp_path / "run")
    again = replay(folder, pipe)
    assert again.config["method"] == "uce" and again.config["method_config"]["lam"] == 0.25
    assert again.config["base_model"] == "tiny-sd1"
    assert again.deltas.keys() == edit.deltas.keys()
    for key in edit.deltas:
        assert torch.allclose(again.deltas[key], edit.deltas[key], atol=1e-6)


def test_text_encoder_keys_of_either_transformers_naming_resolve(pipe):
    assert pipeline_tensor(pipe, KEY_T) is pipeline_tensor(pipe, KEY_T_OLD)
    with pytest.raises(KeyError, match="no parameter"):
        pipeline_tensor(pipe, "text_encoder.nope.weight")
    with pytest.raises(KeyError, match="names no component"):
        pipeline_tensor(pipe, "vae.decoder.conv_in.weight")


# --- validation: broken or altered edits are refused before they reach a model --------------------------------


def _tamper(folder, **changes):
    config = json.loads((folder / CONFIG_NAME).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def test_load_refuses_non_finite_deltas(pipe, tmp_path):
    from safetensors.torch import save_file

    folder = make_edit(pipe).save(tmp_path / "run")
    deltas = Edit.load(folder).deltas
    deltas[KEY_A] = deltas[KEY_A].clone()
    deltas[KEY_A][0, 0] = float("nan")
    save_file(deltas, str(folder / WEIGHTS_NAME))
    with pytest.raises(EditFormatError, match=f"{KEY_A} holds 1 non-finite"):
        Edit.load(folder)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method": None}, "has no 'method'"),
        ({"method": "uce-but-renamed"}, "names method 'uce-but-renamed'"),
        ({"base_fingerprint": None}, "has no base_fingerprint"),
    ],
)
def test_load_refuses_incomplete_or_altered_configs(pipe, tmp_path, changes, message):
    folder = make_edit(pipe).save(tmp_path / "run")
    _tamper(folder, **changes)
    with pytest.raises(EditFormatError, match=message):
        load_edit(folder)  # what every command reads edits with: the method name is checked against the registry


def test_edit_load_checks_method_names_only_against_the_names_it_is_given(pipe, tmp_path):
    folder = make_edit(pipe).save(tmp_path / "run")
    _tamper(folder, method="uce-but-renamed")
    assert Edit.load(folder).config["method"] == "uce-but-renamed"  # the format layer knows no method registry
    with pytest.raises(EditFormatError, match="names method 'uce-but-renamed'"):
        Edit.load(folder, known_methods={"uce"})


def test_an_empty_config_is_refused_and_a_missing_fingerprint_only_when_asked(pipe, tmp_path):
    folder = make_edit(pipe).save(tmp_path / "run")
    (folder / CONFIG_NAME).write_text("{}")
    with pytest.raises(EditFormatError, match="has no 'method'"):
        Edit.load(folder)
    folder = make_edit(pipe).save(tmp_path / "run2")
    _tamper(folder, base_fingerprint=None)
    edit = Edit.load(folder, require_fingerprint=False)
    edit.apply_to(pipe)  # nothing to verify against, by the caller's explicit choice
    edit.revert(pipe)


def test_apply_refuses_implausibly_large_deltas_and_non_finite_scales(pipe):
    base = pipeline_tensor(pipe, KEY_A).detach().clone()
    huge = Edit({KEY_A: base * 1e6}, {"method": "uce"})
    with pytest.raises(ValueError, match=f"changes {KEY_A} by 1e\\+06 times its own size"):
        huge.apply_to(pipe, check=False)
    assert torch.equal(pipeline_tensor(pipe, KEY_A), base), "nothing was applied"
    huge.apply_to(pipe, check=False, max_relative_change=math.inf)  # a user who means it
    huge.revert(pipe)
    small = make_edit(pipe)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            small.apply_to(pipe, scale=scale)
    assert torch.equal(pipeline_tensor(pipe, KEY_A), base)
