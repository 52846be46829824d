"""RoPE rotated once: the angles stay exact at stream positions around a million, and a stream that
has reached them computes what the paper's literal form (re-rotate by cache positions) computes."""
import pytest
import torch

from minisink.cache import SinkCache
from minisink.generate import decode_one_token, prefill
from minisink.rope import RopeScaling, Rotary
from test_cache import ARCHS, VOCAB, NaiveCache, tiny_model

FAR = 1_000_000


def score(rope, q, k, t, j):
    """q rotated by position t, k by position j, dotted: (N,) per row. q, k: (N, hd)."""
    pos = lambda p: torch.tensor([p])
    qr = rope(q[None, :, None], pos(t), pos(t))[0, :, 0]
    kr = rope(k[None, :, None], pos(j), pos(t))[0, :, 0]
    return (qr * kr).sum(-1)


@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling("llama3", 8.0, 8192, 1.0, 4.0)])
@pytest.mark.parametrize("dim, base", [(64, 10000.0), (16, 10000.0), (128, 500000.0)])
def test_scores_depend_only_on_the_distance_at_a_million(dim, base, scaling):
    """q at t, k at j around 10^6 score exactly as q at t - j, k at 0 (the cache frame's small angles)."""
    rope = Rotary(dim, base, scaling)
    g = torch.Generator().manual_seed(dim)
    q, k = torch.randn(8, dim, generator=g), torch.randn(8, dim, generator=g)
    for t in (FAR, FAR + 1, FAR + 1023, 3 * FAR + 17, 10**9 + 7):
        for d in (0, 1, 5, 1019, 2043):
            far, near = score(rope, q, k, t, t - d), score(rope, q, k, d, 0)
            assert (far - near).abs().max() < 1e-5, (t, d)


def test_fp32_angles_would_not_be_exact_at_a_million():
    """The test above can fail: angles formed in fp32, as at short positions, drift by ~0.03 rad."""
    inv_freq = Rotary(64).inv_freq("cpu", torch.tensor(0))
    t = torch.tensor(FAR + 1023)
    drift = (t.float() * inv_freq).double() - t.double() * inv_freq.double()
    assert drift.abs().max() > 1e-2


@pytest.mark.parametrize("far", [FAR, 10**9])
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "mpt"])  # MPT has ALiBi: no angles
def test_a_stream_far_in_equals_the_literal_form(arch, far):
    """Teleport a stream to token ~10^6 (~10^9), then decode: same logits as the paper's literal cache.

    Both caches take the same 3*(S+W) tokens. The literal cache (tests/test_cache.py's oracle:
    un-rotated keys, re-rotated by cache positions every step) is left as is: its state does not
    depend on how far the stream has gone, only on which tokens it holds. The sink cache is moved D
    (a multiple of W) tokens on, as if ~10^6 tokens had been streamed: its window slots now hold
    stream indices + D, so their keys are re-written rotated by those indices. Decoding then rotates
    queries by positions around 10^6, and the sinks by d_t around 10^6, from their copies at s.
    """
    S, W = 4, 12
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (1, 6 * (S + W)), generator=torch.Generator().manual_seed(1))
    literal, once = NaiveCache(S, W), SinkCache(S, W)
    with torch.no_grad():
        prompt = 3 * (S + W)
        for t in range(prompt):
            model(ids[:, t:t + 1], literal)
        prefill(model, once, ids[:, :prompt], chunk_size=7)
        D = (far // W) * W  # a whole number of ring turns: every token stays in its slot
        once.n += D
        once.seen += D
        age = once.slot_token[S:] - (prompt - W)                  # (W,) the oracle keeps the window by age
        once.slot_token[S:] += D
        for layer, k in enumerate(once.k):
            unrotated = literal.k[layer][:, :, S:][:, :, age]      # (B, nkv, W, hd)
            k[:, :, S:] = model.rotary(unrotated, once.slot_token[S:], torch.tensor(S + W - 1))
        assert int(once.n) > far
        for t in range(prompt, ids.shape[1]):
            want = decode_one_token(model, literal, ids[:, t])
            got = decode_one_token(model, once, ids[:, t])
            assert (got - want).abs().max() < 1e-5, t
