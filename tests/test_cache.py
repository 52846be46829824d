"""The sink cache against a deliberately naive oracle, and the properties the method promises."""
import importlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minisink.cache import DenseCache, Plan, SinkCache
from minisink.generate import Stream, decode_one_token, prefill, sample

VOCAB = 61


class NaiveCache:
    """The official algorithm, written for clarity not speed (mit-han-lab/streaming-llm's
    StartRecentKVCache, with the current token written before it attends), in the paper's literal
    frame: concatenate the new key, evict the middle so that the first S and the last W remain, keep
    keys un-rotated and rotate them by their positions 0..len-1 afresh at every step (the query by
    len-1). One token at a time. minisink/cache.py's frame must give the same logits."""

    def __init__(self, S, W):
        self.S, self.W, self.k, self.v, self.n = S, W, [], [], 0

    def begin(self, T, rope=None):
        assert T == 1, "the oracle streams one token at a time"
        self.n += 1
        L = min(self.n, self.S + self.W)
        self.pos = torch.arange(L)                       # positions inside the cache, by age
        plan = Plan(q_pos=self.pos[-1:], k_pos=self.pos, is_sink=self.pos < self.S, mask=None)
        if rope is not None:  # the query rotated by its cache position; the keys in `update`
            plan.rope, plan.q_rope = rope, rope.tables(self.pos[-1:], self.pos[-1], torch.float32)
        return plan

    def update(self, layer, k, v, plan):
        if layer == len(self.k):
            self.k.append(k[:, :, :0]), self.v.append(v[:, :, :0])
        k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        if k.shape[2] > self.S + self.W:  # evict the oldest token after the sinks
            k = torch.cat([k[:, :, :self.S], k[:, :, self.S + 1:]], 2)
            v = torch.cat([v[:, :, :self.S], v[:, :, self.S + 1:]], 2)
        self.k[layer], self.v[layer] = k, v
        if plan.rope is None:
            return k, v
        return plan.rope(k, self.pos, self.pos[-1]), v   # every key re-rotated, every step


# Tiny random configs, one per architecture, written as config.json dicts (what a user's folder has)
TINY = {
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    # Mistral's sliding window (40) is wider than every window here but shorter than the longest
    # streams: it must cut nothing that the sink cache holds (sinks are exempt by design)
    "mistral": dict(model_type="mistral", vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=40),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25, hidden_act="gelu",
                     use_parallel_residual=True),
    "falcon": dict(model_type="falcon", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, multi_query=True, parallel_attn=True, bias=False, alibi=False),
    "mpt": dict(model_type="mpt", vocab_size=VOCAB, d_model=36, n_heads=6, n_layers=2, expansion_ratio=2,
                max_seq_len=2048, no_bias=True, attn_config={"alibi": True, "alibi_bias_max": 8}),
}


def tiny_model(arch: str, seed: int = 0):
    from minisink.weights.load import build_config
    try:
        cls, config = build_config(TINY[arch])
    except ModuleNotFoundError:
        pytest.skip(f"minisink/models/{arch}.py not written yet")
    torch.manual_seed(seed)
    model = cls(config).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.5 * torch.randn_like(p) / p.shape[-1] ** 0.5)
        # Falcon's and MPT's heads are tied to the embedding, whose init makes logits of ~40: tone
        # them down to the others' ~3, so that 1e-5 is a test of the method, not of fp32 rounding
        vocab_sized = [p for p in model.parameters() if p.shape[0] == VOCAB]
        if len(vocab_sized) == 1:  # one tensor is both the embedding and the head
            vocab_sized[0].mul_(0.1)
    return model


ARCHS = list(TINY)


def stream_oracle(model, ids, S, W):
    cache = NaiveCache(S, W)
    with torch.no_grad():
        return torch.cat([model(ids[:, t:t + 1], cache) for t in range(ids.shape[1])], 1)


