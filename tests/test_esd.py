import contextlib
import copy

import pytest
import torch
from diffusers import DDIMScheduler

import erasure.methods.esd as esd_module
import erasure.sampling as sampling_module
from erasure.concepts import Concept, EraseRequest
from erasure.diffusion import Conditioning, encode_prompts, predict_noise, unconditional_conditioning
from erasure.methods import METHODS, PRESETS, get_method
from erasure.methods.base import NonFiniteEditError, select_unet_parameters
from erasure.methods.esd import (
    ESD,
    ESDConfig,
    adam_steps_in_backward,
    esd_target,
    gradient_checkpointing,
    original_weights,
)
from erasure.sampling import ddim_scheduler, initial_noise
from erasure.testing import tiny_pipeline

PIP = EraseRequest((Concept(name="pip", kind="character", erase=("a picture of pip",)),))
FAST = {"iterations": 3, "ddim_steps": 3, "resolution": 16, "preset": "paper"}  # the per-iteration trajectory samplers


# --- maths ------------------------------------------------------------------------------------------------------


def test_target_is_negative_guidance_from_the_anchor():
    out_c, out_a = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for eta in (0.5, 1.0, 2.0):
        target = esd_target(out_c, out_a, eta)
        torch.testing.assert_close(target - out_a, -eta * (out_c - out_a))  # Eq. 7
    torch.testing.assert_close(esd_target(out_c, out_a, 1.0), 2 * out_a - out_c)


def test_v_space_target_is_the_v_of_the_epsilon_target():
    """For fixed (x_t, t), v is affine in eps with weights summing to 1, so Eq. 7 commutes with eps -> v."""
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    generator = torch.Generator().manual_seed(0)
    x_t, eps_c, eps_a = (torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([10, 500, 990])
    abar = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)

    def velocity(eps):  # diffusers' get_velocity(x_0, eps, t) with x_0 recovered from x_t
        x_0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        return scheduler.get_velocity(x_0, eps, t)

    for eta in (1.0, 2.0):
        v_target = esd_target(velocity(eps_c), velocity(eps_a), eta)
        torch.testing.assert_close(v_target, velocity(esd_target(eps_c, eps_a, eta)))


# --- config and registry ----------------------------------------------------------------------------------------


def test_variants_are_registered_with_their_parameter_sets():
    expected = {"esd-x": "xattn", "esd-u": "noxattn", "esd-x-strict": "xattn_kv", "esd-all": "unet"}
    for name, parameters in expected.items():
        assert METHODS[name] is ESD and PRESETS[name] == {"parameters": parameters}
        method = get_method(name)
        assert method.name == name and method.config.parameters == parameters


def test_presets_fill_only_unset_fields():
    assert ESDConfig().preset == "fast" and ESDConfig() == ESDConfig(preset="fast")  # the default
    paper = ESDConfig(preset="paper")
    assert (paper.iterations, paper.lr, paper.eta, paper.sampler) == (1000, 1e-5, 1.0, "edited")
    newer = ESDConfig(preset="diffusers", iterations=7, lr="1e-4")
    assert (newer.iterations, newer.lr, newer.eta, newer.sampler) == (7, 1e-4, 1.0, "frozen")
    assert isinstance(newer.lr, float)
    assert ESDConfig.from_dict(newer.to_dict()) == newer
    for bad in ({"preset": "x"}, {"sampler": "x"}, {"parameters": "text_encoder"}, {"eta": 0}, {"lr": -1.0}):
        with pytest.raises(ValueError):
            ESDConfig(**bad)


# --- frozen weights ---------------------------------------------------------------------------------------------


