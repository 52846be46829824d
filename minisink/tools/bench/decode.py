"""Benchmark (issues 3 and 18): what a streaming decode step costs, next to what it cannot beat.

    python -m minisink bench decode [--models llama-134m,pythia-160m] [--caches 256,1024,2048]
                                    [--threads 1,2] [--rounds 4] [--steps 6] [--no-compile]
                                    [--recompute-steps 1] [--busy] [--positions 2048,100000]

For each model shape, thread count and cache size C = 4 + (C-4), in one process, per-token ms of:

  sink           Stream(policy="sink"), eager, the cache full and its ring moved on
  sink compiled  Stream(compile=True), same; its compile time is reported apart. On a CPU its
                 mat-vecs are fused reductions (minisink/tools/fast.py), not F.linear
  static         the no-streaming baseline, written here (`StaticCache`): one preallocated buffer of
                 C slots, token t written to slot t rotated once by t, every slot attended, unwritten
                 ones masked; what HF's StaticCache or gpt-fast do. No sinks, no ring, no eviction:
                 it cannot go past C tokens. Same model code, same attention as `sink`.
  recompute      Stream(policy="recompute"): a forward over the last C tokens for every token
  matvec         the step's weight reads alone: every weight matrix of the model times a vector,
                 through F.linear, nothing else. What PyTorch's fp32 mat-vec makes of those bytes on
                 this CPU: the floor of an eager step. Not of any step: the compiled CPU step
                 writes its mat-vecs as fused reductions (minisink/tools/fast.py), which read
                 the weights faster than F.linear (issue 23)
  read bound     the bytes a step must read (every weight once, an untied input embedding one row,
                 K and V of C slots per layer) over the memory bandwidth probed in this run (a large
                 tensor copy: read + write bytes)

The timed variants are interleaved, A B C A B C ..., `--rounds` times with `--steps` timed steps
each (after 2 warm-up steps), and the median over all steps is reported: a shared machine drifts,
and interleaving spreads the drift over all of them alike. recompute takes seconds per token, so it
is timed in the first round only. Ratios: sink / static, sink / read bound, matvec / its own read
bound (the weights alone, no KV), compiled / sink, compiled / read bound.

--busy: at 2 threads, the same sink and static steps with the machine as it is, then with a second
process (started here) spinning on one core, interleaved; how much each slows down, and the ratio.
--positions: per-token latency (eager sink, cache 4+1020) at those stream positions, reached by
chunked prefill of the tokens before them (exact: tests/test_cache.py), and the process's RSS. Of the
first model scaled down (`--positions-shape`, default tiny: 100K tokens of prefill take minutes, not
an hour), where attention over the 1024 slots is a larger share of the step, not a smaller one.

Random weights, fp32, batch 1: a step costs what it costs with trained weights.
"""
import os
import subprocess
import sys
import time
from statistics import median

import torch

from ...cache import Plan
from .. import cli
from ..cli import resident_bytes
from ...generate import Stream, decode_one_token
from .models import CONFIGS, bandwidth, kv_bytes, machine, random_model, scaled, weight_bytes

SINKS = 4


class StaticCache:
    """The plain static-cache decode the sink cache is measured against: no streaming at all.

    Token t goes to slot t, its key rotated once by t (as SinkCache does); a query attends to every
    slot, those not written yet masked, as HF's StaticCache and gpt-fast do. The model code is
    minisink's, unchanged: only what the sink cache adds (sinks that follow the window, the ring,
    eviction) differs.
    """

    def __init__(self, capacity: int):
        self.capacity, self.k, self.v = capacity, [], []
        self.n = torch.zeros((), dtype=torch.long)
        self.slots = torch.arange(capacity)
        self.no_sinks = torch.zeros(capacity, dtype=torch.bool)

    def begin(self, T: int, rope=None) -> Plan:
        tok = self.n + torch.arange(T)                                         # (T,)
        mask = self.slots[None, :] <= tok[:, None]                             # (T, C) causal
        self.n += T
        plan = Plan(tok, self.slots, self.no_sinks, mask, slots=tok)
        if rope is not None:
            plan.rope, plan.q_rope = rope, rope.tables(tok, tok[-1], torch.float32)
        return plan

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: Plan):
        if layer == len(self.k):
            B, H, _, D = k.shape
            self.k.append(k.new_zeros(B, H, self.capacity, D)), self.v.append(v.new_zeros(B, H, self.capacity, D))
        if plan.rope is not None:
            k = plan.rope.apply(k, *plan.q_rope)
        self.k[layer].index_copy_(2, plan.slots, k)
        self.v[layer].index_copy_(2, plan.slots, v)
        return self.k[layer], self.v[layer]


def matvec_stepper(model):
    """Every weight matrix of the model (nn.Linear; a tied one once) times one vector, as a step
    reads them: the mat-vec floor, without attention, norms, activations or the cache."""
    mats = list({id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}.values())
    vectors = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in mats}

    def step():
        for w in mats:
            torch.nn.functional.linear(vectors[w.shape[1]], w)
    return step