def stream_minisink(model, ids, S, W, prompt_len, chunk, cache=None):
    """Prefill `prompt_len` tokens in chunks of `chunk`, then decode the rest one token at a time."""
    cache = cache or SinkCache(S, W)
    out = []
    with torch.no_grad():
        if prompt_len:
            prefill(model, cache, ids[:, :prompt_len], chunk, each=lambda start, logits: out.append(logits))
        out += [decode_one_token(model, cache, ids[:, t])[:, None] for t in range(prompt_len, ids.shape[1])]
    return torch.cat(out, 1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("S", [0, 1, 4])
@pytest.mark.parametrize("W", [1, 7, 32])
def test_matches_naive_oracle(arch, S, W):
    model = tiny_model(arch)
    n = 5 * (S + W) + 3
    ids = torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(S * 100 + W))
    want = stream_oracle(model, ids, S, W)
    prompt = (3 * n) // 4
    for chunk in (S + W, 5, prompt):  # divides the prompt or not, shorter and longer than the cache
        got = stream_minisink(model, ids, S, W, prompt, max(chunk, 1))
        assert (got - want).abs().max() < 1e-5, f"chunk {chunk}"


@settings(max_examples=25, deadline=None)
@given(S=st.integers(0, 5), W=st.integers(1, 12), extra=st.integers(0, 40), chunk=st.integers(1, 30),
       prompt_frac=st.floats(0, 1))
def test_matches_naive_oracle_property(S, W, extra, chunk, prompt_frac):
    model = tiny_model("llama")
    n = S + W + extra + 1
    ids = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
    got = stream_minisink(model, ids, S, W, int(prompt_frac * n), chunk)
    assert (got - stream_oracle(model, ids, S, W)).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_equals_token_by_token(arch):
    """Prefill in chunks that fit, chunks that overflow the cache, and one chunk of the whole stream:
    the same logits as feeding the stream one token at a time, over streams 5x the cache."""
    model = tiny_model(arch)
    for S, W, chunk in [(4, 12, 5), (0, 9, 30), (2, 6, 40), (1, 7, 3), (4, 12, 80)]:
        ids = torch.randint(0, VOCAB, (2, 5 * (S + W)), generator=torch.Generator().manual_seed(S + W))
        one_by_one = stream_minisink(model, ids, S, W, 0, 1)
        chunked = stream_minisink(model, ids, S, W, ids.shape[1], chunk)
        assert (chunked - one_by_one).abs().max() < 1e-4, (S, W, chunk)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_attention_call_per_layer_and_only_the_sinks_move(arch, monkeypatch):
    """A decode step over a full cache: one F.scaled_dot_product_attention call per layer, and of
    the keys it attends to, only the S sinks (re-rotated by d_t) and the slot of the new token change."""
    S, W = 3, 8
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (1, 4 * (S + W)), generator=torch.Generator().manual_seed(0))
    cache = SinkCache(S, W)
    with torch.no_grad():
        prefill(model, cache, ids[:, :3 * (S + W)], chunk_size=5)
        decode_one_token(model, cache, ids[:, 3 * (S + W)])             # a step, so the sinks have moved
        before = [k.clone() for k in cache.k]                            # what the next step attends to
        calls = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda *a, **kw: calls.append(kw.get("attn_mask")) or sdpa(*a, **kw))
        t = 3 * (S + W) + 1
        decode_one_token(model, cache, ids[:, t])
    assert len(calls) == len(before)                                     # one per layer
    rope = arch != "mpt"                                                 # ALiBi: a bias, no moved keys
    assert all(mask is None for mask in calls) or not rope               # full cache: no mask
    new_slot = int(cache.slots_of(torch.tensor(t)))
    for k_before, k in zip(before, cache.k):
        changed = {i for i in range(S + W) if not torch.equal(k_before[:, :, i], k[:, :, i])}
        assert changed == ({*range(S), new_slot} if rope else {new_slot})


