"""Rotary position embeddings (RoPE), and why minisink rotates each key only once.

The paper's rule (StreamingLLM, section 3.2) is literal: positions are slots in the cache, not
indices in the text. Keep keys un-rotated, and at every step rotate every cached key by its
position *inside the cache* and the query by the last position. As old tokens are evicted, the
same key is rotated by a different angle each step. tests/test_cache.py keeps this literal form
(`NaiveCache`, with `Rotary.__call__(x, pos)`) as the oracle, and tutorial 4 as the lesson.

Only differences of positions reach a RoPE score: q rotated by a, k rotated by b gives
q^T R(b - a) k. Let t be the stream index of the query, j of a key, S sinks, W window, C = S+W.

- A window key j sits at cache position p_q - (t - j), where p_q = min(t, C-1) is the query's own
  cache position: its score depends on t - j only. Rotating the key by j, once, when it is written,
  and the query by t gives the same score.
- A sink s sits at cache position s, p_q - s before the query. In the query's frame (rotated by t)
  that is s + d_t, d_t = max(0, t - (C-1)): the sinks follow the window. The cache re-rotates its
  S sink keys by d_t at every step, from a copy rotated by s (so no rounding accumulates).

So a step rotates the query and its new key by t and the S sinks by d_t: the tables of two
positions instead of S+W, and the window in the cache is never touched again (minisink/cache.py).
Same scores as the literal form, up to float rounding.

Angles: a stream is endless, so t grows without bound. In fp32, t * inv_freq at t ~ 10^6 is off by
~0.06 rad (24-bit mantissa). So the angle t * inv_freq is formed from the int64 position in float64
and reduced modulo 2 pi there (error ~10^-10 rad at t ~ 10^6, ~10^-4 at t ~ 10^12); the reduced
angle, in [0, 2 pi), goes to fp32 and cos/sin run in fp32 as in HF. The frequencies themselves are
the fp32 values HF computes, so short positions agree with HF to an ulp.
The tables are built once per forward pass, for all layers (`SinkCache.begin` puts them in its Plan).

Dynamic NTK scaling changes the frequencies with the largest position in use; once the cache is
full that is constant (C-1). While it fills, a key keeps the frequencies it was written with, as in
HF's own cache (a sink copy too, re-rotated by d_t with the newest ones); the literal form
re-rotates every key with the newest ones. The two agree unless the cache
is larger than the trained context, the only case where dynamic NTK acts at all under StreamingLLM.
"""
import math
from dataclasses import dataclass

import torch


NO_FLOAT64 = {"mps"}  # devices without float64 arithmetic (not tested here: no Apple GPU on CI)


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

    def tables(self, pos: torch.Tensor, max_pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """pos: (N,) int64 -> cos, sin (N, dim) in `dtype`, exact at any position of an endless stream."""
        if pos.device.type in NO_FLOAT64:
            # Apple's GPU (mps) has no float64: the tables are made on the CPU, N x dim values a pass
            cos, sin = self.tables(pos.cpu(), max_pos.cpu(), dtype)
            return cos.to(pos.device), sin.to(pos.device)
        inv_freq = self.inv_freq(pos.device, max_pos)                    # (dim/2,) fp32, HF's values
        # compiled: an opaque op, so that the tables stay one small buffer (see `cos_sin`)
        cos, sin = (opaque_cos_sin if torch.compiler.is_compiling() else cos_sin)(pos, inv_freq)
        return cos.to(dtype), sin.to(dtype)                              # (N, dim) each

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, nh, N, hd) rotated by tables (N, dim) of `tables`; same shape and dtype."""
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)   # no-ops when the tables are in x's dtype already
        x_rot, x_pass = x[..., : self.dim], x[..., self.dim :]
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
        return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated

    def __call__(self, x: torch.Tensor, pos: torch.Tensor, max_pos: torch.Tensor) -> torch.Tensor:
        """x: (B, nh, N, hd); pos: (N,) int64 positions -> x rotated, same shape and dtype."""
        return self.apply(x, *self.tables(pos, max_pos, x.dtype))

    @property
    def key(self) -> tuple:
        """What the tables depend on: layers with equal keys share one set of tables per forward."""
        return (self.dim, self.base, self.scaling)


def cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (N,) int64, inv_freq (dim/2,) fp32 -> cos, sin (N, dim) fp32 of the angles pos * inv_freq."""
    angles = pos.double()[:, None] * inv_freq.double()[None, :]      # (N, dim/2) float64: exact
    angles = torch.remainder(angles, 2 * math.pi).float()           # [0, 2 pi): fp32 is exact enough
    angles = torch.cat((angles, angles), dim=-1)                     # (N, dim)
    return angles.cos(), angles.sin()


# Why opaque under torch.compile: at batch 1 a query-key product has one row, and inductor (CPU)
# lowers it to a loop over keys into which it fuses every element-wise producer of the query, the
# table included: cos() and sin() ran once per head, key and channel, and the compiled step was
# slower than eager. A custom op is a fence it does not fuse through: the tables are computed once.
opaque_cos_sin = torch.library.custom_op("minisink::rope_cos_sin", mutates_args=())(cos_sin)


@opaque_cos_sin.register_fake
def _(pos, inv_freq):
    shape = (pos.shape[0], 2 * inv_freq.shape[0])
    return pos.new_empty(shape, dtype=torch.float32), pos.new_empty(shape, dtype=torch.float32)


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
