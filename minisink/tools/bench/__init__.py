"""python -m minisink bench [decode|cpu|gpu|tokenizer|eval|quantize|startup|tp_memory|all] [options of that benchmark]

Each benchmark is a module of this package with a `main(argv)`; `python -m minisink bench NAME -h`
lists its options. `all` runs every benchmark with its defaults, one after another. Modules are
imported only when their benchmark runs, so one that is missing (or needs a missing package) is
reported and does not stop the others.
"""
import importlib
import sys

BENCHMARKS = {
    "decode": "sink vs recompute per token, and latency flat in the stream position (CPU, Pythia-160M shape)",
    "cpu": "SmolLM2-135M decode per dtype next to llama.cpp on the same GGUF, 1 and 2 threads, ratios",
    "gpu": "real 7B shapes past a full cache: eager, compiled, recompute; tok/s and GB/s (scaled down on CPU)",
    "tokenizer": "minisink's BPE encoder next to HF tokenizers",
    "eval": "chunked streaming evaluation vs token by token",
    "quantize": "one SmolLM2 step's mat-vecs: fp32, bf16, int8, int4 kernels side by side (minisink/quantize.py)",
    "startup": "the first README command in a fresh copy: time to first token and tok/s (median of 5)",
    "tp_memory": "tensor parallel: each rank's weight bytes and resident memory for N = 1, 2, 3 (CPU)",
}


def usage() -> str:
    lines = [__doc__.split("\n")[0], ""]
    lines += [f"  {name:<10} {what}" for name, what in BENCHMARKS.items()]
    lines += [f"  {'all':<10} all of the above, with their defaults"]
    return "\n".join(lines)


def run(name: str, argv: list[str]) -> int:
    try:
        module = importlib.import_module(f"minisink.tools.bench.{name}")
    except ModuleNotFoundError as e:
        missing = e.name or str(e)
        where = f"minisink/tools/bench/{name}.py" if missing == f"minisink.tools.bench.{name}" else f"module {missing!r}"
        print(f"benchmark {name!r} cannot run: {where} is missing", file=sys.stderr)
        return 1
    module.main(argv)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        if rest:
            print("`all` runs each benchmark with its defaults and takes no options", file=sys.stderr)
            return 2
        status = 0
        for bench in BENCHMARKS:
            print(f"\n===== {bench} =====", flush=True)
            status |= run(bench, [])
        return status
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run(name, rest)