def test_eager_pass_over_a_filling_cache_spans_the_slots_in_use():
    """Eager: a step costs what the stream holds until the cache is full, then S+W slots for ever,
    without a mask. Compiled: always S+W slots (static shapes), the unused ones masked; the host
    count is then unknown, until a chunk reads it back from the device."""
    cache = SinkCache(2, 6)
    kv = torch.zeros(1, 1, 1, 4)
    spans = []
    for _ in range(12):
        plan = cache.begin(1)
        assert plan.mask is None
        spans.append(cache.update(0, kv, kv, plan)[0].shape[2])
    assert spans == [1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8]
    model, ids = tiny_model("llama"), torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    cache, reference = SinkCache(2, 6), SinkCache(2, 6)
    step = torch.compile(decode_one_token, fullgraph=True, backend="eager")
    with torch.no_grad():
        prefill(model, cache, ids[:, :2], chunk_size=2), prefill(model, reference, ids[:, :2], chunk_size=2)
        torch._dynamo.reset()
        for t in range(2, 6):
            got, want = step(model, cache, ids[:, t]), decode_one_token(model, reference, ids[:, t])
            assert (got - want).abs().max() < 1e-6
        assert cache.seen is None and reference.seen == 6
        got, want = decode_one_token(model, cache, ids[:, 6]), decode_one_token(model, reference, ids[:, 6])
        assert (got - want).abs().max() < 1e-6   # eager, count unknown: every slot, unused ones masked
        prefill(model, cache, ids[:, 7:9], 2), prefill(model, reference, ids[:, 7:9], 2)
        assert cache.seen == reference.seen == 9  # a chunk reads the count back


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_as_long_as_the_stream_is_dense(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids)
        for S, W in [(4, 36), (0, 40), (3, 100)]:
            assert (stream_minisink(model, ids, S, W, 17, 6) - dense).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_recompute_is_a_fresh_forward_over_the_last_window(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))
    stream = Stream(model, "recompute", sink_size=2, window_size=6)
    for t in range(ids.shape[1]):
        got = stream.feed(ids[:, t:t + 1])
        with torch.no_grad():
            want = model(ids[:, max(0, t - 7):t + 1])[:, -1]  # positions 0..7, no cache carried over
        assert (got - want).abs().max() < 1e-6


def test_window_policy_differs_from_sink_once_the_first_token_is_evicted():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    sink = stream_minisink(model, ids, 4, 12, 40, 8)
    window = stream_minisink(model, ids, 0, 16, 40, 8)
    assert torch.equal(sink[:, :16], window[:, :16])           # same until the cache is full
    assert (sink[:, 17:] - window[:, 17:]).abs().max() > 1e-3  # then the sinks make a difference


def test_batch_of_streams_equals_each_stream_alone():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (3, 50), generator=torch.Generator().manual_seed(0))
    batch = stream_minisink(model, ids, 2, 9, 20, 7)
    for b in range(3):
        assert (batch[b:b + 1] - stream_minisink(model, ids[b:b + 1], 2, 9, 20, 7)).abs().max() < 1e-5


