"""Rotary position embeddings (RoPE), evaluated at whatever positions the cache hands out.

minisink keeps keys *un-rotated* in the cache. Every forward pass rotates queries and keys by the
positions they have inside the cache at that moment (see minisink/cache.py), so the same key is
rotated by a different angle each step as older tokens are evicted. That is the StreamingLLM rule:
positions are slots in the cache, not indices in the text.

The tables are computed in fp32 from scratch on every call, from integer positions on the device:
there is no precomputed table to outgrow, nothing to rebuild after loading on the meta device, and
nothing a compiled graph has to guard on. The cost is a few element-wise ops per layer.
"""
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` of a Llama config.json (or `rope_parameters` in transformers >= 5)."""
    kind: str = "default"          # default | linear | dynamic | llama3
    factor: float = 1.0
    original_max_position_embeddings: int = 0   # llama3, and the context of dynamic
    low_freq_factor: float = 1.0   # llama3
    high_freq_factor: float = 4.0  # llama3


class Rotary:
    """Rotates the first `dim` channels of each head with the rotate-half convention of HF checkpoints.

    `dim` < head_dim is partial rotary (Pythia rotates 25% of each head; the rest passes through).
    """

    def __init__(self, dim: int, base: float = 10000.0, scaling: RopeScaling = RopeScaling()):
        assert dim % 2 == 0, f"rotary dim must be even, got {dim}"
        self.dim, self.base, self.scaling = dim, base, scaling

    def inv_freq(self, device, max_pos: torch.Tensor) -> torch.Tensor:
        """(dim/2,) fp32 angular frequencies. `max_pos` (0-d tensor) only matters for dynamic NTK."""
        s, dim = self.scaling, self.dim
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        if s.kind == "dynamic":
            # NTK-aware: raise the base once the positions in use exceed the trained context.
            # Positions here are cache positions, so with StreamingLLM this triggers only if the
            # cache itself is larger than the trained context.
            ctx = s.original_max_position_embeddings
            seq_len = torch.clamp(max_pos + 1, min=ctx).double()
            base = self.base * ((s.factor * seq_len / ctx) - (s.factor - 1)) ** (dim / (dim - 2))
            return (1.0 / (base.float() ** exponent)).float()
        inv_freq = 1.0 / (self.base ** exponent)
        if s.kind == "linear":
            inv_freq = inv_freq / s.factor  # same as dividing the positions by `factor`
        elif s.kind == "llama3":
            # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
            # interpolated smoothly.
            ctx = s.original_max_position_embeddings
            low_wavelen, high_wavelen = ctx / s.low_freq_factor, ctx / s.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
            smooth = (ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
            is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv_freq = torch.where(is_medium, smoothed, scaled)
        return inv_freq

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, max_pos: torch.Tensor) -> torch.Tensor:
        """x: (B, nh, N, hd); pos: (N,) int64 positions -> x rotated, same shape and dtype."""
        angles = pos.float()[:, None] * self.inv_freq(x.device, max_pos)[None, :]  # (N, dim/2)
        angles = torch.cat((angles, angles), dim=-1)                                # (N, dim)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x_rot, x_pass = x[..., : self.dim], x[..., self.dim :]
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
        return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated


def rope_from_config(d: dict, theta_key: str = "rope_theta", default_theta: float = 10000.0):
    """(base, RopeScaling) from a config.json dict, in either of the two forms found in the wild.

    Checkpoints on the hub write `rope_theta` (or e.g. `rotary_emb_base`) and `rope_scaling`
    ({"type"|"rope_type": ..., "factor": ...} or null). transformers >= 5 writes both into one
    `rope_parameters` dict instead.
    """
    from .config import refuse
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or params
    base = float(params.get("rope_theta", d.get(theta_key, default_theta)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return base, RopeScaling()
    if kind not in ("linear", "dynamic", "llama3"):
        refuse("rope_scaling.rope_type", kind, "minisink implements default, linear, dynamic and llama3")
    ctx = scaling.get("original_max_position_embeddings") if kind == "llama3" else None
    return base, RopeScaling(
        kind=kind, factor=float(scaling["factor"]),
        # dynamic NTK scales relative to the trained context, which HF reads from max_position_embeddings
        original_max_position_embeddings=int(ctx or d.get("max_position_embeddings", 2048)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)))
