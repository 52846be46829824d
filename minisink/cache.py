"""The StreamingLLM cache: S attention sinks plus a rolling window of W recent tokens, in one frame.

Every layer keeps preallocated K and V buffers of shape (B, kv_heads, S+W, head_dim). The first S
tokens of the stream go to the sink slots and stay there forever; every later token goes to the
window slots, which are used as a ring buffer: token t lands in slot S + (t - S) % W, overwriting
the token that has just left the window.

    stream:   t0  t1  t2  t3  t4  t5  t6  t7  t8  t9  t10 t11 t12 t13 ...
    S=2, W=5, C=S+W=7, after t12 was written (the query is t12):

    slot       0    1  |  2    3    4    5    6
    token      t0   t1 |  t12  t8   t9   t10  t11    <- ring; next write (t13) goes to slot 3
    key at     6    7  |  12   8    9    10   11     <- the angle its key is rotated by (RoPE)
               sinks   |  window: each key rotated once, by its stream index, when written

The paper gives positions *inside the cache*: sinks 0..S-1, window tokens S..C-1 by age, the query
the last, C-1. Only differences of positions reach the scores (minisink/rope.py), so a window key
j may as well sit at j and the query at t: their distance t - j is the paper's. A sink s sits at
cache position s, C-1 - s before the query; in the query's frame that is s + d_t, where

    d_t = max(0, t - (C-1))      how far the window has slid (12 - 6 = 6 above: the sinks at 6, 7)

So **the sinks follow the window**: at every step the S sink keys are re-rotated by d_t into the sink
slots, from a copy kept rotated by their own position s (never cumulatively, so no error builds
up). The whole cache is then in the query's frame: one query rotation, one attention call over the
slots, and no mask once the cache is full (slot order does not matter to attention). ALiBi reads
the same positions (`Plan.k_pos`: s + d_t for a sink, j for a window key).

A forward pass over T new tokens is `plan = cache.begin(T, rope)` (positions, mask, RoPE tables,
shared by all layers), then `cache.update(layer, k, v, plan)` per layer, which rotates and stores the
new keys and hands back what to attend to. Two ways to write:

- write first, then attend to the buffer: one token (decode), or a chunk that fits in the cache.
  The token a write evicts is exactly the one that has left the current token's window.
- attend to the buffer + the chunk, then write: a chunk of T > 1 tokens that overflows the cache
  (chunked prefill, long-text evaluation). Writing first would evict keys that earlier tokens of
  the chunk still see. Each token t of the chunk sees the sinks and its own window t-W+1 .. t,
  exactly as if the chunk had been streamed one token at a time: see `Plan.q_pos_sink`.

Mapping to the official code: mit-han-lab/streaming-llm's StartRecentKVCache(start_size=S,
recent_size=R) evicts *after* the forward pass, so its query attends to S+R+1 keys. minisink writes
the current token first, so a query attends to at most S+W keys including itself:
official (S, R) == minisink (S, W=R+1).

No torch.cat to evict, no reallocation and no host synchronisation in the decode step: the stream
position `n` lives on the device. The host also counts the tokens (`seen`), so that an eager step
over a filling cache attends to the slots in use only, and a chunk asks the device once, to choose
which of its tokens survive. A compiled step cannot count on the host: it spans all S+W slots
(static shapes) and masks the unused ones until it is told the cache is full (`full`, which an
eager pass or the feeder, `Stream`, sets once: a compiled stream has one graph while the cache
fills and one without a mask after), and it leaves `seen` unknown (None) until the next chunk
reads it back.
"""
from dataclasses import dataclass

import torch
from torch import nn

from .rope import Rotary


@dataclass
class Plan:
    """One forward pass over T new tokens, from `SinkCache.begin` to every layer's `update` and
    `attend`. L keys are attended to."""
    q_pos: torch.Tensor             # (T,) int64  stream index of each query, and of each new key
    k_pos: torch.Tensor             # (L,) int64  position of each key in the queries' frame
    is_sink: torch.Tensor           # (L,) bool   the key is one of the S sinks
    mask: torch.Tensor | None       # (T, L) bool query may attend to key; None: every key
    q_pos_sink: torch.Tensor | None = None  # (T,) overflowing chunk: the cache position min(t, C-1)
    #   from which each query sees the sinks (kept rotated by s): its queries have different d_t
    # where the new tokens go (SinkCache.update)
    slots: torch.Tensor | None = None      # (T',) int64 the slots the new tokens are written to
    new_sinks: tuple | None = ()           # (first, count): new sinks, the first `count` kept tokens;
    #   () none; None unknown (a compiled step while the cache fills)
    keep: torch.Tensor | None = None       # (T',) which new tokens are written (an overflowing chunk); None: all
    shift: torch.Tensor | None = None      # () int64 d_t of the last query: how far the window has slid
    chunk: bool = False             # an overflowing chunk: attend to buffer + chunk, then write
    sinks_move: bool = False        # re-rotate the sink slots (False: eager, d_t and the sinks unchanged)
    rope: Rotary | None = None      # the tables below are this Rotary's
    q_rope: tuple | None = None     # cos, sin (T, dim) of q_pos: the queries and the new keys
    sink_rope: tuple | None = None  # cos, sin of the shift (1, dim), or of q_pos_sink (T, dim)


