"""Benchmark: decode speed of real model shapes past a full cache, eager vs compiled vs recompute.

    python -m minisink bench gpu [--models pythia-6.9b,llama-2-7b,falcon-7b,mpt-7b] [--shape full]
                                 [--tokens 2000] [--device cuda] [--dtype bf16]

Each model (random weights, allocated directly on the device in the dtype) streams through a sink
cache of 4+2044. The cache is first filled by chunked prefill (exact: the cache ends up as token-by-
token streaming would leave it), then each mode streams tokens past the full cache:

  sink eager       Stream(...)                  one decode step per token, eager PyTorch
  sink compiled    Stream(..., compile=True)    the step under torch.compile(mode="reduce-overhead",
                                                fullgraph=True): one CUDA graph per token on a GPU
  recompute        Stream(policy="recompute")   a fresh forward over the last 2048 tokens per token

Per token it prints ms, tok/s and GB/s: the weights (each parameter read once per token, as
gpt-fast counts) and weights + the KV cache read by the step, and that as a fraction of the
device's peak memory bandwidth where the device is known. Decode at batch 1 is bound by memory
bandwidth, so that fraction says how close a step comes to the hardware's limit.

On a CPU the default shape is "tiny" (hidden 256, 2 layers, vocab 4096; see minisink/tools/bench/models.py)
and few tokens, so that it finishes in about a minute: four 7B models in fp32 need 4 x 28 GB. The
compiled step uses inductor's C++ backend there (no CUDA graphs); compiling takes most of the time.
"""
import json
import re
import time
import warnings
from pathlib import Path
from statistics import median

import torch

from .. import cli
from ...generate import Stream
from ...weights.load import DTYPES
from .models import CONFIGS, bandwidth, kv_bytes, machine, random_model, scaled, seconds_per_call, sync, weight_bytes

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


def copy_bandwidth(device, gib: float = 4.0, repeats: int = 10) -> float:
    """Bytes per second of a large device-to-device copy, bytes read + bytes written, median of
    `repeats` (random data, not zeros). What the memory really delivers, next to the datasheet."""
    if torch.device(device).type != "cuda":
        return bandwidth(torch.get_num_threads())
    src = torch.empty(int(gib * 2**30) // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * gib * 2**30 / median(times)


class GraphCounts:
    """Counts CUDA graph captures and replays (torch.cuda.CUDAGraph, which torch.compile's
    reduce-overhead mode records into) while active; and graphs dynamo compiled, and the steps
    inductor ran without a CUDA graph (its `cudagraph_skips` counter)."""

    def __enter__(self):
        from torch._dynamo.utils import counters
        self.counters, self.captures, self.replays = counters, 0, 0
        self._graphs0 = counters["stats"]["unique_graphs"]
        self._skips0 = counters["inductor"]["cudagraph_skips"]
        if torch.cuda.is_available():
            cls = torch.cuda.CUDAGraph
            self._begin, self._replay = cls.capture_begin, cls.replay

            def capture_begin(graph, *a, **kw):
                self.captures += 1
                return self._begin(graph, *a, **kw)

            def replay(graph, *a, **kw):
                self.replays += 1
                return self._replay(graph, *a, **kw)
            cls.capture_begin, cls.replay = capture_begin, replay
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.replay = self._begin, self._replay

    @property
    def compiled(self) -> int:
        return self.counters["stats"]["unique_graphs"] - self._graphs0

    @property
    def skips(self) -> int:
        return self.counters["inductor"]["cudagraph_skips"] - self._skips0


def host_syncs(step, n: int, device) -> list[str] | None:
    """Where `n` calls of step() made the host wait for the GPU: one "file:line" per wait (torch.cuda's
    sync debug mode warns at every synchronising call: .item(), .tolist(), nonzero, a copy to the
    host, a cudaMalloc that must first free cached blocks). [] for none; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # only torch's own words for a sync: enabling the mode also warns, once per process, that it is a
    # "prototype feature [that] does not yet detect all synchronizing operations"
    return [f"{w.filename}:{w.lineno}" for w in caught if "called a synchronizing CUDA operation" in str(w.message)]


def profile(step, n: int, top: int = 12) -> None:
    """Kernel time of n steps by torch.profiler: the GPU's busy time per step next to the wall time,
    and the kernels that take it. Where a step loses to the memory bound, this says which ones."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    sync("cuda")
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        sync("cuda")
    wall = (time.perf_counter() - start) / n
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    busy = sum(e.self_device_time_total for e in events) / 1e6 / n
    print(f"  profile of {n} compiled steps: GPU busy {busy * 1e3:.2f} ms/step of {wall * 1e3:.2f} ms wall "
          f"(profiler on); top kernels by time:")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"    {e.self_device_time_total / 1e3 / n:8.3f} ms/step  {e.count // n:>4}x  {e.key[:110]}")


