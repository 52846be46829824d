"""Benchmark: decode speed of real model shapes past a full cache, eager vs compiled vs recompute.

    python -m minisink.bench gpu [--models pythia-6.9b,llama-2-7b,falcon-7b,mpt-7b] [--shape full]
                                 [--tokens 2000] [--device cuda] [--dtype bf16]

Each model (random weights, allocated directly on the device in the dtype) streams through a sink
cache of 4+2044. The cache is first filled by chunked prefill (exact: the cache ends up as token-by-
token streaming would leave it), then each mode streams tokens past the full cache:

  sink eager       Stream(...)                  one decode step per token, eager PyTorch
  sink compiled    Stream(..., compile=True)    the step under torch.compile(mode="reduce-overhead",
                                                fullgraph=True): one CUDA graph per token on a GPU
  recompute        Stream(policy="recompute")   a fresh forward over the last 2048 tokens per token
  recompute sdpa   the same, attention through PyTorch's fused SDPA (minisink.attention.use_sdpa)

Per token it prints ms, tok/s and GB/s: the weights (each parameter read once per token, as
gpt-fast counts) and weights + the KV cache read by the step, and that as a fraction of the
device's peak memory bandwidth where the device is known. Decode at batch 1 is bound by memory
bandwidth, so that fraction says how close a step comes to the hardware's limit.

On a CPU the default shape is "tiny" (hidden 256, 2 layers, vocab 4096; see minisink/bench/models.py)
and few tokens, so that it finishes in about a minute: four 7B models in fp32 need 4 x 28 GB. The
compiled step uses inductor's C++ backend there (no CUDA graphs); compiling takes most of the time.
"""
import argparse
import re
import time

import torch

from ..attention import use_sdpa
from ..generate import Stream
from ..load import DTYPES
from .models import CONFIGS, machine, random_model, scaled, seconds_per_call, sync, weight_bytes

MODELS = ["pythia-6.9b", "llama-2-7b", "falcon-7b", "mpt-7b"]

# Peak memory bandwidth in TB/s, by the words of torch.cuda.get_device_name (vendor datasheets)
PEAK_TBPS = [
    ({"h200"}, 4.8),
    ({"h100", "pcie"}, 2.0),
    ({"h100", "hbm3"}, 3.35),    # the SXM5 board calls itself "NVIDIA H100 80GB HBM3"
    ({"h100", "sxm"}, 3.35),
    ({"a100", "80gb"}, 2.0),
    ({"a100", "40gb"}, 1.55),
    ({"l4"}, 0.3),
    ({"4090"}, 1.0),
]


def peak_bandwidth(device) -> float | None:
    """Bytes per second the device's memory can deliver, or None when the device is not in the table."""
    if torch.device(device).type != "cuda":
        return None
    words = set(re.split(r"[\s\-]+", torch.cuda.get_device_name(device).lower()))
    return next((tbps * 1e12 for need, tbps in PEAK_TBPS if need <= words), None)


def kv_bytes(stream) -> int:
    """Bytes of K and V a decode step reads: every layer's whole buffer (B, kv_heads, S+W, hd)."""
    return sum(t.numel() * t.element_size() for t in [*stream.cache.k, *stream.cache.v])


