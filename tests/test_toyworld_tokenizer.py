"""The toy tokenizer: CLIP's byte-level BPE cut down to the toy world's words, loadable as an SD 1.x tokenizer."""

import json

import pytest

from erasure.toyworld import tokenizer as toy_tokenizer
from erasure.toyworld.captions import TEMPLATES, all_subjects
from erasure.toyworld.render import CHARACTERS, COLOURS, SHAPES
from erasure.toyworld.tokenizer import END_TOKEN, EXTRA_WORDS, START_TOKEN, write_tokenizer_files

CAPTIONS = [template.format(x=subject) for subject in all_subjects() for template in TEMPLATES]
TOY_WORDS = sorted({word.lower() for text in CAPTIONS for word in text.split()})
OTHER_TEXTS = [
    "A zebra, riding 42 bicycles!!",
    "ünïcödé 日本語 emoji 🙂 don't",
    "Van Gogh's starry night -- oil on canvas",
    "   lots\tof\n whitespace   ",
    "outlinedness redder circles",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tokenizer_files(tmp_path_factory.mktemp("toy-tokenizer") / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def token_strings(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)[1:-1]


# --------------------------------------------------------------------------------------------------- the files
def test_writes_the_slow_tokenizer_files_with_sd1_settings(folder):
    assert {p.name for p in folder.iterdir()} >= {"vocab.json", "merges.txt", "tokenizer_config.json"}
    assert not (folder / "tokenizer.json").exists(), "the tokenizer must load from vocab.json + merges.txt alone"
    assert (folder / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77
    assert config["pad_token"] == config["eos_token"] == END_TOKEN
    assert config["bos_token"] == START_TOKEN
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(len(vocab))), "ids are contiguous"
    assert vocab[START_TOKEN] == len(vocab) - 2 and vocab[END_TOKEN] == len(vocab) - 1  # CLIP's layout
    assert len(vocab) < 2000, "a small vocabulary, not CLIP's 49,408"


def test_files_are_deterministic(folder, tmp_path):
    again = write_tokenizer_files(tmp_path / "again")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes()


def test_loads_with_clip_tokenizer_padded_with_end_of_text_like_sd1(tokenizer):
    assert type(tokenizer).__name__ == "CLIPTokenizer"
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == tokenizer.eos_token == END_TOKEN
    assert tokenizer.bos_token == START_TOKEN
    assert tokenizer.pad_token_id == tokenizer.eos_token_id != tokenizer.bos_token_id
    ids = tokenizer("a red circle", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert ids[4:] == [tokenizer.eos_token_id] * 73
    long = tokenizer(" ".join(["red"] * 200), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------------- the words
def test_every_toy_word_is_one_token(tokenizer):
    assert {"a", "an", "picture", "image", "drawing", "of", "striped", "outlined"} <= set(TOY_WORDS)
    assert {name.lower() for name in CHARACTERS} <= set(TOY_WORDS)
    words = TOY_WORDS + list(CHARACTERS) + list(COLOURS) + list(SHAPES) + ["plain"]
    for word in words:
        pieces = token_strings(tokenizer, word)
        assert pieces == [word.lower() + "</w>"], f"{word!r} splits into {pieces}"


def test_every_caption_is_one_token_per_word_and_decodes_back(tokenizer):
    for text in CAPTIONS:
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text.split()) + 2, text
        assert tokenizer.unk_token_id not in ids[1:-1]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text.lower()


def test_paraphrase_words_are_one_token_too(tokenizer):
    for word in EXTRA_WORDS:
        assert len(token_strings(tokenizer, word)) == 1, word


def test_toy_words_are_clips_own_tokens():
    """Each toy word is the token CLIP itself makes of it (``outlined`` aside: CLIP splits it, we join it)."""
    from open_clip.tokenizer import SimpleTokenizer

    clip = SimpleTokenizer()
    split = [w for w in TOY_WORDS if len(clip.bpe(w).split()) > 1]
    assert split == ["outlined"]
    vocab, _ = toy_tokenizer.build_vocabulary()
    for word in TOY_WORDS + list(EXTRA_WORDS):
        if word != "outlined" and len(clip.bpe(word).split()) == 1:
            assert clip.bpe(word) in vocab


def test_merges_are_clips_in_clips_order_plus_one_for_outlined(folder):
    clip_rank = {pair: rank for rank, pair in enumerate(toy_tokenizer.clip_merges())}
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line]
    ours = [m for m in merges if m not in clip_rank]
    assert ours == [("out", "lined</w>")], "only the join CLIP lacks is added"
    assert merges[-1] == ("out", "lined</w>"), "and it comes last, after every merge of CLIP's"
    ranks = [clip_rank[m] for m in merges[:-1]]
    assert ranks == sorted(ranks)


def test_byte_level_base_covers_every_byte(tokenizer):
    vocab = tokenizer.get_vocab()
    symbols = toy_tokenizer.bytes_to_unicode()
    assert len(symbols) == 256 and len(set(symbols.values())) == 256
    assert all(s in vocab and s + "</w>" in vocab for s in symbols.values())


# ------------------------------------------------------------------------------------------------ other text
@pytest.mark.parametrize("text", OTHER_TEXTS)
def test_any_other_text_still_encodes(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    inner = ids[1:-1]
    assert inner, "nothing was dropped"
    assert tokenizer.unk_token_id not in inner, "every byte has a token: nothing is unknown"
    assert all(0 <= i < len(tokenizer) for i in inner)
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == "".join(text.lower().split())
