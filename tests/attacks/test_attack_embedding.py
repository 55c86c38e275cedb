import pytest
import torch
from attack_helpers import CONCEPT, brightness_judge, red_selector, tiny, tiny_edit

from erasure.attacks.base import AttackError, evaluation_rows
from erasure.attacks.context import AttackContext
from erasure.attacks.optimise import (
    DenoiseObjective,
    EmbedObjective,
    MatchObjective,
    concept_latents,
    make_parametrisation,
    optimise,
    project_simplex,
)
from erasure.attacks.override import (
    EmbeddingOverride,
    build_slots,
    encode_ids,
    encode_layouts,
    slot_text,
    token_embedding,
    vocabulary_ids,
)
from erasure.diffusion import encode_prompts

PROMPT = "a picture of pip"


def ids_of(tokenizer, prompt):
    return tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_override_with_the_original_rows_reproduces_the_prompt_embedding_bit_for_bit(family):
    from erasure.testing import tiny_pipeline

    pipe = tiny_pipeline(family)
    reference = encode_prompts(pipe, [PROMPT, "zog"]).prompt_embeds
    single = encode_prompts(
        pipe, [PROMPT]
    ).prompt_embeds  # batched kernels may round differently: compare like for like
    table = token_embedding(pipe.text_encoder).weight
    ids = [ids_of(pipe.tokenizer, p) for p in (PROMPT, "zog")]
    with torch.no_grad(), EmbeddingOverride(pipe.text_encoder) as override:
        everything = [torch.arange(77), torch.arange(3)]
        with override.rows(everything, [table[ids[0]], table[ids[1][:3]]]):
            through_pipeline = encode_prompts(pipe, [PROMPT, "zog"]).prompt_embeds
        assert torch.equal(through_pipeline, reference)
        layout = build_slots(pipe.tokenizer, PROMPT, 1, "replace", words=["Pip"])
        original = table[ids[0][layout.slots]]
        assert torch.equal(encode_layouts(pipe, override, [layout], original), single)
        assert torch.equal(encode_ids(pipe, ids[0][None]), single)
        assert torch.equal(encode_prompts(pipe, [PROMPT]).prompt_embeds, single)  # inactive: passes through


def test_token_embedding_finds_both_transformers_layouts():
    pipe = tiny()
    table = token_embedding(pipe.text_encoder)
    wrapped = torch.nn.Module()
    wrapped.text_model = pipe.text_encoder  # transformers 4 nests the modules under text_model
    assert token_embedding(wrapped) is table


def test_slot_builders_place_tokens_where_stated():
    tokenizer = tiny().tokenizer
    words = tokenizer(PROMPT, add_special_tokens=False).input_ids  # a, picture, of, pip
    n = len(words)
    prefix = build_slots(tokenizer, PROMPT, 3, "prefix")
    assert prefix.slots.tolist() == [1, 2, 3] and prefix.input_ids[4 : 4 + n].tolist() == words
    suffix = build_slots(tokenizer, PROMPT, 2, "suffix")
    assert suffix.slots.tolist() == [1 + n, 2 + n] and suffix.input_ids[3 + n] == tokenizer.eos_token_id
    replace = build_slots(tokenizer, PROMPT, 2, "replace", words=["Pip"])
    assert replace.slots.tolist() == [4, 5] and replace.input_ids[1:4].tolist() == words[:3]
    interleave = build_slots(tokenizer, PROMPT, 1, "interleave", every=3)  # P4D-K: a slot before every 3 tokens
    assert interleave.slots.tolist() == [1, 5]
    assert interleave.input_ids[[2, 3, 4, 6]].tolist() == words
    free = build_slots(tokenizer, PROMPT, 4, "free")
    assert free.slots.tolist() == [1, 2, 3, 4] and free.input_ids[5] == tokenizer.eos_token_id and free.length == 6
    for layout in (prefix, suffix, replace, interleave, free):
        assert layout.input_ids[0] == tokenizer.bos_token_id and len(layout.input_ids) == 77
    cat = tokenizer("cat", add_special_tokens=False).input_ids[0]
    assert slot_text(tokenizer, replace, torch.tensor([cat, cat])) == "a picture of cat cat"
    with pytest.raises(AttackError, match="does not name"):
        build_slots(tokenizer, "a drawing of zog", 1, "replace", words=["Pip"])
    with pytest.raises(AttackError, match="at most 77"):
        build_slots(tokenizer, PROMPT, 80, "prefix")


def reference_projection(v, iterations=200):
    """Bisection on theta in float64: sum(max(v - theta, 0)) = 1."""
    v = v.double()
    low, high = v.min(-1, keepdim=True).values - 1, v.max(-1, keepdim=True).values
    for _ in range(iterations):
        mid = (low + high) / 2
        too_big = (v - mid).clamp_min(0).sum(-1, keepdim=True) > 1
        low, high = torch.where(too_big, mid, low), torch.where(too_big, high, mid)
    return (v - (low + high) / 2).clamp_min(0)


def test_simplex_projection_is_exact_and_idempotent():
    generator = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 10.0):
        v = torch.randn(6, 50, generator=generator, dtype=torch.float64) * scale
        p = project_simplex(v)
        assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-12)
        torch.testing.assert_close(p, reference_projection(v), rtol=0, atol=1e-12)
        torch.testing.assert_close(project_simplex(p), p, rtol=0, atol=1e-15)
        # optimality (KKT): v - p is theta on the support and <= theta off it
        theta = (v - p)[p > 0].reshape(-1)
        assert theta.numel() and (v - p)[p == 0].max() <= theta.max() + 1e-12 if (p == 0).any() else True
    vertex = torch.zeros(1, 5, dtype=torch.float64)
    vertex[0, 2] = 1
    assert torch.equal(project_simplex(vertex), vertex)


