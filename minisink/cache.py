"""The StreamingLLM cache: S attention sinks plus a rolling window of W recent tokens.

Every layer keeps preallocated K and V buffers of shape (B, kv_heads, S+W, head_dim). The first S
tokens of the stream go to the sink slots and stay there forever; every later token goes to the
window slots, which are used as a ring buffer: token t lands in slot S + (t - S) % W, overwriting
the token that has just left the window.

    stream:   t0  t1  t2  t3  t4  t5  t6  t7  t8  t9  t10 t11 t12 t13 ...
    S=2, W=5, after t12 was written:

    slot      0    1  |  2    3    4    5    6
    token     t0   t1 |  t12  t8   t9   t10  t11      <- ring; next write (t13) goes to slot 3
    position  0    1  |  6    2    3    4    5        <- positions *inside the cache*
              sinks   |  window, positions by age: oldest S .. newest S+W-1

Positions inside the cache, not in the text: sinks get 0..S-1, window tokens S, S+1, ... by age,
and the current token the last position, S+W-1. Until the cache is full this is simply the token's
index in the stream. The attention (minisink/attention.py) turns these positions into RoPE rotations
or ALiBi distances.

Only differences of positions reach the scores, so a Layout may give its positions in one of two
frames (see minisink/rope.py for the argument):

- cache frame (the paper, literally; `rotate_keys_once=False`): positions as above; keys are stored
  un-rotated and every step rotates every cached key by its current position.
- stream frame (the default): positions are stream indices, a key is rotated once, by its stream
  index, when it is written, and stays so. Window scores depend on t - j either way; sinks are seen
  from the query's cache position min(t, S+W-1), which the Layout gives as `q_pos_sink`.

A forward pass over T new tokens is a `Layout` (positions and mask, shared by all layers), then one
`update` per layer. Two ways to write:

- write first, then attend to the buffer: for one token (decode) or when nothing gets evicted.
  The token that the write evicts is exactly the one that left the current token's window.
- attend to buffer + chunk, then write: for a chunk of T > 1 tokens that overflows the cache
  (chunked prefill, long-text evaluation). Writing first would evict keys that earlier tokens of the
  same chunk still see. Each token t of the chunk sees the sinks and its own window, t-W+1 .. t,
  exactly as if the chunk had been streamed one token at a time.

For that exactness the chunk needs two query positions. The window part of a score depends only
on t - j (both are in the window, positions by age); a sink's on the query's cache position,
min(t, S+W-1). Keys get the positions that the chunk's last query sees; each query gets one position
for window keys (`q_pos`) and one for sinks (`q_pos_sink`). For RoPE and ALiBi, only differences of
positions reach the scores, so this is the same mathematics as token-by-token streaming.

Mapping to the official code: mit-han-lab/streaming-llm's StartRecentKVCache(start_size=S,
recent_size=R) evicts *after* the forward pass, so its query attends to S+R+1 keys. minisink writes
the current token first, so a query attends to at most S+W keys including itself:
official (S, R) == minisink (S, W=R+1).

While the cache fills (fewer than S+W tokens seen), an eager pass attends to the slots in use only,
so a short stream pays for its length, not the capacity: the count of tokens seen is also kept on
the host (no sync). Under torch.compile the pass always spans all S+W slots, so the graph's shapes
never change; unused slots are masked.

No torch.cat to evict, no reallocation and no host synchronisation in the decode path: the stream
position `n` lives on the device, and a one-token step never reads it on the host. Only the chunked
path (prefill, evaluation) asks for it, once per chunk, to choose which tokens of the chunk survive.
"""
import sys
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Layout:
    """Where the keys of one forward pass sit, shared by every layer. L keys, T queries."""
    k_pos: torch.Tensor        # (L,) int64  position of each key (cache frame: in the cache; stream frame: in the stream)
    q_pos: torch.Tensor        # (T,) int64  position of each query, as seen by window keys (same frame)
    q_pos_sink: torch.Tensor | None  # (T,) position of each query as seen by sink keys; None: same
    is_sink: torch.Tensor      # (L,) bool   key is one of the S sinks
    mask: torch.Tensor         # (T, L) bool  query may attend to key
    max_pos: torch.Tensor      # () int64    the newest query's cache position (dynamic NTK RoPE needs it)
    keys_rotated: bool = False  # stream frame: cached keys are already rotated by k_pos (RoPE)
    sink_slots: int | None = None  # sinks can only be among the first `sink_slots` keys; None: ask is_sink
    tables: dict = field(default_factory=dict, repr=False)  # RoPE/ALiBi tables of this pass, by key


