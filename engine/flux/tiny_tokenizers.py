"""Small but real CLIP and T5 tokenizer files for the built-in `tiny` model.

Same folder layout and file formats as FLUX.1's `tokenizer/` (byte-level BPE,
vocab.json + merges.txt) and `tokenizer_2/` (Unigram tokenizer.json), so
transformers' CLIPTokenizer and T5TokenizerFast load them and our tokenizers
are tested on the real formats. Built from a fixed text, byte for byte the
same on every run: the CLIP merges are learned from it by plain BPE training,
the T5 pieces are its words scored by frequency.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, processors
from tokenizers.models import Unigram

from engine.flux.tokenizers import (
    CLIP_BOS, CLIP_EOS, T5_EOS, T5_PAD, T5_UNK, clip_normalizer, clip_pre_tokenizer, t5_pre_tokenizer,
)

CLIP_VOCAB_SIZE = 1000
# two special tokens follow the byte alphabet (256 bytes, alone and word-final) and the merges
CLIP_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2

TEXT = """
a photo of sks dog. a photo of a dog. a photo of sks person. a photo of a person.
a painting in the style of sks. a drawing of a cat in sks style. a sks dog on the beach.
a close up photo of a sks dog sitting on a wooden floor, natural light, high detail.
a portrait photo of a sks person smiling, studio lighting, sharp focus, 85mm lens.
a sks toy on a table next to a window. a sks cat sleeping on a red blanket.
a watercolor painting of a house by the sea in the style of sks.
an oil painting of mountains at sunset, in sks style, warm colors.
a photo of a woman wearing a blue dress, standing in a garden full of flowers.
a photo of a man with a beard and glasses, reading a book in a quiet library.
a black and white photo of an old city street in the rain.
a dog running through the snow. a cat looking out of the window at the birds.
the quick brown fox jumps over the lazy dog. a small child plays with a ball in the park.
a cup of coffee on a desk with a laptop and a notebook, morning light.
a green forest with tall trees, a river and a small bridge, photorealistic.
an astronaut riding a horse on the moon, digital art, highly detailed.
a bowl of fruit with apples, oranges and bananas on a kitchen table.
a bright yellow car parked in front of a white building, sunny day.
a group of friends laughing around a campfire at night under the stars.
a person walking a dog along the beach at golden hour, soft focus.
a cute puppy with big eyes, fluffy fur, sitting in the grass.
a photo of my dog, a golden retriever, playing with a stick in the water.
a selfie of a young person with curly hair and a friendly smile.
a pencil sketch of a face, clean lines, white background.
a pixel art style picture of a castle, a dragon and a knight.
a cinematic shot of a city at night, neon lights, reflections on wet streets.
a minimalist poster of a mountain, flat colors, simple shapes.
a picture of sks backpack on a rock by a lake, blue sky, clouds.
this is a photo, that is a painting, and these are drawings of people and animals.
two dogs and three cats are playing together in a living room.
high quality, best quality, 4k, 8k, ultra realistic, award winning photograph.
"""

# T5's vocabulary is case-sensitive and its pieces start words with this mark
WORD_START = "\u2581"
# single characters the T5 pieces cover beyond the text's own, so prompts rarely fall back to <unk>
EXTRA_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:;'\"()-_/&%+*#@éèêàâäöüñçß"
SUFFIXES = ("s", "es", "ed", "ing", "er", "ly", "y", "ness", "est")


def write_clip_tokenizer(folder: str | Path) -> Path:
    """Writes vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    _write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False) + "\n")
    _write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    bos, eos = _special(CLIP_BOS, normalized=True), _special(CLIP_EOS, normalized=False)
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(vocab[CLIP_BOS]): bos, str(vocab[CLIP_EOS]): eos},
        "bos_token": CLIP_BOS, "clean_up_tokenization_spaces": True, "do_lower_case": True,
        "eos_token": CLIP_EOS, "errors": "replace", "model_max_length": 77,
        "pad_token": CLIP_EOS, "tokenizer_class": "CLIPTokenizer", "unk_token": CLIP_EOS,
    })
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": _token_map(CLIP_BOS), "eos_token": _token_map(CLIP_EOS),
        "pad_token": CLIP_EOS, "unk_token": _token_map(CLIP_EOS),
    })
    return folder


