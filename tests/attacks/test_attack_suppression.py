import numpy as np
import pytest
from attack_helpers import CONCEPT, brightness_judge, red_selector, tiny, unet_fingerprint

from erasure.attacks.base import AttackError
from erasure.attacks.context import AttackContext
from erasure.attacks.trajectory import complete
from erasure.edit import fingerprint

STEPS = 3


def suppressed(pipe, **kwargs):
    return AttackContext(
        pipe, None, brightness_judge, red_selector, steps=STEPS, suppression="negative-prompt",
        negative_prompt="pip", **kwargs,
    )  # fmt: skip


def test_negative_prompt_suppression_changes_only_the_edited_images_and_no_weight():
    pipe = tiny()
    weights = unet_fingerprint(pipe), fingerprint(dict(pipe.text_encoder.named_parameters()))
    ctx = suppressed(pipe)
    prompts, seeds = ["a picture of pip", "pip"], [3, 4]
    base = ctx.generate("base", prompts, seeds)
    edited = ctx.generate("edited", prompts, seeds)
    plain = AttackContext(pipe, None, brightness_judge, red_selector, steps=STEPS)
    assert np.array_equal(base, plain.generate("edited", prompts, seeds))  # base is the pipeline's own generation
    assert np.abs(edited.astype(int) - base.astype(int)).max() > 8  # the negative prompt steers the edited side
    kn, k0 = complete(ctx, prompts, seeds, [STEPS, 0])
    assert np.array_equal(kn, base) and np.array_equal(k0, edited)  # k = N is base, k = 0 the suppressed model
    assert (unet_fingerprint(pipe), fingerprint(dict(pipe.text_encoder.named_parameters()))) == weights
    assert ctx.settings()["suppression"] == "negative-prompt" and ctx.settings()["negative_prompt"] == "pip"


def test_suppression_settings_are_checked():
    pipe = tiny()
    with pytest.raises(AttackError, match="Unknown suppression"):
        AttackContext(pipe, None, brightness_judge, red_selector, suppression="blur")
    with pytest.raises(AttackError, match="needs the negative prompt"):
        AttackContext(pipe, None, brightness_judge, red_selector, suppression="negative-prompt")
    with pytest.raises(AttackError, match="classifier-free guidance"):
        suppressed(pipe, guidance=1.0)


def test_a_probe_of_the_negative_prompt_baseline_fills_the_prompt_from_the_concept():
    from erasure.attacks.suite import run_probe

    pipe = tiny()
    summary = run_probe(
        pipe, None, CONCEPT, brightness_judge, red_selector, attacks=["trajectory"], steps=2,
        options={"trajectory": {"handoffs": (1,)}}, suppression="negative-prompt", likelihood=False,
    )  # fmt: skip
    assert summary["settings"]["negative_prompt"] == "Pip" and summary["verdict"]["suppression"] == "negative-prompt"
    assert summary["suite"] == "custom" and list(summary["attacks"]) == ["trajectory"]


def test_any_generation_time_edit_suppresses_the_edited_side_sld_included():
    from erasure.concepts import Concept, EraseRequest
    from erasure.methods import get_method

    pipe = tiny()
    request = EraseRequest((Concept(name="pip", kind="character", erase=("pip",)),))
    sld = get_method("sld", warmup_steps=1, safety_scale=50.0).apply(pipe, request, progress=False)
    ctx = AttackContext(pipe, None, brightness_judge, red_selector, steps=STEPS, suppression=sld)
    plain = AttackContext(pipe, None, brightness_judge, red_selector, steps=STEPS)
    prompts, seeds = ["a picture of pip", "pip"], [3, 4]
    base, edited = ctx.generate("base", prompts, seeds), ctx.generate("edited", prompts, seeds)
    assert np.array_equal(base, plain.generate("edited", prompts, seeds))
    assert not np.array_equal(edited, base)
    # completion from step 1 keeps the schedule's step count: warm-up 1 means SLD acts on every finishing step
    k1, kn = complete(ctx, prompts, seeds, [1, STEPS])
    assert np.array_equal(kn, base) and not np.array_equal(k1, base)
    assert ctx.settings()["suppression"] == "sld" and ctx.settings()["negative_prompt"] is None
    assert ctx.settings()["suppression_settings"]["safety_concept"] == "pip"
