"""minisink/tools/viz.py, what the tutorials share: each helper against an independent answer."""
import pytest
import torch
import transformers

from minisink.tools import eval as ev
from minisink.tools import viz
from minisink.cache import DenseCache, SinkCache
from minisink.weights.load import load_model

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama saved by transformers and loaded by minisink: (minisink model, HF model)."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attn_implementation="eager")).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(folder)
    return load_model(folder), hf


def test_attention_maps_equal_transformers_attention_weights(tiny):
    model, hf = tiny
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    P = viz.attention_maps(model, ids)                                  # (layers, B, heads, T, T)
    with torch.no_grad():
        theirs = torch.stack(hf(ids, output_attentions=True).attentions)   # (layers, B, heads, T, T)
    assert P.shape == theirs.shape
    assert torch.allclose(P, theirs, atol=1e-5)


def fresh_window_nll(model, ids, C, targets):
    """The definition, one window at a time: NLL of ids[t] from model(ids[t-C .. t-1]), no cache kept."""
    with torch.no_grad():
        return torch.stack([ev.token_nll(model(ids[None, t - C:t])[:, -1], ids[t:t + 1])[0] for t in targets.tolist()])


def test_recompute_at_is_a_fresh_forward_over_each_window(tiny):
    model, _ = tiny
    ids = torch.randint(0, 64, (40,), generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([8, 9, 23, 39])
    want = fresh_window_nll(model, ids, 8, targets)
    assert torch.allclose(viz.recompute_nll_at(model, ids, 8, targets, batch_size=3), want, atol=1e-5)
    assert torch.allclose(ev.recompute_nll(model, ids, 8)[targets], want, atol=1e-5)   # eval's, every token
    assert model.lm_head._forward_pre_hooks == {}                       # the last-position hook is gone


def test_recompute_at_works_for_gpt_neox():
    """GPT-NeoX calls its output head `embed_out`, not `lm_head`: the last-position hook finds it."""
    from test_cache import tiny_model
    model = tiny_model("gpt_neox")
    ids = torch.randint(0, 61, (30,), generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([10, 17, 29])
    got = viz.recompute_nll_at(model, ids, 10, targets, batch_size=2)
    assert torch.allclose(got, fresh_window_nll(model, ids, 10, targets), atol=1e-5)
    assert model.embed_out._forward_pre_hooks == {}


def test_policy_nll_is_remembered_and_equals_eval(tiny):
    model, _ = tiny
    ids = torch.randint(0, 64, (30,), generator=torch.Generator().manual_seed(3))
    first = viz.policy_nll(model, ids, "sink", 2, 6)
    assert viz.policy_nll(model, ids, "sink", 2, 6) is first
    assert torch.allclose(first[1:], ev.policy_nll(model, ids, "sink", 2, 6)[1:])


def test_uniform_mass_is_k_over_t_plus_one():
    assert viz.uniform_mass(4, 1) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert viz.uniform_mass(6, 4, skip=2) == pytest.approx((1 + 1 + 4 / 5 + 4 / 6) / 4)   # all of it while t < k
    P = torch.tril(torch.ones(6, 6)) / torch.arange(1, 7)[:, None]      # every query spreads evenly
    assert viz.mass_on_first(P, 4, 2) == pytest.approx(viz.uniform_mass(6, 4, 2))


def test_cache_rows_are_the_sinks_and_the_window():
    S, W, T = 2, 5, 14
    rows = viz.cache_rows(SinkCache(S, W), T)
    for t in range(T):
        assert rows[t].nonzero()[:, 0].tolist() == sorted({*range(min(S, t + 1)), *range(max(0, t - W + 1), t + 1)})
    assert torch.equal(viz.cache_rows(DenseCache(4), T), torch.tril(torch.ones(T, T, dtype=torch.bool)))