def write_t5_tokenizer(folder: str | Path) -> Path:
    """Writes tokenizer.json (Unigram), tokenizer_config.json, special_tokens_map.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = _t5_pieces()
    tokenizer = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = t5_pre_tokenizer()
    tokenizer.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)])
    tokenizer.add_special_tokens([T5_PAD, T5_EOS, T5_UNK])
    _write_text(folder / "tokenizer.json", tokenizer.to_str(pretty=True) + "\n")
    specials = {T5_PAD: 0, T5_EOS: 1, T5_UNK: 2}
    _write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": {str(i): _special(token, normalized=False) for token, i in specials.items()},
        "additional_special_tokens": [], "clean_up_tokenization_spaces": True, "eos_token": T5_EOS,
        "extra_ids": 0, "legacy": True, "model_max_length": 512, "pad_token": T5_PAD,
        "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": T5_UNK,
    })
    _write_json(folder / "special_tokens_map.json", {
        "eos_token": _token_map(T5_EOS, normalized=False), "pad_token": _token_map(T5_PAD, normalized=False),
        "unk_token": _token_map(T5_UNK, normalized=False),
    })
    return folder


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's layout: byte alphabet, the same with `</w>`, one entry per merge, then bos and eos."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [character + "</w>" for character in alphabet]
    merges = _learn_merges(_word_counts(), CLIP_MERGES)
    tokens += [left + right for left, right in merges] + [CLIP_BOS, CLIP_EOS]
    # two merges can spell the same token; it keeps its first id
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def _word_counts() -> Counter[tuple[str, ...]]:
    """The text's words as CLIP sees them (byte-level symbols, the last one marked `</w>`)."""
    normalized = clip_normalizer().normalize_str(TEXT)
    counts: Counter[tuple[str, ...]] = Counter()
    for word, _ in clip_pre_tokenizer().pre_tokenize_str(normalized):
        counts[(*word[:-1], word[-1] + "</w>")] += 1
    return counts


def _learn_merges(words: Counter[tuple[str, ...]], limit: int) -> list[tuple[str, str]]:
    """Classic BPE training (Sennrich et al.): merge the most frequent adjacent pair, again and again.

    Written out rather than left to `tokenizers`' trainer, whose ties fall in
    hash order and so change between runs; here ties go to the smaller pair.
    """
    merges: list[tuple[str, str]] = []
    while len(merges) < limit:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = Counter({_merge(word, best): count for word, count in words.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in its order (what byte-level BPE vocabularies start with)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _t5_pieces() -> list[tuple[str, float]]:
    """Specials, then every piece with its log frequency, best first, as SentencePiece orders them."""
    words = Counter(re.findall(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]", TEXT))
    counts: Counter[str] = Counter()
    for word, count in words.items():
        counts[WORD_START + word] += count
        counts[WORD_START + word.capitalize()] += 1
        counts[word] += 1  # the same word glued to the previous one ("dog." -> "dog", ".")
    for suffix in SUFFIXES:
        counts[suffix] += 2
    for character in EXTRA_CHARACTERS:
        counts[character] += 1
    counts[WORD_START] += 1
    total = sum(counts.values())
    # single characters are a last resort: a word should win over its spelling
    scores = {piece: math.log(count / total) - (8.0 if len(piece) == 1 else 0.0) for piece, count in counts.items()}
    ordered = sorted(scores.items(), key=lambda item: (-round(item[1], 6), item[0]))
    return [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0)] + [(piece, round(score, 6)) for piece, score in ordered]


def _special(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": True}


def _token_map(content: str, normalized: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="\n")
