"""Streaming perplexity on long text: the NLL of every token under each cache policy.

    python -m minisink eval --model FOLDER|NAME --text FILE|- --tokens 8000 \\
        --policy dense,window,sink,recompute --sink-size 4 --window-size 1020 --out DIR

The definition is token-by-token streaming: feed the stream one token at a time through a cache,
`logits = model(ids[:, i:i+1], cache)`, and score token i+1 with those logits. The evaluator here
feeds chunks of `--chunk-size` tokens instead, `model(ids[:, i:i+T], cache)`, and gets the same
logits for every token (up to float rounding) at a fraction of the cost: one matrix multiply per
weight per chunk instead of per token. Why that is exact, given how minisink/cache.py works:

1. Keys and values do not depend on later eviction. Token j's k and v at layer l are functions of
   its hidden state at layer l, which depends only on what j itself attended to below layer l (the
   sinks and j's own window). Whatever is evicted after j was written cannot change them. So the
   keys a later token reads are the same whether j arrived alone or inside a chunk.
2. Each query sees the keys it would see streaming. A chunk that overflows the cache attends to
   "buffer + chunk" before writing, with a mask that gives query t the S sinks and exactly its own
   window t-W+1 .. t; keys that t's window has already lost are masked, keys that a later query of
   the chunk will overwrite are still there.
3. Only position differences reach the scores. Streaming, query t sits at cache position
   p = min(t, S+W-1), window key j at p - (t - j), sink s at s. RoPE rotates q and k by their
   positions and <R(a) q, R(b) k> = <q, R(b - a) k>; ALiBi adds -slope * (q_pos - k_pos). A chunk
   uses one frame for all its keys (the positions its last query sees) and gives each query two
   positions: `q_pos` in that frame, so t - j is right for every window key, and `q_pos_sink`
   = min(t, S+W-1), so the distance to each sink is right too (sinks never move). Same differences,
   same scores, same softmax, same outputs.

(Caveat: dynamic-NTK RoPE also reads the largest position in use, which for a chunk is its last
query's; it only matters when the cache itself is larger than the trained context.)

Policies (the cache size C = S+W is the same for all but dense):
  dense      DenseCache: every token kept, positions are text indices; past the trained context the
             model sees positions it was never trained on and degrades.
  window     SinkCache(0, C): a rolling window of C tokens, no sink.
  sink       SinkCache(S, W): StreamingLLM.
  recompute  no cache across tokens: the prediction of token t+1 is the last logit of a fresh forward
             over the window of the last C tokens ending at t, ids[t-C+1 .. t], at positions
             0 .. C-1 (while t < C the window is the whole prefix ids[0 .. t]). The quality
             reference of the paper's "sliding window with re-computation"; O(N * C) tokens of work.
             Computed as one causal forward over the prefix ids[0 .. C-1] (which holds the windows
             of every t < C), then batches of full windows, each taken at its last position.

Tokens: the stream is BOS (when the tokenizer has one) followed by the text's tokens, N in all. The
first token of the stream has no prediction, so its NLL is not counted (NaN in the CSV); perplexity
is exp(mean NLL) over tokens 1 .. N-1. "After the cache fills" counts tokens t >= C only: those
predicted from a full cache (before that, every policy is a plain causal forward over the prefix).
"""
import argparse
import csv
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import cli, tp
from ..cache import SinkCache
from .cli import UserError
from . import sizing
from ..generate import POLICIES, make_cache, prefill