def timer(step) -> callable:
    """A function that times `n` calls of step() after 2 warm-up calls; returns the n seconds."""
    def timed(n: int, warmup: int = 2) -> list[float]:
        for _ in range(warmup):
            step()
        out = []
        for _ in range(n):
            start = time.perf_counter()
            step()
            out.append(time.perf_counter() - start)
        return out
    return timed


def tokens(vocab: int):
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, vocab, (1, 1), generator=g)


def sink_stream(model, C, ids, compile=False) -> Stream:
    stream = Stream(model, "sink", SINKS, C - SINKS, compile=compile)
    stream.feed(ids[:, :C + 8])    # the cache full, and its ring moved on
    return stream


def static_stepper(model, C, ids, per_round: int):
    """A StaticCache holding C tokens' worth of slots; each round restarts near its end."""
    cache = StaticCache(C)
    with torch.inference_mode():
        model(ids[:, :C - per_round], cache)
    source = tokens(model.config.vocab_size)

    @torch.inference_mode()
    def step():
        return decode_one_token(model, cache, next(source)[:, 0])

    def rewind():
        cache.n.fill_(C - per_round)
    return step, rewind


def seconds_per_token(stream, ids, start, steps, warmup=2) -> float:
    """Median seconds of one `stream.feed(token)` over `steps`, feeding ids[start], ids[start+1], ..."""
    fed = iter(ids[0, start:].tolist())
    return median(timer(lambda: stream.feed(torch.tensor([[next(fed)]])))(steps, warmup))


def fast_forward(stream, ids, position) -> float:
    """Feed tokens up to `position` as one prompt (chunked prefill, exact); returns the seconds."""
    start = time.perf_counter()
    stream.feed(ids[:, stream.tokens_seen:position])
    return time.perf_counter() - start


def measure(name, model, C, threads, args, ids):
    """One row: interleaved medians for one model, cache size and thread count."""
    torch.set_num_threads(threads)
    src = tokens(model.config.vocab_size)
    sink = sink_stream(model, C, ids)
    variants = {"sink": timer(lambda: sink.feed(next(src)))}
    compile_s = None
    if args.compile:
        torch._dynamo.reset()   # compile for this thread count and shape
        compiled = sink_stream(model, C, ids, compile=True)
        start = time.perf_counter()
        compiled.feed(next(src))          # the first step compiles
        compile_s = time.perf_counter() - start
        variants["sink compiled"] = timer(lambda: compiled.feed(next(src)))
    per_round = args.steps + 2
    static_step, rewind = static_stepper(model, C, ids, per_round)
    variants["static"] = timer(static_step)
    variants["matvec"] = timer(matvec_stepper(model))
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        rewind()
        for k, timed in variants.items():
            times[k] += timed(args.steps)
    ms = {k: median(v) * 1e3 for k, v in times.items()}
    if args.recompute_steps:
        recompute = Stream(model, "recompute", SINKS, C - SINKS)
        recompute.history = ids[:, :C - 1]                   # its whole state: the last C-1 token ids
        ms["recompute"] = median(timer(lambda: recompute.feed(next(src)))(args.recompute_steps, warmup=0)) * 1e3
    bw = bandwidth(threads)
    read = weight_bytes(model) + kv_bytes(sink)
    ms["read bound"] = read / bw * 1e3
    ms["weights bound"] = weight_bytes(model) / bw * 1e3   # what matvec reads: no KV
    return ms, compile_s, bw, read


def report(name, C, threads, ms, compile_s, bw, read) -> None:
    cols = ["sink", "sink compiled", "static", "matvec", "recompute", "read bound"]
    cells = "".join(f"{ms[c]:>10.1f}" if c in ms else f"{'-':>10}" for c in cols)
    ratios = (f"{ms['sink'] / ms['static']:>7.2f}x {ms['sink'] / ms['read bound']:>7.2f}x "
              f"{ms['matvec'] / ms['weights bound']:>7.2f}x")
    ratios += (f" {ms['sink compiled'] / ms['sink']:>7.2f}x {ms['sink compiled'] / ms['read bound']:>7.2f}x"
               if "sink compiled" in ms else f" {'-':>8} {'-':>8}")
    extra = f"  compile {compile_s:.0f} s" if compile_s is not None else ""
    print(f"  {threads:>2}  {SINKS}+{C - SINKS:<5}{cells}  {ratios}  {bw / 1e9:5.1f} GB/s, {read / 1e9:.2f} GB{extra}",
          flush=True)


def busy(model, C, ids, args) -> None:
    """2 threads: sink and static with the machine as it is, then with a core kept busy here."""
    torch.set_num_threads(2)
    src = tokens(model.config.vocab_size)
    sink = sink_stream(model, C, ids)
    static_step, rewind = static_stepper(model, C, ids, args.steps + 2)
    variants = {"sink": timer(lambda: sink.feed(next(src))), "static": timer(static_step)}
    times = {(k, load): [] for k in variants for load in ("as is", "busy")}
    for _ in range(args.rounds):
        for load in ("as is", "busy"):
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            try:
                for k, timed in variants.items():
                    rewind()
                    times[k, load] += timed(args.steps)
            finally:
                if spinner:
                    spinner.kill(), spinner.wait()
    ms = {key: median(v) * 1e3 for key, v in times.items()}
    slow = {k: ms[k, "busy"] / ms[k, "as is"] for k in variants}
    print(f"\nBusy machine, 2 threads, cache {SINKS}+{C - SINKS}: ms/token with the machine as it is -> "
          f"with a second process spinning on one core")
    for k in variants:
        print(f"  {k:<7} {ms[k, 'as is']:7.1f} -> {ms[k, 'busy']:7.1f}  ({slow[k]:.2f}x slower)")
    print(f"  sink's slowdown / static's: {slow['sink'] / slow['static']:.2f}", flush=True)