def test_original_weights_swap_in_and_back():
    pipe = tiny_pipeline("sd1")
    reference = copy.deepcopy(pipe)
    trained = list(select_unet_parameters(pipe.unet, "xattn").values())
    originals = [p.detach().clone() for p in trained]
    with torch.no_grad():
        for p in trained:
            p.add_(0.05)
    after_training = [p.detach().clone() for p in trained]
    cond = encode_prompts(pipe, ["a picture of pip"])
    x = initial_noise(pipe, 1, 16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = predict_noise(reference, x, 500, cond)
        with original_weights(trained, originals):
            torch.testing.assert_close(predict_noise(pipe, x, 500, cond), expected, rtol=0, atol=0)
        assert not torch.allclose(predict_noise(pipe, x, 500, cond), expected)
    assert all(torch.equal(p, q) for p, q in zip(trained, after_training, strict=True))
    with pytest.raises(RuntimeError, match="boom"), original_weights(trained, originals):
        raise RuntimeError("boom")
    assert all(torch.equal(p, q) for p, q in zip(trained, after_training, strict=True))


@pytest.mark.parametrize("sampler", ["frozen", "edited"])
def test_frozen_predictions_are_the_original_models_throughout_training(monkeypatch, sampler):
    pipe = tiny_pipeline("sd1")
    reference = copy.deepcopy(pipe)
    frozen_calls, sampling_calls = [], []

    def compare(calls):
        def wrapped(p, latents, t, cond, *args, **kwargs):
            out = predict_noise(p, latents, t, cond, *args, **kwargs)
            with torch.no_grad():
                calls.append(torch.allclose(out, predict_noise(reference, latents, t, cond, *args, **kwargs)))
            return out

        return wrapped

    def esd_predict(p, latents, t, cond, *args, **kwargs):
        if torch.is_grad_enabled():  # eps_theta(x_t, c, t): the model being trained
            return predict_noise(p, latents, t, cond, *args, **kwargs)
        return compare(frozen_calls)(p, latents, t, cond, *args, **kwargs)

    monkeypatch.setattr(esd_module, "predict_noise", esd_predict)
    monkeypatch.setattr(sampling_module, "predict_noise", compare(sampling_calls))
    config = FAST | {"iterations": 4, "ddim_steps": 3, "lr": 1e-2, "sampler": sampler, "seed": 3}
    edit = get_method("esd-x", **config).apply(pipe, PIP, progress=False)
    assert edit.deltas
    assert len(frozen_calls) == 4 and all(frozen_calls)
    assert sampling_calls, "no DDIM step was taken; pick another seed"
    if sampler == "frozen":
        assert all(sampling_calls)
    else:
        assert not all(sampling_calls)  # after the first update the trajectory comes from the edited model


# --- training -----------------------------------------------------------------------------------------------------


def _unet_training_steps(unet, parameters, steps, *, in_backward, lr=1e-2):
    """``steps`` Adam steps on an MSE loss of the UNet, with one Adam after the backward or steps inside it."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(steps, 1, 4, 8, 8, generator=generator)
    context = torch.randn(steps, 1, 77, unet.config.cross_attention_dim, generator=generator)
    unet.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = None if in_backward else torch.optim.Adam(parameters, lr=lr)
    with contextlib.ExitStack() as stack:
        if in_backward:
            stack.enter_context(adam_steps_in_backward(parameters, lr))
        for step in range(steps):
            loss = unet(latents[step], 500, context[step]).sample.square().mean()
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_adam_steps_in_backward_make_the_same_update_as_one_adam(checkpointing):
    pipe = tiny_pipeline("sd1")
    unet_after, unet_in = pipe.unet, copy.deepcopy(pipe.unet)
    for unet in (unet_after, unet_in):
        unet.train()
    after = list(select_unet_parameters(unet_after, "xattn").values())
    inside = list(select_unet_parameters(unet_in, "xattn").values())
    before = [p.detach().clone() for p in after]
    with gradient_checkpointing(unet_after, checkpointing), gradient_checkpointing(unet_in, checkpointing):
        _unet_training_steps(unet_after, after, 3, in_backward=False)
        _unet_training_steps(unet_in, inside, 3, in_backward=True)
    assert not any(torch.equal(p, q) for p, q in zip(after, before, strict=True))  # every tensor was trained
    for p, q in zip(after, inside, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in inside)
    # the hooks are gone after the block: a further backward only accumulates gradients
    frozen = [p.detach().clone() for p in inside]
    unet_in(torch.randn(1, 4, 8, 8), 500, torch.randn(1, 77, 32)).sample.square().mean().backward()
    assert all(torch.equal(p, q) for p, q in zip(inside, frozen, strict=True))
    assert all(p.grad is not None for p in inside)


def test_adam_steps_in_backward_ignore_gradients_left_from_before():
    pipe = tiny_pipeline("sd1")
    clean, stale = pipe.unet, copy.deepcopy(pipe.unet)
    clean_parameters = list(select_unet_parameters(clean, "xattn").values())
    stale_parameters = list(select_unet_parameters(stale, "xattn").values())
    for parameter in stale_parameters:
        parameter.grad = torch.ones_like(parameter)
    _unet_training_steps(clean, clean_parameters, 1, in_backward=True)
    _unet_training_steps(stale, stale_parameters, 1, in_backward=True)
    assert all(torch.equal(p, q) for p, q in zip(clean_parameters, stale_parameters, strict=True))


def test_adam_steps_in_backward_never_hold_all_gradients():
    """When a tensor's gradient arrives, every tensor stepped before it has already dropped its gradient."""
    pipe = tiny_pipeline("sd1")
    parameters = list(select_unet_parameters(pipe.unet, "xattn").values())
    held = []
    for parameter in parameters:  # registered first, so it runs before the step that drops the gradient
        parameter.register_post_accumulate_grad_hook(
            lambda _: held.append(sum(p.grad is not None for p in parameters))
        )
    _unet_training_steps(pipe.unet, parameters, 1, in_backward=True)
    assert len(held) == len(parameters) > 1
    assert max(held) == 1


def test_cached_sampler_trains_on_frozen_states_and_counts_its_work(monkeypatch):
    """The cached sampler makes its states once with the original weights; each iteration is one forward more."""
    pipe = tiny_pipeline("sd1")
    reference = copy.deepcopy(pipe)
    calls = {"grad": 0, "frozen_rows": 0, "frozen_ok": []}

    def counting(p, latents, t, cond, *args, **kwargs):
        out = predict_noise(p, latents, t, cond, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["grad"] += 1
        else:
            calls["frozen_rows"] += latents.shape[0] * (2 if args and args[0] is not None else 1)
            with torch.no_grad():
                expected = predict_noise(reference, latents, t, cond, *args, **kwargs)
            calls["frozen_ok"].append(torch.equal(out, expected))
        return out

    monkeypatch.setattr(esd_module, "predict_noise", counting)
    monkeypatch.setattr(sampling_module, "predict_noise", counting)
    config = FAST | {"iterations": 6, "ddim_steps": 3, "lr": 1e-2, "preset": "fast", "trajectories": 2, "seed": 4}
    edit = get_method("esd-x", **config).apply(pipe, PIP, progress=False)
    assert edit.deltas and edit.config["stats"]["cached_states"] == 2 * 3
    assert calls["grad"] == 6, "one trained forward per iteration"
    # 2 DDIM steps of 2 trajectories with CFG (2 rows each) + 3 states x 2 trajectories x (concept, anchor)
    assert calls["frozen_rows"] == 2 * 2 * 2 + 3 * 2 * 2
    assert all(calls["frozen_ok"]), "every frozen prediction came from the original weights"


def test_fast_preset_is_diffusers_with_the_cached_sampler():
    fast, newer = ESDConfig(preset="fast"), ESDConfig(preset="diffusers")
    assert (fast.iterations, fast.lr, fast.eta) == (newer.iterations, newer.lr, newer.eta)
    assert fast.sampler == "cached" and newer.sampler == "frozen" and ESDConfig(preset="paper").sampler == "edited"
    with pytest.raises(ValueError, match="trajectories"):
        ESDConfig(preset="fast", trajectories=0)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_esd_objective_falls(family):
    """The Eq. 7 objective on held-out noise (x_t at the first DDIM step) drops after training."""
    pipe = tiny_pipeline(family)
    cond = encode_prompts(pipe, ["a picture of pip"]).expand(4)
    uncond = unconditional_conditioning(pipe, 4)
    x_t = initial_noise(pipe, 4, 16, torch.Generator().manual_seed(123))
    t = ddim_scheduler(pipe, 1).timesteps[0]
    with torch.no_grad():
        out_c, out_a = predict_noise(pipe, torch.cat([x_t, x_t]), t, Conditioning.cat([cond, uncond])).chunk(2)
        target = esd_target(out_c, out_a, 1.0)

    def objective():
        with torch.no_grad():
            return torch.nn.functional.mse_loss(predict_noise(pipe, x_t, t, cond), target).item()

    edit = get_method("esd-x", iterations=10, ddim_steps=1, resolution=16, lr=1e-3).apply(pipe, PIP, progress=False)
    before = objective()
    edit.apply_to(pipe)
    after = objective()
    assert after < 0.6 * before
    stats = edit.config["stats"]
    assert stats["iterations"] == 10 and len(stats["loss_curve"]) == 10
    assert all(torch.isfinite(torch.tensor(stats["loss_curve"])))


@pytest.mark.parametrize("name", ["esd-x", "esd-u", "esd-x-strict", "esd-all"])
def test_only_the_variants_tensors_change(name):
    pipe = tiny_pipeline("sd1")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    method = get_method(name, **FAST, lr=1e-3)
    edit = method.apply(pipe, PIP, progress=False)
    selected = set(select_unet_parameters(pipe.unet, method.config.parameters))
    assert edit.deltas and set(edit.deltas) <= selected
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())  # apply() restores
    keys = list(edit.deltas)
    if name == "esd-x":
        assert all(".attn2." in k for k in keys)
    elif name == "esd-u":
        assert not any(".attn2." in k or k.startswith("unet.time_embedding.") for k in keys)
    elif name == "esd-x-strict":
        assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in keys)
    else:
        assert any(".attn2." in k for k in keys) and any(".attn2." not in k for k in keys)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_esd_runs_on_v_prediction_and_sdxl(family):
    pipe = tiny_pipeline(family)
    request = EraseRequest((Concept(name="pip", kind="character", erase=("pip", "a picture of pip"), anchor="zog"),))
    edit = get_method("esd-x", **FAST, lr=1e-3, sampler="frozen").apply(pipe, request, progress=False)
    assert edit.deltas and all(torch.isfinite(d).all() for d in edit.deltas.values())
    assert edit.config["stats"]["prompts"] == ["pip", "a picture of pip"]


