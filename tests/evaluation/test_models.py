"""Weights files (partial UNet state dicts, as the official ESD/UCE scripts save them) and their edits."""

import pytest
import torch

from erasure.convert import single_file_state_dict
from erasure.evaluation import EvaluationError, load_unet_weights, weights_edit
from erasure.testing import tiny_pipeline


def attn2_keys(unet):
    return [k for k in unet.state_dict() if ".attn2.to_k." in k or ".attn2.to_v." in k]


def test_unet_weights_in_every_key_form_load_to_diffusers_names(tmp_path):
    from safetensors.torch import save_file

    pipe = tiny_pipeline("sd1")
    keys = attn2_keys(pipe.unet)
    own = pipe.unet.state_dict()
    state = {k: own[k] + 1 for k in keys}
    ldm = single_file_state_dict(pipe)
    ldm_keys = [k for k in ldm if k.startswith("model.diffusion_model.") and ".attn2.to_k." in k]
    forms = {
        "plain": state,
        "prefixed": {f"unet.{k}": v for k, v in state.items()},
        "ldm": {k: ldm[k] + 1 for k in ldm_keys},
    }
    for name, tensors in forms.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        loaded = load_unet_weights(tmp_path / f"{name}.safetensors", pipe.unet)
        assert set(loaded) <= set(own) and len(loaded) == len(tensors)
        assert all(torch.equal(loaded[k], own[k] + 1) for k in loaded), name


def test_bad_weights_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    pipe = tiny_pipeline("sd1")
    key = attn2_keys(pipe.unet)[0]
    save_file({"cond_stage_model.x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(EvaluationError, match="is not a UNet parameter"):
        load_unet_weights(tmp_path / "foreign.safetensors", pipe.unet)
    save_file({key: torch.zeros(3, 3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(EvaluationError, match="different base model"):
        load_unet_weights(tmp_path / "shape.safetensors", pipe.unet)
    (tmp_path / "esd.ckpt").write_bytes(b"pickle")
    with pytest.raises(EvaluationError, match="pickles"):
        load_unet_weights(tmp_path / "esd.ckpt", pipe.unet)


def test_a_weights_edit_applies_the_files_tensors_and_restores_exactly(tmp_path):
    # patched_unet (a second apply path) is gone: a weights file is an Edit (delta = W_file - W_base).
    from safetensors.torch import save_file

    from erasure.edit import STATE_DICT_METHOD

    pipe = tiny_pipeline("sd1")
    key = attn2_keys(pipe.unet)[0]
    before = pipe.unet.state_dict()[key].clone()
    save_file({key: before + 1}, str(tmp_path / "esd.safetensors"))
    edit = weights_edit(tmp_path / "esd.safetensors", pipe)
    assert list(edit.deltas) == [f"unet.{key}"] and edit.config["method"] == STATE_DICT_METHOD
    assert edit.config["method_config"]["source"] == str(tmp_path / "esd.safetensors")
    with edit.applied(pipe):
        assert torch.equal(pipe.unet.state_dict()[key], before + 1)
    assert torch.equal(pipe.unet.state_dict()[key], before)


def test_a_weights_edit_refuses_another_base(tmp_path):
    from safetensors.torch import save_file

    from erasure.edit import FingerprintMismatchError

    pipe, other = tiny_pipeline("sd1"), tiny_pipeline("sd1", seed=1)
    key = attn2_keys(pipe.unet)[0]
    save_file({key: pipe.unet.state_dict()[key] * 0}, str(tmp_path / "esd.safetensors"))
    edit = weights_edit(tmp_path / "esd.safetensors", pipe)
    with pytest.raises(FingerprintMismatchError):
        edit.apply_to(other)
