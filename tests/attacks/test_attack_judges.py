import numpy as np
import pytest
from attack_helpers import brightness_judge, red_selector, tiny

from erasure.attacks.base import AttackError
from erasure.attacks.context import AttackContext
from erasure.attacks.judges import (
    JudgeSpec,
    default_selector,
    judge_and_selector,
    load_concept_judge,
    parse_judge_spec,
    same_judge,
)
from erasure.concepts import Concept, load_concepts
from erasure.resources import checkpoint, prompt_file

TOY_CLIP = f"clip:{checkpoint('toyworld-clip')}"


def pip():
    return load_concepts(prompt_file("toyworld/pip.toml")).concepts[0]


def renders(*subjects):
    from erasure.toyworld.render import make_scene, render

    rng = np.random.default_rng(0)
    return np.stack([render(make_scene(rng, **subject)) for subject in subjects])


PIPS = [{"character": "Pip"}] * 3
OTHERS = [{"character": "Zog"}, {"character": "Miro"}, {"shape": "square", "colour": "blue", "style": "striped"}]


def test_specs_parse_and_unknown_judges_are_named():
    assert parse_judge_spec(" oracle ") == JudgeSpec("oracle", None, "oracle")
    assert parse_judge_spec("clip:ViT-B-32-quickgelu:openai").argument == "ViT-B-32-quickgelu:openai"
    with pytest.raises(AttackError, match="Unknown judge 'human'"):
        parse_judge_spec("human")


@pytest.mark.parametrize("spec", ["oracle", TOY_CLIP])
def test_each_judge_sees_pip_in_renders_of_pip_and_the_selector_ranks_them_higher(spec):
    judge = load_concept_judge(spec, pip())
    images = renders(*PIPS, *OTHERS)
    shows = judge.shows_target(images)
    scores = judge.target_score(images)
    assert shows[:3] == [True] * 3 and sum(shows[3:]) <= 1
    assert min(scores[:3]) > max(scores[3:]) and all(0.0 <= s <= 1.0 for s in scores)
    assert judge.describe()["kind"] == spec.partition(":")[0] and judge.describe()["concept"] == "Pip"


@pytest.mark.parametrize("spec", ["oracle", TOY_CLIP])
def test_each_judges_neighbour_test_accepts_renders_of_the_neighbour_prompt_and_refuses_others(spec):
    from erasure.attacks.base import neighbour_rows

    concept = pip()
    rows = [row for row in neighbour_rows(concept) if row.prompt.lower() == "an image of zog"]
    assert len(rows) == 1 and rows[0].concept == "Zog"  # the class the prompt should show
    judge, _ = judge_and_selector(spec, "oracle" if spec != "oracle" else TOY_CLIP, concept)
    images = renders({"character": "Zog"}, {"character": "Zog"}, {"character": "Miro"}, {"character": "Pip"})
    assert judge.follows_prompt(images, rows * 4) == [True, True, False, False]


def test_the_oracle_has_no_model_of_a_concept_outside_the_toy_world():
    van_gogh = Concept("Van Gogh", "style", ("Van Gogh",), evaluate=("a painting by Van Gogh",))
    with pytest.raises(AttackError, match="no model of concept 'Van Gogh'"):
        load_concept_judge("oracle", van_gogh)
    with pytest.raises(AttackError, match="No default selector"):
        default_selector("clip", van_gogh)
    with pytest.raises(AttackError, match="64x64"):
        load_concept_judge("oracle", pip()).shows_target(np.zeros((1, 32, 32, 3), np.uint8))


def test_judge_and_selector_record_themselves_and_refuse_the_same_model():
    judge, selector = judge_and_selector("oracle", TOY_CLIP, pip())
    assert default_selector("oracle", pip()) == "clip" and default_selector("clip", pip()) == "oracle"
    ctx = AttackContext(tiny(), None, judge, selector, steps=1)
    settings = ctx.settings()
    assert settings["judge"]["role"] == "judge" and settings["judge"]["kind"] == "oracle"
    assert settings["selector"]["role"] == "selector" and settings["selector"]["kind"] == "clip"
    assert settings["selector_is_judge"] is False
    with pytest.raises(AttackError, match="selector is the judge"):
        judge_and_selector("oracle", "oracle", pip())
    with pytest.raises(AttackError, match="selector is the judge"):  # two spellings of the shipped oracle
        judge_and_selector("oracle", f"oracle:{checkpoint('toyworld-oracle')}", pip())
    same, also = judge_and_selector("oracle", "oracle", pip(), allow_selector_as_judge=True)
    assert same_judge(same, also) and also.model is same.model
    with pytest.raises(AttackError, match="selector is the judge"):  # the context sees through the two roles
        AttackContext(tiny(), None, same, also)
    ctx = AttackContext(tiny(), None, same, also, allow_selector_as_judge=True)
    assert ctx.settings()["selector_is_judge"] is True
    plain = AttackContext(tiny(), None, brightness_judge, red_selector).settings()
    assert plain["judge"] == {"callable": "attack_helpers.brightness_judge"}
