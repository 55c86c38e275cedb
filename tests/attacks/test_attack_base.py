import numpy as np
import pytest
import torch
from attack_helpers import (
    CONCEPT,
    NeighbourJudge,
    brightness_judge,
    red_selector,
    tiny,
    tiny_edit,
    unet_fingerprint,
)

import erasure.attacks as attacks
from erasure.attacks.base import AttackConfig, AttackError, evaluation_rows, neighbour_rows, replace_words
from erasure.attacks.context import AttackContext
from erasure.attacks.sampler import decode, eta_ddim_step, sample, seeded_noise
from erasure.concepts import Concept
from erasure.diffusion import encode_prompts
from erasure.edit import FingerprintMismatchError
from erasure.generate import generate
from erasure.sampling import ddim_scheduler


def context(pipe, edit=None, **kwargs):
    return AttackContext(pipe, edit, brightness_judge, red_selector, steps=3, **kwargs)


def test_registry_lists_every_attack_with_both_presets():
    assert {"paraphrase", "trajectory", "noise", "inversion", "inpaint"} <= set(attacks.attack_names())
    for name in attacks.attack_names():
        for preset in ("toy", "paper"):
            attack = attacks.get_attack(name, preset=preset)
            assert attack.name == name and attack.surface in ("text", "embedding", "weights", "trajectory")
    with pytest.raises(ValueError, match="unknown attack"):
        attacks.get_attack("nope")
    with pytest.raises(AttackError, match="no preset"):
        attacks.get_attack("noise", preset="fast")
    with pytest.raises(AttackError, match="no option"):
        attacks.get_attack("noise", etaz=(1.0,))


def test_a_budget_of_zero_is_refused():
    with pytest.raises(AttackError, match="budget of 0"):
        attacks.get_attack("inversion", steps=0)
    with pytest.raises(AttackError, match="budget of 0"):
        attacks.get_attack("paraphrase", seeds=0)
    assert isinstance(attacks.get_attack("paraphrase", rewordings=0).config, AttackConfig)


def test_selector_may_not_be_the_judge_without_the_flag():
    pipe = tiny()
    with pytest.raises(AttackError, match="selector is the judge"):
        AttackContext(pipe, None, brightness_judge, brightness_judge)
    ctx = AttackContext(pipe, None, brightness_judge, brightness_judge, allow_selector_as_judge=True)
    assert ctx.settings()["selector_is_judge"] is True


def test_an_edit_from_another_base_is_refused():
    edit = tiny_edit(tiny())
    from erasure.testing import tiny_pipeline

    other = tiny_pipeline("sd1", seed=1)
    with pytest.raises(FingerprintMismatchError, match="differ from those the edit was made from"):
        context(other, edit)


def test_a_concept_without_evaluate_prompts_is_refused():
    concept = Concept(name="Pip", kind="character", erase=("pip",))
    with pytest.raises(AttackError, match="no evaluate prompts"):
        evaluation_rows(concept)
    with pytest.raises(AttackError, match="no evaluate prompts"):
        attacks.get_attack("trajectory").run(context(tiny()), concept)


def test_evaluation_rows_follow_the_evaluators_seeds_and_case_numbers():
    rows = evaluation_rows(CONCEPT, images_per_prompt=2, base_seed=5)
    assert [(r.prompt, r.evaluation_seed) for r in rows] == [
        ("an image of pip", 5), ("an image of pip", 6), ("a drawing of pip", 5), ("a drawing of pip", 6),
    ]  # fmt: skip
    assert [r.case_number for r in rows] == [0, 1, 2, 3]
    assert replace_words("A picture of Pip and pip!", ["Pip"], "<x>") == "A picture of <x> and <x>!"


def test_model_blocks_apply_and_revert_the_edit_exactly():
    pipe = tiny()
    edit = tiny_edit(pipe)
    before = unet_fingerprint(pipe)
    ctx = context(pipe, edit)
    with ctx.model("edited"):
        edited = unet_fingerprint(pipe)
        assert edited != before
        with ctx.model("base"):
            assert unet_fingerprint(pipe) == before
        assert unet_fingerprint(pipe) == edited
    assert unet_fingerprint(pipe) == before
    with pytest.raises(RuntimeError), ctx.model("edited"):
        raise RuntimeError("boom")
    assert unet_fingerprint(pipe) == before and ctx.state == "base"


def test_the_sampler_is_the_pipelines_generation():
    pipe = tiny()
    prompts, seeds = ["a cat", "pip"], [1, 2]
    reference = generate(pipe, prompts, seeds, steps=3, guidance_scale=7.5, progress=False)
    latents, generators = seeded_noise(pipe, seeds)
    ours = decode(pipe, sample(pipe, encode_prompts(pipe, prompts), latents, steps=3, guidance=7.5))
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def test_eta_ddim_with_eta_zero_is_ddim_and_with_eta_one_is_diffusers_eta_one():
    pipe = tiny()
    for prediction in ("epsilon", "v_prediction"):
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
        scheduler = ddim_scheduler(pipe, 10)
        x, out, z = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        for t in scheduler.timesteps[[0, 4, 9]]:
            ours = eta_ddim_step(scheduler, out, t, x, eta=0.0)
            theirs = scheduler.step(out, t, x, eta=0.0, return_dict=False)[0]
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
            ours = eta_ddim_step(scheduler, out, t, x, eta=1.0, variance_scale=1.0, noise=z)
            theirs = scheduler.step(out, t, x, eta=1.0, variance_noise=z, return_dict=False)[0]
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # v scales only the added noise: x(v) - x(0-noise) is v times the eta noise term
    a = eta_ddim_step(scheduler, out, t, x, eta=1.5, variance_scale=1.0, noise=z)
    b = eta_ddim_step(scheduler, out, t, x, eta=1.5, variance_scale=2.0, noise=z)
    c = eta_ddim_step(scheduler, out, t, x, eta=1.5, variance_scale=1.0, noise=torch.zeros_like(z))
    torch.testing.assert_close(b - c, 2 * (a - c), rtol=1e-5, atol=1e-6)


