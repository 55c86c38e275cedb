"""Prompt expansion: bare words become templated phrasings, the same for every method, recorded and switchable off."""

import pytest

from erasure.concepts import Concept, EraseRequest, request_from_prompts
from erasure.expansion import (
    SD_TEMPLATES,
    expand_concept,
    expand_request,
    is_toyworld_tokenizer,
    resolve_templates,
    toyworld_phrasings,
)
from erasure.methods import get_method
from erasure.testing import tiny_pipeline
from erasure.toyworld.captions import ERASE_TEMPLATES, HELD_OUT_TEMPLATES, all_subjects
from erasure.toyworld.render import COLOURS, STYLES


def test_toyworld_phrasings_come_from_the_caption_grammar_and_hold_out_the_evaluation_templates():
    phrasings = toyworld_phrasings("triangle")
    subjects = [s for s in all_subjects() if s.endswith(" triangle")]
    assert len(subjects) == len(COLOURS) * len(STYLES)
    assert phrasings == [t.format(x=s) for s in subjects for t in ERASE_TEMPLATES]
    assert not any(p.startswith(t.replace("{x}", "")) for p in phrasings for t in HELD_OUT_TEMPLATES)
    assert toyworld_phrasings("Zog") == ["Zog", "a picture of Zog"]
    assert toyworld_phrasings("zog") == ["Zog", "a picture of Zog"]  # case-insensitive, as CLIP's tokenizer
    assert all("striped red" in p for p in toyworld_phrasings("striped red"))
    assert toyworld_phrasings("banana") == [] and toyworld_phrasings("  ") == []


def test_sd_templates_follow_the_kind_and_expand_a_named_anchor_with_the_same_template():
    style = expand_concept(Concept(name="Van Gogh", kind="style", erase=("Van Gogh",), anchor="Monet"), "sd")
    assert style.erase == ("Van Gogh", *(t.format("Van Gogh") for t in SD_TEMPLATES["style"]))
    assert style.erase_anchors == ("Monet", *(t.format("Monet") for t in SD_TEMPLATES["style"]))
    assert style.expansion == "sd"
    car = expand_concept(Concept(name="car", kind="object", erase=("car",)), "sd")
    assert car.anchor == "" and car.erase[1:] == tuple(t.format("car") for t in SD_TEMPLATES["object"])


def test_only_concepts_with_few_prompts_are_expanded_once_and_preserve_prompts_are_kept_out():
    listed = Concept(name="red", kind="attribute", erase=("a red circle", "a red square", "a red cross"))
    assert expand_concept(listed, "toyworld") is listed
    red = Concept(name="red", kind="attribute", erase=("red",), preserve=("a red circle",))
    expanded = expand_concept(red, "toyworld")
    assert "a red circle" not in expanded.erase and "a picture of a red circle" in expanded.erase
    assert expand_concept(expanded, "toyworld") == expanded  # idempotent: a replay does not expand twice
    assert expand_concept(expanded, "sd") == expanded
    unknown = Concept(name="banana", kind="object", erase=("banana",))
    assert expand_concept(unknown, "toyworld") == unknown and unknown.expansion == ""  # nothing to add: unmarked
    assert Concept.from_dict(expanded.to_dict()) == expanded
    assert expand_request(EraseRequest((red,)), "off").concepts == (red,)
    with pytest.raises(ValueError, match="template set"):
        expand_concept(red, "mace")


class _Vocabulary:
    def __init__(self, vocabulary):
        self.vocabulary = vocabulary

    def get_vocab(self):
        return self.vocabulary


def test_auto_picks_the_toy_templates_only_for_the_toy_tokenizer():
    toy = tiny_pipeline("sd1").tokenizer  # the tiny test tokenizer reuses the toy world's words
    big = _Vocabulary({f"word{i}</w>": i for i in range(49408)})
    assert is_toyworld_tokenizer(toy) and not is_toyworld_tokenizer(big) and not is_toyworld_tokenizer(object())
    assert resolve_templates("auto", [toy]) == "toyworld" and resolve_templates("auto", [big]) == "sd"
    assert resolve_templates("off", [toy]) == "off"
    with pytest.raises(ValueError, match="expand must be one of"):
        resolve_templates("always", [toy])


def test_every_method_sees_the_expanded_request_and_the_edit_records_it():
    pipe = tiny_pipeline("sd1")
    request = request_from_prompts("triangle", kind="object")
    seen = []
    method = get_method("uce")
    hook = method._erase
    method._erase = lambda pipe_, request_, parameters, **kwargs: (
        seen.append(request_) or hook(pipe_, request_, parameters, **kwargs)
    )
    edit = method.apply(pipe, request, progress=False)
    assert seen[0].concepts[0].erase == ("triangle", *toyworld_phrasings("triangle"))
    assert edit.config["request"]["concepts"][0]["expansion"] == "toyworld"
    off = get_method("uce", expand="off").apply(pipe, request, progress=False)
    assert off.config["request"]["concepts"][0]["erase"] == ["triangle"]
    negative = get_method("negative-prompt").apply(pipe, request, progress=False)
    assert negative.config["request"]["concepts"][0]["expansion"] == "toyworld"
    assert negative.config["suppression"]["negative_prompt"] == "triangle"
    with pytest.raises(ValueError, match="expand must be one of"):
        get_method("uce", expand="sometimes").apply(pipe, request, progress=False)


def test_paired_anchors_are_never_expanded():
    pairs = Concept(name="striped", kind="style", erase=("a striped red circle",), anchor=("a red circle",))
    assert expand_concept(pairs, "toyworld") is pairs and expand_concept(pairs, "sd") is pairs
