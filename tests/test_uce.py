"""UCE (arXiv 2308.14761) and the shared closed-form ridge solver, checked against their defining equations."""

import pytest
import torch

from erasure.concepts import Concept, EraseRequest, request_from_prompts
from erasure.diffusion import encode_prompts
from erasure.edit import pipeline_tensor
from erasure.methods import get_method
from erasure.methods.closed_form import RidgeSolver, ridge_objective, ridge_solution
from erasure.methods.uce import UCEConfig
from erasure.testing import tiny_pipeline

# --- the ridge solver -------------------------------------------------------------------------------------------


def random_problem(n=5, d=7, out=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, d, generator=generator, dtype=torch.float64)
    inputs = torch.randn(n, d, generator=generator, dtype=torch.float64)
    targets = torch.randn(n, out, generator=generator, dtype=torch.float64)
    weights = torch.rand(n, generator=generator, dtype=torch.float64) + 0.1
    return w0, inputs, targets, weights


def test_ridge_solution_matches_the_explicit_formula():
    w0, inputs, targets, weights = random_problem()
    lam = 0.3
    left = (targets * weights[:, None]).T @ inputs + lam * w0
    right = (inputs * weights[:, None]).T @ inputs + lam * torch.eye(inputs.shape[1], dtype=torch.float64)
    expected = left @ torch.linalg.inv(right)  # an independent reference
    assert torch.allclose(ridge_solution(w0, inputs, targets, weights, lam), expected, atol=1e-10)


def test_ridge_solution_minimises_the_objective():
    w0, inputs, targets, weights = random_problem(seed=1)
    w = ridge_solution(w0, inputs, targets, weights, lam=0.5)
    best = ridge_objective(w, w0, inputs, targets, weights, lam=0.5)
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):
        nudged = w + 1e-3 * torch.randn(w.shape, generator=generator, dtype=torch.float64)
        assert ridge_objective(nudged, w0, inputs, targets, weights, lam=0.5) > best


def test_ridge_solver_factors_once_for_many_maps():
    w0, inputs, targets, weights = random_problem(seed=3)
    solver = RidgeSolver(inputs, weights, lam=0.2)
    other = torch.randn(6, 7, dtype=torch.float64)
    other_targets = torch.randn(5, 6, dtype=torch.float64)
    assert torch.allclose(solver.solve(w0, targets), ridge_solution(w0, inputs, targets, weights, 0.2), atol=1e-12)
    assert torch.allclose(
        solver.solve(other, other_targets), ridge_solution(other, inputs, other_targets, weights, 0.2), atol=1e-12
    )
    assert solver.solve(w0.float(), targets.float()).dtype == torch.float32
    identity = torch.eye(7, dtype=torch.float64)
    assert torch.allclose(solver.gram @ solver.solve_gram(identity), identity, atol=1e-10)  # A^-1, never formed


@pytest.mark.parametrize("erase_rows", [3, 12])  # fewer rows than d (the low-rank form) and more
@pytest.mark.parametrize("own_map", [True, False])  # kept rows keep W0's outputs, or another map's
def test_kept_rows_equal_ordinary_rows_whose_targets_are_the_kept_maps_outputs(erase_rows, own_map):
    w0, inputs, targets, weights = random_problem(n=erase_rows, d=7, seed=4)
    generator = torch.Generator().manual_seed(5)
    kept = torch.randn(9, 7, generator=generator, dtype=torch.float64)
    kept_weights = torch.rand(9, generator=generator, dtype=torch.float64) + 0.1
    keeper = w0 if own_map else torch.randn(w0.shape, generator=generator, dtype=torch.float64)
    solver = RidgeSolver(inputs, weights, 0.3, kept=kept, kept_weights=kept_weights)
    fast = solver.solve(w0, targets, kept_map=None if own_map else keeper)
    plain = ridge_solution(
        w0, torch.cat([inputs, kept]), torch.cat([targets, kept @ keeper.T]), torch.cat([weights, kept_weights]), 0.3
    )
    assert torch.allclose(fast, plain, atol=1e-10)
    with pytest.raises(ValueError, match="kept must be"):
        RidgeSolver(inputs, kept=kept[:, :3])
    with pytest.raises(ValueError, match="kept_map has shape"):
        solver.solve(w0, targets, kept_map=keeper[:2])


