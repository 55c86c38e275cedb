"""A small CLIP tokenizer for the toy world, derived from CLIP's own byte-level BPE merges.

CLIP's tokenizer (and so Stable Diffusion 1.x's) is byte-level BPE over 49,152 merges. The toy world uses a few dozen
words, so the shipped tokenizer keeps the 512 byte-level base symbols, only the merges that CLIP itself applies on
the way to each toy word (in CLIP's own rank order, so the toy words become single tokens exactly as in CLIP), and
the two special tokens. The one toy word CLIP splits (``outlined`` = ``out`` + ``lined``) gets one extra merge,
appended after all of CLIP's (lowest priority), so it cannot change how any other word splits.
Any other text still encodes (it falls back to shorter pieces, down to single bytes), so a user's prompt never
fails to tokenize; it is simply made of pieces the model never saw.

The merges file ships inside ``open_clip`` (``bpe_simple_vocab_16e6.txt.gz``), so nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from erasure.toyworld.captions import TEMPLATES
from erasure.toyworld.render import CHARACTERS, COLOURS, SHAPES, STYLES

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
CLIP_MERGE_COUNT = 49152 - 256 - 2  # as in CLIP's SimpleTokenizer

# Words of the captions, then words a user may try in paraphrases of toy concepts (they are single tokens, but
# their embeddings were never trained on an image).
CAPTION_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [w for t in TEMPLATES for w in t.replace("{x}", "").split()]
        + ["a"]
        + list(COLOURS)
        + list(SHAPES)
        + [s for s in STYLES if s != "plain"]
        + [name.lower() for name in CHARACTERS]
    )
)
EXTRA_WORDS: tuple[str, ...] = (
    "the", "photo", "with", "and", "in", "shape", "character", "face", "eyes", "mouth", "smiley", "round", "ball",
    "box", "cube", "pyramid", "plus", "sign", "stripes", "outline", "plain", "colour", "color", "dot", "little",
    "cartoon", "big", "small", "style", "painting", "art", "sketch", "crimson", "scarlet", "violet", "lime", "navy",
    "golden", "orange", "black", "white", "empty", "hollow", "solid", "lines", "named", "called", "friend",
)  # fmt: skip


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters), strict=True))


@lru_cache(maxsize=1)
def clip_merges() -> tuple[tuple[str, str], ...]:
    """CLIP's BPE merges, in rank order, read from the file that ships inside ``open_clip``."""
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : CLIP_MERGE_COUNT + 1])  # type: ignore[misc]


def merges_used_for(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """Run CLIP's BPE on one lower-case word and return the merges it applies, in order."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(symbols) > 1:
        pairs = {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return used


def pieces_after(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """The symbols a word is left in after applying ``merges`` in order (as ``merges_used_for`` returns them)."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    for left, right in merges:
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == (left, right):
                merged.append(left + right)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_vocabulary(words: tuple[str, ...] = CAPTION_WORDS + EXTRA_WORDS) -> tuple[dict[str, int], list[str]]:
    """Build the toy vocabulary and merges list.

    Args:
        words: Lower-case words that must each be one token.

    Returns:
        ``(vocab, merges)``: token -> id, and merge lines ``"left right"`` in CLIP's rank order.

    """
    all_merges = clip_merges()
    ranks = {pair: rank for rank, pair in enumerate(all_merges)}
    kept: set[tuple[str, str]] = set()
    appended: list[tuple[str, str]] = []
    for word in words:
        used = merges_used_for(word, ranks)
        kept.update(used)
        pieces = pieces_after(word, used)
        while len(pieces) > 1:  # CLIP leaves the word in pieces: join them left to right with merges of our own
            pair = (pieces[0], pieces[1])
            if pair not in appended:
                appended.append(pair)
            pieces = ["".join(pair)] + pieces[2:]
    merges = [pair for pair in all_merges if pair in kept] + appended
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(pair) for pair in merges] + [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    return vocab, [" ".join(pair) for pair in merges]


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and a ``CLIPTokenizer`` config (SD 1.x padding) to ``folder``.

    Args:
        folder: Destination (created if missing); a diffusers pipeline's ``tokenizer/`` folder.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "pad_token": END_TOKEN,  # Stable Diffusion 1.x pads with end-of-text
        "unk_token": END_TOKEN,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "pad_token": END_TOKEN, "unk_token": END_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder
