"""Causal attention over what the cache hands back, written out to be read (a fused kernel optional).

All four models call `attend` the same way: un-rotated q, k, v plus the `Layout` of this forward pass
(minisink/cache.py). Position information enters here and only here: RoPE rotates queries and keys
by their positions inside the cache; ALiBi subtracts slope * (query_pos - key_pos) from the scores.

The written-out formula is the default. `attend(..., sdpa=True)`, or every call inside a
`with use_sdpa():` block, hands the same scores to PyTorch's fused
`scaled_dot_product_attention` instead: faster for long prefill chunks, same mathematics (the mask
is the Layout's, ALiBi goes in as an additive float mask). It needs one position per query, so a
RoPE chunk that overflows the cache (two query frames: `layout.q_pos_sink`) always takes the
written-out path. In fp16/bf16 the additive ALiBi mask is rounded to the model's dtype, as
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
    nkv, L = k.shape[1], k.shape[2]
    g = nh // nkv  # query heads per kv head (GQA/MQA); head h reads kv head h // g

    def scores_for(q_pos: torch.Tensor) -> torch.Tensor:
        qr = rope(q, q_pos, layout.max_pos) if rope is not None else q
        # grouped heads share one K: fold the group into the query rows instead of copying K g times
        s = qr.reshape(B, nkv, g * T, hd) @ kr.transpose(-1, -2)   # (B, nkv, g*T, L)
        return s.view(B, nh, T, L) * scale

    kr = rope(k, layout.k_pos, layout.max_pos) if rope is not None else k
    scores = scores_for(layout.q_pos)                                # (B, nh, T, L)
    if layout.q_pos_sink is not None and rope is not None:
        # a chunk past the cache's capacity: sinks are seen from a different query position
        scores = torch.where(layout.is_sink, scores_for(layout.q_pos_sink), scores)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(layout, alibi_slopes)          # (B, nh, T, L), fp32
    scores = scores.masked_fill(~layout.mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


def alibi_bias(layout: Layout, slopes: torch.Tensor) -> torch.Tensor:
    """(nh, T, L) fp32: -slope_h * (query_pos - key_pos), distances inside the cache."""
    q_pos = layout.q_pos[:, None]
    if layout.q_pos_sink is not None:  # a chunk past the capacity: sinks seen from another position
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
        q, k = rope(q, layout.q_pos, layout.max_pos), rope(k, layout.k_pos, layout.max_pos)
    q = q.reshape(B, nkv, g * T, hd)   # the group folded into the query rows, as in `attend`
    mask = layout.mask.repeat(g, 1)    # (g*T, L): row i*T + t is query t of the group's i-th head
    if alibi_slopes is not None:
        bias = alibi_bias(layout, alibi_slopes).view(nkv, g * T, L)
        mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)   # additive float mask
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, nkv, g*T, hd)
    return y.view(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd)
