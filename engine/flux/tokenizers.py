"""FLUX.1's prompt tokenizers, read from a model's `tokenizer/` and `tokenizer_2/`.

Built on the `tokenizers` library with the pipelines transformers (5.x) builds
for CLIPTokenizer and T5TokenizerFast from the same files, so the ids match
diffusers' FluxPipeline: CLIP padded to 77 with its pad token, T5 padded to
512 (dev) or 256 (schnell) with <pad>; both truncate and keep their eos.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from engine.errors import ModelLoadError


CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
CLIP_MAX_LENGTH = 77
# CLIP's own word pattern: its special tokens, English contractions, letter runs, single digits, symbol runs
CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


def clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])


def t5_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # splitting on whitespace first drops repeated and leading spaces, as SentencePiece does
    return pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
    ])


class PromptTokenizer:
    """Shared by both: batch encoding to a fixed length, and piece counting for the wizard."""

    def __init__(self, tokenizer: Tokenizer | None, pad_id: int, eos_id: int, bos_id: int | None = None):
        self._tokenizer = tokenizer
        self.pad_id, self.eos_id, self.bos_id = pad_id, eos_id, bos_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, prompts: Sequence[str] | str, max_length: int) -> np.ndarray:
        """(B, max_length) int32: [bos] pieces eos pad..., pieces cut so bos and eos always stay."""
        if isinstance(prompts, str):
            prompts = [prompts]
        start = [] if self.bos_id is None else [self.bos_id]
        room = max_length - len(start) - 1
        if room < 0:
            raise ValueError(f"max_length {max_length} leaves no room for the special tokens")
        rows = [start + ids[:room] + [self.eos_id] for ids in self.split(list(prompts))]
        return pad_rows(rows, max_length, self.pad_id)

    def split(self, texts: list[str]) -> list[list[int]]:
        """Each text's piece ids, without special tokens or truncation."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def pieces(self, text: str) -> list[str]:
        """The vocabulary pieces `text` splits into, without special tokens."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def count_tokens(self, text: str) -> int:
        """How many pieces `text` splits into: a trigger word should be one or two."""
        return len(self.pieces(text))


class ClipTokenizer(PromptTokenizer):
    """CLIP's byte-level BPE: `<|startoftext|> ... <|endoftext|>`, lowercased."""

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ClipTokenizer":
        """Reads tokenizer.json if present, else vocab.json + merges.txt, with tokenizer_config.json's tokens."""
        folder = Path(folder)
        tokens = special_tokens(folder, defaults={"bos_token": CLIP_BOS, "eos_token": CLIP_EOS,
                                                   "pad_token": CLIP_EOS, "unk_token": CLIP_EOS})
        if (folder / "tokenizer.json").is_file():
            model = read_json(folder / "tokenizer.json")["model"]
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        else:
            require_files(folder, "vocab.json", "merges.txt")
            vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                  end_of_word_suffix="</w>", fuse_unk=False, unk_token=tokens["unk_token"]))
        tokenizer.normalizer = clip_normalizer()
        tokenizer.pre_tokenizer = clip_pre_tokenizer()
        add_special_tokens(tokenizer, folder, tokens)
        return cls(tokenizer, pad_id=token_id(tokenizer, tokens["pad_token"]),
                   eos_id=token_id(tokenizer, tokens["eos_token"]), bos_id=token_id(tokenizer, tokens["bos_token"]))

    def encode(self, prompts: Sequence[str] | str, max_length: int = CLIP_MAX_LENGTH) -> np.ndarray:
        return super().encode(prompts, max_length)