def test_parametrisations_give_rows_of_the_right_kind():
    pipe = tiny()
    table = token_embedding(pipe.text_encoder).weight.detach()
    vocab = vocabulary_ids(pipe.tokenizer)
    generator = torch.Generator().manual_seed(0)
    pez = make_parametrisation("pez", table, vocab, 2, generator=generator)
    with torch.no_grad():
        pez.weight.add_(0.01 * torch.randn(pez.weight.shape, generator=generator))
    rows = pez.rows()
    assert any(torch.equal(rows[0], table[i]) for i in vocab) and rows.requires_grad
    rows.sum().backward()
    assert pez.weight.grad is not None  # the gradient at the projection lands on the soft copy
    simplex = make_parametrisation("simplex", table, vocab, 3)
    assert torch.allclose(simplex.weight.sum(-1), torch.ones(3))
    drawn = simplex.rows(generator)
    assert all(any(torch.equal(row, table[i]) for i in vocab) for row in drawn)
    (drawn.sum() * 1e6).backward()
    assert simplex.weight.grad.abs().max() <= 1.0  # straight-through gradient clipped to [-1, 1]
    assert make_parametrisation("token", table, vocab, 5, [3]).weight.shape == (1, table.shape[1])
    with pytest.raises(AttackError, match="Unknown parametrisation"):
        make_parametrisation("gumbel", table, vocab, 1)


def falls(losses, window=3):
    return sum(losses[-window:]) / window < sum(losses[:window]) / window


@pytest.mark.parametrize("kind", ["denoise", "match", "embed"])
def test_each_objective_falls_over_a_few_steps(kind):
    pipe = tiny()
    ctx = AttackContext(pipe, tiny_edit(pipe), brightness_judge, red_selector, steps=2)
    rows = evaluation_rows(CONCEPT)
    layouts = [build_slots(pipe.tokenizer, r.prompt, 2, "prefix") for r in rows]
    table = token_embedding(pipe.text_encoder).weight.detach()
    param = make_parametrisation("soft", table, vocabulary_ids(pipe.tokenizer), 2, generator=torch.Generator())
    if kind == "denoise":
        objective = DenoiseObjective(concept_latents(ctx, rows), torch.arange(2), 4, timesteps=torch.tensor([300]))
    elif kind == "match":
        latents = concept_latents(ctx, rows)
        generator = torch.Generator().manual_seed(0)
        objective = MatchObjective.bank(ctx, latents, [r.prompt for r in rows], torch.arange(2), 4, 4, generator)
    else:
        objective = EmbedObjective(encode_prompts(pipe, ["a drawing of zog", "a drawing of zog"]).prompt_embeds)

    def loss(seed):  # common random numbers: the same draws of (sample, t, eps) before and after training
        with torch.no_grad(), ctx.model("edited"), EmbeddingOverride(pipe.text_encoder) as override:
            embeds = encode_layouts(pipe, override, layouts, param.rows())
            return float(objective.loss(pipe, embeds, 0, 1, torch.Generator().manual_seed(seed)))

    before = [loss(seed) for seed in range(2)]
    lr = 0.2 if kind == "denoise" else 0.05
    optimise(ctx, layouts, param, objective, steps=6, lr=lr, generator=torch.Generator().manual_seed(9))
    after = [loss(seed) for seed in range(2)]
    assert sum(after) < sum(before), (before, after)


def test_optimise_refuses_no_budget():
    pipe = tiny()
    ctx = AttackContext(pipe, None, brightness_judge, red_selector)
    table = token_embedding(pipe.text_encoder).weight.detach()
    param = make_parametrisation("soft", table, vocabulary_ids(pipe.tokenizer), 1)
    with pytest.raises(AttackError, match="budget of 0"):
        optimise(ctx, [], param, EmbedObjective(torch.zeros(1)), steps=0, lr=0.1)


@pytest.mark.parametrize("kind", ["soft", "pez", "simplex"])
def test_snapshots_record_the_curve_without_changing_the_run(kind):
    pipe = tiny()
    ctx = AttackContext(pipe, None, brightness_judge, red_selector)
    layouts = [build_slots(pipe.tokenizer, PROMPT, 2, "prefix")]
    table = token_embedding(pipe.text_encoder).weight.detach()
    target = EmbedObjective(encode_prompts(pipe, ["a drawing of zog"]).prompt_embeds)

    def run(**kwargs):
        param = make_parametrisation(kind, table, vocabulary_ids(pipe.tokenizer), 2, generator=torch.Generator())
        found = optimise(ctx, layouts, param, target, steps=4, lr=0.05, generator=torch.Generator().manual_seed(3),
                         **kwargs)  # fmt: skip
        return found

    plain, curved, short = run(), run(snapshot_steps=(1, 3)), None
    assert torch.equal(plain.rows, curved.rows) and plain.losses == curved.losses  # the same run
    assert sorted(curved.snapshots) == [1, 3] and plain.snapshots == {}
    param = make_parametrisation(kind, table, vocabulary_ids(pipe.tokenizer), 2, generator=torch.Generator())
    short = optimise(ctx, layouts, param, target, steps=3, lr=0.05, generator=torch.Generator().manual_seed(3))
    assert short.losses == curved.losses[:3], (short.losses, curved.losses)
    assert torch.equal(curved.snapshots[3], short.rows)  # a snapshot is what a shorter run ends with
    with pytest.raises(AttackError, match="snapshot step 5"):
        run(snapshot_steps=(5,))