def test_anchor_replaces_the_unconditional_prediction():
    pipe = tiny_pipeline("sd1")
    request = EraseRequest(
        (
            Concept(name="pip", kind="character", erase=("pip", "a picture of pip"), anchor="zog"),
            Concept(name="miro", kind="character", erase=("miro",)),
        )
    )
    prompts, cond, anchor, uncond = get_method("esd-x")._conditionings(pipe, request)
    assert prompts == ["pip", "a picture of pip", "miro"]
    zog = encode_prompts(pipe, ["zog"]).prompt_embeds[0]
    torch.testing.assert_close(anchor.prompt_embeds[0], zog)
    torch.testing.assert_close(anchor.prompt_embeds[1], zog)
    torch.testing.assert_close(anchor.prompt_embeds[2], uncond.prompt_embeds[0])
    _, _, always_uncond, _ = get_method("esd-x", anchor="unconditional")._conditionings(pipe, request)
    torch.testing.assert_close(always_uncond.prompt_embeds, uncond.prompt_embeds.expand(3, -1, -1))


def test_paired_anchors_give_each_erase_prompt_its_own_reference():
    pipe = tiny_pipeline("sd1")
    pairs = {"a striped red circle": "a red circle", "a striped blue square": "", "striped zog": "zog"}
    concept = Concept(name="striped", kind="style", erase=tuple(pairs), anchor=tuple(pairs.values()))
    prompts, _, anchor, uncond = get_method("esd-x")._conditionings(pipe, EraseRequest((concept,)))
    assert prompts == list(pairs)
    for row, reference in enumerate(pairs.values()):
        expected = encode_prompts(pipe, [reference]).prompt_embeds[0] if reference else uncond.prompt_embeds[0]
        torch.testing.assert_close(anchor.prompt_embeds[row], expected)


