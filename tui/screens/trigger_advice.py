"""Advice on a trigger word: made-up, one word, and few tokenizer pieces.

A trigger should be a word the model knows nothing about (`sks`), so training
gives it one meaning. A common English word already means something; a word the
tokenizer cuts into many pieces is learnt as several half-words.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

MANY_PIECES = 3  # more pieces than this is a warning

COMMON_WORDS = frozenset("""
a an the and or but if of in on at to for from by with without about into over under after before
is are was were be been being have has had do does did will would can could should may might must
i you he she it we they me him her us them my your his its our their this that these those
man woman men women boy girl child children baby kid person people friend family mother father
dog dogs cat cats pet puppy kitten bird horse fish animal cow pig sheep rabbit bear lion tiger
car house home tree flower water fire sun moon star sky sea city road street room door window
book table chair bed cup phone computer picture photo image art style painting drawing portrait
red blue green yellow black white brown orange pink purple gray grey gold silver
big small little large old new young good bad best great happy sad beautiful pretty cute nice
day night time year world life love hand face head eye eyes hair body foot light dark
one two three first last new other same thing things way place work game music movie toy
""".split())


def trigger_problems(word: str) -> list[str]:
    """What stops `word` from being a trigger at all."""
    if not word.strip():
        return ["The trigger word is empty: type a made-up word such as sks."]
    if len(word.split()) > 1:
        return [f"{word.strip()!r} is more than one word: a trigger is a single made-up word such as sks."]
    return []


def trigger_warnings(word: str, class_noun: str = "") -> list[str]:
    """Doubts that need no tokenizer: a common word, or the class noun itself."""
    word = word.strip().lower()
    if not word:
        return []
    if class_noun and word == class_noun.strip().lower():
        return [f"{word!r} is the class noun; the trigger should be a separate made-up word, e.g. sks {word}."]
    if word in COMMON_WORDS:
        return [f"{word!r} is a common English word the model already knows; a made-up word such as sks "
                "keeps your subject apart."]
    return []


def tokenizer_folder(model: str) -> Path | None:
    """The CLIP tokenizer folder of `model` if it is on this machine (never downloads)."""
    from engine.config import model_source

    kind, where = model_source(model, Path.cwd())
    if kind == "tiny":
        from engine.flux.tiny import ensure_tiny_model

        return ensure_tiny_model() / "tokenizer"
    if kind == "local":
        folder = Path(where) / "tokenizer"
        return folder if folder.is_dir() else None
    if kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(where, "tokenizer/vocab.json")
        except Exception as error:  # advice only
            log.debug("tokenizer cache lookup failed: %s", error)
            return None
        return Path(cached).parent if isinstance(cached, str) else None
    return None


@lru_cache(maxsize=4)
def _tokenizer(folder: Path):
    from engine.flux.tokenizers import ClipTokenizer

    return ClipTokenizer.from_folder(folder)


def piece_warning(word: str, model: str) -> str | None:
    """A warning when the model's tokenizer cuts `word` into many pieces; None when fine or unknown."""
    word = word.strip()
    if not word:
        return None
    try:
        folder = tokenizer_folder(model)
        if folder is None:
            return None
        pieces = _tokenizer(folder).pieces(word)
    except Exception as error:  # a missing or odd tokenizer only costs the advice
        log.info("no tokenizer advice for %s: %s", model, error)
        return None
    if len(pieces) <= MANY_PIECES:
        return None
    shown = " ".join(piece.removesuffix("</w>") for piece in pieces)
    return (f"{word!r} splits into {len(pieces)} tokenizer pieces ({shown}); a short rare word that stays one "
            "piece, such as sks, is learnt more reliably.")
