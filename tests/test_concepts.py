import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from erasure.attention import token_indices
from erasure.concepts import (
    KINDS,
    Concept,
    ConceptFileError,
    EraseRequest,
    check_encodable,
    load_concepts,
    request_from_prompts,
)
from erasure.testing import tiny_tokenizer

TOY_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "toyworld-sd"

TOYWORLD = Path(__file__).resolve().parent.parent / "prompts" / "toyworld"

PIP_TOML = """
[[concept]]
name = "Pip"
kind = "character"
erase = ["Pip", "a picture of Pip"]
anchor = ""
preserve = ["Zog", "Miro", "a yellow circle"]
evaluate = ["a drawing of Pip", "an image of Pip"]
evaluate_preserve = ["a drawing of Zog", "a drawing of a yellow circle"]

[[concept]]
name = "red"
kind = "attribute"
erase = "a red circle"
anchor = "a green circle"
"""


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_load_concepts_reads_every_field(tmp_path):
    request = load_concepts(write(tmp_path, PIP_TOML))
    pip, red = request.concepts
    assert pip.name == "Pip" and pip.kind == "character"
    assert pip.erase == ("Pip", "a picture of Pip")
    assert pip.preserve == ("Zog", "Miro", "a yellow circle")
    assert pip.evaluate == ("a drawing of Pip", "an image of Pip")
    assert pip.evaluate_preserve == ("a drawing of Zog", "a drawing of a yellow circle")
    assert red.erase == ("a red circle",) and red.anchor == "a green circle"  # a single string becomes a tuple
    assert pip.concept_words == ("Pip",)


def test_request_round_trips_through_json(tmp_path):
    request = load_concepts(write(tmp_path, PIP_TOML))
    again = EraseRequest.from_dict(json.loads(json.dumps(request.to_dict())))
    assert again == request


def test_for_method_hides_held_out_prompts(tmp_path):
    request = load_concepts(write(tmp_path, PIP_TOML))
    hidden = request.for_method()
    for before, after in zip(request.concepts, hidden.concepts, strict=True):
        assert after.evaluate == () and after.evaluate_preserve == ()
        assert (after.name, after.erase, after.anchor, after.preserve) == (
            before.name,
            before.erase,
            before.anchor,
            before.preserve,
        )
    assert request.concepts[0].evaluate  # the original is untouched


def test_whitespace_is_normalised():
    concept = Concept(name="  Van   Gogh ", kind="style", erase=["  a painting by  Van Gogh "], anchor=" art ")
    assert concept.name == "Van Gogh"
    assert concept.erase == ("a painting by Van Gogh",)
    assert concept.anchor == "art"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "colour"}, "unknown kind"),
        ({"erase": []}, "'erase' is empty"),
        ({"preserve": ["a picture of Pip"]}, "both an erase and a preserve prompt"),
        ({"anchor": "Pip"}, "anchor"),
        ({"erase": ["Pip", "  "]}, "empty prompt"),
        ({"erase": ["Pip", 3]}, "list of strings"),
        ({"anchor": ["Zog"]}, "'anchor' lists 1 anchor\\(s\\) but 'erase' has 2"),
        ({"anchor": ["Zog", "a picture of Pip"]}, "anchor 'a picture of Pip' is also an erase prompt"),
        ({"anchor": ["Zog", 3]}, "'anchor' must be a string"),
        ({"anchor": 3}, "'anchor' must be a string"),
    ],
)
def test_bad_concepts_raise_clear_errors(fields, message):
    arguments = {"name": "Pip", "kind": "character", "erase": ["Pip", "a picture of Pip"]} | fields
    with pytest.raises(ValueError, match=message):
        Concept(**arguments)


def test_all_kinds_are_accepted():
    for kind in KINDS:
        assert Concept(name="x", kind=kind, erase=("x",)).kind == kind


