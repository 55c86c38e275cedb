import numpy as np
import pytest
import torch
from attack_helpers import CONCEPT, NeighbourJudge, brightness_judge, red_selector, tiny, tiny_edit, unet_fingerprint

import erasure.attacks as attacks
from erasure.attacks.base import AttackError, evaluation_rows
from erasure.attacks.context import AttackContext
from erasure.attacks.inpaint import centre_mask, inpaint
from erasure.attacks.relearning import Relearning
from erasure.attacks.ring_a_bell import RingABellDiscreteConfig, genetic_search
from erasure.attacks.trajectory import complete
from erasure.concepts import Concept
from erasure.edit import fingerprint
from erasure.generate import generate

STEPS = 2
#: Budgets that keep every registered attack to seconds on the tiny pipeline.
TINY = {
    "paraphrase": {"rewordings": 1, "seeds": 1},
    "trajectory": {"handoffs": (1,)},
    "noise": {"etas": (1.5,), "variance_scales": (1.04,), "control": True},
    "inpaint": {"control": True},
    "ring_a_bell": {"etas": (3.0,)},
    "ring_a_bell_discrete": {"tokens": 3, "population": 4, "generations": 2},
    "unlearndiffatk": {"steps": 2, "batch_size": 2, "eval_every": 1},
    "p4d": {"steps": 2, "batch_size": 2, "bank": 4, "eval_every": 0},
    "inversion": {"steps": 2, "batch_size": 2, "images": 2},
    "relearning": {"checkpoints": (1, 2), "batch_size": 2, "images": 2, "lr": 1e-2},
    "resurgence": {"checkpoints": (1,), "batch_size": 2, "images": 2, "lr": 1e-2},
}


def context(pipe, edit, **kwargs):
    return AttackContext(pipe, edit, brightness_judge, red_selector, steps=STEPS, **kwargs)


def close(a, b):
    return np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_completion_with_k_zero_is_the_edited_generation_and_k_n_the_base_generation():
    pipe = tiny()
    edit = tiny_edit(pipe, scale=0.5)
    ctx = context(pipe, edit)
    prompts, seeds = ["a picture of pip", "pip"], [3, 4]
    k0, kn = complete(ctx, prompts, seeds, [0, STEPS])
    base = generate(pipe, prompts, seeds, steps=STEPS, progress=False)
    with edit.applied(pipe):
        edited = generate(pipe, prompts, seeds, steps=STEPS, progress=False)
    assert not close(base, edited)  # the edit changes the images, so the two checks are not the same check
    assert close(k0, edited) and close(kn, base)
    with pytest.raises(AttackError, match="handoff"):
        complete(ctx, prompts, seeds, [STEPS + 1])


def test_completion_finished_by_another_model_hands_it_the_base_trajectory():
    """The reference control: with ``finisher``, k = 0 is the finisher's own generation and k = N the base's."""
    from erasure.testing import tiny_pipeline

    pipe = tiny()
    other = tiny_pipeline("sd1", seed=1)
    other.vae.load_state_dict(pipe.vae.state_dict())  # a model of the base's latent space, another UNet
    ctx, finisher = context(pipe, None), context(other, None)
    prompts, seeds = ["a picture of pip", "pip"], [3, 4]
    k0, kn = complete(ctx, prompts, seeds, [0, STEPS], finisher=finisher)
    base = generate(pipe, prompts, seeds, steps=STEPS, progress=False)
    own = generate(other, prompts, seeds, steps=STEPS, progress=False)
    assert not close(base, own)
    assert close(k0, own) and close(kn, base)


def test_latent_space_mismatch_names_what_differs():
    from erasure.attacks.models import latent_space_mismatch

    pipe, twin = tiny(), tiny()
    assert latent_space_mismatch(pipe, twin, STEPS) is None
    twin.vae.register_to_config(scaling_factor=0.5)
    assert "scaling_factor" in latent_space_mismatch(pipe, twin, STEPS)
    twin = tiny()
    with torch.no_grad():
        next(twin.vae.parameters()).add_(1.0)
    assert latent_space_mismatch(pipe, twin, STEPS) == "its VAE differs from the base model's"
    twin = tiny()
    twin.scheduler.register_to_config(prediction_type="v_prediction")
    assert "predicts v_prediction" in latent_space_mismatch(pipe, twin, STEPS)


