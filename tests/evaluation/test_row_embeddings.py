"""Replaying the probe's inversion prompts: the learned token each row names is loaded before generation."""

import pytest
import torch

from erasure.attacks.override import save_learned_embeds
from erasure.evaluation.errors import EvaluationError
from erasure.evaluation.jobs import load_row_embeddings
from erasure.prompt_sets import PromptRow
from erasure.testing import tiny_pipeline


def row(case, prompt, **extra):
    return PromptRow(case, prompt, 0, "Pip", "target", (), extra)


def test_a_row_naming_a_learned_embedding_teaches_the_pipeline_its_token(tmp_path):
    pipe = tiny_pipeline("sd1")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vector = torch.linspace(-1, 1, width)
    save_learned_embeds(tmp_path / "embeddings" / "inversion.safetensors", "<concept>", vector)
    csv = tmp_path / "prompts.csv"  # the path the rows are relative to (never read here)
    rows = [
        row(0, "a picture of <concept>", embedding="embeddings/inversion.safetensors", token="<concept>"),
        row(1, "a drawing of <concept>", embedding="embeddings/inversion.safetensors", token="<concept>"),
        row(2, "a plain prompt"),
    ]
    before = len(pipe.tokenizer)
    from erasure.prompt_sets import file_sha256

    path = tmp_path / "embeddings" / "inversion.safetensors"
    assert load_row_embeddings(pipe, rows, csv) == [
        {"embedding": str(path), "token": "<concept>", "sha256": file_sha256(path)}
    ]  # one file, loaded once for both rows, recorded with its checksum
    token_id = pipe.tokenizer.convert_tokens_to_ids("<concept>")
    assert len(pipe.tokenizer) == before + 1 and token_id == before
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], vector)
    assert pipe.tokenizer("a picture of <concept>").input_ids.count(token_id) == 1  # one token, not sub-words
    assert load_row_embeddings(tiny_pipeline("sd1"), rows[2:], csv) == []


def test_a_missing_embedding_or_token_is_named(tmp_path):
    pipe = tiny_pipeline("sd1")
    missing = [row(7, "<concept>", embedding="embeddings/inversion.safetensors", token="<concept>")]
    with pytest.raises(EvaluationError, match=r"case 7 needs the learned embedding .*inversion.safetensors"):
        load_row_embeddings(pipe, missing, tmp_path / "prompts.csv")
    with pytest.raises(EvaluationError, match="case 3 names the embedding .* but no token column"):
        load_row_embeddings(pipe, [row(3, "<concept>", embedding="e.safetensors")], tmp_path / "prompts.csv")
