"""Causal attention over what the cache hands back, written out (no fused kernel) to be read.

All four models call `attend` the same way: un-rotated q, k, v plus the `Layout` of this forward pass
(minisink/cache.py). Position information enters here and only here: RoPE rotates queries and keys
by their positions inside the cache; ALiBi subtracts slope * (query_pos - key_pos) from the scores.
"""
import torch

from .cache import Layout
from .rope import Rotary


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float,
           rope: Rotary | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, nh, T, hd); k, v: (B, nkv, L, hd) with nh a multiple of nkv -> (B, T, nh * hd)."""
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
        q_pos = layout.q_pos[:, None]
        if layout.q_pos_sink is not None:
            q_pos = torch.where(layout.is_sink, layout.q_pos_sink[:, None], q_pos)
        distance = (q_pos - layout.k_pos[None, :]).float()          # (T, L)
        scores = scores - alibi_slopes[:, None, None] * distance     # (B, nh, T, L)
    scores = scores.masked_fill(~layout.mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    y = probs.view(B, nkv, g * T, L) @ v                             # (B, nkv, g*T, hd)
    return y.view(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd)
