"""The contract every registered weight method keeps, on every model family (one parametrized matrix, as in peft).

Methods run with their ``test_config()`` overrides (for example two iterations), so the matrix stays fast.
Generation-time methods (negative prompt, SLD) change no weight; their contract is in ``test_generation_time.py``.
"""

from dataclasses import dataclass, field

import pytest
import torch

from erasure.concepts import Concept, EraseRequest
from erasure.edit import Edit, pipeline_tensor
from erasure.methods import METHODS, PRESETS, get_method, register
from erasure.methods.base import EraseMethod, MethodConfig, NonFiniteEditError, select_unet_parameters
from erasure.testing import tiny_pipeline

FAMILIES = ("sd1", "sd2", "sdxl")
REQUEST = EraseRequest(
    (
        Concept(
            name="pip",
            kind="character",
            erase=("pip", "a picture of pip"),
            preserve=("zog", "a red circle"),
            evaluate=("a drawing of pip",),
            evaluate_preserve=("a drawing of zog",),
        ),
    )
)


def method_for(name):
    return get_method(name, **METHODS[name].test_config())


def full_state(pipe):
    return {
        f"{component}.{key}": value.clone()
        for component in ("unet", "text_encoder", "text_encoder_2", "vae")
        if getattr(pipe, component, None) is not None
        for key, value in getattr(pipe, component).state_dict().items()
    }


def changed_keys(pipe, state):
    return {key for key, value in full_state(pipe).items() if not torch.equal(value, state[key])}


def _distinct(names):
    """One name per (class, registered defaults): an alias (fmn for resteer, ca for concept-ablation) is the same
    method and config, so running it again would test nothing new."""
    seen, kept = set(), []
    for name in names:
        key = (METHODS[name], tuple(sorted(PRESETS[name].items())))
        if key not in seen:
            seen.add(key)
            kept.append(name)
    return kept


WEIGHT_METHODS = _distinct(sorted(name for name, cls in METHODS.items() if not cls.generation_time))
CASES = [(m, f) for m in WEIGHT_METHODS for f in FAMILIES if f in METHODS[m].supported_families]


@pytest.fixture(scope="module", params=CASES, ids=lambda p: "-".join(p))
def erased(request):
    """(pipe, method, edit, state before apply, requires_grad flags before, request seen by the method)."""
    name, family = request.param
    pipe = tiny_pipeline(family)
    method = method_for(name)
    seen = []
    hook = method._erase

    def recording_hook(pipe_, request_, parameters, **kwargs):
        seen.append(request_)
        return hook(pipe_, request_, parameters, **kwargs)

    method._erase = recording_hook
    state = full_state(pipe)
    flags = {name: p.requires_grad for name, p in pipe.unet.named_parameters()}
    edit = method.apply(pipe, REQUEST, progress=False, base_model=f"tiny-{family}")
    return pipe, method, edit, state, flags, seen


def test_apply_leaves_the_pipe_unchanged(erased):
    pipe, _, _, state, flags, _ = erased
    assert changed_keys(pipe, state) == set()
    assert {name: p.requires_grad for name, p in pipe.unet.named_parameters()} == flags
    assert all(p.grad is None for p in pipe.unet.parameters())  # no gradient memory left behind


def test_only_selected_tensors_change(erased):
    pipe, method, edit, _, _, _ = erased
    assert edit.deltas, "the method changed nothing"
    assert set(edit.deltas) <= set(method.select_parameters(pipe))
    assert all(torch.isfinite(delta).all() for delta in edit.deltas.values())
    assert all(delta.abs().max() > 0 for delta in edit.deltas.values())


def test_held_out_prompts_never_reach_the_method(erased):
    *_, seen = erased
    assert seen and all(c.evaluate == () and c.evaluate_preserve == () for r in seen for c in r.concepts)
    assert [c.erase for c in seen[0].concepts] == [c.erase for c in REQUEST.concepts]


