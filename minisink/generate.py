"""The decode loop, by hand: prefill in chunks, then one token at a time, forever if asked.

    stream = Stream(model, policy="sink", sink_size=4, window_size=1020)
    for token in stream.generate(prompt_ids, max_new_tokens=None):   # None: endless
        ...

`decode_one_token` is the whole per-token step: one forward of one token through the cache, and a
sample. It has no host synchronisation and static shapes, so `torch.compile(..., fullgraph=True,
mode="reduce-overhead")` can turn it into one CUDA graph on a GPU; on a CPU, `Stream(compile=True)`
uses inductor's default mode (fused C++ kernels, no graphs to replay). Prefill is chunked (each chunk at most the
window) and stays eager: its shapes vary.

Policies, all through this loop so they can be compared:
  dense      keep everything (DenseCache): memory grows, quality collapses past the trained context
  window     S=0: the first token to be evicted takes the attention sink with it
  sink       S>0: StreamingLLM
  recompute  no KV cache across steps: re-encode the last S+W tokens from scratch for every new
             token, positions 0..S+W-1. The quality reference; quadratic cost.
"""
from collections.abc import Iterator

import torch

from .cache import DenseCache, SinkCache

POLICIES = ("dense", "window", "sink", "recompute")


def first_token(tokenizer, config: dict) -> int | None:
    """The token every stream of this model starts with: BOS, where the model has one.

    A model pre-trained with a dedicated sink token (minisink/tools/train.py --sink-token) starts with that
    token. Falcon's tokenizer names no BOS, and its config.json says 11 (<|endoftext|>, which
    separated its training documents), but falcon-40b's first release says 1: >>ABSTRACT<<, a tag for
    the start of a paper's abstract. Every Falcon starts from <|endoftext|>."""
    sink = config.get("minisink_sink_token_id")
    first = sink if sink is not None else getattr(tokenizer, "bos_id", None)
    if config.get("model_type") in ("falcon", "RefinedWeb", "RefinedWebModel"):
        first = getattr(tokenizer, "piece_to_id", {}).get("<|endoftext|>", first)
    return first if first is not None and first >= 0 else None


def end_ids(tokenizer, config: dict) -> set[int]:
    """The ids that end a reply: the tokenizer's EOS and every id config.json's `eos_token_id` names
    (an int or a list). Llama-3-Instruct ends a turn with <|eot_id|>, which its config names next to
    the tokenizer's <|end_of_text|>; a chat that stopped only at the latter would talk past the turn."""
    named = config.get("eos_token_id")
    named = named if isinstance(named, list) else [named]
    ids = {getattr(tokenizer, "eos_id", None), *named}
    return {i for i in ids if isinstance(i, int) and 0 <= i < tokenizer.vocab_size}


def make_cache(policy: str, sink_size: int, window_size: int, device, dtype) -> SinkCache:
    """The cache a policy streams through. For `window` the S+W slots all become window."""
    if policy == "sink":
        return SinkCache(sink_size, window_size, device=device, dtype=dtype)
    if policy == "window":
        return SinkCache(0, sink_size + window_size, device=device, dtype=dtype)
    if policy in ("dense", "recompute"):
        return DenseCache(sink_size + window_size, device=device, dtype=dtype)
    raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, vocab) -> next tokens (B,), on the device, without a host sync."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]   # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p        # mass before this token already enough
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def prefill(model, cache: SinkCache, ids: torch.Tensor, chunk_size: int, each=None) -> torch.Tensor:
    """Feed ids (B, T) through the cache in chunks; return the last token's logits (B, vocab).

    Every chunk attends to the sinks plus each token's own window (see SinkCache), so a prompt far
    longer than the cache is prefilled exactly as if it had been streamed token by token.
    `each(start, logits)`, if given, receives every chunk's logits (B, t, vocab) as it comes, e.g.
    to score them (minisink/tools/eval.py): the one loop that feeds a stream in chunks.
    """
    for start in range(0, ids.shape[1], chunk_size):
        logits = model(ids[:, start:start + chunk_size], cache)
        if each is not None:
            each(start, logits)
    return logits[:, -1]


def decode_one_token(model, cache: SinkCache, token: torch.Tensor) -> torch.Tensor:
    """token (B,) -> logits (B, vocab) of the next one. The whole per-token step."""
    return model(token[:, None], cache)[:, -1]