def test_cost_meter_counts_a_known_generation_exactly():
    pipe = tiny()
    ctx = context(pipe)
    for guidance, rows_per_image in ((7.5, 2), (1.0, 1)):
        with ctx.meter() as meter:
            generate(pipe, ["a cat", "pip", "zog"], [0, 1, 2], steps=4, guidance_scale=guidance, progress=False)
        counts = meter.summary()
        assert counts["unet_forwards"] == 4  # one batched UNet call per step
        assert counts["unet_forward_rows"] == 4 * 3 * rows_per_image  # steps x images x (2 with CFG)
        assert counts["unet_backwards"] == 0
        assert counts["text_encoder_forwards"] == (2 if guidance > 1 else 1)
        assert counts["seconds"] > 0
    with ctx.meter() as meter:
        x = torch.randn(2, 4, 32, 32)
        cond = encode_prompts(pipe, ["pip", "pip"]).prompt_embeds
        pipe.unet(x.requires_grad_(), 10, encoder_hidden_states=cond).sample.sum().backward()
    assert meter.summary()["unet_backwards"] == 1 and meter.summary()["unet_backward_rows"] == 2


def test_best_of_judges_only_the_selected_variant():
    pipe = tiny()
    judged = []

    def judge(images):
        judged.append(len(images))
        return [True] * len(images)

    ctx = AttackContext(pipe, None, judge, red_selector)
    rows = evaluation_rows(CONCEPT)
    dark, red = np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8)
    red[..., 0] = 200
    hits, picked, records = ctx.best_of(rows, [dark, red], [{"v": 0}, {"v": 1}], model="edited", attack="x")
    assert judged == [2] and hits == [True, True] and (picked == red).all()
    assert [r["selected"] for r in records] == [False, False, True, True]


def test_every_attack_module_registers_an_attack_and_shared_modules_none():
    """A new shared module must be listed in _SHARED_MODULES, or the registry would import it as an attack."""
    import pkgutil

    import erasure.attacks as attacks

    by_module = {cls.__module__.rpartition(".")[2] for cls in attacks.ATTACKS.values()}
    modules = {m.name for m in pkgutil.iter_modules(attacks.__path__) if not m.name.startswith("_")}
    assert modules - attacks._SHARED_MODULES == by_module, "list shared modules in erasure/attacks/_SHARED_MODULES"
    assert not by_module & attacks._SHARED_MODULES


def test_neighbour_cost_judges_the_neighbour_rows_of_both_models_under_the_given_sampling():
    pipe = tiny()
    judge = NeighbourJudge()
    ctx = AttackContext(pipe, tiny_edit(pipe, scale=0.5), judge, red_selector, steps=2, images_per_prompt=3)
    cost = ctx.neighbour_cost(CONCEPT, eta=1.5)
    (base_images, prompts), (edited_images, again) = judge.seen
    assert prompts == again == ["a drawing of zog"] * 3  # the evaluate_preserve rows, 3 seeds each
    seeds = [r.evaluation_seed for r in neighbour_rows(CONCEPT, 3)]
    assert np.array_equal(edited_images, ctx.generate("edited", prompts, seeds, eta=1.5))
    assert not np.array_equal(edited_images, ctx.generate("edited", prompts, seeds))  # the sampling was applied
    assert np.array_equal(base_images, ctx.generate("base", prompts, seeds, eta=1.5))
    flags = [judge.follows_prompt(images, neighbour_rows(CONCEPT, 3))[::2] for images in (base_images, edited_images)]
    assert cost["n"] == 2 and cost["sampling"] == {"eta": 1.5}  # images without a verdict are left out
    assert cost["base"]["rate"] == np.mean(flags[0]) and cost["edited"]["rate"] == np.mean(flags[1])
    if cost["base"]["rate"]:
        assert cost["ratio"] == pytest.approx(cost["edited"]["rate"] / cost["base"]["rate"])


def test_neighbour_cost_of_the_base_is_one_and_is_none_without_a_neighbour_test_or_neighbours():
    pipe = tiny()

    class AlwaysFollows(NeighbourJudge):
        def follows_prompt(self, images, rows):
            return [True] * len(images)

    same = AttackContext(pipe, None, AlwaysFollows(), red_selector, steps=2, images_per_prompt=2)
    cost = same.neighbour_cost(CONCEPT, eta=1.0)
    assert cost["ratio"] == 1.0 and cost["ratio_interval"] == [1.0, 1.0] and cost["n"] == 2
    plain = AttackContext(pipe, None, brightness_judge, red_selector, steps=2)
    assert plain.neighbour_cost(CONCEPT) is None  # a judge without a neighbour test
    lonely = Concept(name="Pip", kind="character", erase=("pip",), evaluate=("an image of pip",))
    assert same.neighbour_cost(lonely) is None


def test_control_is_refused_by_attacks_that_do_not_run_it():
    from erasure.attacks import get_attack

    for name in ("noise", "inpaint"):
        assert get_attack(name, "toy", control=True).config.control
    for name in ("paraphrase", "trajectory", "inversion", "relearning"):
        with pytest.raises(AttackError, match="no base-model control run"):
            get_attack(name, "toy", control=True)