RECOMPUTE_BUDGET = 2 ** 26  # elements of the largest tensor (logits or scores) in one recompute batch


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (T, vocab), targets (T,) -> -log p(target) (T,) in fp32."""
    return -F.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


@torch.inference_mode()
def streaming_nll(model, ids: torch.Tensor, cache: SinkCache, chunk_size: int = 512, progress=None) -> torch.Tensor:
    """NLL of every token of the stream ids (N,) fed through `cache` in chunks -> (N,), nll[0] = NaN.

    nll[t] = -log p(ids[t] | the cache after tokens 0 .. t-1). chunk_size=1 is token-by-token
    streaming, the definition; any chunk size gives the same numbers (see the module docstring).
    The last token is only a target, so tokens 0 .. N-2 are fed.
    """
    N = ids.shape[0]
    nll = torch.full((N,), float("nan"), device=ids.device)

    def score(start: int, logits: torch.Tensor) -> None:                 # logits (1, T, vocab)
        end = start + logits.shape[1]
        nll[start + 1:end + 1] = token_nll(logits[0], ids[start + 1:end + 1])
        if progress is not None:
            progress.update(end - start)
    if N > 1:
        prefill(model, cache, ids[None, :N - 1], chunk_size, each=score)
    return nll


@torch.inference_mode()
def recompute_nll(model, ids: torch.Tensor, cache_size: int, batch_size: int | None = None,
                  progress=None) -> torch.Tensor:
    """NLL of every token when each is predicted from a fresh forward over its last C tokens -> (N,).

    Token t+1 is predicted by the last logit of model(ids[t-C+1 .. t]) at positions 0 .. C-1, or of
    model(ids[0 .. t]) while t < C-1 (C = cache_size). Windows are stacked into a batch; the prefix
    ids[0 .. C-1] is one causal forward, since its position t is exactly the window ending at t.
    """
    N, C = ids.shape[0], cache_size
    nll = torch.full((N,), float("nan"), device=ids.device)
    prefix = min(C, N - 1)
    nll[1:prefix + 1] = token_nll(model(ids[None, :prefix])[0], ids[1:prefix + 1])
    if progress is not None:
        progress.update(prefix)
    if N - 1 <= C:
        return nll
    if batch_size is None:
        batch_size = max(1, RECOMPUTE_BUDGET // (C * max(_vocab_size(model), _n_heads(model) * C)))
    targets = torch.arange(C + 1, N, device=ids.device)   # predicted by the windows ending at C .. N-2
    nll[C + 1:] = window_nll(model, ids, C, targets, batch_size, progress)
    return nll


def output_head(model) -> torch.nn.Module:
    """The module that turns hidden states into logits: `lm_head`, or GPT-NeoX's `embed_out`."""
    return model.lm_head if hasattr(model, "lm_head") else model.embed_out


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor, cache_size: int, targets: torch.Tensor, batch_size: int = 8,
               progress=None) -> torch.Tensor:
    """NLL (len(targets),) of ids[t] for each t in targets (t >= C), predicted the paper's "sliding
    window with re-computation" way: the last logit of a fresh forward over ids[t-C .. t-1] at
    positions 0 .. C-1. Windows are stacked into batches; the output head sees the last position only."""
    C = cache_size
    assert int(targets.min()) >= C, "window_nll scores tokens whose window is full (t >= C)"
    last_only = output_head(model).register_forward_pre_hook(lambda module, args: (args[0][:, -1:],))
    try:
        nll = []
        for part in targets.split(batch_size):
            windows = torch.stack([ids[t - C:t] for t in part.tolist()])          # (b, C)
            nll.append(token_nll(model(windows)[:, -1], ids[part]))                # (b,)
            if progress is not None:
                progress.update(len(part))
    finally:
        last_only.remove()
    return torch.cat(nll)


def policy_nll(model, ids: torch.Tensor, policy: str, sink_size: int, window_size: int,
               chunk_size: int = 512, progress=None) -> torch.Tensor:
    """NLL (N,) of the stream `ids` under one policy with a cache of sink_size + window_size."""
    if policy == "recompute":
        return recompute_nll(model, ids, sink_size + window_size, progress=progress)
    p = next(model.parameters())
    cache = make_cache(policy, sink_size, window_size, device=p.device, dtype=p.dtype)
    return streaming_nll(model, ids, cache, chunk_size, progress)


def perplexity(nll: torch.Tensor, first: int = 1) -> float:
    """exp(mean NLL) over tokens first .. N-1 (NaN when there are none)."""
    scored = nll[first:]
    return math.exp(scored.double().mean().item()) if scored.numel() else float("nan")


def _config_value(model, *names, default=None):
    for name in names:
        value = getattr(getattr(model, "config", None), name, None)
        if value is not None:
            return value
    return default


def _vocab_size(model) -> int:
    return _config_value(model, "vocab_size", default=32000)


def _n_heads(model) -> int:
    return _config_value(model, "num_attention_heads", "n_heads", "n_head", default=32)


def trained_context(model) -> int | None:
    """The context length the model was trained with, when its config says (as `sizing` reads it)."""
    return sizing.trained_context(vars(model.config)) if hasattr(model, "config") else None


# ---------------------------------------------------------------------------------------------------
# Command line