def test_nan_loss_raises_and_restores(monkeypatch):
    pipe = tiny_pipeline("sd1")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    monkeypatch.setattr(esd_module, "esd_target", lambda c, a, eta: torch.full_like(c, float("nan")))
    with pytest.raises(NonFiniteEditError, match="ESD loss became nan"):
        get_method("esd-x", **FAST).apply(pipe, PIP, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_esd_borrows_the_snapshot_of_apply_and_leaves_it_intact(monkeypatch):
    """Memory: the frozen values are apply()'s own snapshot (no second copy), swapped back after every use."""
    pipe = tiny_pipeline("sd1")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    seen: dict = {"stored": set()}
    real_erase, real_swap = ESD._erase, esd_module.original_weights

    def spy_erase(self, *args, originals=None, **kwargs):
        seen["snapshot"] = {id(tensor) for tensor in originals.values()}
        return real_erase(self, *args, originals=originals, **kwargs)

    def spy_swap(parameters, stored):
        seen["stored"].update(id(tensor) for tensor in stored)
        return real_swap(parameters, stored)

    monkeypatch.setattr(ESD, "_erase", spy_erase)
    monkeypatch.setattr(esd_module, "original_weights", spy_swap)
    edit = get_method("esd-x", **FAST, lr=1e-2).apply(pipe, PIP, progress=False)
    assert seen["stored"] and seen["stored"] == seen["snapshot"]
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())  # restored from the snapshot
    edit.apply_to(pipe)
    for key, delta in edit.deltas.items():
        name = key.removeprefix("unet.")
        torch.testing.assert_close(pipe.unet.state_dict()[name], before[name] + delta)