def test_metadata(erased):
    pipe, method, edit, _, _, _ = erased
    config = edit.config
    assert config["method"] == method.name and config["method_config"] == method.config.to_dict()
    assert EraseRequest.from_dict(config["request"]) == REQUEST  # the full request, held-out prompts included
    assert config["base_model"].startswith("tiny-") and config["family"] in FAMILIES
    assert isinstance(config["stats"], dict) and config["base_fingerprint"]


def test_applied_edit_changes_exactly_its_tensors_and_reverts_bit_for_bit(erased):
    pipe, _, edit, state, _, _ = erased
    edit.apply_to(pipe)
    try:
        assert changed_keys(pipe, state) <= set(edit.deltas)
        for key, delta in edit.deltas.items():
            assert torch.allclose(pipeline_tensor(pipe, key), state[key] + delta, atol=1e-6)
    finally:
        edit.revert(pipe)
    assert changed_keys(pipe, state) == set()


def test_scale_zero_is_a_no_op(erased):
    pipe, _, edit, state, _, _ = erased
    edit.apply_to(pipe, scale=0.0)
    assert changed_keys(pipe, state) == set()
    edit.revert(pipe)


def test_deltas_round_trip_through_disk(erased, tmp_path):
    pipe, _, edit, state, _, _ = erased
    loaded = Edit.load(edit.save(tmp_path / "run"))
    assert loaded.deltas.keys() == edit.deltas.keys()
    assert all(torch.equal(loaded.deltas[key], delta) for key, delta in edit.deltas.items())
    loaded.apply_to(pipe)  # fingerprint verified against the base
    loaded.revert(pipe)
    assert changed_keys(pipe, state) == set()


def test_same_seed_gives_the_same_edit(erased):
    pipe, method, edit, _, _, _ = erased
    again = method_for(method.name).apply(pipe, REQUEST, progress=False)
    assert again.deltas.keys() == edit.deltas.keys()
    for key, delta in edit.deltas.items():
        assert torch.allclose(again.deltas[key], delta, rtol=1e-5, atol=1e-7), key


# --- the base template and the registry, with throw-away methods -----------------------------------------------


@dataclass
class _NudgeConfig(MethodConfig):
    amount: float = field(default=1.0, metadata={"help": "what to add"})


class _Nudge(EraseMethod):
    config_class = _NudgeConfig
    parameter_preset = "xattn_kv"

    def _erase(self, pipe, request, parameters, *, images=None, progress=True, originals=None):
        first = next(iter(parameters.values()))
        first.requires_grad_(True)
        with torch.no_grad():
            first.add_(self.config.amount * torch.randn(first.shape))
        return {"amount": self.config.amount}


@pytest.fixture
def throwaway_registry():
    before = dict(METHODS), dict(PRESETS)
    yield
    METHODS.clear()
    METHODS.update(before[0])
    PRESETS.clear()
    PRESETS.update(before[1])


def test_register_presets_and_get_method(throwaway_registry):
    register("nudge-big", amount=10.0)(register("nudge")(_Nudge))
    assert METHODS["nudge"] is METHODS["nudge-big"] is _Nudge
    assert get_method("nudge").config.amount == 1.0
    assert get_method("nudge-big").config.amount == 10.0
    assert get_method("nudge-big", amount=3.0).config.amount == 3.0
    assert get_method("Nudge-Big").name == "nudge-big"
    with pytest.raises(ValueError, match="unknown method 'nope'; choose from .*nudge"):
        get_method("nope")
    with pytest.raises(ValueError, match="no field"):
        register("nudge-bad", volume=2)(_Nudge)
    with pytest.raises(ValueError, match="already registered"):
        register("uce")(_Nudge)


