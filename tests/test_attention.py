"""The fused path (PyTorch SDPA) against the written-out attention, for all four architectures.

`attend(..., sdpa=True)` must be the same function as the default: same mask, same positions, same
ALiBi. Compared here over the three kinds of forward pass a stream makes: a chunk that fits the
cache (write first), a chunk that overflows it (buffer + chunk; RoPE models fall back to the
written-out path there, ALiBi takes SDPA with the bias as an additive mask), and one-token decode
(RoPE with sinks: the written-out path too, as the sinks are seen from a second query position).
"""
import pytest
import torch
import torch.nn.functional as F

import minisink.attention
from minisink.attention import attend, use_sdpa
from minisink.cache import SinkCache
from minisink.generate import decode_one_token, prefill
from minisink.rope import Rotary
from test_cache import ARCHS, VOCAB, stream_minisink, stream_oracle, tiny_model


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Records the calls that reach F.scaled_dot_product_attention during the test."""
    calls, fused = [], F.scaled_dot_product_attention
    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_full_forward_sdpa_matches_written_out(arch, sdpa_calls):
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
        with use_sdpa():
            got = model(ids)
    assert len(sdpa_calls) == 2  # one per layer: the fused path was taken
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("S, W", [(4, 12), (0, 9)])
@pytest.mark.parametrize("chunk", [5, 16, 30])  # fits the cache, equals it, overflows it
def test_streaming_with_sdpa_matches_written_out(arch, S, W, chunk, sdpa_calls):
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (2, 45), generator=torch.Generator().manual_seed(S + W + chunk))
    want = stream_minisink(model, ids, S, W, prompt_len=30, chunk=chunk)
    with use_sdpa():
        got = stream_minisink(model, ids, S, W, prompt_len=30, chunk=chunk)
    one_frame_somewhere = arch == "mpt" or S == 0 or chunk <= S + W  # RoPE: a prefill chunk that fits
    assert bool(sdpa_calls) == one_frame_somewhere, "the fused path was taken where it cannot be, or never"
    assert (got - want).abs().max() < 1e-5
    # and both are the token-by-token oracle
    assert (got - stream_oracle(model, ids, S, W)).abs().max() < 1e-5


def test_two_query_frames_with_rope_take_the_written_out_path(sdpa_calls):
    model = tiny_model("llama")
    cache = SinkCache(2, 6)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), use_sdpa():
        model(ids[:, :4], cache)   # fits: fused
        assert len(sdpa_calls) == 2
        model(ids[:, 4:20], cache)  # overflows the cache: the sinks need a second query frame
        assert len(sdpa_calls) == 2


def test_sdpa_is_off_by_default_and_use_sdpa_restores():
    assert minisink.attention.SDPA is False
    with use_sdpa():
        assert minisink.attention.SDPA is True
        with use_sdpa(False):
            assert minisink.attention.SDPA is False
        assert minisink.attention.SDPA is True
    assert minisink.attention.SDPA is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nkv", [1, 2, 4])
def test_attend_sdpa_in_low_precision(dtype, nkv):
    """bf16/fp16 inputs: both paths within a few roundings of the fp32 computation on the same inputs.

    The written-out path rounds the scores to the dtype before its fp32 softmax, the fused kernel
    need not; the output is a convex combination of values |v| <= 4, rounded once. Measured: at most
    1 u * 4 for either; bound 4 u * 4.
    """
    g = torch.Generator().manual_seed(nkv)
    layout = SinkCache(2, 30, dtype=dtype).begin(24)
    q = torch.randn(2, 4, 24, 16, generator=g).to(dtype)
    L = layout.mask.shape[1]  # the 24 slots in use: an eager pass over a filling cache spans only those
    k, v = (torch.randn(2, nkv, L, 16, generator=g).clamp(-4, 4).to(dtype) for _ in range(2))
    exact = attend(q.float(), k.float(), v.float(), layout, 0.25, rope=Rotary(16))
    bound = 4 * (torch.finfo(dtype).eps / 2) * 4
    for sdpa in (False, True):
        got = attend(q, k, v, layout, 0.25, rope=Rotary(16), sdpa=sdpa)
        assert got.dtype == dtype and (got.float() - exact).abs().max() <= bound


@pytest.mark.parametrize("arch", ["llama", "mpt"])  # RoPE, and ALiBi as a float mask
def test_sdpa_decode_step_compiles_without_graph_breaks(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    cache, reference = SinkCache(2, 6), SinkCache(2, 6)
    with torch.no_grad(), use_sdpa():
        prefill(model, cache, ids[:, :9], chunk_size=9)
        prefill(model, reference, ids[:, :9], chunk_size=9)
        torch._dynamo.reset()
        step = torch.compile(decode_one_token, fullgraph=True, backend="eager")
        for t in range(9, 16):
            got, want = step(model, cache, ids[:, t]), decode_one_token(model, reference, ids[:, t])
            assert (got - want).abs().max() < 1e-6
