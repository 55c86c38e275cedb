"""RECE (arXiv 2407.12383): the closed-form adversarial embedding (Eq. 5) and the epochs built on UCE."""

import pytest
import torch

from erasure.concepts import Concept, EraseRequest
from erasure.diffusion import encode_prompts
from erasure.edit import pipeline_tensor
from erasure.methods import get_method
from erasure.methods.closed_form import adversarial_embeddings
from erasure.methods.rece import RECEConfig
from erasure.testing import tiny_pipeline


def maps(widths=(5, 9, 3), d=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(out, d, generator=generator, dtype=torch.float64) for out in widths]


def test_adversarial_embedding_solves_its_normal_equations():
    edited, original = maps(seed=0), maps(seed=1)
    c = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lam = 0.3
    c_adv = adversarial_embeddings(edited, original, c, lam)
    gram = sum(w.T @ w for w in edited) + lam * torch.eye(6, dtype=torch.float64)
    rhs = sum(a.T @ b for a, b in zip(edited, original, strict=True)) @ c.T
    assert torch.allclose(gram @ c_adv.T, rhs, atol=1e-10)


def test_adversarial_embedding_maps_through_the_edited_weights_to_the_original_keys_and_values():
    original = maps(seed=3)
    mixing = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(6, 6, generator=torch.Generator().manual_seed(4))
    edited = [w @ mixing for w in original]  # every map edited the same invertible way: W' c' = W c has a solution
    c = torch.randn(3, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    c_adv = adversarial_embeddings(edited, original, c, 1e-12)
    assert torch.allclose(c_adv, c @ torch.linalg.inv(mixing).T, atol=1e-6)
    for new, old in zip(edited, original, strict=True):
        assert torch.allclose(c_adv @ new.T, c @ old.T, atol=1e-6)


def test_adversarial_embedding_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="same, non-zero number"):
        adversarial_embeddings(maps(), maps()[:2], torch.zeros(1, 6), 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        adversarial_embeddings(maps(), maps(), torch.zeros(1, 5), 0.1)


REQUEST = EraseRequest(
    (Concept(name="pip", kind="character", erase=("pip", "a picture of pip"), preserve=("zog", "a red circle")),)
)


def test_zero_epochs_is_exactly_uce():
    pipe = tiny_pipeline("sd1")
    uce = get_method("uce").apply(pipe, REQUEST, progress=False)
    rece = get_method("rece", epochs=0).apply(pipe, REQUEST, progress=False)
    assert uce.deltas.keys() == rece.deltas.keys()
    assert all(torch.equal(uce.deltas[key], rece.deltas[key]) for key in uce.deltas)


def test_an_epoch_erases_the_adversarial_embedding_and_keeps_the_preserved_prompts_near_uce():
    pipe = tiny_pipeline("sd1")
    uce = get_method("uce").apply(pipe, REQUEST, progress=False)
    rece = get_method("rece", epochs=2).apply(pipe, REQUEST, progress=False)
    epochs = rece.config["stats"]["epoch_stats"]
    assert len(epochs) == 2
    for epoch in epochs:  # after the epoch's edit, c' no longer reaches the concept's original keys/values
        assert epoch["adversarial_residual_after"] > epoch["adversarial_residual_before"]
    assert any(not torch.equal(uce.deltas[key], rece.deltas[key]) for key in uce.deltas)
    # preservation: the preserve prompt's keys move less under RECE than the erased prompt's
    key = next(k for k in rece.deltas if k.endswith("attn2.to_k.weight"))
    zog, pip = (encode_prompts(pipe, [p]).prompt_embeds[0].double() for p in ("zog", "pip"))
    w0 = pipeline_tensor(pipe, key).detach().double()
    delta = rece.deltas[key].double()
    assert (zog @ delta.T).norm() / (zog @ w0.T).norm() < (pip @ delta.T).norm() / (pip @ w0.T).norm()


def test_the_adversarial_rows_come_from_the_concept_word_or_from_every_erase_prompt():
    pipe = tiny_pipeline("sd1")
    (concept,) = REQUEST.concepts
    length = pipe.tokenizer.model_max_length
    for source, count in (("word", len(concept.concept_words)), ("prompts", len(concept.erase))):
        edit = get_method("rece", adversarial_source=source, expand="off").apply(pipe, REQUEST, progress=False)
        assert edit.config["stats"]["epoch_stats"][0]["adversarial_rows"] == length * count, source
    with pytest.raises(ValueError, match="adversarial_source"):
        RECEConfig(adversarial_source="images")


def test_defaults_follow_the_concept_kind():
    config = RECEConfig()
    style = Concept(name="van gogh", kind="style", erase=("van gogh",))
    unsafe = Concept(name="nudity", kind="unsafe", erase=("nudity",))
    assert config.regularisation_for(style) == 1e-3
    assert config.regularisation_for(unsafe) == 0.1
    assert config.epochs_for(EraseRequest((style,))) == 1
    assert config.epochs_for(EraseRequest((style, unsafe))) == 3  # the largest: train.py's nudity default
    ship = Concept(name="ship", kind="object", erase=("ship",))
    assert config.regularisation_for(ship) == 1e-3  # train_object.py's default
    assert RECEConfig(embedding_regularisation=0.5).regularisation_for(style) == 0.5
    assert RECEConfig(epochs=4).epochs_for(EraseRequest((style,))) == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": -1}, "epochs"),
        ({"embedding_regularisation": 0.0}, "embedding_regularisation"),
        ({"adversarial_lam": float("nan")}, "adversarial_lam"),
    ],
)
def test_bad_settings_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        RECEConfig(**options)