class SinkCache(nn.Module):
    """S sink slots + a ring buffer of W window slots per layer. `window` policy is S=0."""

    def __init__(self, sink_size: int, window_size: int, device=None, dtype=torch.float32):
        super().__init__()
        if sink_size < 0 or window_size < 1:
            raise ValueError(f"need sink_size >= 0 and window_size >= 1, got {sink_size}, {window_size}")
        self.S, self.W = sink_size, window_size
        self.capacity = sink_size + window_size
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        # per layer, allocated by the first update from that layer's own K (a sharded layer has fewer heads)
        self.k: list[torch.Tensor] = []       # (B, kv_heads, S+W, hd) in the last query's frame
        self.v: list[torch.Tensor] = []       # (B, kv_heads, S+W, hd)
        self.sink_k: list[torch.Tensor] = []  # (B, kv_heads, S, hd) the sinks' copies, rotated by s once
        self.register_buffer("slot_token", torch.full((self.capacity,), -1, dtype=torch.long, device=device))
        self.register_buffer("n", torch.zeros((), dtype=torch.long, device=device))  # tokens seen
        self.register_buffer("sink_slots", torch.arange(sink_size, device=device))
        self.seen: int | None = 0  # n as the host counts it; None after a compiled step
        self.full = False  # the host knows every slot holds a token: a compiled step needs no mask

    @property
    def length(self) -> int:
        """Tokens seen so far. Reads the device: call it between steps, not inside one."""
        return int(self.n)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a decode step reads and writes in place (Stream marks them static for CUDA graphs)."""
        return [*self.k, *self.v, *self.sink_k, self.slot_token, self.n]

    def slots_of(self, tok: torch.Tensor) -> torch.Tensor:
        """Slot that stream index `tok` is written to: its own index for a sink, the ring otherwise."""
        return torch.where(tok < self.S, tok, self.S + (tok - self.S) % self.W)

    def begin(self, T: int, rope: Rotary | None = None) -> Plan:
        """Plan a forward pass over the next T tokens of the stream; call once, before the layers."""
        S, W, C = self.S, self.W, self.capacity
        tok = self.n + torch.arange(T, device=self.n.device)           # (T,) stream indices of the queries
        compiling = torch.compiler.is_compiling()
        # the decode step (T == 1) never asks the device; a chunk does, once, to know if it overflows
        n = (None if compiling else self.seen) if T == 1 else self.length
        chunk = T > 1 and n + T > C
        shift = torch.clamp(tok[-1] - (C - 1), min=0)                  # d_t of the last query
        if not chunk:
            slots, keep = self.slots_of(tok), None
            self.slot_token.index_copy_(0, slots, tok)
            used = C if n is None else min(n + T, C)  # eager, filling: slots 0..n+T-1 are the ones in use
            key_tok = self.slot_token[:used]                          # (L <= C,)
            is_sink = (key_tok >= 0) & (key_tok < S)
            k_pos = torch.where(is_sink, key_tok + shift, key_tok)     # the sinks follow the window
            if T > 1:
                mask = (key_tok >= 0) & (key_tok[None, :] <= tok[:, None])  # causal: the chunk fits
            else:  # one token sees every key in use: a mask only for the unused slots of a compiled step
                mask = None if n is not None or self.full else (key_tok >= 0)[None, :]
            q_pos_sink = None
        else:
            # Only the sinks and the last W tokens of the chunk survive it; writing only those keeps
            # every slot index unique (index_copy_ with duplicates is undefined).
            keep = torch.tensor([i for i in range(T) if n + i < S or i >= T - W], device=tok.device)
            slots = self.slots_of(tok[keep])
            key_tok = torch.cat([self.slot_token, tok])               # (L = C+T,) buffer, then chunk
            self.slot_token.index_copy_(0, slots, tok[keep])
            is_sink = (key_tok >= 0) & (key_tok < S)
            k_pos = key_tok                                            # sinks at s: seen from q_pos_sink
            t, j = tok[:, None], key_tok[None, :]
            mask = (j >= 0) & (j <= t) & ((j < S) | (j > t - W))      # the sinks, and t's own window
            q_pos_sink = torch.clamp(tok, max=C - 1) if S else None
        self.seen = None if n is None else n + T
        if n is not None and n + T >= C:
            self.full = True
        self.n += T
        if n is None:
            new_sinks = () if self.full or not S else None
        else:
            new_sinks = (n, min(S - n, T)) if n < S else ()
        # d_t moves once t >= C; while the cache fills only a new sink moves them (a compiled step: always)
        sinks_move = S > 0 and (n is None or n < S or n + T > C)
        plan = Plan(tok, k_pos, is_sink, mask, q_pos_sink, slots, new_sinks, keep, shift, chunk, sinks_move)
        if rope is not None:
            # one table for every layer: the queries' positions and the sinks' (shift or cache position)
            sink_pos = shift[None] if q_pos_sink is None else q_pos_sink
            max_pos = torch.clamp(tok[-1], max=C - 1)   # the newest query's cache position (dynamic NTK)
            cos, sin = rope.tables(torch.cat([tok, sink_pos]), max_pos, self.dtype)
            plan.rope, plan.q_rope, plan.sink_rope = rope, (cos[:T], sin[:T]), (cos[T:], sin[T:])
        return plan

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (B, kv_heads, T, hd) as the plan says; return the keys and
        values to attend to (B, kv_heads, L, hd), all in the queries' frame (RoPE: rotated)."""
        S = self.S
        if layer == len(self.k):  # the shapes come from this layer's own K
            B, H, _, D = k.shape
            self.k.append(torch.zeros(B, H, self.capacity, D, device=self.device, dtype=self.dtype))
            self.v.append(torch.zeros(B, H, self.capacity, D, device=self.device, dtype=self.dtype))
            self.sink_k.append(torch.zeros(B, H, S, D, device=self.device, dtype=self.dtype))
        k_buf, v_buf, sink_k = self.k[layer], self.v[layer], self.sink_k[layer]
        k, v = k.to(self.dtype), v.to(self.dtype)
        if plan.rope is not None:
            k = plan.rope.apply(k, *plan.q_rope)   # a key is rotated once, by its stream index, when written
        if plan.chunk:  # attend to buffer + chunk, then write; the sinks as their copies, rotated by s
            keys = torch.cat([sink_k, k_buf[:, :, S:], k], 2)                  # (B, H, C+T, hd)
            values = torch.cat([v_buf, v], 2)
            k, v = k[:, :, plan.keep], v[:, :, plan.keep]
        k_buf.index_copy_(2, plan.slots, k)
        v_buf.index_copy_(2, plan.slots, v)
        if plan.new_sinks is None:  # compiled, the cache filling: the token may be a sink (a select)
            s = plan.slots.clamp(max=S - 1)
            sink_k.index_copy_(2, s, torch.where((plan.slots < S)[:, None], k, sink_k.index_select(2, s)))
        elif plan.new_sinks:        # keep a copy of each new sink, as written: rotated by s
            first, count = plan.new_sinks
            sink_k[:, :, first:first + count] = k[:, :, :count]
        if plan.chunk:
            return keys, values
        if plan.sinks_move:  # the sinks follow the window: their copies rotated by d_t, into the sink slots
            # an index_copy_, like the write above: a compiled step whose second write to the buffer
            # is a slice assignment copies the whole buffer (inductor, torch 2.13: 1.3x the step at 2K slots)
            sinks = sink_k if plan.rope is None else plan.rope.apply(sink_k, *plan.sink_rope)
            k_buf.index_copy_(2, self.sink_slots, sinks)
        used = plan.k_pos.shape[0]
        return k_buf[:, :, :used], v_buf[:, :, :used]

    def reset(self) -> None:
        """Forget the stream but keep the buffers (a new stream of the same shape)."""
        self.slot_token.fill_(-1)
        self.n.zero_()
        self.seen, self.full = 0, False


class DenseCache(SinkCache):
    """The baseline: keep every token. Grows by doubling, so memory is unbounded by design.

    It is a sink cache that never evicts: S=0 and a window as long as the stream, so positions are
    the token indices in the text. Attention then runs past the trained context and degrades.
    """

    def __init__(self, capacity: int = 256, device=None, dtype=torch.float32):
        super().__init__(0, capacity, device=device, dtype=dtype)

    @property
    def length(self) -> int:
        return self.seen  # kept on the host, so that growing needs no sync (dense is never compiled)

    def begin(self, T: int, rope: Rotary | None = None) -> Plan:
        if self.seen + T > self.capacity:
            self.grow(max(2 * self.capacity, self.seen + T))
        return super().begin(T, rope)

    def grow(self, capacity: int) -> None:
        grow = lambda buf: torch.cat([buf, buf.new_zeros(*buf.shape[:2], capacity - self.capacity, buf.shape[3])], 2)
        self.k, self.v = [grow(b) for b in self.k], [grow(b) for b in self.v]
        self.slot_token = torch.cat([self.slot_token, self.slot_token.new_full((capacity - self.capacity,), -1)])
        self.W = self.capacity = capacity
