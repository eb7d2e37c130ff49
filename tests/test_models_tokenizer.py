"""Offline CLIP tokenizer: ids must be OpenAI CLIP's."""
import importlib.util
from pathlib import Path

import pytest

from trainer.models.tokenizer import (
    BOS_ID,
    EOS_ID,
    build_vocab_and_merges,
    clean_text,
    clip_tokenizer,
    find_bpe_file,
    tokenize,
    tokenizer_folder,
)

STRINGS = [
    "a photo of a cat",
    "Hello, World!!",
    "caf\u00e9 &amp; r\u00e9sum\u00e9 &lt;3",
    "  multiple   spaces\tand\nnewlines ",
    "(masterpiece:1.2), 1girl, [blue hair], \\(escaped\\)",
    "emoji \U0001F431 cat",
    "don\u2019t stop &amp;amp; go",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "A_B-C.D/E 12345 x2",
    "the quick brown fox jumps over the lazy dog's back at 3:00pm",
]


def _oracle():
    """open_clip's reference tokenizer, loaded from its file without importing the
    open_clip package (which pulls torchvision). It ships next to the BPE file our tokenizer reads,
    so its absence means a broken install: the tests fail, never skip."""
    path = find_bpe_file().parent / "tokenizer.py"
    assert path.is_file(), f"open_clip's tokenizer.py is missing next to {find_bpe_file()}"
    spec = importlib.util.spec_from_file_location("_oc_tokenizer_oracle", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SimpleTokenizer(str(find_bpe_file()))


def test_known_ids():
    tok = clip_tokenizer()
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenize(tok, "a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tokenize(tok, "Hello, World!!") == [3306, 267, 1002, 748]
    assert tokenize(tok, "") == [] and tokenize(tok, "   ") == []


@pytest.mark.parametrize("text", STRINGS)
def test_ids_match_openai_reference(text):
    oracle = _oracle()
    assert tokenize(clip_tokenizer(), text) == oracle.encode(text)


def test_cleaning():
    assert clean_text("  A&amp;amp;B \n\t C ") == "a&b c"
    assert clean_text("don\u2019t") == "don't"


def test_pad_tokens():
    eos_pad = clip_tokenizer()
    zero_pad = clip_tokenizer("!")
    assert eos_pad.pad_token_id == EOS_ID
    assert zero_pad.pad_token_id == 0
    for t in (eos_pad, zero_pad):
        assert t.bos_token_id == BOS_ID and t.eos_token_id == EOS_ID
        assert len(t) == 49408


def test_vocab_files(tmp_path):
    vocab, merges = build_vocab_and_merges(find_bpe_file())
    assert len(vocab) == 49408 and len(merges) == 49152 - 256 - 2
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    assert vocab["!"] == 0 and vocab["a</w>"] == 320
    folder = Path(tokenizer_folder())
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    assert not list(folder.glob("*.tmp"))


def test_cache_folder_env(tmp_path, monkeypatch):
    import trainer.models.tokenizer as tk

    monkeypatch.setenv("TRAINTRAIN_CACHE", str(tmp_path))
    tk.tokenizer_folder.cache_clear()
    try:
        folder = tk.tokenizer_folder()
        assert str(folder).startswith(str(tmp_path))
        from transformers import CLIPTokenizer

        t = CLIPTokenizer.from_pretrained(str(folder))
        assert t("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    finally:
        tk.tokenizer_folder.cache_clear()
