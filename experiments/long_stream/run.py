"""A million tokens of books through one cache: the paper's Figure 5 on SmolLM2-135M (issue 25).

    python experiments/long_stream/run.py stream --policy sink --sink-size 4 --window-size 1020 \\
        --tokens 1000448 --out DIR          # per-block perplexity, written as it goes; resumable
    python experiments/long_stream/run.py stability --run DIR --blocks 24 --warmup 4096
    python experiments/long_stream/run.py plot DIR1 DIR2 ... --out figure.png

The stream: the model's first token (BOS), then the books of --books (default
../shared/assets/text/gutenberg) in the order of their MANIFEST.csv, each book's text tokenized on
its own and the token lists concatenated (no separator), cut to --tokens targets + 1. `stream.json`
records the books used and the sha256 of the ids, so two runs can be checked to read the same stream.

`stream` feeds the stream through one cache (make_cache: sink S+W, window S+W slots without sinks,
dense) block by block, --block targets at a time, with the library's chunked feeding and NLL
(minisink.tools.eval.streaming_nll, which is minisink.generate.prefill in chunks of --chunk), and
appends one row per block to ppl.csv (block, first_target, last_target, book, nll_sum, ppl) and
perf.csv (block, seconds, tokens_per_s, rss_mib: the resident memory after the block, the heap trimmed
first: see trim_heap) as it goes; progress and an ETA go to stderr.

Resumable: every --checkpoint-every blocks (at a block boundary) the cache (every layer's K, V and
sink copies, the slot table, the stream position) and the byte lengths of both CSVs are saved to
checkpoint.pt, atomically (a temporary file, fsync, rename). Running the same command again loads
it, cuts the CSVs back to those lengths (rows written after the checkpoint are recomputed, never
doubled) and continues. There is no randomness to save: evaluation is greedy scoring.
A run is refused if its folder holds a run with another config.json.

`stability`: for --blocks blocks spread evenly over a finished run, the same block is streamed again
from a fresh cache (BOS, then the text from --warmup tokens before the block), and its perplexity is
compared with the long stream's: stability.csv. No drift means the two agree.

`plot`: perplexity per block against tokens, log x (the paper's Figure 5), one line per run folder.
"""
import argparse
import csv
import ctypes
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from minisink.tools import cli  # noqa: E402  (no torch yet: a bad flag costs nothing)
from minisink.tools.cli import UserError  # noqa: E402

BOOKS = "../shared/assets/text/gutenberg"   # relative to the repository root, as config.json records it
PPL_COLUMNS = ["block", "first_target", "last_target", "book", "nll_sum", "ppl"]
PERF_COLUMNS = ["block", "seconds", "tokens_per_s", "rss_mib"]
STABILITY_COLUMNS = ["block", "first_target", "book", "warmup", "dtype", "long_ppl", "fresh_ppl",
                     "rel_diff", "seconds"]


# ------------------------------------------------------------------------------------ the stream

def manifest(books: Path) -> list[tuple[str, str]]:
    """(file name, title) of every book, in MANIFEST.csv order."""
    path = books / "MANIFEST.csv"
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
        return [(r["file_name"].strip(), r["title"].strip()) for r in rows]
    except (KeyError, csv.Error) as e:
        raise UserError(f"{path}: expected columns file_name and title ({e})") from None


def book_stream(tokenizer, first: int | None, books: Path, targets: int) -> tuple[list[int], list[tuple[int, str]]]:
    """(ids, starts): the first token, then the books' tokens, targets + 1 ids in all; starts[i] =
    (index of the book's first token in ids, title). Books are tokenized one at a time, as needed."""
    ids = [first] if first is not None else []
    starts = []
    for name, title in manifest(books):
        if len(ids) > targets:
            break
        starts.append((len(ids), title))
        ids += tokenizer.encode(cli.read_text(books / name), bos=False)
    if len(ids) < targets + 1:
        raise UserError(f"{books}: the books hold {len(ids) - 1} tokens, fewer than --tokens {targets}")
    return ids[:targets + 1], starts