def test_ridge_solver_limits():
    w0, inputs, targets, _ = random_problem(n=3, d=7)
    with pytest.raises(ValueError, match="singular"):
        RidgeSolver(inputs, lam=0.0)  # 3 inputs cannot determine a 7-dimensional map
    with pytest.raises(ValueError, match="lam must be"):
        RidgeSolver(inputs, lam=-1.0)
    with pytest.raises(ValueError, match="non-negative"):
        RidgeSolver(inputs, weights=torch.tensor([1.0, -1.0, 1.0]))
    assert torch.allclose(ridge_solution(w0, inputs, targets, lam=1e9), w0, atol=1e-6)  # huge lam keeps W0


# --- UCE on tiny pipelines --------------------------------------------------------------------------------------


def last_token_embedding(pipe, prompt):
    """Independent of the method: the last token before end-of-text, the start token for ""."""
    ids = pipe.tokenizer(prompt).input_ids
    return encode_prompts(pipe, [prompt]).prompt_embeds[0, max(len(ids) - 2, 0)].double()


def kv_keys(edit):
    return [key for key in edit.deltas if key.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipe(request):
    return tiny_pipeline(request.param)


def test_uce_edits_exactly_the_cross_attention_key_value_weights(pipe):
    edit = get_method("uce").apply(pipe, request_from_prompts(["pip"]))
    expected = {
        f"unet.{name}"
        for name, _ in pipe.unet.named_parameters()
        if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
    }
    assert set(edit.deltas) == expected
    assert all(delta.abs().max() > 0 for delta in edit.deltas.values())


def test_uce_satisfies_its_normal_equations(pipe):
    erase, preserve, anchor = ["pip", "a picture of pip"], ["zog", "a red circle"], "a yellow circle"
    config = {"erase_scale": 1.5, "preserve_scale": 0.7, "lam": 0.4}
    request = request_from_prompts(erase, anchor=anchor, preserve=preserve)
    edit = get_method("uce", **config).apply(pipe, request)
    c_erase = torch.stack([last_token_embedding(pipe, p) for p in erase])
    c_anchor = last_token_embedding(pipe, anchor)
    c_preserve = torch.stack([last_token_embedding(pipe, p) for p in preserve])
    for key in kv_keys(edit):
        w0 = pipeline_tensor(pipe, key).detach().double()
        w = w0 + edit.deltas[key].double()
        # d/dW of  s_e sum_E |W c - W0 c_a|^2 + s_p sum_P |W c - W0 c|^2 + lam |W - W0|^2  (halved)
        erase_term = config["erase_scale"] * (c_erase @ w.T - c_anchor @ w0.T).T @ c_erase
        preserve_term = config["preserve_scale"] * (c_preserve @ (w - w0).T).T @ c_preserve
        ridge_term = config["lam"] * (w - w0)
        gradient = erase_term + preserve_term + ridge_term
        assert gradient.norm() < 1e-4 * ridge_term.norm(), key


def test_uce_maps_erased_tokens_to_the_anchor_when_unregularised(pipe):
    erase = ["pip", "a picture of pip"]
    request = request_from_prompts(erase, anchor="a blue square")
    edit = get_method("uce", lam=1e-6).apply(pipe, request)
    c_anchor = last_token_embedding(pipe, "a blue square")
    for key in kv_keys(edit):
        w0 = pipeline_tensor(pipe, key).detach().double()
        w = w0 + edit.deltas[key].double()
        target = w0 @ c_anchor
        for prompt in erase:
            c = last_token_embedding(pipe, prompt)
            assert (w @ c - target).norm() < 1e-3 * target.norm(), (key, prompt)
            assert (w0 @ c - target).norm() > 0.1 * target.norm()  # it was not there before


def test_uce_keeps_preserved_outputs(pipe):
    preserve = ["zog", "a red circle"]
    request = request_from_prompts(["pip"], preserve=preserve)
    strong = get_method("uce", lam=1e-6, preserve_scale=1.0).apply(pipe, request)
    for key in kv_keys(strong):
        for prompt in preserve:
            c = last_token_embedding(pipe, prompt)
            kept = pipeline_tensor(pipe, key).detach().double() @ c
            assert (strong.deltas[key].double() @ c).norm() < 1e-3 * kept.norm(), (key, prompt)


def test_uce_erases_several_concepts_at_once(pipe):
    concepts = (
        Concept(name="pip", kind="character", erase=("pip", "a picture of pip"), anchor=""),
        Concept(name="striped", kind="style", erase=("a striped red circle",), anchor="a red circle"),
    )
    edit = get_method("uce", lam=1e-6).apply(pipe, EraseRequest(concepts))
    start = last_token_embedding(pipe, "")  # the anchor "" is the start token, as in the official code
    striped = encode_prompts(pipe, ["a striped red circle"]).prompt_embeds[0, 2].double()  # "striped" token
    for key in kv_keys(edit):
        w0 = pipeline_tensor(pipe, key).detach().double()
        w = w0 + edit.deltas[key].double()
        for prompt in ("pip", "a picture of pip"):
            assert (w @ last_token_embedding(pipe, prompt) - w0 @ start).norm() < 1e-3 * (w0 @ start).norm()
        target = w0 @ last_token_embedding(pipe, "a red circle")
        assert (w @ striped - target).norm() < 1e-3 * target.norm()  # the concept's token, not the prompt's last


def test_uce_maps_each_erase_prompt_to_its_paired_anchor(pipe):
    # The concept word comes after the words that differ, so its token embeddings differ (causal text encoder);
    # with the word first ("a striped red ...") both rows would be one input with two targets.
    pairs = {"red striped": "a red circle", "blue striped": "a blue square"}
    concept = Concept(name="striped", kind="style", erase=tuple(pairs), anchor=tuple(pairs.values()))
    edit = get_method("uce", lam=1e-6, expand="off").apply(pipe, EraseRequest((concept,)))
    striped = {prompt: encode_prompts(pipe, [prompt]).prompt_embeds[0, 2].double() for prompt in pairs}
    assert edit.config["stats"]["erase_rows_with_conflicting_anchors"] == 0
    for key in kv_keys(edit):
        w0 = pipeline_tensor(pipe, key).detach().double()
        w = w0 + edit.deltas[key].double()
        for prompt, anchor in pairs.items():
            target = w0 @ last_token_embedding(pipe, anchor)
            assert (w @ striped[prompt] - target).norm() < 1e-3 * target.norm(), (key, prompt)
        other = w0 @ last_token_embedding(pipe, "a blue square")
        assert (w @ striped["red striped"] - other).norm() > 0.1 * other.norm()  # not the other pair's anchor


def test_uce_maps_one_token_with_several_paired_anchors_to_their_mean(pipe, caplog):
    # "striped" comes first, so both prompts give the same "striped" embedding: one input, two targets.
    pairs = {"a striped red circle": "a red circle", "a striped blue square": "a blue square"}
    concept = Concept(name="striped", kind="style", erase=tuple(pairs), anchor=tuple(pairs.values()))
    with caplog.at_level("WARNING", logger="erasure.methods.uce"):
        edit = get_method("uce", lam=1e-6, expand="off").apply(pipe, EraseRequest((concept,)))
    assert "2 of 2 erase rows share their token embedding" in caplog.text
    assert edit.config["stats"]["erase_rows_with_conflicting_anchors"] == 2
    striped = encode_prompts(pipe, ["a striped red circle"]).prompt_embeds[0, 2].double()
    for key in kv_keys(edit):
        w0 = pipeline_tensor(pipe, key).detach().double()
        w = w0 + edit.deltas[key].double()
        mean = sum(w0 @ last_token_embedding(pipe, anchor) for anchor in pairs.values()) / 2
        assert (w @ striped - mean).norm() < 1e-3 * mean.norm(), key


def test_uce_all_tokens_maps_end_of_text_too(pipe):
    prompt = "a picture of pip"
    edit = get_method("uce", lam=1e-6, tokens="all_tokens").apply(pipe, request_from_prompts([prompt]))
    embeds = encode_prompts(pipe, [prompt, ""]).prompt_embeds.double()
    end, anchor_end = len(pipe.tokenizer(prompt).input_ids) - 1, 1
    for key in kv_keys(edit):
        w0 = pipeline_tensor(pipe, key).detach().double()
        w = w0 + edit.deltas[key].double()
        target = w0 @ embeds[1, anchor_end]
        assert (w @ embeds[0, end] - target).norm() < 1e-3 * target.norm()
        assert (w @ embeds[0, 4] - w0 @ embeds[1, 0]).norm() < 1e-3 * (w0 @ embeds[1, 0]).norm()


def test_uce_preserve_tokens_all_holds_every_word_of_the_preserve_prompts(pipe):
    """``preserve_tokens="all"``: last-token erase rows, and a preserve row for every token after the start."""
    erase, preserve = ["pip", "a picture of pip"], ["zog", "a red circle"]
    config = {"preserve_scale": 0.7, "lam": 0.4}
    request = request_from_prompts(erase, preserve=preserve)
    edit = get_method("uce", preserve_tokens="all", **config).apply(pipe, request)
    assert edit.config["method_config"]["preserve_tokens"] == "all"
    assert edit.config["stats"]["preserve_rows"] == sum(len(pipe.tokenizer(p).input_ids) - 1 for p in preserve)
    c_erase = torch.stack([last_token_embedding(pipe, p) for p in erase])
    c_anchor = last_token_embedding(pipe, "")
    embeds = encode_prompts(pipe, preserve).prompt_embeds.double()
    c_preserve = torch.cat(
        [embeds[i, 1 : len(pipe.tokenizer(p).input_ids)] for i, p in enumerate(preserve)]
    )  # "a", "red", "circle", end-of-text ...
    for key in kv_keys(edit):
        w0 = pipeline_tensor(pipe, key).detach().double()
        w = w0 + edit.deltas[key].double()
        erase_term = (c_erase @ w.T - c_anchor @ w0.T).T @ c_erase
        preserve_term = config["preserve_scale"] * (c_preserve @ (w - w0).T).T @ c_preserve
        ridge_term = config["lam"] * (w - w0)
        assert (erase_term + preserve_term + ridge_term).norm() < 1e-4 * ridge_term.norm(), key
    # the official default keeps one row per preserve prompt
    assert get_method("uce").apply(pipe, request).config["stats"]["preserve_rows"] == len(preserve)


def test_uce_config_is_validated():
    with pytest.raises(ValueError, match="tokens must be"):
        UCEConfig(tokens="every")
    with pytest.raises(ValueError, match="preserve_tokens must be"):
        UCEConfig(preserve_tokens="first")
    assert UCEConfig().preserve_tokens == "last"
    assert UCEConfig(tokens="all_tokens").preserve_tokens == "all"
    assert UCEConfig(tokens="all_tokens", preserve_tokens="last").preserve_tokens == "last"
    # configs written before preserve_tokens existed replay as they were made
    old = UCEConfig.from_dict({"tokens": "last_subject", "lamb": 0.25})  # edit configs written before the rename
    assert old.preserve_tokens == "last" and old.lam == 0.25
    with pytest.raises(ValueError, match="lam must be"):
        UCEConfig(lam=-1)
    with pytest.raises(ValueError, match="no option"):
        get_method("uce", learning_rate=1.0)


def test_uce_refuses_a_concept_the_tokenizer_cannot_encode():
    pipe = tiny_pipeline("sd2")  # its padding token is "!", so "!" is not a word it can erase
    with pytest.raises(ValueError, match="encodes to no token"):
        get_method("uce").apply(pipe, request_from_prompts(["a picture of !"], name="!"))


@pytest.mark.parametrize("name", ["erase_scale", "preserve_scale", "lam"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_scales_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        UCEConfig(**{name: value})
