"""Benchmark: chunked streaming evaluation vs token-by-token, same cache, same numbers.

    python -m minisink bench eval [--tokens 20000] [--prefix 256] [--sink-size 4 --window-size 508]

A random-weight Llama of realistic shape (Pythia-160M-like: dim 768, 12 layers, 12 heads, SwiGLU
2048, vocab 32000; 110M parameters) reads a stream of random tokens through SinkCache(4, 508).

- chunked: `minisink.tools.eval.streaming_nll` with chunks of 256, timed on the whole stream. A chunk of T
  attends to S+W+T keys, so shorter chunks mean shorter attention rows; on a CPU 256 beat 512 by
  ~20% here (matrix multiplies are already efficient at 256 rows).
- token-by-token: the same function with chunk_size=1 (the definition). On a CPU this takes tens
  of milliseconds per token, so by default it is timed on `--prefix` tokens once the cache is full
  (the cache is filled first, untimed, by the chunked path), where its per-token cost is constant:
  the cache never grows. The full-stream time is that per-token cost times the stream length, and
  the report says so. While the cache is filling, attention is shorter, so this slightly overstates
  token-by-token for the first S+W tokens (2.5% of 20,000). `--prefix 0` times the whole stream.

Both runs' NLLs on the timed prefix are compared, so the speedup is for the same answer.
"""
import time

import torch

from .. import cli
from ...cache import SinkCache
from ..eval import streaming_nll
from ...weights.load import DTYPES
from ...models.llama import LlamaConfig, LlamaForCausalLM
from ..sizing import step_read_bytes

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, max_position_embeddings=2048, rms_norm_eps=1e-5)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = cli.Parser(prog="python -m minisink bench eval", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=cli.bench_steps(2), default=20000)
    p.add_argument("--prefix", type=cli.bench_steps(0), default=256, help="token-by-token tokens timed after the cache fills; 0: all")
    p.add_argument("--sink-size", type=cli.bench_slots(0), default=4)
    p.add_argument("--window-size", type=cli.bench_slots(1), default=508)
    p.add_argument("--chunk-size", type=cli.bench_slots(1), default=256)
    p.add_argument("--device", type=cli.device, default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--threads", type=cli.threads, default=None, help=f"torch CPU threads (default: torch's choice); {cli.THREADS_HELP}")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    S, W, N = args.sink_size, args.window_size, args.tokens

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig.from_dict(SHAPE)).to(dtype).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = step_read_bytes(model)
    ids = torch.randint(0, SHAPE["vocab_size"], (N,), device=device)
    print(f"Llama {SHAPE['hidden_size']}d x {SHAPE['num_hidden_layers']} layers, {n_params / 1e6:.0f}M params, "
          f"{args.dtype} on {device}, {torch.get_num_threads()} threads; {N} tokens, cache {S}+{W}")

    streaming_nll(model, ids[:2 * args.chunk_size], SinkCache(S, W, device, dtype), args.chunk_size)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    chunked = streaming_nll(model, ids, SinkCache(S, W, device, dtype), args.chunk_size)
    sync(device)
    t_chunked = time.perf_counter() - t0
    print(f"chunked ({args.chunk_size}/forward): {t_chunked:8.2f} s for {N - 1} tokens, "
          f"{(N - 1) / t_chunked:8.1f} tok/s")

    if args.prefix and args.prefix + S + W < N:
        start, M = S + W, args.prefix          # fill the cache untimed, then time M tokens one by one
        cache = SinkCache(S, W, device, dtype)
        streaming_nll(model, ids[:start + 1], cache, args.chunk_size)  # feeds tokens 0 .. start-1
        segment = ids[start:start + M + 1]
    else:
        start, M = 0, N - 1
        cache, segment = SinkCache(S, W, device, dtype), ids
    sync(device)
    t0 = time.perf_counter()
    one_by_one = streaming_nll(model, segment, cache, chunk_size=1)
    sync(device)
    t_token = time.perf_counter() - t0
    per_token = t_token / M
    diff = (one_by_one[1:] - chunked[start + 1:start + M + 1]).abs().max().item()
    print(f"token-by-token:       {t_token:8.2f} s for {M} tokens, {1 / per_token:8.1f} tok/s, "
          f"{weight_bytes / per_token / 1e9:.1f} GB/s of weights read"
          + (f" (tokens {start}..{start + M - 1}, cache full)" if start else ""))
    print(f"max |NLL difference| on those tokens: {diff:.2e}")
    estimate = per_token * (N - 1)
    how = "measured" if M == N - 1 else f"extrapolated: {per_token * 1e3:.1f} ms/token x {N - 1} tokens"
    print(f"token-by-token on the whole stream: {estimate:.0f} s ({how})")
    print(f"speedup of chunked evaluation: {estimate / t_chunked:.1f}x")

