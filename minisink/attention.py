"""Causal attention over what the cache hands back: one `F.scaled_dot_product_attention` call a layer.

All four models call `attend` the same way: q, k, v plus the `Plan` of this forward pass
(minisink/cache.py). Position information enters through the plan and nowhere else: RoPE rotates
the queries by their stream index here (the cache has rotated the keys when it wrote them, and the
sinks into the query's frame); ALiBi subtracts slope * (query_pos - key_pos) from the scores, an
additive float mask (in fp16/bf16 rounded to the model's dtype, as transformers' Falcon does on its
SDPA path).

Grouped-query and multi-query attention read each K and V once: the group of query heads that
share a kv head is folded into the query rows, (B, nh, T, hd) -> (B, nkv, g*T, hd), so the kernel
sees nkv heads of g*T queries and K, V are never copied g times.

`attention_probs` is the same computation written out (matmul, mask, softmax): the readable
reference that tests/test_attention.py compares `attend` with, and what attention maps are drawn
from (minisink/tools/viz.py, tutorials 2 and 8). The models never call it.
"""
import torch
import torch.nn.functional as F

from .cache import Plan


def rotated_query(q: torch.Tensor, k: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries (B, nh, T, hd) in the keys' frame, and the keys (B, nkv, L, hd') to match.

    One rotation, by t, for every query of a decode step or of a chunk that fits the cache. A chunk
    that overflows the cache has queries with different d_t, which see the sinks from their cache
    position min(t, C-1): two positions per query. They are put side by side in one head of twice
    the width, q' = [R(t) q | R(min(t, C-1)) q], against k' = [window key | 0] or [0 | sink key], so
    that q'.k' is the right score for either and the chunk still takes one attention call. (The
    other exact choice, sink and window scores apart merged by their log-sum-exp, takes two calls
    and a merge; this one costs a wider head, on the chunked path only.)
    """
    if plan.rope is None:
        return q, k
    qr = plan.rope.apply(q, *plan.q_rope)
    if plan.q_pos_sink is None:
        return qr, k
    sink = plan.is_sink[:, None]                                          # (L, 1)
    q2 = torch.cat([qr, plan.rope.apply(q, *plan.sink_rope)], -1)          # (B, nh, T, 2hd)
    k2 = torch.cat([k.masked_fill(sink, 0), k.masked_fill(~sink, 0)], -1)  # (B, nkv, L, 2hd)
    return q2, k2


def alibi_bias(plan: Plan, slopes: torch.Tensor) -> torch.Tensor:
    """(nh, T, L) fp32: -slope_h * (query_pos - key_pos), distances in the queries' frame."""
    q_pos = plan.q_pos[:, None]
    if plan.q_pos_sink is not None:  # an overflowing chunk: its queries see the sinks from their cache position
        q_pos = torch.where(plan.is_sink, plan.q_pos_sink[:, None], q_pos)
    return -slopes[:, None, None] * (q_pos - plan.k_pos[None, :]).float()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
           alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, nh, T, hd) as projected; k, v: (B, nkv, L, hd) from `SinkCache.update` -> (B, T, nh * hd)."""
    B, nh, T, hd = q.shape
    nkv, L = k.shape[1], k.shape[2]
    g = nh // nkv  # query heads per kv head (GQA/MQA); head h reads kv head h // g
    q, k = rotated_query(q, k, plan)
    q = q.reshape(B, nkv, g * T, q.shape[-1])   # the group folded into the query rows
    mask = None if plan.mask is None else plan.mask.repeat(g, 1)   # (g*T, L): row i*T + t is query t
    if alibi_slopes is not None:
        bias = alibi_bias(plan, alibi_slopes).view(nkv, g * T, L)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        mask = mask.to(q.dtype)                                     # additive float mask
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, nkv, g*T, hd)
    return y.view(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd)


def attention_probs(q: torch.Tensor, k: torch.Tensor, plan: Plan, scale: float,
                    alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """(B, nh, T, L) softmax probabilities of queries q (B, nh, T, hd) over keys k (B, nkv, L, hd),
    written out: the reference for `attend` (probs @ v), and the attention maps."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    q, k = rotated_query(q, k, plan)
    k = k.repeat_interleave(nh // nkv, dim=1)                          # (B, nh, L, hd): head h reads h // g
    scores = (q @ k.transpose(-1, -2)).float() * scale                 # (B, nh, T, L)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(plan, alibi_slopes)
    if plan.mask is not None:
        scores = scores.masked_fill(~plan.mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(q.dtype)