def test_noise_probe_with_eta_zero_is_ddim():
    pipe = tiny()
    ctx = context(pipe, None)
    plain = ctx.generate("edited", ["pip"], [5])
    assert np.array_equal(ctx.generate("edited", ["pip"], [5], eta=0.0, variance_scale=1.04), plain)
    assert not np.array_equal(ctx.generate("edited", ["pip"], [5], eta=1.0), plain)
    assert attacks.get_attack("noise", etas=(0.0, 1.0), variance_scales=(1.0, 1.04)).config.grid() == [
        (0.0, 1.0), (1.0, 1.0), (1.0, 1.04),
    ]  # fmt: skip


def test_the_noise_probe_measures_the_neighbours_at_the_setting_it_picked_most_often():
    pipe = tiny()
    ctx = AttackContext(pipe, tiny_edit(pipe), NeighbourJudge(), red_selector, steps=STEPS, images_per_prompt=2)
    probe = attacks.get_attack("noise", etas=(1.0, 1.5), variance_scales=(1.04,))
    result = probe.run(ctx, CONCEPT)
    picked = [(r["params"]["eta"], r["params"]["variance_scale"]) for r in result.records if r["selected"]]
    most = max(set(picked), key=lambda p: (picked.count(p), -picked.index(p)))  # ties: the first picked
    assert result.neighbour_cost["sampling"] == {"eta": most[0], "variance_scale": most[1]}
    assert result.neighbour_cost == ctx.neighbour_cost(CONCEPT, eta=most[0], variance_scale=most[1])
    off = attacks.get_attack("noise", etas=(1.5,), variance_scales=(1.04,), neighbours=False).run(ctx, CONCEPT)
    assert off.neighbour_cost is None


def test_inpainting_with_an_all_keep_mask_returns_the_base_images_vae_round_trip():
    pipe = tiny()
    ctx = context(pipe, tiny_edit(pipe))
    rows = evaluation_rows(CONCEPT)
    base = ctx.base_images(rows)
    keep = torch.zeros(1, 1, 32, 32)
    filled = inpaint(ctx, "edited", [r.prompt for r in rows], [r.evaluation_seed for r in rows], base, keep)
    from erasure.attacks.sampler import decode
    from erasure.sampling import images_to_latents

    round_trip = decode(pipe, images_to_latents(pipe, base, sample=False))
    assert np.array_equal(filled, round_trip)
    mask = centre_mask(32, 32, 0.5)
    assert mask.sum() == 256 and mask[0, 0, 8:24, 8:24].all()


def test_inversion_round_trips_through_load_textual_inversion(tmp_path):
    pipe = tiny()
    before_unet, before_text = unet_fingerprint(pipe), fingerprint(dict(pipe.text_encoder.named_parameters()))
    vocabulary = len(pipe.tokenizer)
    ctx = context(pipe, tiny_edit(pipe))
    result = attacks.get_attack("inversion", **TINY["inversion"]).run(ctx, CONCEPT)
    assert len(result.notes["losses"]) == 2 and result.prompts[0].prompt == "an image of <concept>"
    assert len(pipe.tokenizer) == vocabulary  # the token is gone again, and every tensor is as it was
    assert unet_fingerprint(pipe) == before_unet
    assert fingerprint(dict(pipe.text_encoder.named_parameters())) == before_text
    from erasure.attacks.override import save_learned_embeds, token_embedding

    vector = result.embeddings["<concept>"]
    path = save_learned_embeds(tmp_path / "learned_embeds.safetensors", "<concept>", vector)
    pipe.load_textual_inversion(str(path), token="<pip-token>")
    token_id = pipe.tokenizer.convert_tokens_to_ids("<pip-token>")
    table = token_embedding(pipe.text_encoder).weight
    assert torch.equal(table[token_id], vector.to(table))
    assert torch.equal(table[:vocabulary], token_embedding(tiny().text_encoder).weight)
    assert unet_fingerprint(pipe) == before_unet