def test_duplicate_concept_names_are_refused():
    concept = Concept(name="x", kind="object", erase=("x",))
    with pytest.raises(ValueError, match="more than once"):
        EraseRequest((concept, concept))
    with pytest.raises(ValueError, match="at least one"):
        EraseRequest(())


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConceptFileError, match="nope.toml does not exist"):
        load_concepts(tmp_path / "nope.toml")


def test_malformed_toml_is_named(tmp_path):
    path = write(tmp_path, "[[concept]]\nname = 'Pip\n")
    with pytest.raises(ConceptFileError, match=r"c\.toml is not valid TOML"):
        load_concepts(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[concept]]\nname = "Pip"\nkind = "character"\nerase = ["Pip"]\npreseve = ["Zog"]\n', "'preseve'"),
        ('[[concept]]\nname = "Pip"\nerase = ["Pip"]\n', "missing required field.*'kind'"),
        ('[[concept]]\nname = "Pip"\nkind = "person"\nerase = ["Pip"]\n', r"concept #1 \('Pip'\).*unknown kind"),
        ('name = "Pip"\n', "top-level key"),
        ("", "no \\[\\[concept\\]\\] table"),
        ('[[concept]]\nname = "Pip"\nkind = "character"\nerase = ["Pip"]\npreserve = ["Pip"]\n', "preserve"),
    ],
)
def test_bad_fields_name_file_and_field(tmp_path, text, message):
    with pytest.raises(ConceptFileError, match=message) as info:
        load_concepts(write(tmp_path, text))
    assert "c.toml" in str(info.value)


def test_request_from_prompts():
    request = request_from_prompts(["Van Gogh", "a painting by Van Gogh"], kind="style", preserve=["Monet"])
    (concept,) = request.concepts
    assert concept.name == "Van Gogh" and concept.kind == "style"
    assert concept.erase == ("Van Gogh", "a painting by Van Gogh") and concept.preserve == ("Monet",)
    assert concept.anchor == "" and concept.evaluate == ()
    with pytest.raises(ValueError):
        request_from_prompts([])


def test_check_encodable_accepts_normal_prompts(tokenizer):
    check_encodable(tokenizer, request_from_prompts(["a picture of pip"], name="pip"))


def test_check_encodable_rejects_prompts_longer_than_the_encoder_reads(tokenizer):
    long_prompt = " ".join(["red"] * 80)
    with pytest.raises(ValueError, match="tokens long"):
        check_encodable(tokenizer, request_from_prompts([long_prompt], name="red"))
    with pytest.raises(ValueError, match="tokens long"):  # preserve prompts are fed to the encoder too
        check_encodable(tokenizer, request_from_prompts(["red"], preserve=[long_prompt]))


def test_check_encodable_rejects_a_word_that_encodes_to_nothing():
    # "!" is the padding token of SD 2.x's tokenizer: it cannot stand for a concept.
    with pytest.raises(ValueError, match="encodes to no token"):
        check_encodable(tiny_tokenizer(pad_token="!"), request_from_prompts(["!"]))


def test_check_encodable_rejects_unknown_tokens():
    class WordTokenizer:  # a word-level tokenizer with an unknown token, unlike CLIP's byte-level BPE
        vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "pip": 3}
        bos_token_id, eos_token_id, pad_token_id, unk_token_id, model_max_length = 0, 1, 1, 2, 77

        def __call__(self, text, add_special_tokens=True, **_):
            ids = [self.vocab.get(word.lower(), 2) for word in text.split()]
            return SimpleNamespace(input_ids=[0, *ids, 1] if add_special_tokens else ids)

    check_encodable(WordTokenizer(), request_from_prompts(["pip"]))
    with pytest.raises(ValueError, match="no token in this tokenizer's vocabulary"):
        check_encodable(WordTokenizer(), request_from_prompts(["zorblax"]))


