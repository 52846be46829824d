"""python -m minisink COMMAND [options]: the library's commands (run.py is the demo).

    eval     streaming perplexity of a text, policy by policy          (minisink/tools/eval.py)
    golden   make and check golden cases for other implementations      (minisink/tools/golden.py)
    train    train a tiny model, with or without a learnable sink token (minisink/tools/train.py)
    gguf     convert a llama.cpp GGUF into a model folder               (minisink/weights/gguf.py)
    bench    benchmarks: decode, gpu, tokenizer, eval, startup          (minisink/tools/bench/)
    size     how many GPUs a model needs under tensor parallel           (minisink/tools/sizing.py)

`python -m minisink COMMAND -h` lists a command's options.
"""
import importlib
import sys

COMMANDS = {"eval": "minisink.tools.eval", "golden": "minisink.tools.golden", "train": "minisink.tools.train",
            "gguf": "minisink.weights.gguf", "bench": "minisink.tools.bench",
            "size": "minisink.tools.sizing"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"python -m minisink: error: unknown command {name!r} (one of {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    # before torch is imported: Ctrl-C during the import exits 130 without a traceback
    from minisink.tools.cli import exit_on_interrupt
    exit_on_interrupt(f"python -m minisink {name}")
    return importlib.import_module(COMMANDS[name]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
