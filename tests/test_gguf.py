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