def run_model(name, d, args, device, dtype, peak):
    model = random_model(d, device, dtype)
    weights = weight_bytes(model)
    S, W = args.sink_size, args.window_size
    most = max(args.tokens, args.eager_tokens, 2 * args.recompute_tokens)
    ids = torch.randint(0, d["vocab_size"], (1, S + W + most + 64), device=device)
    print(f"\n{name}: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M params, "
          f"{weights / 1e9:.3f} GB of weights")
    print(f"  {'mode':<15} {'tokens':>6} {'ms/tok':>8} {'tok/s':>7} {'weights GB/s':>12} "
          f"{'+KV GB/s':>8} {'% peak':>6}")

    def report(mode, tokens, seconds, kv=0):
        moved = (weights + kv) / seconds
        frac = f"{100 * moved / peak:5.1f}%" if peak else "   n/a"
        kv_col = f"{moved / 1e9:8.1f}" if kv else f"{'-':>8}"
        print(f"  {mode:<15} {tokens:>6} {seconds * 1e3:8.2f} {1 / seconds:7.1f} {weights / seconds / 1e9:12.1f} "
              f"{kv_col} {frac}", flush=True)
        return seconds

    def stream_past_full_cache(stream, n):
        stream.feed(ids[:, :S + W])                       # fast-forward: chunked prefill fills the cache
        positions = iter(range(S + W, ids.shape[1]))
        step = lambda: stream.feed(ids[:, next(positions)][:, None])
        return seconds_per_call(step, n, device, warmup=3), stream

    t_eager, eager = stream_past_full_cache(Stream(model, "sink", S, W), args.eager_tokens)
    report("sink eager", args.eager_tokens, t_eager, kv_bytes(eager))
    results = {"sink eager": t_eager}
    if args.compile:
        torch._dynamo.reset()
        start = time.perf_counter()
        compiled = Stream(model, "sink", S, W, compile=True)
        compiled.feed(ids[:, :S + W])
        for t in range(S + W, S + W + 3):                 # compiles, then records the CUDA graph
            compiled.feed(ids[:, t:t + 1])
        sync(device)
        compile_s = time.perf_counter() - start
        compiled.cache.reset()
        t_comp, compiled = stream_past_full_cache(compiled, args.tokens)
        results["sink compiled"] = report("sink compiled", args.tokens, t_comp, kv_bytes(compiled))
        # the same tokens through both streams from the start: the logits must agree
        check = [Stream(model, "sink", S, W), compiled]
        for s in check:
            s.cache.reset()
            s.feed(ids[:, :S + W])
        diff = scale = 0.0
        for t in range(S + W, S + W + 8):
            want, got = (s.feed(ids[:, t:t + 1]).float() for s in check)
            diff, scale = max(diff, (got - want).abs().max().item()), max(scale, want.abs().max().item())
        print(f"  (compiling took {compile_s:.0f} s; compiled vs eager logits over 8 steps: "
              f"max |diff| {diff:.1e}, max |logit| {scale:.1f})")
        del compiled, check
    del eager

    recompute = Stream(model, "recompute", S, W)
    recompute.history = ids[:, :S + W - 1]               # its whole state: the last S+W-1 token ids
    positions = iter(range(S + W - 1, ids.shape[1]))
    step = lambda: recompute.feed(ids[:, next(positions)][:, None])
    results["recompute"] = report("recompute", args.recompute_tokens,
                                  seconds_per_call(step, args.recompute_tokens, device, warmup=1))
    with use_sdpa():
        results["recompute sdpa"] = report("recompute sdpa", args.recompute_tokens,
                                           seconds_per_call(step, args.recompute_tokens, device, warmup=1))
    best = "sink compiled" if "sink compiled" in results else "sink eager"
    print(f"  speedup of {best} over recompute: {results['recompute'] / results[best]:.1f}x "
          f"(over recompute sdpa: {results['recompute sdpa'] / results[best]:.1f}x)")
    del model, recompute
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisink.bench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=["full", "small", "tiny"], default=None,
                   help="default: full on a GPU, tiny on a CPU")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--tokens", type=int, default=None, help="compiled decode steps timed (default 2000; CPU 32)")
    p.add_argument("--eager-tokens", type=int, default=None, help="eager decode steps timed (default 500; CPU 32)")
    p.add_argument("--recompute-tokens", type=int, default=None, help="recompute steps timed (default 20; CPU 3)")
    p.add_argument("--sink-size", type=int, default=4)
    p.add_argument("--window-size", type=int, default=2044)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = args.shape or ("full" if gpu else "tiny")
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    args.tokens = args.tokens or (2000 if gpu else 32)
    args.eager_tokens = args.eager_tokens or (500 if gpu else 32)
    args.recompute_tokens = args.recompute_tokens or (20 if gpu else 2)
    names = [m for m in args.models.split(",") if m]
    if unknown := [m for m in names if m not in MODELS]:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")

    peak = peak_bandwidth(device)
    print(machine(device) + (f", peak memory bandwidth {peak / 1e12:.2f} TB/s" if peak else
                             ", peak memory bandwidth n/a (device not in the table)"))
    print(f"shape {shape}{' (scaled down; see minisink/bench/models.py)' if shape != 'full' else ''}, "
          f"{str(dtype).removeprefix('torch.')}, batch 1, cache {args.sink_size}+{args.window_size}, random weights")
    for name in names:
        run_model(name, scaled(CONFIGS[name], shape), args, device, dtype, peak)


if __name__ == "__main__":
    main()