class T5Tokenizer(PromptTokenizer):
    """T5's SentencePiece Unigram: `... </s>`, case kept, no bos."""

    @classmethod
    def from_folder(cls, folder: str | Path) -> "T5Tokenizer":
        """Reads tokenizer.json; with only spiece.model, SentencePiece itself does the work."""
        folder = Path(folder)
        tokens = special_tokens(folder, defaults={"eos_token": T5_EOS, "pad_token": T5_PAD, "unk_token": T5_UNK})
        if not (folder / "tokenizer.json").is_file():
            require_files(folder, "spiece.model")
            return SentencePieceT5Tokenizer.from_model_file(folder / "spiece.model", tokens)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        # transformers keeps only the SentencePiece character map of the file's normalizer
        # and uses its own pre-tokenizer: do the same
        charsmap = precompiled_charsmap(read_json(folder / "tokenizer.json"))
        tokenizer.normalizer = normalizers.Precompiled(charsmap) if charsmap else None
        tokenizer.pre_tokenizer = t5_pre_tokenizer()
        add_special_tokens(tokenizer, folder, tokens)
        return cls(tokenizer, pad_id=token_id(tokenizer, tokens["pad_token"]),
                   eos_id=token_id(tokenizer, tokens["eos_token"]))


class SentencePieceT5Tokenizer(T5Tokenizer):
    """For a `tokenizer_2/` with spiece.model but no tokenizer.json (needs the sentencepiece package).

    Prompts that spell out a special token ("</s>") are not special-cased here.
    """

    def __init__(self, processor, pad_id: int, eos_id: int, sentinels: int):
        super().__init__(None, pad_id=pad_id, eos_id=eos_id)
        self._processor = processor
        self._sentinels = sentinels

    @classmethod
    def from_model_file(cls, path: Path, tokens: dict[str, str]) -> "SentencePieceT5Tokenizer":
        try:
            import sentencepiece
        except ImportError as error:
            raise ModelLoadError(f"{path.parent} has only spiece.model, which needs the sentencepiece package",
                                 hint="pip install sentencepiece, or add the model's tokenizer.json") from error
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        ids = {key: processor.piece_to_id(token) for key, token in tokens.items()}
        # T5 appends sentinel tokens (<extra_id_N>, 100 by default) after the SentencePiece vocabulary
        sentinels = read_json(path.parent / "tokenizer_config.json").get("extra_ids", 100)
        return cls(processor, pad_id=ids["pad_token"], eos_id=ids["eos_token"], sentinels=sentinels)

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size() + self._sentinels

    def split(self, texts: list[str]) -> list[list[int]]:
        return self._processor.encode(texts)

    def pieces(self, text: str) -> list[str]:
        return self._processor.encode(text, out_type=str)


def pad_rows(rows: list[list[int]], max_length: int, pad_id: int) -> np.ndarray:
    ids = np.full((len(rows), max_length), pad_id, dtype=np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids


def special_tokens(folder: Path, defaults: dict[str, str]) -> dict[str, str]:
    """bos/eos/pad/unk strings: tokenizer_config.json first, then special_tokens_map.json, then defaults."""
    found = dict(defaults)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        config = read_json(folder / name)
        for key in defaults:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


def add_special_tokens(tokenizer: Tokenizer, folder: Path, tokens: dict[str, str]) -> None:
    """Registers the special tokens so a prompt that spells one out gets its id, as in transformers."""
    declared = read_json(folder / "tokenizer_config.json").get("added_tokens_decoder", {})
    added = [AddedToken(entry["content"], single_word=entry.get("single_word", False),
                        lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                        normalized=entry.get("normalized", False), special=True)
             for entry in declared.values() if entry.get("special", True)]
    added_contents = {token.content for token in added}
    added += [AddedToken(content, special=True, normalized=False)
              for content in dict.fromkeys(tokens.values()) if content not in added_contents]
    tokenizer.add_special_tokens(added)


def precompiled_charsmap(tokenizer_json: dict) -> bytes | None:
    normalizer = tokenizer_json.get("normalizer") or {}
    for entry in normalizer.get("normalizers", [normalizer]):
        if entry.get("type") == "Precompiled" and entry.get("precompiled_charsmap"):
            return base64.b64decode(entry["precompiled_charsmap"])
    return None


def token_id(tokenizer: Tokenizer, token: str) -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ModelLoadError(f"the tokenizer's vocabulary has no {token!r} token",
                             hint="the tokenizer files look damaged: download the model again")
    return found


def require_files(folder: Path, *names: str) -> None:
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise ModelLoadError(f"{folder} lacks {', '.join(missing)}",
                             hint="download the model again, or point to a complete FLUX.1 folder")


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}", hint="download the model again") from error
