"""Causal attention over what the cache hands back, written out to be read (a fused kernel optional).

All four models call `attend` the same way: q, k, v plus the `Layout` of this forward pass
(minisink/cache.py). Position information enters here and only here: RoPE rotates queries and keys
by their positions (`rope_new_keys` rotates the new keys once, before the cache stores them, when the
Layout is in the stream frame; in the paper's literal cache frame, `attend` rotates every cached key
at every step); ALiBi subtracts slope * (query_pos - key_pos) from the scores. RoPE tables and ALiBi
biases are built once per forward pass, by the first layer, and shared by the others (`per_pass`).

The written-out formula is the default. `attend(..., sdpa=True)`, or every call inside a
`with use_sdpa():` block, hands the same scores to PyTorch's fused
`scaled_dot_product_attention` instead: faster for long prefill chunks, same mathematics (the mask
is the Layout's, ALiBi goes in as an additive float mask). It needs one position per query, so a
RoPE pass with two query positions (`layout.q_pos_sink`: a chunk that overflows the cache, or a
decode step in the stream frame) always takes the written-out path. In fp16/bf16 the additive ALiBi mask is rounded to the model's dtype, as
transformers' Falcon does on its SDPA path; the written-out path adds it in fp32.
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .cache import Layout
from .rope import Rotary

SDPA = False  # what `attend(sdpa=None)` does: False, the formula below; see `use_sdpa`


@contextmanager
def use_sdpa(enabled: bool = True):
    """Inside this block every model attends through PyTorch's fused kernel (benchmarks, tests)."""
    global SDPA
    before, SDPA = SDPA, enabled
    try:
        yield
    finally:
        SDPA = before


def per_pass(layout: Layout, key, make):
    """What every layer of this forward pass needs (RoPE tables, ALiBi biases): built once, shared."""
    if key not in layout.tables:
        layout.tables[key] = make()
    return layout.tables[key]


def rotate(x: torch.Tensor, layout: Layout, rope: Rotary, which: str) -> torch.Tensor:
    """x (B, h, N, hd) rotated by the Layout's positions `which` (q_pos, q_pos_sink or k_pos)."""
    cos, sin = per_pass(layout, (which, rope.key, x.dtype),
                        lambda: rope.tables(getattr(layout, which), layout.max_pos, x.dtype))  # (N, dim)
    return rope.apply(x, cos, sin)


def rope_new_keys(k: torch.Tensor, layout: Layout, rope: Rotary) -> torch.Tensor:
    """The keys k (B, nkv, T, hd) of this pass's tokens as the cache stores them.

    Stream frame: rotated once, by their stream indices (= the queries' q_pos), never again.
    Cache frame (the paper's literal form): un-rotated; `attend` rotates the whole cache each step.
    """
    return rotate(k, layout, rope, "q_pos") if layout.keys_rotated else k


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float,
           rope: Rotary | None = None, alibi_slopes: torch.Tensor | None = None,
           sdpa: bool | None = None) -> torch.Tensor:
    """q: (B, nh, T, hd); k, v: (B, nkv, L, hd) with nh a multiple of nkv -> (B, T, nh * hd)."""
    if (SDPA if sdpa is None else sdpa) and (layout.q_pos_sink is None or rope is None):
        return attend_sdpa(q, k, v, layout, scale, rope, alibi_slopes)
    B, nh, T, hd = q.shape
    nkv, L = k.shape[1], k.shape[2]
    probs = attention_probs(q, k, layout, scale, rope, alibi_slopes)   # (B, nh, T, L)
    y = probs.view(B, nkv, nh // nkv * T, L) @ v                       # (B, nkv, g*T, hd)
    return y.view(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd)


def attention_probs(q: torch.Tensor, k: torch.Tensor, layout: Layout, scale: float,
                    rope: Rotary | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """(B, nh, T, L) softmax probabilities of queries q (B, nh, T, hd) over keys k (B, nkv, L, hd).

    The first half of `attend`, public so that attention maps can be drawn with the same code.
    """
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv  # query heads per kv head (GQA/MQA); head h reads kv head h // g

    def scores_for(qr: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        # grouped heads share one K: fold the group into the query rows instead of copying K g times
        s = qr.reshape(B, nkv, g * T, hd) @ keys.transpose(-1, -2)   # (B, nkv, g*T, L')
        return s.view(B, nh, T, keys.shape[2]) * scale

    if rope is None:
        scores = scores_for(q, k)                                    # (B, nh, T, L)
    else:
        kr = k if layout.keys_rotated else rotate(k, layout, rope, "k_pos")
        scores = scores_for(rotate(q, layout, rope, "q_pos"), kr)   # (B, nh, T, L)
        if layout.q_pos_sink is not None:
            # sinks are seen from the query's cache position: the query rotated a second time
            q_sink, n = rotate(q, layout, rope, "q_pos_sink"), layout.sink_slots
            if n is not None:  # the sinks are the first n slots: score only those again
                # a product and a sum, not a matmul: S columns are too few to be worth a (possibly
                # multi-threaded) batched matmul call per layer, which stalls on a busy machine
                qs = q_sink.reshape(B, nkv, g * T, 1, hd)
                sink = (qs * kr[:, :, None, :n]).sum(-1).view(B, nh, T, -1) * scale   # (B, nh, T, n)
                scores = torch.cat([sink, scores[..., n:]], dim=-1)
            else:              # a chunk past the capacity: sinks also among the chunk's own keys
                scores = torch.where(layout.is_sink, scores_for(q_sink, kr), scores)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(layout, alibi_slopes)          # (B, nh, T, L), fp32
    scores = scores.masked_fill(~layout.mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


def alibi_bias(layout: Layout, slopes: torch.Tensor) -> torch.Tensor:
    """(nh, T, L) fp32: -slope_h * (query_pos - key_pos), distances inside the cache; once per pass."""
    return per_pass(layout, ("alibi", slopes.shape[0]), lambda: _alibi_bias(layout, slopes))


def _alibi_bias(layout: Layout, slopes: torch.Tensor) -> torch.Tensor:
    q_pos = layout.q_pos[:, None]
    if layout.q_pos_sink is not None:  # two query positions: sinks are seen from the second
        q_pos = torch.where(layout.is_sink, layout.q_pos_sink[:, None], q_pos)
    distance = (q_pos - layout.k_pos[None, :]).float()              # (T, L)
    return -slopes[:, None, None] * distance


def attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float,
                rope: Rotary | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """`attend` through F.scaled_dot_product_attention. Needs one query frame when there is RoPE."""
    assert layout.q_pos_sink is None or rope is None, "two query frames: use the written-out path"
    B, nh, T, hd = q.shape
    nkv, L = k.shape[1], k.shape[2]
    g = nh // nkv
    if rope is not None:
        q = rotate(q, layout, rope, "q_pos")
        k = k if layout.keys_rotated else rotate(k, layout, rope, "k_pos")
    q = q.reshape(B, nkv, g * T, hd)   # the group folded into the query rows, as in `attend`
    mask = layout.mask.repeat(g, 1)    # (g*T, L): row i*T + t is query t of the group's i-th head
    if alibi_slopes is not None:
        bias = alibi_bias(layout, alibi_slopes).view(nkv, g * T, L)
        mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)   # additive float mask
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, nkv, g*T, hd)
    return y.view(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd)