def count(syncs: list | None) -> str:
    return "n/a" if syncs is None else str(len(syncs))


def per_block(step, n: int, device, block: int = 100) -> list[float]:
    """Seconds per token of each block of `block` calls, n // block blocks, synchronised at block
    ends only (on a GPU a step is queued long before it runs). CPU: blocks of the median call."""
    if torch.device(device).type != "cuda":
        return [seconds_per_call(step, block, device, warmup=0) for _ in range(max(1, n // block))]
    out = []
    for _ in range(max(1, n // block)):
        sync(device)
        start = time.perf_counter()
        for _ in range(block):
            step()
        sync(device)
        out.append((time.perf_counter() - start) / block)
    return out


def run_model(name, d, args, device, dtype, peak, copy_bw) -> list[dict]:
    """Every mode for one model in one dtype; returns a row per mode (also printed)."""
    model = random_model(d, device, dtype)
    weights = weight_bytes(model)
    S, W = args.sink_size, args.window_size
    most = args.tokens + args.eager_tokens + args.recompute_tokens + 3 * args.sync_steps + 64
    ids = torch.randint(0, d["vocab_size"], (1, S + W + most), device=device)
    dt = str(dtype).removeprefix("torch.")
    print(f"\n{name}, {dt}: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M params, "
          f"{weights / 1e9:.3f} GB of weights")
    print(f"  {'mode':<15} {'tokens':>6} {'ms/tok':>8} {'tok/s':>7} {'weights GB/s':>12} "
          f"{'+KV GB/s':>8} {'% peak':>6} {'% copy':>6}  first/last block ms")
    rows = []

    def report(mode, blocks, tokens, kv=0, **extra):
        seconds = sum(blocks) / len(blocks)
        moved = (weights + kv) / seconds
        frac = f"{100 * moved / peak:5.1f}%" if peak else "   n/a"
        kv_col = f"{moved / 1e9:8.1f}" if kv else f"{'-':>8}"
        flat = f"  {blocks[0] * 1e3:.2f} / {blocks[-1] * 1e3:.2f}" if len(blocks) > 1 else ""
        print(f"  {mode:<15} {tokens:>6} {seconds * 1e3:8.2f} {1 / seconds:7.1f} {weights / seconds / 1e9:12.1f} "
              f"{kv_col} {frac} {100 * moved / copy_bw:5.1f}%{flat}", flush=True)
        rows.append(dict(model=name, dtype=dt, mode=mode, tokens=tokens, ms_per_token=seconds * 1e3,
                         weights_gb=weights / 1e9, kv_gb=kv / 1e9, gb_per_s=moved / 1e9,
                         frac_peak=moved / peak if peak else None, frac_copy=moved / copy_bw,
                         first_block_ms=blocks[0] * 1e3, last_block_ms=blocks[-1] * 1e3, **extra))
        return seconds

    def past_full_cache(stream):
        """The cache filled by chunked prefill (exact), then a step() that feeds the next token."""
        stream.feed(ids[:, :S + W])
        positions = iter(range(S + W, ids.shape[1]))
        return lambda: stream.feed(ids[:, next(positions)][:, None])

    eager = Stream(model, "sink", S, W)
    step = past_full_cache(eager)
    for _ in range(3):
        step()
    syncs = host_syncs(step, args.sync_steps, device)
    blocks = per_block(step, args.eager_tokens, device, args.block)
    t_eager = report("sink eager", blocks, len(blocks) * args.block, kv_bytes(eager), host_syncs=syncs)
    if syncs:
        print(f"  eager host syncs at: {', '.join(sorted(set(syncs)))}")
    best = ("sink eager", t_eager)
    if args.compile:
        torch._dynamo.reset()
        with GraphCounts() as warm:
            start = time.perf_counter()
            compiled = Stream(model, "sink", S, W, compile=True)
            step = past_full_cache(compiled)
            for _ in range(3):                            # compiles, warms up, records the CUDA graph
                step()
            sync(device)
            compile_s = time.perf_counter() - start
        with GraphCounts() as timed:
            syncs = host_syncs(step, args.sync_steps, device)
            blocks = per_block(step, args.tokens, device, args.block)
        if args.profile and device.type == "cuda":
            profile(step, args.profile)
        steps = args.sync_steps + len(blocks) * args.block
        t_comp = report("sink compiled", blocks, len(blocks) * args.block, kv_bytes(compiled), compile_s=compile_s, host_syncs=syncs,
                        graphs_compiled_warmup=warm.compiled, graph_captures_warmup=warm.captures,
                        graphs_compiled_timed=timed.compiled, graph_captures_timed=timed.captures,
                        graph_replays_timed=timed.replays, timed_steps=steps, cudagraph_skips=warm.skips + timed.skips)
        best = min(best, ("sink compiled", t_comp), key=lambda b: b[1])
        # the same tokens through a fresh eager stream and the compiled one: the logits must agree
        check = [Stream(model, "sink", S, W), compiled]
        for s in check:
            s.cache.reset()
            s.feed(ids[:, :S + W])
        diff = scale = 0.0
        for t in range(S + W, S + W + 8):
            want, got = (s.feed(ids[:, t:t + 1]).float() for s in check)
            diff, scale = max(diff, (got - want).abs().max().item()), max(scale, want.abs().max().item())
        rows[-1].update(logit_diff=diff, logit_scale=scale)
        print(f"  (compile + warm-up {compile_s:.0f} s: dynamo graphs {warm.compiled}, CUDA graph captures "
              f"{warm.captures}; then {steps} steps: {timed.compiled} recompiles, {timed.captures} captures, "
              f"{timed.replays} replays, {warm.skips + timed.skips} cudagraph skips; host syncs in "
              f"{args.sync_steps} steps: eager {count(rows[0]['host_syncs'])}, compiled {count(syncs)}; "
              f"compiled vs eager logits, 8 steps: max |diff| {diff:.1e} of max |logit| {scale:.1f})", flush=True)
        del compiled, check
    del eager

    if args.recompute_tokens:
        recompute = Stream(model, "recompute", S, W)
        recompute.history = ids[:, :S + W - 1]           # its whole state: the last S+W-1 token ids
        positions = iter(range(S + W - 1, ids.shape[1]))
        step = lambda: recompute.feed(ids[:, next(positions)][:, None])
        n = args.recompute_tokens
        t_re = report("recompute", [seconds_per_call(step, n, device, warmup=1)], n)
        print(f"  speedup of {best[0]} over recompute: {t_re / best[1]:.1f}x")
        del recompute
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def summary(rows: list[dict]) -> None:
    """The table README quotes: one line per model, dtype and mode."""
    print(f"\nSummary (ms/token; GB/s = weights + KV read per token / time; flat = last 100 / first 100 steps)")
    print(f"  {'model':<12} {'dtype':<9} {'mode':<15} {'ms/tok':>7} {'tok/s':>7} {'GB/s':>7} {'% peak':>6} "
          f"{'% copy':>6} {'flat':>5}")
    for r in rows:
        peak = f"{100 * r['frac_peak']:5.1f}%" if r["frac_peak"] else "   n/a"
        flat = f"{r['last_block_ms'] / r['first_block_ms']:5.2f}" if r["mode"].startswith("sink") else f"{'':>5}"
        print(f"  {r['model']:<12} {r['dtype']:<9} {r['mode']:<15} {r['ms_per_token']:7.2f} "
              f"{1e3 / r['ms_per_token']:7.1f} {r['gb_per_s']:7.0f} {peak} {100 * r['frac_copy']:5.1f}% {flat}")


def main(argv=None):
    p = cli.Parser(prog="python -m minisink bench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=["full", "small", "tiny"], default=None,
                   help="default: full on a GPU, tiny on a CPU")
    p.add_argument("--dtype", default=None, help="comma-separated, from "
                   f"{', '.join(DTYPES)}; each dtype runs every model before the next dtype "
                   "(default: bf16,fp16 on a GPU, fp32 on a CPU)")
    p.add_argument("--tokens", type=cli.bench_steps(1), default=None, help="compiled decode steps timed (default 1000; CPU 32)")
    p.add_argument("--eager-tokens", type=cli.bench_steps(1), default=None, help="eager decode steps timed (default 500; CPU 32)")
    p.add_argument("--recompute-tokens", type=cli.bench_steps(0), default=None, help="recompute steps timed (default 10; CPU 2)")
    p.add_argument("--block", type=cli.bench_steps(1), default=None,
                   help="steps per timed block; flat = last block / first block (default 100; CPU 8)")
    p.add_argument("--sync-steps", type=cli.bench_steps(0), default=20, help="steps run with CUDA sync detection on, untimed")
    p.add_argument("--sink-size", type=cli.bench_slots(0), default=4)
    p.add_argument("--window-size", type=cli.bench_slots(1), default=2044)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--threads", type=cli.threads, default=None, help=f"torch CPU threads (default: torch's choice); {cli.THREADS_HELP}")
    p.add_argument("--profile", type=cli.bench_steps(0), default=0, help="CUDA: profile this many compiled steps, top kernels")
    p.add_argument("--json", default=None, help="also write every row to this file, as JSON")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = args.shape or ("full" if gpu else "tiny")
    dtypes = (args.dtype or ("bf16,fp16" if gpu else "fp32")).split(",")
    if unknown := [d for d in dtypes if d not in DTYPES]:
        p.error(f"unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    args.tokens = args.tokens or (1000 if gpu else 32)
    args.eager_tokens = args.eager_tokens or (500 if gpu else 32)
    args.recompute_tokens = args.recompute_tokens if args.recompute_tokens is not None else (10 if gpu else 2)
    args.block = args.block or (100 if gpu else 8)
    args.sync_steps = args.sync_steps if gpu else 0
    names = [m for m in args.models.split(",") if m]
    if unknown := [m for m in names if m not in MODELS]:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")

    peak = peak_bandwidth(device)
    copy_bw = copy_bandwidth(device)
    print(machine(device) + (f", peak memory bandwidth {peak / 1e12:.2f} TB/s (datasheet)" if peak else
                             ", peak memory bandwidth n/a (device not in the table)"))
    rate = f"{copy_bw / 1e12:.2f} TB/s" if copy_bw >= 1e12 else f"{copy_bw / 1e9:.1f} GB/s"
    print(f"measured: a {'4 GiB device-to-device' if gpu else '512 MB'} copy moves {rate} "
          f"(bytes read + written){f', {100 * copy_bw / peak:.0f}% of peak' if peak else ''}")
    print(f"shape {shape}{' (scaled down; see minisink/tools/bench/models.py)' if shape != 'full' else ''}, "
          f"batch 1, cache {args.sink_size}+{args.window_size} full, random weights")
    rows = []
    for dt in dtypes:
        for name in names:
            rows += run_model(name, scaled(CONFIGS[name], shape), args, device, DTYPES[dt], peak, copy_bw)
            if args.json:   # after every model: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps(dict(machine=machine(device), peak=peak, copy=copy_bw,
                                                           rows=rows), indent=1))
    summary(rows)

