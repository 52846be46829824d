"""Mistral (Llama plus a sliding window): parity with transformers' MistralForCausalLM, dense and token
by token, with a sliding window shorter than the input."""
import pytest
import torch
import transformers

from minisink.cache import DenseCache, SinkCache
from minisink.weights.load import LoadError, build_config, load_model

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
CONFIGS = {
    "window-8": dict(sliding_window=8),               # far shorter than the 48-token input
    "window-47": dict(sliding_window=47),             # one token short: only the first key is cut off
    "no-window": dict(sliding_window=None),           # Mistral v0.2 and later
    "window-5-headdim-mqa": dict(sliding_window=5, head_dim=16, num_key_value_heads=1),
}
T = 48


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**{**BASE, **CONFIGS[request.param]})).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights far from HF's tiny init, so that a wrong mask shows in the logits
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise / p.shape[-1] ** 0.25)
    hf.save_pretrained(folder)
    ids = torch.randint(0, BASE["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    return request.param, want, ids, load_model(folder)


def test_logits_match_transformers(pair):
    name, want, ids, ours = pair
    assert ours.config.sliding_window == CONFIGS[name]["sliding_window"]
    assert (ours(ids) - want).abs().max() < 1e-4


def test_token_by_token_matches_transformers(pair):
    """A dense cache, fed one token at a time, applies the window as transformers' full forward does."""
    name, want, ids, ours = pair
    cache = DenseCache(4)
    with torch.no_grad():
        got = torch.cat([ours(ids[:, t:t + 1], cache) for t in range(T)], 1)
    assert (got - want).abs().max() < 1e-4


def test_chunked_dense_prefill_matches_transformers(pair):
    name, want, ids, ours = pair
    cache = DenseCache(4)
    with torch.no_grad():
        got = torch.cat([ours(ids[:, t:t + 7], cache) for t in range(0, T, 7)], 1)
    assert (got - want).abs().max() < 1e-4


def test_sink_cache_within_the_window_is_unaffected(pair):
    """S sinks + W <= sliding_window: the sliding mask cuts nothing a sink cache holds, and without
    eviction the stream is the dense forward of its own (full) attention over S + W tokens."""
    name, want, ids, ours = pair
    window = CONFIGS[name]["sliding_window"]
    if window is None or window >= T:
        cache = SinkCache(0, T)
        with torch.no_grad():
            got = torch.cat([ours(ids[:, t:t + 1], cache) for t in range(T)], 1)
        assert (got - want).abs().max() < 1e-4


def test_config_defaults_and_refusals():
    d = dict(BASE, model_type="mistral")
    assert build_config(d)[1].sliding_window == 4096  # transformers' MistralConfig default
    assert build_config(dict(d, model_type="llama", sliding_window=16))[1].sliding_window is None
    with pytest.raises(LoadError, match="sliding_window=0 is not supported"):
        build_config(dict(d, sliding_window=0))