class Progress:
    """tqdm if it is installed, else one line on stderr rewritten in place."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, mininterval=0.5)
        except ImportError:
            self.bar = None
        self.total, self.desc, self.done = total, desc, 0

    def update(self, n: int):
        if self.bar is not None:
            self.bar.update(n)
            return
        self.done += n
        print(f"\r{self.desc}: {self.done}/{self.total} tokens", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv):
    p = cli.Parser(prog="python -m minisink eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="model folder (config.json, model.safetensors, tokenizer), short name, hub repo id or .gguf file, as run.py takes")
    p.add_argument("--text", required=True, type=lambda t: t if t == "-" else cli.readable_file(t),
                   help="UTF-8 text file, or - for stdin (text that is not UTF-8 is reported with its byte offset)")
    p.add_argument("--tokens", type=int, default=4000, help="length N of the stream, BOS included (default 4000)")
    p.add_argument("--policy", default="dense,window,sink,recompute", help="comma-separated: " + ", ".join(POLICIES))
    p.add_argument("--sink-size", type=int, default=4, help="S, attention sinks (default 4)")
    p.add_argument("--window-size", type=int, default=None,
                   help="W, rolling window (default: the model's trained context minus S, S+W at most 4096)")
    p.add_argument("--chunk-size", type=int, default=512, help="tokens per forward pass (default 512)")
    p.add_argument("--out", required=True, type=cli.writable_folder,
                   help="folder for the CSVs and the PNG (required: eval writes nowhere unless told where; "
                        "e.g. results/NAME, outside the repository)")
    p.add_argument("--sweep-sinks", type=int_list, default=None, metavar="0,1,2,4,8",
                   help="also print PPL for these sink counts at the same cache size S+W (paper's Table 2)")
    p.add_argument("--device", default="cpu", type=cli.device, help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16, or fp16 (GPU only: refused on CPU, as by run.py); int8, int4: "
                   "quantized weights, bf16 activations, CPU (minisink/quantize.py; int4 on a .gguf: its own Q4_0/Q4_1/Q4_K blocks)")
    args = p.parse_args(argv)
    args.policy = [x.strip() for x in args.policy.split(",") if x.strip()]
    bad = [x for x in args.policy if x not in POLICIES]
    if bad or not args.policy:
        p.error(f"unknown policy {bad[0] if bad else '(none)'!r}; choose from {', '.join(POLICIES)}")
    if args.sink_size < 0 or (args.window_size is not None and args.window_size < 1) or args.chunk_size < 1:
        p.error("need --sink-size >= 0, --window-size >= 1 and --chunk-size >= 1")
    if args.tokens < 2:
        p.error(f"--tokens must be at least 2 (the first token is not scored), got {args.tokens}")
    for s in args.sweep_sinks or []:  # checked again once the default window is known (choose_cache)
        if args.window_size is not None and not 0 <= s < args.sink_size + args.window_size:
            p.error(f"--sweep-sinks: {s} sinks leave no window in a cache of {args.sink_size + args.window_size}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from ..quantize import DTYPES as QUANTIZED
    from ..weights.load import DTYPES
    if args.dtype not in DTYPES and args.dtype not in QUANTIZED:
        p.error(f"--dtype {args.dtype!r}: choose one of {', '.join([*DTYPES, *QUANTIZED])}")
    if args.dtype in QUANTIZED and args.device != "cpu":
        p.error(f"--dtype {args.dtype} runs on CPU only (torch's int8/int4 CPU kernels); on {args.device} use bf16")
    cli.refuse_fp16_on_cpu(activations_dtype(args.dtype), args.device)
    return args


def activations_dtype(name: str) -> torch.dtype:
    """--dtype's torch dtype; int8/int4 quantize the weights only, and compute in bf16."""
    from ..weights.load import DTYPES
    return DTYPES.get(name, torch.bfloat16)


def choose_cache(args, device, share: float = 1.0) -> tuple[int, list[str]]:
    """(W, notes to print): --window-size, or the same default as run.py's (minisink/tools/sizing.py)."""
    from ..weights.load import DTYPES, build_config, read_config
    from .sizing import CacheSizeError, check_fits, choose_window
    config = read_config(args.model)
    cls, parsed = build_config(config)
    try:
        W, notes = choose_window(config, args.sink_size, args.window_size, getattr(parsed, "sliding_window", None))
        check_fits(cls, parsed, args.sink_size + W, activations_dtype(args.dtype), torch.device(device), share)
    except CacheSizeError as e:
        raise cli.UsageError(str(e)) from None
    cache_size = args.sink_size + W
    for s in args.sweep_sinks or []:
        if not 0 <= s < cache_size:
            raise UserError(f"--sweep-sinks: {s} sinks leave no window in a cache of {cache_size}")
    return W, notes


