"""`attend` (one F.scaled_dot_product_attention call) against the written-out reference.

`attention_probs` is the formula by hand (matmul, mask, softmax); `attend` must be that, times V,
over the three kinds of forward pass a stream makes: a chunk that fits the cache (write first), a
chunk that overflows it (buffer + chunk, two query positions side by side in one call), and
one-token decode (the sinks re-rotated into the query's frame), with RoPE and with ALiBi, and for
every grouping of query heads over kv heads.
"""
import pytest
import torch

from minisink.alibi import alibi_slopes
from minisink.attention import attend, attention_probs
from minisink.cache import SinkCache
from minisink.rope import Rotary


def passes(S=2, W=6, rope=None, dtype=torch.float32):
    """(name, plan) of every kind of pass a stream makes, in the order a stream makes them."""
    cache = SinkCache(S, W, dtype=dtype)
    yield "chunk that fits", cache.begin(5, rope)
    yield "decode, filling", cache.begin(1, rope)
    yield "chunk that overflows", cache.begin(13, rope)
    yield "decode, full", cache.begin(1, rope)
    cache.seen = None  # as after a compiled step: all slots, unused ones masked
    yield "decode, count unknown", cache.begin(1, rope)


@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("nkv", [1, 2, 4])
def test_attend_is_the_written_out_formula(position, nkv):
    g = torch.Generator().manual_seed(nkv)
    rope = Rotary(12) if position == "rope" else None   # partial rotary: 12 of 16 channels
    slopes = alibi_slopes(4) if position == "alibi" else None
    for name, plan in passes(rope=rope):
        T, L = plan.q_pos.shape[0], plan.k_pos.shape[0]
        q = torch.randn(2, 4, T, 16, generator=g)
        k, v = (torch.randn(2, nkv, L, 16, generator=g) for _ in range(2))
        want = (attention_probs(q, k, plan, 0.25, slopes) @ v.repeat_interleave(4 // nkv, 1))  # (B, nh, T, hd)
        got = attend(q, k, v, plan, 0.25, slopes)                                              # (B, T, nh*hd)
        assert (got - want.transpose(1, 2).reshape(2, T, 64)).abs().max() < 1e-5, name


def test_overflowing_chunk_sees_each_sink_from_its_cache_position():
    """Two query positions in one call: q' = [R(t) q | R(min(t, C-1)) q] against [window | 0], [0 | sink]."""
    rope = Rotary(8)
    plan = dict(passes(rope=rope))["chunk that overflows"]
    q, k = torch.randn(1, 1, 13, 8), torch.randn(1, 1, plan.k_pos.shape[0], 8)
    scores = attention_probs(q, k, plan, 1.0).log()       # log-softmax: scores up to a constant per row
    for t in range(13):
        p_t = rope(q[:, :, t:t + 1], plan.q_pos[t:t + 1], torch.tensor(7))     # the window's frame
        s_t = rope(q[:, :, t:t + 1], plan.q_pos_sink[t:t + 1], torch.tensor(7))  # the sinks'
        want = torch.where(plan.is_sink, s_t @ k.transpose(-1, -2), p_t @ k.transpose(-1, -2))[0, 0, 0]
        seen = plan.mask[t]
        got = scores[0, 0, t, seen] - scores[0, 0, t, seen].max()
        assert (got - (want[seen] - want[seen].max())).abs().max() < 1e-4, t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nkv", [1, 2, 4])
def test_attend_in_low_precision(dtype, nkv):
    """bf16/fp16 inputs: within a few roundings of the fp32 computation on the same inputs.

    The output is a convex combination of values |v| <= 4, rounded once. Measured: at most 1 u * 4;
    bound 4 u * 4.
    """
    g = torch.Generator().manual_seed(nkv)
    plan = SinkCache(2, 30, dtype=dtype).begin(24, Rotary(16))
    plan32 = SinkCache(2, 30).begin(24, Rotary(16))
    q = torch.randn(2, 4, 24, 16, generator=g).to(dtype)
    L = plan.k_pos.shape[0]  # the 24 slots in use: an eager pass over a filling cache spans only those
    k, v = (torch.randn(2, nkv, L, 16, generator=g).clamp(-4, 4).to(dtype) for _ in range(2))
    exact = attend(q.float(), k.float(), v.float(), plan32, 0.25)
    bound = 4 * (torch.finfo(dtype).eps / 2) * 4
    got = attend(q, k, v, plan, 0.25)
    assert got.dtype == dtype and (got.float() - exact).abs().max() <= bound