class Stream:
    """One model streaming through one cache. Feed it text (ids) and let it talk, turn after turn.

    The cache's buffers are allocated here, by one throwaway token (each layer sizes its buffers
    from its own K, so a sharded model gets its own shapes), then the cache is reset: every token
    of the stream, the first included, takes the same step. compile=True compiles that step once
    (fullgraph, no recompiles): CUDA graphs on a GPU, inductor's default mode on a CPU, where
    docs/benchmarks.md compares it with eager. On a CPU, matvec="reduce" (the default) compiles the
    mat-vecs as fused reductions (minisink/tools/fast.py); "linear" keeps F.linear.
    """

    def __init__(self, model, policy: str = "sink", sink_size: int = 4, window_size: int = 1020,
                 batch_size: int = 1, prefill_chunk: int | None = None, compile: bool = False,
                 matvec: str = "reduce"):
        weight = next(model.parameters())
        self.model, self.policy, self.batch_size = model, policy, batch_size
        self.device, self.dtype = weight.device, weight.dtype
        self.capacity = sink_size + window_size
        self.cache = make_cache(policy, sink_size, window_size, self.device, self.dtype)
        self.prefill_chunk = prefill_chunk or min(window_size, 512)
        self.history = torch.empty(batch_size, 0, dtype=torch.long, device=self.device)  # recompute only
        if policy != "recompute":
            with torch.inference_mode():  # allocate the buffers (the token's keys are forgotten)
                model(torch.zeros(batch_size, 1, dtype=torch.long, device=self.device), self.cache)
            self.cache.reset()
        self.step = decode_one_token
        if compile:
            self.step = compiled_step(self.cache, self.device, matvec)
        self.fed = 0         # tokens fed, counted on the host
        self.logits = None   # (B, vocab) prediction for the next token
        self.pending = None  # (B,) last generated token, not fed yet: it goes in with the next feed

    @property
    def tokens_seen(self) -> int:
        return self.history.shape[1] if self.policy == "recompute" else self.fed

    @property
    def slots_used(self) -> int:
        return min(self.tokens_seen, self.capacity) if self.policy != "dense" else self.tokens_seen

    @torch.inference_mode()
    def feed(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Append ids (B, T) to the stream; returns the logits (B, vocab) for the next token.

        The last generated token, if not fed yet, goes first: the stream is one sequence of tokens.
        """
        ids = torch.empty(self.batch_size, 0, dtype=torch.long) if ids is None else ids
        # a copy made here is an inference tensor like every sampled token, so a compiled step
        # sees one kind of input and compiles once
        ids = ids.to(self.device, copy=True)
        if self.pending is not None:
            ids, self.pending = torch.cat([self.pending[:, None], ids], dim=1), None
        if ids.shape[1] == 0:
            return self.logits
        if self.policy == "recompute":
            for t in range(ids.shape[1]):
                self.logits = self._recompute(ids[:, t])
        elif ids.shape[1] == 1:  # the step, every token of the stream alike
            self.logits = self.step(self.model, self.cache, ids[:, 0])
        else:  # a prompt: chunks of varying length, eager, never graphed
            self.logits = prefill(self.model, self.cache, ids, self.prefill_chunk)
        self.fed += ids.shape[1]
        if self.policy in ("sink", "window") and self.fed >= self.capacity:
            self.cache.full = True  # what a compiled step cannot count itself: no mask from now on
        return self.logits

    def _recompute(self, token: torch.Tensor) -> torch.Tensor:
        self.history = torch.cat([self.history, token[:, None]], dim=1)[:, -self.capacity:]
        return self.model(self.history)[:, -1]  # fresh forward, positions 0..len-1

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor | None = None, max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop_ids: set[int] = frozenset()) -> Iterator[torch.Tensor]:
        """Feed `ids` (B, T), then yield next tokens (B,) as they are produced.

        Endless when max_new_tokens is None. Stops early once every row has produced a stop id; that
        check reads the token on the host, as printing it would anyway.
        """
        if ids is not None and ids.numel():
            self.feed(ids)
        if self.logits is None:
            raise ValueError("nothing to continue from: feed at least one token (e.g. BOS) first")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        done = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)
        produced = 0
        while max_new_tokens is None or produced < max_new_tokens:
            self.feed()  # the token generated last
            token = sample(self.logits, temperature, top_k, top_p, generator)   # (B,)
            self.pending = token
            produced += 1
            yield token
            if len(stop_ids):
                done |= torch.isin(token, stop)
                if bool(done.all()):
                    return


def compiled_step(cache: SinkCache, device: torch.device, matvec: str = "reduce"):
    """`decode_one_token` compiled: CUDA graphs on a GPU (mode="reduce-overhead"), inductor's
    default mode (fused C++ kernels) on a CPU, which has no graphs to replay. On a CPU the step's
    mat-vecs are rewritten as reductions that inductor fuses (minisink/tools/fast.py), unless
    matvec="linear" (F.linear, MKL/oneDNN: the slower baseline, kept for the benchmarks).
    torch._dynamo is imported here, only when compiling: it takes seconds."""
    if matvec not in ("reduce", "linear"):
        raise ValueError(f"matvec={matvec!r}: one of 'reduce' (fused reductions on a CPU) or 'linear' (F.linear)")
    import torch._dynamo
    for buf in cache.tensors():  # they never move: a CUDA graph reads and writes them in place
        torch._dynamo.mark_static_address(buf)
    if device.type != "cuda":
        from .tools.fast import cpu_step
        return torch.compile(cpu_step(decode_one_token) if matvec == "reduce" else decode_one_token, fullgraph=True)
    graphed = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    # a CUDA graph's output lives in the graph's own memory and its next replay overwrites it: hand
    # out a copy (one row of logits), so that logits kept by a caller stay valid
    return lambda model, cache, token: graphed(model, cache, token).clone()