def read_stream(args) -> list[int]:
    """The stream's first token (BOS, as run.py starts a stream) + the text's tokens, at most args.tokens in all."""
    from ..weights.load import read_config
    try:
        from ..text.tokenizer import load_tokenizer
    except ImportError as e:
        raise UserError(f"minisink.text.tokenizer is not available ({e})") from None
    text = cli.decode_utf8(sys.stdin.buffer.read(), "stdin") if args.text == "-" else cli.read_text(args.text)
    config = read_config(args.model)  # a wrong folder is best reported as such, before its tokenizer
    try:
        tokenizer = load_tokenizer(args.model)
    except ValueError as e:  # a tokenizer file that minisink cannot read (UnsupportedTokenizerError, ...)
        raise UserError(str(e)) from None
    from ..generate import first_token
    first = first_token(tokenizer, config)
    ids = ([first] if first is not None else []) + tokenizer.encode(text, bos=False)
    if len(ids) < 2:
        raise UserError(f"{args.text}: the text has too few tokens to score ({len(ids)})")
    if len(ids) < args.tokens:
        print(f"note: the text has only {len(ids)} tokens; using them all", file=sys.stderr)
    return ids[:args.tokens]


def summary_rows(results: dict, cache_size: int) -> list[dict]:
    rows = []
    for label, (S, W, nll) in results.items():
        rows.append({"policy": label, "sink_size": S, "window_size": W,
                     "tokens_scored": nll.shape[0] - 1, "ppl": perplexity(nll),
                     "tokens_after_fill": max(0, nll.shape[0] - cache_size),
                     "ppl_after_fill": perplexity(nll, first=cache_size)})
    return rows


def write_csv(path: Path, rows: list[dict]):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


STYLES = {"dense": dict(color="tab:blue"), "window": dict(color="tab:orange", lw=2.0),
          "sink": dict(color="tab:green"), "recompute": dict(color="black", ls="--", lw=0.9)}


def plot(path: Path, results: dict, cache_size: int, context: int | None, title: str) -> bool:
    """Running log-PPL vs tokens (the paper's Figure 3), and a 256-token moving average zoomed on
    the bounded-cache policies (dense, once it degrades, would flatten them into one line)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the PNG", file=sys.stderr)
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    k = min(256, next(iter(results.values()))[2].shape[0] - 1)
    zoom = []
    for label, (_, _, nll) in results.items():
        style = STYLES.get(label, dict(lw=1.0))
        x = torch.arange(1, nll.shape[0])
        running = nll[1:].double().cumsum(0) / x
        top.plot(x, running, label=label, **{"lw": 1.2, **style})
        moving = F.avg_pool1d(nll[None, None, 1:].double(), k, stride=1)[0, 0]   # mean of the last k
        bottom.plot(x[k - 1:], moving, label=label, **{"lw": 1.0, **style})
        if label != "dense":
            zoom.append(moving)
    if zoom and "dense" in results:
        lo, hi = min(m.min().item() for m in zoom), max(m.max().item() for m in zoom)
        bottom.set_ylim(lo - 0.1 * (hi - lo), hi + 0.3 * (hi - lo))
        bottom.text(0.01, 0.97, "zoomed on the bounded caches; dense may leave the frame",
                    transform=bottom.transAxes, va="top", fontsize=8, color="grey")
    for ax in (top, bottom):
        ax.axvline(cache_size, color="grey", ls="--", lw=0.8)
        if context:
            ax.axvline(context, color="grey", ls=":", lw=0.8)
        ax.grid(alpha=0.3)
    top.set_ylabel("running log-PPL (mean NLL, tokens 1..t)")
    bottom.set_ylabel(f"log-PPL of the last {k} tokens")
    marks = f"dashed: cache size {cache_size}" + (f"; dotted: trained context {context}" if context else "")
    bottom.set_xlabel(f"tokens ({marks})")
    top.legend()
    top.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def print_summary(rows: list[dict], cache_size: int):
    print(f"{'policy':<16}{'cache':>10}{'PPL':>10}{f'PPL t>={cache_size}':>14}")
    for r in rows:
        cache = {"dense": "all", "recompute": f"last {cache_size}"}.get(
            r["policy"], f"{r['sink_size']}+{r['window_size']}")
        print(f"{r['policy']:<16}{cache:>10}{r['ppl']:>10.3f}{r['ppl_after_fill']:>14.3f}")


def print_sweep(rows: list[dict]):
    """The shape of the paper's Table 2: one column per sinks+window split of the same cache."""
    names = [f"{r['sink_size']}+{r['window_size']}" for r in rows]
    print(f"{'cache (S+W)':<16}" + "".join(f"{n:>10}" for n in names))
    print(f"{'PPL':<16}" + "".join(f"{r['ppl']:>10.3f}" for r in rows))
    print(f"{'PPL after fill':<16}" + "".join(f"{r['ppl_after_fill']:>10.3f}" for r in rows))


