"""scripts/token_drift.py: the per-token change of cross-attention keys/values that an edit makes."""

import pytest
import torch
from conftest import load_script

from erasure.concepts import request_from_prompts
from erasure.diffusion import encode_prompts
from erasure.edit import Edit, pipeline_tensor
from erasure.methods import get_method
from erasure.testing import tiny_pipeline


@pytest.fixture(scope="module")
def script():
    return load_script("token_drift.py")


def test_drift_is_the_relative_key_value_change_averaged_over_the_edit(script):
    pipe = tiny_pipeline("sd1")
    request = request_from_prompts(["a picture of pip"], preserve=["a picture of zog"])
    edit = get_method("uce", preserve_tokens="all", lam=1e-3).apply(pipe, request)
    drift = script.token_drift(pipe, edit, ["a picture of pip", "a picture of zog"])
    embeddings = encode_prompts(pipe, ["a picture of pip", "a picture of zog"]).prompt_embeds.double()
    assert drift.shape == embeddings.shape[:2]
    expected = torch.stack(
        [
            (embeddings @ delta.double().T).norm(dim=-1)
            / (embeddings @ pipeline_tensor(pipe, key).detach().double().T).norm(dim=-1)
            for key, delta in edit.deltas.items()
        ]
    ).mean(0)
    torch.testing.assert_close(drift, expected)
    pip_position = len(pipe.tokenizer("a picture of pip").input_ids) - 2
    assert drift[0, pip_position] > 10 * drift[1, 1 : pip_position + 2].max()  # the erased word, not the preserved


def test_an_edit_without_key_value_tensors_is_refused(script, capsys):
    pipe = tiny_pipeline("sd1")
    key = next(k for k, _ in pipe.unet.named_parameters() if k.endswith("attn2.to_q.weight"))
    edit = Edit({f"unet.{key}": torch.zeros_like(pipeline_tensor(pipe, f"unet.{key}"))}, {"method": "uce"})
    with pytest.raises(ValueError, match="no cross-attention key/value"):
        script.token_drift(pipe, edit, ["pip"])
    assert script.main(["--model", "nowhere", "--edit", "/nonexistent/run", "--prompt", "pip"]) == 2
    assert "error:" in capsys.readouterr().err