def test_buffers_never_move_over_a_long_stream():
    """After 20,000 tokens the cache holds the same tensors, same shapes, same storage.

    Driven at the cache's own interface (begin + update per layer, as a model calls it) so that
    20,000 steps take seconds; test_matches_naive_oracle covers the same path through real models.
    """
    S, W, layers = 4, 28, 2
    cache = SinkCache(S, W)
    kv = lambda t: torch.full((1, 2, 1, 8), float(t))  # (B, kv_heads, T=1, hd), tagged by token
    def step(t):
        plan = cache.begin(1)
        for layer in range(layers):
            cache.update(layer, kv(t), -kv(t), plan)
    for t in range(S + W):
        step(t)
    before = [(t, t.shape, t.data_ptr()) for t in [*cache.k, *cache.v, cache.slot_token, cache.n]]
    for t in range(S + W, 20_000):
        step(t)
    after = [*cache.k, *cache.v, cache.slot_token, cache.n]
    assert all(a is t and a.shape == shape and a.data_ptr() == ptr for a, (t, shape, ptr) in zip(after, before))
    assert cache.length == 20_000 and int(cache.n) == 20_000
    # the sinks still hold tokens 0..3, the window the last 28 tokens, each in its ring slot
    assert cache.slot_token[:S].tolist() == [0, 1, 2, 3]
    assert sorted(cache.slot_token[S:].tolist()) == list(range(20_000 - W, 20_000))
    assert torch.equal(cache.k[1][0, 0, :, 0], cache.slot_token.float())   # no RoPE: the sinks as copied
    assert torch.equal(cache.sink_k[1][0, 0, :, 0], cache.slot_token[:S].float())


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_step_compiles_without_graph_breaks(arch):
    model = tiny_model(arch)
    cache = SinkCache(2, 6)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefill(model, cache, ids[:, :5], chunk_size=5)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(decode_one_token)(model, cache, ids[:, 5])
        assert explanation.graph_break_count == 0, explanation.break_reasons
        # fullgraph=True refuses to compile at all if anything would break the graph
        step = torch.compile(decode_one_token, fullgraph=True, backend="eager")
        reference = SinkCache(2, 6)
        prefill(model, reference, ids[:, :6], chunk_size=6)
        for t in range(6, 20):
            got, want = step(model, cache, ids[:, t]), decode_one_token(model, reference, ids[:, t])
            assert (got - want).abs().max() < 1e-6


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    assert sample(logits, temperature=1.0, top_k=1, generator=g).tolist() == [1, 0]
    assert sample(logits, temperature=1.0, top_p=0.01, generator=g).tolist() == [1, 0]
    # top-k 2 on row 0 can only give tokens 1 or 3; top-p 0.5 the same (they hold > 0.5 together)
    draws = torch.stack([sample(logits, 1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3}
    draws = torch.stack([sample(logits, 1.0, top_p=0.5, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3}


def test_generate_is_seeded_and_stops_on_eos():
    model = tiny_model("llama")
    prompt = torch.tensor([[1, 2, 3]])
    run = lambda seed: [int(t) for t in Stream(model, "sink", 2, 8).generate(
        prompt, max_new_tokens=30, temperature=1.0, seed=seed)]
    assert run(7) == run(7) and run(7) != run(8)
    first = run(7)
    stopped = [int(t) for t in Stream(model, "sink", 2, 8).generate(
        prompt, max_new_tokens=30, temperature=1.0, seed=7, stop_ids={first[5]})]
    assert stopped == first[:first.index(first[5]) + 1]


def test_turns_share_one_stream():
    """Generated tokens are part of the stream: a second turn sees them, as if fed as text."""
    model = tiny_model("llama")
    stream = Stream(model, "sink", 2, 8)
    reply = [int(t) for t in stream.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5)]
    logits = stream.feed(torch.tensor([[4, 5]]))
    replay = Stream(model, "sink", 2, 8)
    assert (logits - replay.feed(torch.tensor([[1, 2, 3, *reply, 4, 5]]))).abs().max() < 1e-5
    assert stream.tokens_seen == replay.tokens_seen == 10


def test_compiled_stream_compiles_once_and_agrees_with_eager():
    """Every token goes through the compiled step, the first too (Stream allocated the buffers);
    prompts stay eager."""
    from torch._dynamo.utils import counters
    model = tiny_model("llama")
    torch._dynamo.reset()
    counters.clear()
    prompt = torch.tensor([[1]])  # BOS alone: the case that used to compile twice
    compiled = [int(t) for t in Stream(model, "sink", 2, 6, compile=True).generate(prompt, max_new_tokens=15)]
    # two graphs: while the cache fills (its unused slots masked), and once it is full (no mask)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] == 2
    eager = [int(t) for t in Stream(model, "sink", 2, 6).generate(prompt, max_new_tokens=15)]
    assert compiled == eager