def run(args) -> int:
    from ..weights.hub import resolve
    from ..weights.load import DTYPES, build_config, load_model, read_config
    named, args.model = args.model, resolve(args.model)  # a folder, a .gguf file, or a short name / repo id downloaded as run.py does
    # under torchrun: this rank's part of the model (minisink/tools/tp.py); (None, device) otherwise
    shard, device = tp.start(build_config(read_config(args.model))[1], torch.device(args.device), Path(args.model).name)
    if shard is not None and args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype} runs in one process only; under torchrun use --dtype bf16 or fp32")
    args.device = str(device)
    S, (W, notes) = args.sink_size, choose_cache(args, args.device, tp.memory_share(tp.launched(), device))
    C = S + W
    ids_list = read_stream(args)
    for note in notes:  # after the input is known to be readable: an error stays one line
        print(f"minisink.tools.eval: {note}", file=sys.stderr)
    if args.dtype in DTYPES:
        model = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device, shard=shard)
    else:
        from ..quantize import QuantizeError, load_quantized
        from ..weights.gguf import GGUFError
        try:
            model = load_quantized(named, args.model, args.dtype, device=args.device)
        except (QuantizeError, GGUFError) as e:
            raise UserError(str(e)) from None
    ids = torch.tensor(ids_list, dtype=torch.long, device=args.device)
    N = ids.shape[0]
    print(f"{N} tokens, cache {S}+{W}, chunks of {args.chunk_size}", file=sys.stderr)

    memo: dict[tuple, torch.Tensor] = {}   # (kind, S, W) -> nll: window is sink with S=0, so share runs

    def nll_for(policy, s, w, desc):
        key = {"dense": ("dense", 0, 0), "window": ("sink", 0, s + w), "sink": ("sink", s, w),
               "recompute": ("recompute", 0, s + w)}[policy]
        if key not in memo:
            bar = Progress(N - 1, desc)
            memo[key] = policy_nll(model, ids, policy, s, w, args.chunk_size, bar).cpu()
            bar.close()
        return memo[key]

    results = {}
    for policy in args.policy:
        s, w = {"window": (0, C), "recompute": (0, C), "dense": (0, N)}.get(policy, (S, W))
        results[policy] = (s, w, nll_for(policy, S, W, policy))
    sweep = {}
    for s in args.sweep_sinks or []:
        sweep[f"sink {s}+{C - s}"] = (s, C - s, nll_for("sink", s, C - s, f"sink {s}+{C - s}"))
    if not tp.speaks():   # tensor parallel: every rank computed the same numbers; rank 0 writes them
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results, C)
    write_csv(out / "streaming_ppl_summary.csv", rows)
    columns = {f"nll_{p}": nll.tolist() for p, (_, _, nll) in results.items()}
    token_rows = [{"token": t, "id": ids_list[t],
                   **{c: ("" if t == 0 else f"{v[t]:.6f}") for c, v in columns.items()}} for t in range(N)]
    write_csv(out / "streaming_ppl_tokens.csv", token_rows)
    title = f"{Path(args.model).name}: {N} tokens, cache {S}+{W}"
    written = ["streaming_ppl_summary.csv", "streaming_ppl_tokens.csv"]
    if plot(out / "streaming_ppl.png", results, C, trained_context(model), title):
        written.append("streaming_ppl.png")
    print_summary(rows, C)
    if sweep:
        sweep_rows = summary_rows(sweep, C)
        write_csv(out / "streaming_ppl_sweep.csv", sweep_rows)
        written.append("streaming_ppl_sweep.csv")
        print()
        print_sweep(sweep_rows)
    print(f"wrote {', '.join(written)} in {out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    def command(argv) -> int:
        try:
            return run(parse_args(argv))
        finally:
            tp.leave()  # under torchrun
    return cli.main("python -m minisink eval", command, argv, errors=(tp.TPError,))