class SinkCache(nn.Module):
    """S sink slots + a ring buffer of W window slots per layer. `window` policy is S=0."""

    def __init__(self, sink_size: int, window_size: int, device=None, dtype=torch.float32,
                 rotate_keys_once: bool = True):
        super().__init__()
        if sink_size < 0 or window_size < 1:
            raise ValueError(f"need sink_size >= 0 and window_size >= 1, got {sink_size}, {window_size}")
        self.S, self.W = sink_size, window_size
        self.capacity = sink_size + window_size
        self.device, self.dtype = torch.device(device or "cpu"), dtype
        self.rotate_keys_once = rotate_keys_once  # stream frame (default) or the paper's cache frame
        self.k: list[torch.Tensor] = []  # per layer (B, kv_heads, S+W, hd), allocated at first write
        self.v: list[torch.Tensor] = []
        self.register_buffer("slot_token", torch.full((self.capacity,), -1, dtype=torch.long, device=device))
        self.register_buffer("n", torch.zeros((), dtype=torch.long, device=device))  # tokens seen
        for buf in (self.slot_token, self.n):
            self._static(buf)
        self._write_first = True
        self._new_slots = self._keep = None
        self._host_n: int | None = 0   # n as the host knows it; None after a compiled step
        self._used = self.capacity     # slots the current pass attends to

    @property
    def length(self) -> int:
        """Tokens seen so far. Reads the device: call it between steps, not inside one."""
        return int(self.n)

    def slots_of(self, tok: torch.Tensor) -> torch.Tensor:
        """Slot that stream index `tok` is written to: its own index for a sink, the ring otherwise."""
        return torch.where(tok < self.S, tok, self.S + (tok - self.S) % self.W)

    def begin(self, T: int) -> Layout:
        """Plan a forward pass over the next T tokens of the stream; call once before the layers."""
        tok = self.n + torch.arange(T, device=self.n.device)          # (T,) stream indices of the queries
        # T == 1 is decided without looking at n: the decode step must not sync with the device.
        # A chunk reads n on the host once, to know whether it overflows the cache.
        compiling = torch.compiler.is_compiling()
        n = (None if compiling else self._host_n) if T == 1 else self.length
        self._write_first = T == 1 or n + T <= self.capacity
        # an eager pass over a filling cache attends to the slots in use only (tokens 0..n+T-1 are in
        # slots 0..n+T-1 until the cache is full); compiled, always all of them: static shapes
        self._used = self.capacity if compiling or n is None else min(n + T, self.capacity)
        self._host_n = None if compiling or n is None else n + T  # compiled: stored after each call
        if self._write_first:
            self._new_slots = self.slots_of(tok)
            self.slot_token.index_copy_(0, self._new_slots, tok)
            key_tok = self.slot_token[:self._used]                      # (L <= S+W,)
        else:
            key_tok = torch.cat([self.slot_token, tok])                 # (L=S+W+T,) buffer, then chunk
            # Only the sinks and the last W tokens of the chunk survive it; writing only those keeps
            # every slot index unique (index_copy_ with duplicates is undefined).
            keep = [i for i in range(T) if n + i < self.S or i >= T - self.W]
            self._keep = torch.tensor(keep, dtype=torch.long, device=self.n.device)
            self._new_slots = self.slots_of(tok[self._keep])
            self.slot_token.index_copy_(0, self._new_slots, tok[self._keep])
        layout = self.layout(tok, key_tok, chunked=not self._write_first)
        self.n += T
        return layout

    def layout(self, tok: torch.Tensor, key_tok: torch.Tensor, chunked: bool) -> Layout:
        """Positions and mask for queries `tok` (T,) and keys holding stream indices `key_tok` (L,)."""
        S, W, C = self.S, self.W, self.capacity
        last = tok[-1]
        base = torch.clamp(last - (C - 1), min=0)           # how far the last query's window has slid
        is_sink = (key_tok >= 0) & (key_tok < S)
        t, j = tok[:, None], key_tok[None, :]
        mask = (j >= 0) & (j <= t) & ((j < S) | (j > t - W))  # the sinks, and t's own window
        if self.rotate_keys_once:
            # stream frame: keys keep the stream index they were rotated by; sinks are seen from the
            # query's cache position. A chunk that fits the cache has tok <= C-1: one frame suffices.
            one_frame = S == 0 or (tok.shape[0] > 1 and not chunked)
            q_pos_sink = None if one_frame else torch.clamp(tok, max=C - 1)
            return Layout(key_tok, tok, q_pos_sink, is_sink, mask, max_pos=last - base,
                          keys_rotated=True, sink_slots=None if chunked else S)
        k_pos = torch.where(is_sink, key_tok, key_tok - base)
        q_pos = tok - base
        q_pos_sink = torch.clamp(tok, max=C - 1) if (chunked and S > 0) else None
        return Layout(k_pos, q_pos, q_pos_sink, is_sink, mask, max_pos=q_pos[-1])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (B, kv_heads, T, hd); return the keys and values to attend to."""
        if layer == len(self.k):
            B, H, _, D = k.shape
            self.k.append(self._static(torch.zeros(B, H, self.capacity, D, device=self.device, dtype=self.dtype)))
            self.v.append(self._static(torch.zeros(B, H, self.capacity, D, device=self.device, dtype=self.dtype)))
        k_buf, v_buf = self.k[layer], self.v[layer]
        if self._write_first:
            k_buf.index_copy_(2, self._new_slots, k.to(self.dtype))
            v_buf.index_copy_(2, self._new_slots, v.to(self.dtype))
            return k_buf[:, :, :self._used], v_buf[:, :, :self._used]
        keys, values = torch.cat([k_buf, k.to(self.dtype)], 2), torch.cat([v_buf, v.to(self.dtype)], 2)
        k_buf.index_copy_(2, self._new_slots, k[:, :, self._keep].to(self.dtype))
        v_buf.index_copy_(2, self._new_slots, v[:, :, self._keep].to(self.dtype))
        return keys, values

    @staticmethod
    def _static(buf: torch.Tensor) -> torch.Tensor:
        """Tell torch.compile this tensor never moves: a CUDA graph (mode="reduce-overhead") can then
        read and write it in place at every replay instead of copying it in and out. Only once
        torch.compile is loaded (Stream(compile=True) loads it first): importing it takes seconds."""
        if "torch._dynamo" in sys.modules and not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(buf)
        return buf

    def reset(self) -> None:
        """Forget the stream but keep the buffers (a new stream of the same shape)."""
        self.slot_token.fill_(-1)
        self.n.zero_()
        self._host_n = 0


class DenseCache(SinkCache):
    """The baseline: keep every token. Grows by doubling, so memory is unbounded by design.

    It is a sink cache that never evicts: S=0 and a window as long as the stream, so positions are
    the token indices in the text. Attention then runs past the trained context and degrades.
    """

    def __init__(self, capacity: int = 256, device=None, dtype=torch.float32, rotate_keys_once: bool = True):
        super().__init__(0, capacity, device=device, dtype=dtype, rotate_keys_once=rotate_keys_once)

    @property
    def length(self) -> int:
        return self._host_n  # kept on the host, so that growing needs no sync (dense is never compiled)

    def begin(self, T: int) -> Layout:
        if self._host_n + T > self.capacity:
            self.grow(max(2 * self.capacity, self._host_n + T))
        return super().begin(T)

    def grow(self, capacity: int) -> None:
        grow = lambda buf: torch.cat([buf, buf.new_zeros(*buf.shape[:2], capacity - self.capacity, buf.shape[3])], 2)
        self.k, self.v = [grow(b) for b in self.k], [grow(b) for b in self.v]
        self.slot_token = torch.cat([self.slot_token, self.slot_token.new_full((capacity - self.capacity,), -1)])
        self.W = self.capacity = capacity