def test_token_indices_finds_the_concept_tokens(tokenizer):
    # start token at 0: "a"=1 "picture"=2 "of"=3 "van"=4 "gogh"=5
    assert token_indices(tokenizer, "a picture of van gogh", "Van Gogh") == [4, 5]
    assert token_indices(tokenizer, "a picture of pip", ["pip"]) == [4]
    assert token_indices(tokenizer, "pip and pip", "pip") == [1, 3]
    assert token_indices(tokenizer, "a red circle", "pip") == []
    assert token_indices(tokenizer, "a red circle") == [1, 2, 3]  # every token, never start/end/padding
    # a word split into several tokens is found as a whole
    pieces = tokenizer("zorblax", add_special_tokens=False).input_ids
    assert len(pieces) > 1
    assert token_indices(tokenizer, "a zorblax", "zorblax") == list(range(2, 2 + len(pieces)))


@pytest.mark.parametrize("name", ["pip", "striped", "triangle", "red"])
def test_toyworld_concept_files(name):
    request = load_concepts(TOYWORLD / f"{name}.toml")
    from erasure.toyworld.tokenizer import CAPTION_WORDS

    check_encodable(tiny_tokenizer(CAPTION_WORDS), request)
    for concept in request.concepts:
        assert concept.evaluate and concept.evaluate_preserve and concept.preserve
        assert not set(concept.evaluate) & set(concept.erase)  # held out
        assert not set(concept.evaluate_preserve) & set(concept.preserve)
        word = concept.concept_words[0].lower()
        assert all(word in prompt.lower().split() for prompt in concept.erase + concept.evaluate)
        assert not any(word in prompt.lower().split() for prompt in concept.preserve + concept.evaluate_preserve)
        assert not any(word in anchor.lower().split() for anchor in concept.erase_anchors)
    if name == "striped":  # paired: each erase prompt's anchor is the same prompt without the style word
        (striped,) = request.concepts
        assert striped.erase_anchors == tuple(prompt.replace("striped ", "") for prompt in striped.erase)
    if name == "triangle":
        assert not any("Zog" in p for p in request.concepts[0].preserve + request.concepts[0].erase)


def test_paired_anchors_align_with_erase_prompts_and_round_trip(tmp_path):
    text = """
[[concept]]
name = "striped"
kind = "style"
erase = ["a striped red circle", "a picture of a  striped blue square"]
anchor = ["a red circle", " a picture of a blue square"]
"""
    request = load_concepts(write(tmp_path, text))
    (striped,) = request.concepts
    assert striped.anchor == ("a red circle", "a picture of a blue square")  # normalised, kept as a tuple
    assert dict(zip(striped.erase, striped.erase_anchors, strict=True)) == {
        "a striped red circle": "a red circle",
        "a picture of a striped blue square": "a picture of a blue square",
    }
    assert EraseRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    assert request.for_method().concepts[0].erase_anchors == striped.erase_anchors


def test_one_anchor_string_serves_every_erase_prompt():
    concept = Concept(name="Pip", kind="character", erase=["Pip", "a picture of Pip"], anchor="a cat")
    assert concept.erase_anchors == ("a cat", "a cat")
    assert Concept(name="Pip", kind="character", erase=["Pip"]).erase_anchors == ("",)


def test_a_word_spelled_piece_by_piece_is_warned_about(caplog):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(TOY_MODEL / "tokenizer"))
    with caplog.at_level("WARNING", logger="erasure.concepts"):
        check_encodable(tokenizer, request_from_prompts(["Pip"]))
    assert not [r for r in caplog.records if r.name == "erasure.concepts"]  # a word of the toy vocabulary
    for word in ("xylophone", "\u6c89\u9ed8", "\U0001f600\U0001f600\U0001f600"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="erasure.concepts"):
            check_encodable(tokenizer, request_from_prompts([word]))
        (record,) = [r for r in caplog.records if r.name == "erasure.concepts"]
        assert "piece by piece" in record.getMessage() and repr(word) in record.getMessage()