def test_non_finite_results_are_refused_and_the_pipe_restored():
    pipe = tiny_pipeline("sd1")
    state = full_state(pipe)
    pipe.unet.requires_grad_(False)  # _Nudge switches gradients on; apply must switch them back off
    with pytest.raises(NonFiniteEditError, match="non-finite"):
        _Nudge(_NudgeConfig(amount=float("nan"))).apply(pipe, REQUEST)
    assert changed_keys(pipe, state) == set()
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_a_failing_method_leaves_the_pipe_unchanged():
    class Broken(_Nudge):
        def _erase(self, pipe, request, parameters, **kwargs):
            super()._erase(pipe, request, parameters, **kwargs)
            raise RuntimeError("out of memory")

    pipe = tiny_pipeline("sd1")
    state = full_state(pipe)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    with pytest.raises(RuntimeError, match="out of memory"):
        Broken().apply(pipe, REQUEST)
    assert changed_keys(pipe, state) == set()
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags


def test_seed_makes_random_methods_repeatable_and_leaves_global_rng_alone():
    pipe = tiny_pipeline("sd1")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = _Nudge(_NudgeConfig(seed=5)).apply(pipe, REQUEST)
    assert torch.equal(torch.rand(1), expected_next)  # apply forked the RNG
    second = _Nudge(_NudgeConfig(seed=5)).apply(pipe, REQUEST)
    third = _Nudge(_NudgeConfig(seed=6)).apply(pipe, REQUEST)
    (key,) = first.deltas
    assert torch.equal(first.deltas[key], second.deltas[key])
    assert not torch.equal(first.deltas[key], third.deltas[key])


def test_unsupported_family_is_refused():
    class OnlySDXL(_Nudge):
        supported_families = ("sdxl",)

    with pytest.raises(ValueError, match="does not support sd1"):
        OnlySDXL().apply(tiny_pipeline("sd1"), REQUEST)


@pytest.mark.parametrize(
    ("preset", "included", "excluded"),
    [
        ("xattn", ["attn2.to_q.weight", "attn2.to_out.0.bias"], ["attn1.to_k.weight", "conv_in.weight"]),
        ("xattn_kv", ["attn2.to_k.weight", "attn2.to_v.weight"], ["attn2.to_q.weight", "attn1.to_k.weight"]),
        (
            "noxattn",
            ["attn1.to_k.weight", "conv_in.weight", "resnets.0.conv1.weight"],
            ["attn2.to_k.weight", "time_embedding.linear_1.weight", "conv_out.weight"],
        ),
        ("unet", ["attn2.to_k.weight", "conv_out.weight", "time_embedding.linear_1.weight"], []),
    ],
)
def test_parameter_presets(preset, included, excluded):
    unet = tiny_pipeline("sd1").unet
    selected = select_unet_parameters(unet, preset)
    assert all(key.startswith("unet.") for key in selected)
    for suffix in included:
        assert any(key.endswith(suffix) for key in selected), suffix
    for suffix in excluded:
        assert not any(key.endswith(suffix) for key in selected), suffix
    names = dict(unet.named_parameters())
    assert all(selected[key] is names[key.removeprefix("unet.")] for key in selected)
    with pytest.raises(ValueError, match="Unknown UNet parameter preset"):
        select_unet_parameters(unet, "everything")


def test_the_shared_training_step_refuses_a_non_finite_loss_and_clips():
    from erasure.methods.base import NonFiniteEditError, optimiser_step

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    settings = {"max_grad_norm": 1.0, "label": "Thing", "lr": 1}
    with pytest.raises(NonFiniteEditError, match=r"Thing loss became nan at step 4; lower lr \(now 1\)"):
        optimiser_step(weight.sum() * float("nan"), optimizer, [weight], step=4, **settings)
    assert torch.equal(weight.detach(), torch.ones(3))  # nothing stepped
    assert optimiser_step((10 * weight).sum(), optimizer, [weight], step=5, **settings) == 30.0
    torch.testing.assert_close(weight.detach(), torch.ones(3) - 1 / 3**0.5)  # the gradient (10, 10, 10) clipped to 1
