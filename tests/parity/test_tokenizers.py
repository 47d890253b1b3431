"""Our CLIP and T5 tokenizers against transformers' CLIPTokenizer and T5TokenizerFast,
on the tiny tokenizer files, with FluxPipeline's calls (pad to max_length, truncate)."""
import subprocess
import sys

import numpy as np
import pytest
from transformers import CLIPTokenizer, T5TokenizerFast

from engine.errors import ModelLoadError
from engine.flux.tiny_tokenizers import write_clip_tokenizer, write_t5_tokenizer
from engine.flux.tokenizers import ClipTokenizer, T5Tokenizer

PROMPTS = [
    "a photo of sks dog",
    "A Photo OF sks Dog, in the STYLE of a person!",
    "",
    "   leading, trailing and   repeated\twhitespace\n  ",
    "café crème brûlée, naïve façade, Ångström, Straße",
    "an emoji 🐶🎨 party 👩‍👩‍👧 and ✨sparkles✨",
    "日本語のプロンプト 中文提示 한국어 프롬프트",
    "punctuation: (a) [b] {c} <d> -- ... !!! ??? 'quotes' \"double\" it's we'll I'd",
    "numbers 1234 and 3.14159, 85mm f/1.8, 4k 8k",
    "a photo of sks dog " * 120,  # far past both lengths: truncation keeps eos
    "photo",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-tokenizers")
    return write_clip_tokenizer(root / "tokenizer"), write_t5_tokenizer(root / "tokenizer_2")


def reference_ids(tokenizer, prompts, max_length) -> np.ndarray:
    """What FluxPipeline asks transformers for."""
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="np")["input_ids"]


def test_clip_matches_transformers_clip_tokenizer(folders):
    reference = CLIPTokenizer.from_pretrained(folders[0])
    ours = ClipTokenizer.from_folder(folders[0])
    ids = ours.encode(PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    assert np.array_equal(ids, reference_ids(reference, PROMPTS, 77))
    assert (ids[:, 0] == ours.bos_id).all()
    assert ids[PROMPTS.index(""), :3].tolist() == [ours.bos_id, ours.eos_id, ours.pad_id]
    assert ids[-2, -1] == ours.eos_id  # the over-long prompt was cut, its eos kept


def test_clip_reads_tokenizer_json_the_same_way(folders, tmp_path):
    CLIPTokenizer.from_pretrained(folders[0]).save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    from_json = ClipTokenizer.from_folder(tmp_path).encode(PROMPTS)
    assert np.array_equal(from_json, ClipTokenizer.from_folder(folders[0]).encode(PROMPTS))


@pytest.mark.parametrize("max_length", [512, 256, 16])
def test_t5_matches_transformers_t5_tokenizer_fast(folders, max_length):
    reference = T5TokenizerFast.from_pretrained(folders[1])
    ours = T5Tokenizer.from_folder(folders[1])
    ids = ours.encode(PROMPTS, max_length)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), max_length)
    assert np.array_equal(ids, reference_ids(reference, PROMPTS, max_length))
    assert ids[PROMPTS.index(""), :2].tolist() == [ours.eos_id, ours.pad_id]
    assert ids[-2, -1] == ours.eos_id


def test_special_tokens_spelled_in_a_prompt_map_to_their_ids(folders):
    prompts = ["a photo <|endoftext|> of </s> sks <pad> dog"]
    assert np.array_equal(ClipTokenizer.from_folder(folders[0]).encode(prompts),
                          reference_ids(CLIPTokenizer.from_pretrained(folders[0]), prompts, 77))
    assert np.array_equal(T5Tokenizer.from_folder(folders[1]).encode(prompts, 32),
                          reference_ids(T5TokenizerFast.from_pretrained(folders[1]), prompts, 32))


def test_tiny_files_are_small_deterministic_and_hold_the_demo_words(folders, tmp_path):
    clip, t5 = ClipTokenizer.from_folder(folders[0]), T5Tokenizer.from_folder(folders[1])
    assert 300 <= clip.vocab_size <= 1000 and 300 <= t5.vocab_size <= 1000
    assert (clip.bos_id, clip.eos_id, clip.pad_id) == (clip.vocab_size - 2, clip.vocab_size - 1, clip.vocab_size - 1)
    assert (t5.eos_id, t5.pad_id, t5.bos_id) == (1, 0, None)
    for word in ("photo", "of", "sks", "dog", "a", "style", "person"):
        assert clip.count_tokens(word) == 1 and t5.count_tokens(word) == 1
    # another process (its own hash seeds) writes the same bytes
    script = ("import engine, sys; from engine.flux.tiny_tokenizers import *; "
              "write_clip_tokenizer(sys.argv[1] + '/tokenizer'); write_t5_tokenizer(sys.argv[1] + '/tokenizer_2')")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    for folder in folders:
        names = sorted(path.name for path in folder.iterdir())
        assert names == sorted(path.name for path in (tmp_path / folder.name).iterdir())
        for name in names:
            assert (folder / name).read_bytes() == (tmp_path / folder.name / name).read_bytes(), name


def test_count_tokens_sees_a_rare_word_split_into_pieces(folders):
    clip = ClipTokenizer.from_folder(folders[0])
    assert clip.count_tokens("zqxvkj") > 3
    assert "".join(clip.pieces("zqxvkj")).replace("</w>", "") == "zqxvkj"
    assert clip.count_tokens("a photo of sks dog") == 5


def test_a_missing_tokenizer_file_is_a_user_error(tmp_path):
    with pytest.raises(ModelLoadError, match="merges.txt"):
        write_clip_tokenizer(tmp_path / "clip")
        (tmp_path / "clip" / "merges.txt").unlink()
        ClipTokenizer.from_folder(tmp_path / "clip")
    with pytest.raises(ModelLoadError, match="spiece.model"):
        T5Tokenizer.from_folder(tmp_path / "empty")


def test_t5_spiece_model_fallback_matches_transformers(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    from engine.flux.tiny_tokenizers import TEXT

    (tmp_path / "text.txt").write_text(TEXT)
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "spiece"), vocab_size=200,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    reference = T5TokenizerFast.from_pretrained(tmp_path, extra_ids=0)
    ours = T5Tokenizer.from_folder(tmp_path)
    plain = [p for p in PROMPTS if "  " not in p and not p.startswith(" ")]
    assert np.array_equal(ours.encode(plain, 64), reference_ids(reference, plain, 64))
