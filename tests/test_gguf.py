"""The GGUF converter (minisink/gguf.py) on the real SmolLM2-135M-Instruct GGUF, against transformers
reading the same file, and on small GGUF files written here to exercise its refusals."""
import pytest
import torch
import transformers

from conftest import ASSETS, need_assets
from minisink.load import load_model
from minisink.smollm2 import smollm2_gguf
from minisink.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    """transformers' own reading of the GGUF (dequantized by transformers, its own Q/K permutation)."""
    gguf = smollm2_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                             dtype=torch.float32).eval()


def test_logits_match_transformers_reading_the_gguf(smollm2, hf_smollm2):
    need_assets()
    text = (ASSETS / "text" / "moby_dick.txt").read_text(encoding="utf-8")[20_000:21_000]
    ids = torch.tensor([load_tokenizer(smollm2).encode(text)[:64]])
    assert ids.shape == (1, 64)
    ours = load_model(smollm2)
    with torch.no_grad():
        want = hf_smollm2(ids).logits
        got = ours(ids)
    assert want.abs().max() > 10  # real logits, not a degenerate model
    assert (got - want).abs().max() < 1e-4


# --- the tokenizer ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2):
    """transformers' tokenizer built from the GGUF's own metadata (vocabulary, merges, token types)."""
    gguf = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).backend_tokenizer


def test_tokenizer_encodes_four_books_like_the_gguf_says(smollm2, hf_gguf_tokenizer):
    """All four books in ../shared/assets/text, encoded by minisink's hand-written BPE from the
    converted tokenizer.json, equal transformers' GGUF tokenizer with the pre-tokenizer that the file
    names (tokenizer.ggml.pre = "smollm": llama.cpp splits every digit off first, then GPT-2's regex,
    as SmolLM2's own tokenizer.json does with Digits + ByteLevel); and they decode back losslessly.

    transformers (5.23) has no entry for "smollm" and keeps plain GPT-2 splitting, which differs in
    one case: a run of 2+ whitespace characters before a digit. Moby Dick has such runs (11 tokens
    fewer in minisink, e.g. "\\n  1668" is ĊĠĠ 1 6 6 8, not ĊĠ Ġ 1 6 6 8); on texts without them
    transformers as it is must agree too.
    """
    import copy
    import re

    from tokenizers import pre_tokenizers
    need_assets()
    smollm = copy.deepcopy(hf_gguf_tokenizer)
    smollm.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ours = load_tokenizer(smollm2)
    books = sorted((ASSETS / "text").glob("*.txt"))
    assert len(books) == 4
    for book in books:
        text = book.read_text(encoding="utf-8")
        ids = ours.encode(text)
        assert ids == smollm.encode(text, add_special_tokens=False).ids, book.name
        if not re.search(r"\s\s(?=\d)", text):
            assert ids == hf_gguf_tokenizer.encode(text, add_special_tokens=False).ids, book.name
        decoder = ours.stream_decoder()
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text, book.name


def test_tokenizer_special_tokens(smollm2):
    ours = load_tokenizer(smollm2)
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    assert ours.id_to_piece(1) == "<|im_start|>" and ours.id_to_piece(2) == "<|im_end|>"
    ids = ours.encode("<|im_start|>user\nHi<|im_end|>")
    assert (ids[0], ids[-1], len(ids)) == (1, 2, 5)  # whole tokens, not spelled out: <|im_start|> user Ċ Hi <|im_end|>
    assert ours.decode(ours.encode("<|im_start|>user\nHi 2024!<|im_end|>")) == "user\nHi 2024!"