def book_at(starts: list[tuple[int, str]], index: int) -> str:
    title = starts[0][1]
    for start, name in starts:
        if start > index:
            break
        title = name
    return title


def sha256_ids(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def load(args):
    """(model, tokenizer ids, book starts) for a run's config: the model in its dtype, the stream."""
    import torch
    from minisink.generate import first_token
    from minisink.text.tokenizer import load_tokenizer
    from minisink.weights.load import DTYPES, load_model, read_config
    torch.set_num_threads(args.threads)
    model_dir = Path(os.path.expanduser(args.model))
    tokenizer = load_tokenizer(model_dir)
    ids, starts = book_stream(tokenizer, first_token(tokenizer, read_config(model_dir)), REPO / args.books, args.tokens)
    model = load_model(model_dir, dtype=DTYPES[args.dtype])
    return model, ids, starts


# ------------------------------------------------------------------------------- cache snapshots

def cache_state(cache) -> dict:
    """Everything a SinkCache (or DenseCache) carries from one block to the next."""
    return {"k": cache.k, "v": cache.v, "sink_k": cache.sink_k, "slot_token": cache.slot_token,
            "n": cache.n, "seen": cache.seen, "full": cache.full, "W": cache.W, "capacity": cache.capacity}


def restore_cache(cache, state: dict) -> None:
    cache.k, cache.v, cache.sink_k = state["k"], state["v"], state["sink_k"]
    cache.slot_token, cache.n = state["slot_token"], state["n"]
    cache.seen, cache.full, cache.W, cache.capacity = state["seen"], state["full"], state["W"], state["capacity"]


def save_atomic(obj, path: Path) -> None:
    import torch
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_row(path: Path, columns: list[str], row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------- resident memory

def fixed_mmap_threshold(nbytes: int = 4 << 20) -> bool:
    """--malloc mmap: glibc mmaps every allocation above nbytes and unmaps it when freed.

    Why RSS moves at all: each chunk's logits (256 x 49,152, bf16: 24 MiB, and twice that in fp32 to
    score them) are allocated and freed again. glibc starts by mmapping such blocks, but on the first
    free it raises its threshold to the freed size (up to 32 MiB), so later ones come from the heap,
    whose top it returns to the system only now and then: with --malloc default the process's RSS
    swung between 572.0 and 658.5 MiB from block to block over 100 blocks of SmolLM2 at 4+1020 (+15%;
    nothing is kept, the cache is fixed). A fixed threshold (as MALLOC_MMAP_THRESHOLD_ sets it) stops
    that (565.5 - 565.7 MiB over 15 blocks at 4 MiB) but faults every big tensor in afresh: about 1.4x
    slower per block at 4 MiB, 2x at 128 KiB (concurrent runs, a loaded machine: provisional). Hence
    the default, `trim_heap` after each block. False where there is no glibc."""
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-3, nbytes) == 1   # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def trim_heap() -> None:
    """--malloc trim (the default): after each block, hand the heap's free memory back to the system
    (glibc's malloc_trim), so the RSS recorded between blocks is what the run holds, not what the
    allocator happened to keep from the last chunk's logits; costs nothing measurable per block
    (docs/results/long_stream/README.md). A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------ stream mode

def run_config(args) -> dict:
    sink = args.sink_size if args.policy == "sink" else 0
    return {"model": str(args.model), "books": str(args.books), "policy": args.policy, "sink_size": sink,
            "window_size": args.window_size, "tokens": args.tokens, "block": args.block, "chunk": args.chunk,
            "dtype": args.dtype, "threads": args.threads}


def stream(args) -> int:
    if args.malloc == "mmap":
        fixed_mmap_threshold()
    import torch
    from minisink.generate import make_cache
    from minisink.tools.eval import streaming_nll
    out = Path(args.out)
    config = run_config(args)
    if (out / "config.json").exists():
        old = json.loads((out / "config.json").read_text())
        if old != config:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in config.items() if old.get(k) != v)
            raise UserError(f"{out} holds a run with another config ({diff}); use another --out")
    model, ids_list, starts = load(args)   # a missing book or model fails here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor(ids_list, dtype=torch.long)
    stream_info = {"tokens": len(ids_list), "sha256_ids": sha256_ids(ids_list),
                   "books": [{"first_token": s, "title": t} for s, t in starts]}
    if not (out / "config.json").exists():
        (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        (out / "stream.json").write_text(json.dumps(stream_info, indent=1) + "\n")
    elif json.loads((out / "stream.json").read_text())["sha256_ids"] != stream_info["sha256_ids"]:
        raise UserError(f"{out}/stream.json: the run read another token stream (books or tokenizer changed)")

    B, S, W = args.block, config["sink_size"], args.window_size
    make = {"sink": lambda: make_cache("sink", S, W, "cpu", next(model.parameters()).dtype),
            "window": lambda: make_cache("window", 0, W, "cpu", next(model.parameters()).dtype),
            "dense": lambda: make_cache("dense", 0, W, "cpu", next(model.parameters()).dtype)}[args.policy]
    cache = make()
    blocks = args.tokens // B
    done = 0
    ppl_csv, perf_csv, ckpt = out / "ppl.csv", out / "perf.csv", out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        restore_cache(cache, state["cache"])
        done = state["blocks_done"]
        for path, size in ((ppl_csv, state["ppl_bytes"]), (perf_csv, state["perf_bytes"])):
            with path.open("r+b") as f:
                f.truncate(size)  # rows written after the checkpoint are computed again
        print(f"resuming {out} at block {done} of {blocks}", file=sys.stderr)
    else:
        for path in (ppl_csv, perf_csv):
            path.unlink(missing_ok=True)
    started, first_done = time.perf_counter(), done
    for b in range(done, blocks):
        t0 = time.perf_counter()
        # inputs ids[b*B .. (b+1)*B - 1] go into the cache; targets ids[b*B + 1 .. (b+1)*B] are scored
        nll = streaming_nll(model, ids[b * B:(b + 1) * B + 1], cache, args.chunk)[1:]
        nll_sum = nll.double().sum().item()
        if args.malloc == "trim":
            trim_heap()
        seconds = time.perf_counter() - t0
        rss = cli.resident_bytes()[0] / 2 ** 20
        append_row(ppl_csv, PPL_COLUMNS, {"block": b, "first_target": b * B + 1, "last_target": (b + 1) * B,
                                          "book": book_at(starts, b * B + 1), "nll_sum": repr(nll_sum),
                                          "ppl": f"{math.exp(nll_sum / B):.6f}"})
        append_row(perf_csv, PERF_COLUMNS, {"block": b, "seconds": f"{seconds:.4f}",
                                            "tokens_per_s": f"{B / seconds:.1f}", "rss_mib": f"{rss:.1f}"})
        if args.crash_after_rows is not None and b + 1 == args.crash_after_rows:
            os.kill(os.getpid(), 9)   # tests: a SIGKILL between a row and its checkpoint
        if (b + 1) % args.checkpoint_every == 0 or b + 1 == blocks:
            save_atomic({"cache": cache_state(cache), "blocks_done": b + 1, "ppl_bytes": ppl_csv.stat().st_size,
                         "perf_bytes": perf_csv.stat().st_size}, ckpt)
        n = b + 1 - first_done
        if n == 1 or (b + 1) % args.log_every == 0 or b + 1 == blocks:
            rate = n * B / (time.perf_counter() - started)
            eta = (blocks - b - 1) * B / rate
            print(f"{out.name}: block {b + 1}/{blocks}, {(b + 1) * B} tokens, ppl {math.exp(nll_sum / B):.2f}, "
                  f"{rate:.0f} tok/s, RSS {rss:.0f} MiB, ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)
    return 0


# --------------------------------------------------------------------------------- stability mode

def spread(blocks: int, count: int, first: int) -> list[int]:
    """count block indices spread evenly from `first` to the last block (rounded)."""
    if count == 1:
        return [blocks - 1]
    return sorted({round(first + i * (blocks - 1 - first) / (count - 1)) for i in range(count)})


def stability(args) -> int:
    import torch
    from minisink.generate import make_cache
    from minisink.tools.eval import streaming_nll
    run = Path(args.run)
    try:
        config = json.loads((run / "config.json").read_text())
        with (run / "ppl.csv").open(newline="") as f:
            rows = {int(r["block"]): r for r in csv.DictReader(f)}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{run}: not a finished stream run ({e})") from None
    if config["policy"] == "dense":
        raise UserError("stability compares bounded caches; the dense run has no fresh-cache twin")
    args.model, args.books, args.tokens, args.dtype, args.threads = (config["model"], config["books"], config["tokens"],
                                                                     args.dtype or config["dtype"], args.threads)
    B, S, W, chunk = config["block"], config["sink_size"], config["window_size"], config["chunk"]
    blocks = config["tokens"] // B
    first = math.ceil(args.warmup / B) + 1          # the first block with a whole warmup of text before it
    chosen = args.only or spread(blocks, args.blocks, first)
    missing = [b for b in chosen if b not in rows]
    if missing:
        raise UserError(f"{run}/ppl.csv has no row for block {missing[0]} (the run is not finished?)")
    model, ids_list, starts = load(args)
    ids = torch.tensor(ids_list, dtype=torch.long)
    out = Path(args.out) if args.out else run / "stability.csv"
    if out.exists():
        out.unlink()
    for b in chosen:
        t0 = time.perf_counter()
        start = b * B - args.warmup            # the fresh stream: the first token, then the text from here
        fresh = torch.cat([ids[:1], ids[start:(b + 1) * B + 1]])
        cache = make_cache(config["policy"], S, W, "cpu", next(model.parameters()).dtype)
        nll = streaming_nll(model, fresh, cache, chunk)[-B:]
        fresh_ppl = math.exp(nll.double().sum().item() / B)
        long_ppl = float(rows[b]["ppl"])
        rel = long_ppl / fresh_ppl - 1
        append_row(out, STABILITY_COLUMNS, {"block": b, "first_target": b * B + 1, "book": book_at(starts, b * B + 1),
                                            "warmup": args.warmup, "dtype": args.dtype, "long_ppl": f"{long_ppl:.6f}",
                                            "fresh_ppl": f"{fresh_ppl:.6f}", "rel_diff": f"{rel:+.6f}",
                                            "seconds": f"{time.perf_counter() - t0:.1f}"})
        print(f"block {b}: long {long_ppl:.4f}, fresh {fresh_ppl:.4f}, {100 * rel:+.4f}%", file=sys.stderr, flush=True)
    return 0


# -------------------------------------------------------------------------------------- plot mode

def read_run(folder: Path) -> tuple[dict, list[dict]]:
    config = json.loads((folder / "config.json").read_text())
    with (folder / "ppl.csv").open(newline="") as f:
        return config, list(csv.DictReader(f))


def label(config: dict) -> str:
    S, W = config["sink_size"], config["window_size"]
    return {"sink": f"sink {S}+{W}", "window": f"window {W}", "dense": "dense"}[config["policy"]]


def plot(folders: list[Path], out: Path, context: int | None = 8192) -> None:
    """Perplexity per block vs the block's last target, log x: the paper's Figure 5."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for folder in folders:
        config, rows = read_run(folder)
        ax.plot([int(r["last_target"]) for r in rows], [float(r["ppl"]) for r in rows], lw=0.9,
                label=f"{label(config)} ({len(rows) * config['block']:,} tokens)")
    if context:
        ax.axvline(context, color="grey", ls=":", lw=0.8, label=f"trained context {context:,}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel(f"perplexity of each block of {config['block']} tokens")
    ax.set_title("SmolLM2-135M-Instruct on 61 concatenated novels (books differ: the level moves with the book)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------- command line

def parse_args(argv):
    p = cli.Parser(prog="experiments/long_stream/run.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("stream", help="stream the books through one cache, a CSV row per block")
    s.add_argument("--model", default=None, help="model folder (default: SmolLM2-135M-Instruct, smollm2_folder())")
    s.add_argument("--books", default=BOOKS,
                   help="folder with MANIFEST.csv and the books (default ../shared/assets/text/gutenberg)")
    s.add_argument("--policy", choices=["sink", "window", "dense"], default="sink")
    s.add_argument("--sink-size", type=cli.int_at_least(0), default=4)
    s.add_argument("--window-size", type=cli.int_at_least(1), default=1020,
                   help="W: the window (sink), the whole cache (window), the first allocation (dense)")
    s.add_argument("--tokens", type=cli.int_at_least(1), default=1_000_448, help="targets scored (whole blocks)")
    s.add_argument("--block", type=cli.int_at_least(1), default=1024, help="targets per CSV row (default 1024)")
    s.add_argument("--chunk", type=cli.int_at_least(1), default=256, help="tokens per forward pass (default 256)")
    s.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    s.add_argument("--threads", type=cli.int_at_least(1), default=1)
    s.add_argument("--checkpoint-every", type=cli.int_at_least(1), default=4, help="blocks between checkpoints")
    s.add_argument("--log-every", type=cli.int_at_least(1), default=10, help="blocks between progress lines")
    s.add_argument("--out", required=True, type=cli.writable_folder)
    s.add_argument("--malloc", choices=["trim", "mmap", "default"], default="trim",
                   help="steady RSS: trim the heap after each block (default), or fix glibc's mmap threshold "
                        "(fixed_mmap_threshold), or neither (RSS then swings from block to block)")
    s.add_argument("--crash-after-rows", type=int, default=None, help=argparse.SUPPRESS)  # tests only
    t = sub.add_parser("stability", help="re-stream blocks of a finished run from a fresh cache")
    t.add_argument("--run", required=True, help="a finished stream folder")
    t.add_argument("--blocks", type=cli.int_at_least(1), default=24)
    t.add_argument("--only", type=lambda x: [int(v) for v in x.split(",")], default=None,
                   help="these block indices instead of --blocks spread ones (a short check)")
    t.add_argument("--warmup", type=cli.int_at_least(1), default=4096, help="text tokens before the block")
    t.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the run's")
    t.add_argument("--threads", type=cli.int_at_least(1), default=1)
    t.add_argument("--out", default=None, help="CSV to write (default RUN/stability.csv)")
    g = sub.add_parser("plot", help="the Figure-5 plot of run folders")
    g.add_argument("runs", nargs="+")
    g.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.mode == "stream":
        if args.tokens % args.block:
            p.error(f"--tokens {args.tokens} is not a whole number of --block {args.block}")
        if args.model is None:
            from minisink.weights.smollm2 import smollm2_folder
            args.model = smollm2_folder()
        args.model = str(args.model).replace(str(Path.home()), "~")
    return args


def main(argv=None) -> int:
    def run(argv):
        args = parse_args(argv)
        if args.mode == "plot":
            plot([Path(r) for r in args.runs], Path(args.out))
            return 0
        return {"stream": stream, "stability": stability}[args.mode](args)
    return cli.main("experiments/long_stream/run.py", run, argv)


if __name__ == "__main__":
    cli.exit_on_interrupt("experiments/long_stream/run.py")
    sys.exit(main())