@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_every_registered_attack_runs_judges_its_rows_and_restores_the_pipeline(name):
    assert name in TINY, f"give {name} a tiny budget in TINY"
    pipe = tiny()
    before = unet_fingerprint(pipe)
    ctx = context(pipe, tiny_edit(pipe))
    result = attacks.get_attack(name, **TINY[name]).run(ctx, CONCEPT)
    rows = evaluation_rows(CONCEPT)
    assert result.attack == name and len(result.hits) == len(rows) == len(result.images)
    assert all(isinstance(hit, bool) for hit in result.hits)
    assert result.cost["unet_forwards"] > 0 and result.cost["seconds"] > 0
    assert sum(r["selected"] and r["model"] == "edited" for r in result.records) == len(rows)
    if TINY[name].get("control"):
        assert result.base_hits is not None and len(result.base_hits) == len(rows)
    for row in result.prompts:
        assert row.extra["attack"] == name
    assert unet_fingerprint(pipe) == before and ctx.state == "base"


def test_resurgence_trains_on_the_neighbours_and_a_lora_relearning_leaves_the_weights_alone():
    pipe = tiny()
    edit = tiny_edit(pipe)
    ctx = context(pipe, edit)
    seen = []
    images = ctx.base_images

    def recording(rows):
        seen.extend(r.prompt for r in rows)
        return images(rows)

    ctx.base_images = recording
    attacks.get_attack("resurgence", **TINY["resurgence"]).run(ctx, CONCEPT)
    assert set(seen[: TINY["resurgence"]["images"]]) <= set(CONCEPT.preserve)  # never the concept's prompts
    before = unet_fingerprint(pipe)
    weights = {k: p.detach().clone() for k, p in pipe.unet.named_parameters() if k.endswith("attn2.to_k.weight")}
    lora = attacks.get_attack("relearning", **TINY["relearning"] | {"rank": 2})
    assert isinstance(lora, Relearning)
    result = lora.run(ctx, CONCEPT)  # the LoRA hooks add B A to the outputs; the weights are never written
    assert result.notes["weight_distance"] > 0 and unet_fingerprint(pipe) == before
    assert all(torch.equal(p, weights[k]) for k, p in pipe.unet.named_parameters() if k in weights)
    with pytest.raises(AttackError, match="rank must be"):
        attacks.get_attack("relearning", rank=-1)
    with pytest.raises(AttackError, match="no preserve prompts"):
        lonely = Concept(name="Pip", kind="character", erase=("pip",), evaluate=("an image of pip",))
        attacks.get_attack("resurgence", **TINY["resurgence"]).run(ctx, lonely)


def test_the_genetic_search_climbs_to_the_fittest_string():
    target = torch.tensor([3, 7, 11, 15])

    def fitness(strings):
        return (strings == target).sum(dim=1).float()

    config = RingABellDiscreteConfig(tokens=4, population=32, generations=60)
    best, history = genetic_search(fitness, torch.arange(20), config, torch.Generator().manual_seed(0))
    assert all(b >= a for a, b in zip(history, history[1:], strict=False))  # the best so far never gets worse
    assert torch.equal(best, target) and history[-1] == 4


def test_ring_a_bell_discrete_finds_typed_prompts_that_replay():
    pipe = tiny()
    ctx = context(pipe, tiny_edit(pipe))
    result = attacks.get_attack("ring_a_bell_discrete", **TINY["ring_a_bell_discrete"]).run(ctx, CONCEPT)
    found = result.notes["found"]
    assert set(found) == set(CONCEPT.evaluate) and all(isinstance(text, str) and text for text in found.values())
    assert [row.prompt for row in result.prompts] == [found[r.prompt] for r in evaluation_rows(CONCEPT)]


def test_inversion_judges_a_curve_whose_last_point_is_its_result():
    pipe = tiny()
    ctx = context(pipe, tiny_edit(pipe))
    config = TINY["inversion"] | {"steps": 3, "checkpoints": (1, 2, 7)}  # 7 lies past the run: not a point
    result = attacks.get_attack("inversion", **config).run(ctx, CONCEPT)
    assert [point["steps"] for point in result.curve] == [1, 2, 3]
    assert result.curve[-1]["hits"] == result.hits and len(result.notes["losses"]) == 3
    selected = [r for r in result.records if r["selected"]]
    assert len(selected) == len(result.hits) and {r["params"]["steps"] for r in selected} == {3}
    assert len(result.records) == 3 * len(result.hits)
    with pytest.raises(AttackError, match="increasing"):
        attacks.get_attack("inversion", checkpoints=(2, 1))