def rss_mb() -> float:
    """Resident memory now (not the peak) in MiB; the peak where there is no /proc."""
    return resident_bytes()[0] / 2**20


def positions(model, ids_for, args) -> None:
    """Eager sink step latency at stream positions, cache 4+1020, and RSS after each."""
    torch.set_num_threads(args.position_threads)
    W = 1020
    stream = Stream(model, "sink", SINKS, W)
    print(f"\nLatency vs stream position, cache {SINKS}+{W}, {args.position_threads} thread(s), median of "
          f"{args.steps * args.rounds} steps")
    print(f"  {'position':>9}  {'ms/token':>8}  {'RSS MB':>10}  fast-forward (chunked prefill)")
    for position in args.positions:
        start, before = time.perf_counter(), stream.tokens_seen
        for s in range(before, position, 4096):   # in pieces: the ids for 100K positions are generated lazily
            stream.feed(ids_for(s, min(s + 4096, position)))
        took = time.perf_counter() - start
        src = tokens(model.config.vocab_size)
        ms = median(timer(lambda: stream.feed(next(src)))(args.steps * args.rounds)) * 1e3
        rss = rss_mb()
        print(f"  {position:>9,}  {ms:8.1f}  {rss:10,.0f}  {position - before:,} tokens in {took:.0f} s", flush=True)


def main(argv=None):
    p = cli.Parser(prog="python -m minisink bench decode", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama-134m,pythia-160m", help=f"shapes from {', '.join(CONFIGS)}")
    p.add_argument("--caches", type=cli.int_list(cli.bench_slots(5)), default=[256, 1024, 2048], help="cache sizes C = S+W, S=4")
    p.add_argument("--threads", type=cli.int_list(cli.threads), default=[1, 2], help=f"torch CPU thread counts; {cli.THREADS_HELP}")
    p.add_argument("--rounds", type=cli.bench_steps(1), default=4, help="interleaved rounds")
    p.add_argument("--steps", type=cli.bench_steps(1), default=6, help="timed steps per variant per round")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip Stream(compile=True)")
    p.add_argument("--recompute-steps", type=cli.bench_steps(0), default=1, help="recompute steps timed (0: skip)")
    p.add_argument("--busy", action="store_true", help="also: 2-thread slowdown under a second busy process")
    p.add_argument("--positions", type=cli.int_list(cli.int_between(1, 10**12, " (stream positions)")), default=[], help="also: latency at these stream positions, e.g. 2048,100000")
    p.add_argument("--position-threads", type=cli.threads, default=1)
    p.add_argument("--positions-shape", default="tiny", choices=["tiny", "small", "full"])
    args = p.parse_args(argv)
    caches, threads = args.caches, args.threads

    print(machine("cpu") + f"; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"torch {torch.__version__}; random weights, fp32, batch 1; {args.rounds} interleaved rounds of "
          f"{args.steps} steps per variant, medians")
    for name in [m for m in args.models.split(",") if m]:
        model = random_model(CONFIGS[name])
        n_params = sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, model.config.vocab_size, (1, max(caches) + 64), generator=torch.Generator().manual_seed(1))
        print(f"\n{name}: {n_params / 1e6:.0f}M params, {weight_bytes(model) / 1e9:.2f} GB of weights read per "
              f"step (an untied input embedding: one row)")
        print(f"  {'th':>2}  {'cache':<7}{'sink':>10}{'compiled':>10}{'static':>10}{'matvec':>10}{'recompute':>10}"
              f"{'bound':>10}  {'sink/':>8} {'sink/':>8} {'matvec/':>8} {'compiled/':>8} {'compiled/':>8}")
        print(f"  {'':>2}  {'':<7}{'ms/token':>10}{'':>10}{'':>10}{'':>10}{'':>10}{'':>10}  {'static':>8} "
              f"{'bound':>8} {'weights':>8} {'sink':>8} {'bound':>8}")
        for t in threads:
            for C in caches:
                report(name, C, t, *measure(name, model, C, t, args, ids))
        if args.busy and name == args.models.split(",")[0]:
            busy(model, 1024, ids, args)
        if args.positions and name == args.models.split(",")[0]:
            small = random_model(scaled(CONFIGS[name], args.positions_shape))
            print(f"\n{name} scaled to {args.positions_shape}: {sum(p.numel() for p in small.parameters()) / 1e6:.1f}M params")
            g = torch.Generator().manual_seed(2)
            positions(small, lambda a, b: torch.randint(0, small.config.vocab_size, (1, b - a), generator=g), args)
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

