"""Benchmark (issue 3): the sink cache's cost per token is flat in the stream position, and how much
cheaper it is than re-encoding the window for every token (`recompute`).

    python -m minisink.bench decode [--sizes 256,512,1024,2048,4096] [--far 50000] [--threads N]

Model: a random-weight GPT-NeoX of Pythia-160M's shape (hidden 768, 12 layers, 12 heads, vocab
50304, rotary_pct 0.25; 162M parameters), fp32, batch 1. Everything goes through `Stream`, the
decode loop a user runs.

1. Latency at stream positions ~2K and ~50K, sink cache 4+1020 (Stream's default). Streaming 50K
   tokens one at a time takes too long on a small CPU, so the cache is fast-forwarded: the tokens
   before each measured position are fed as one prompt, which Stream prefills in chunks through the
   same cache. That is exact, not an approximation (tests/test_cache.py: chunked prefill gives the
   logits and the cache of token-by-token streaming): the same slots hold the same tokens at the same
   positions as after 50K decode steps, values equal up to float rounding. Then decode steps are
   timed there.
2. Per-token cost of `sink` and `recompute` at cache sizes C = S+W (S=4). sink: one decode step with
   the cache full. recompute: one forward over the last C tokens (positions 0..C-1, no KV carried
   over), which is what Stream does for that policy. Its whole state is the last C-1 token ids, so
   it is fast-forwarded by handing it those. Like Stream, the forward computes logits for all C tokens.

CPU timings are medians over the timed steps (a shared machine is noisy).
"""
import argparse
import time

import torch

from ..generate import Stream
from .models import CONFIGS, machine, random_model, seconds_per_call, weight_bytes

SINKS = 4


def seconds_per_token(stream, ids, start, steps, warmup=2) -> float:
    """Median seconds of one `stream.feed(token)` over `steps`, feeding ids[start], ids[start+1], ..."""
    tokens = iter(ids[0, start:].tolist())
    return seconds_per_call(lambda: stream.feed(torch.tensor([[next(tokens)]])), steps, "cpu", warmup)


def fast_forward(stream, ids, position) -> float:
    """Feed tokens up to `position` as one prompt (chunked prefill, exact); returns the seconds."""
    start = time.perf_counter()
    stream.feed(ids[:, stream.tokens_seen:position])
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisink.bench decode", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="256,512,1024,2048,4096", help="cache sizes S+W for sink vs recompute")
    p.add_argument("--near", type=int, default=2048, help="first stream position timed (latency)")
    p.add_argument("--far", type=int, default=50000, help="second stream position timed (latency)")
    p.add_argument("--window", type=int, default=1020, help="W of the latency run (S=4)")
    p.add_argument("--steps", type=int, default=20, help="sink decode steps timed per measurement")
    p.add_argument("--recompute-steps", type=int, default=3, help="recompute steps timed per size")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]

    d = CONFIGS["pythia-160m"]
    model = random_model(d)
    n_params, weights = sum(p.numel() for p in model.parameters()), weight_bytes(model)
    ids = torch.randint(0, d["vocab_size"], (1, max(args.far, *sizes) + 2 * args.steps + 64),
                        generator=torch.Generator().manual_seed(0))
    print(f"Pythia-160M shape (GPT-NeoX {d['hidden_size']}d x {d['num_hidden_layers']} layers, "
          f"{d['num_attention_heads']} heads, vocab {d['vocab_size']}), {n_params / 1e6:.0f}M params "
          f"({weights / 1e9:.2f} GB), random weights, fp32, batch 1")
    print(machine("cpu"))

    S, W = SINKS, args.window
    print(f"\n1. sink: per-token latency vs stream position (cache {S}+{W}, median of {args.steps} decode steps)")
    print(f"   {'position':>9}  {'ms/token':>8}  {'GB/s':>5}  fast-forward to the position (chunked prefill, same cache)")
    stream = Stream(model, "sink", S, W)
    for position in (args.near, args.far):
        before = stream.tokens_seen
        took = fast_forward(stream, ids, position)
        per_token = seconds_per_token(stream, ids, position, args.steps)
        print(f"   {position:>9,}  {per_token * 1e3:8.1f}  {weights / per_token / 1e9:5.1f}  "
              f"{position - before:,} tokens in {took:.1f} s ({(position - before) / took:,.0f} tok/s, "
              f"{stream.prefill_chunk}/forward)")

    print(f"\n2. sink vs recompute, per token, cache C = {S} + (C-{S}); sink: median of {args.steps} decode "
          f"steps with the cache full; recompute: median of {args.recompute_steps} forwards over C tokens")
    print(f"   {'C':>5}  {'sink ms/tok':>11}  {'recompute ms/tok':>16}  {'speedup':>7}")
    for C in sizes:
        P = C + 8                                           # the cache full, and its ring moved on
        sink = Stream(model, "sink", S, C - S)
        fast_forward(sink, ids, P)
        t_sink = seconds_per_token(sink, ids, P, args.steps)
        del sink
        recompute = Stream(model, "recompute", S, C - S)
        recompute.history = ids[:, P - (C - 1):P]           # its whole state: the last C-1 token ids
        t_re = seconds_per_token(recompute, ids, P, args.recompute_steps, warmup=1)
        print(f"   {C:>5}  {t_sink * 1e3:11.1f}  {t_re * 1e3:16.1f}  {t_re / t_sink:6.1f}x", flush=True)


if __name__ == "__main__":
    main()
