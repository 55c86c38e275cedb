"""LoRA export maths and the diffusers round trip: rank capping, biases only where the base layer has one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from erasure.edit import Edit, pipeline_tensor
from erasure.export import BIAS_ADAPTER, LORA_WEIGHTS_NAME, export_edit, lora_state_dict, save_lora
from erasure.testing import tiny_pipeline


def esd_x_like_edit(pipe, seed=0):
    """Deltas on every cross-attention tensor of one block: bias-less to_q/to_k/to_v and to_out.0 with its bias."""
    generator = torch.Generator().manual_seed(seed)
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    keys = [f"{prefix}.{name}" for name in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")]
    keys.append(f"{prefix}.to_out.0.bias")
    return Edit({key: 0.01 * torch.randn(pipeline_tensor(pipe, key).shape, generator=generator) for key in keys})


def test_rank_is_capped_at_each_layers_rank():
    edit = Edit({"unet.a.weight": torch.randn(8, 5), "unet.b.weight": torch.randn(3, 40)})
    state, config, skipped = lora_state_dict(edit, rank=100_000)
    assert state["unet.a.lora_A.weight"].shape == (5, 5) and state["unet.a.lora_B.weight"].shape == (8, 5)
    assert state["unet.b.lora_A.weight"].shape == (3, 40) and state["unet.b.lora_B.weight"].shape == (3, 3)
    ranks = {"a": 5, "b": 3}
    assert {m: config["rank_pattern"].get(m, config["r"]) for m in ranks} == ranks
    assert config["alpha_pattern"] == config["rank_pattern"] and not skipped
    for module in ranks:
        delta = edit.deltas[f"unet.{module}.weight"]
        product = state[f"unet.{module}.lora_B.weight"] @ state[f"unet.{module}.lora_A.weight"]
        assert torch.allclose(product, delta, atol=1e-5)


def test_mixed_bias_edit_is_split_into_a_weight_and_a_bias_adapter(tmp_path):
    pipe = tiny_pipeline("sd1")
    edit = esd_x_like_edit(pipe)
    state, config, skipped = lora_state_dict(edit, rank=4)
    assert not config["lora_bias"] and not any(key.endswith(".bias") for key in state) and not skipped
    folder, _ = save_lora(edit, tmp_path / "lora", rank=64)
    bias_state = load_file(str(folder / BIAS_ADAPTER / LORA_WEIGHTS_NAME))
    bias_config = json.loads((folder / BIAS_ADAPTER / "adapter_config.json").read_text())
    (module,) = {key.rsplit(".lora_", 1)[0] for key in bias_state}
    assert module.endswith("to_out.0") and bias_config["lora_bias"]
    assert torch.equal(bias_state[f"{module}.lora_B.bias"], edit.deltas[f"{module}.bias"])
    assert not bias_state[f"{module}.lora_A.weight"].any() and not bias_state[f"{module}.lora_B.weight"].any()


def test_bias_adapter_is_not_written_when_every_adapted_layer_has_a_bias_delta(tmp_path):
    edit = Edit({"unet.x.weight": torch.randn(6, 4), "unet.x.bias": torch.randn(6)})
    folder, _ = save_lora(edit, tmp_path / "lora", rank=2)
    assert not (folder / BIAS_ADAPTER).exists()
    assert json.loads((folder / "adapter_config.json").read_text())["lora_bias"]


# Two adapters on one UNet is the workflow under test; peft warns about exactly that.
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
def test_mixed_bias_lora_fuses_in_diffusers_to_the_applied_edit(tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    pipe, base = tiny_pipeline("sd1"), tiny_pipeline("sd1")
    edit = esd_x_like_edit(pipe, seed=3)
    folder, _ = save_lora(edit, tmp_path / "lora", rank=10_000)
    pipe.load_lora_weights(str(folder), adapter_name="weights")
    pipe.load_lora_weights(str(folder / BIAS_ADAPTER), adapter_name="bias")
    pipe.fuse_lora(adapter_names=["weights", "bias"])
    pipe.unload_lora_weights()
    for key, delta in edit.deltas.items():
        assert torch.allclose(pipeline_tensor(pipe, key), pipeline_tensor(base, key) + delta, atol=1e-5), key
    untouched = "unet.conv_in.weight"
    assert torch.equal(pipeline_tensor(pipe, untouched), pipeline_tensor(base, untouched))


def test_export_refuses_bad_input_before_writing(tmp_path):
    edit = Edit({"unet.x.weight": torch.randn(2, 2)})
    with pytest.raises(ValueError, match="Unknown export format 'onnx'"):
        export_edit(edit, tmp_path / "o", "onnx")
    with pytest.raises(ValueError, match="finite"):
        export_edit(edit, tmp_path / "o", "diffusers", scale=float("nan"))
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        export_edit(edit, tmp_path / "o.bin", "single-file", model="unused")
    with pytest.raises(ValueError, match="records no base model"):
        export_edit(edit, tmp_path / "o", "diffusers")
    assert list(tmp_path.iterdir()) == []
