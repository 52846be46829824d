"""Benchmark: encode speed of minisink's hand-written byte-level BPE next to HF `tokenizers`.

    python -m minisink bench tokenizer [--text ../shared/assets/text/moby_dick.txt] [--repeat 3]

Both encode the same book as one string, in the same run, and must give the same ids. minisink is
timed twice: "cold" starts from an empty memo, so it pays for BPE on every distinct word once;
"warm" encodes the book again, when only the splitting and the memo lookups remain (the steady
state when the same kind of text keeps coming). `tokenizers` (Rust) is timed with its own word
cache warm, best of --repeat; it encodes a single string on one thread, like minisink.
Load times are reported apart. `tokenizers` is imported only here, never by minisink itself.
"""

import time
from pathlib import Path

from .. import cli
from ...text.tokenizer import BPETokenizer

ASSETS = Path(__file__).resolve().parents[3].parent / "shared" / "assets"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv=None):
    p = cli.Parser(prog="python -m minisink bench tokenizer",
                                description=__doc__.split("\n")[0])
    p.add_argument("--text", type=Path, default=ASSETS / "text" / "moby_dick.txt")
    p.add_argument("--repeat", type=cli.int_between(1, 1000, " (runs of a whole book each)"), default=3, help="runs of `tokenizers`; the best counts")
    args = p.parse_args(argv)
    if not ASSETS.is_dir() or not args.text.is_file():
        print(f"skipped: {args.text} not found (the offline assets live beside the repo)")
        return
    try:
        import tokenizers
    except ImportError:
        print("skipped: HF `tokenizers` is not installed (pip install -r requirements-test.txt)")
        return

    text = args.text.read_text(encoding="utf-8")
    print(f"{args.text.name}: {len(text):,} characters, encoded as one string")
    print(f"{'tokenizer':<14}{'tokens':>9}{'load s':>9}{'minisink cold':>16}{'minisink warm':>16}"
          f"{'tokenizers':>14}{'cold/tok':>10}{'warm/tok':>10}")
    for name in ("gpt-neox-20b", "falcon"):
        path = ASSETS / "tokenizers" / name / "tokenizer.json"
        ours, load_s = timed(lambda: BPETokenizer(path))
        ids, cold_s = timed(lambda: ours.encode(text))
        _, warm_s = timed(lambda: ours.encode(text))
        theirs = tokenizers.Tokenizer.from_file(str(path))
        encode = lambda: theirs.encode(text, add_special_tokens=False).ids  # noqa: E731
        runs = [timed(encode) for _ in range(args.repeat)]
        want, lib_s = runs[0][0], min(s for _, s in runs)
        if ids != want:
            raise SystemExit(f"{path}: minisink and tokenizers disagree on {args.text}; run the tests")
        n = len(ids)
        print(f"{name:<14}{n:>9,}{load_s:>9.2f}{n / cold_s:>12,.0f} t/s{n / warm_s:>12,.0f} t/s"
              f"{n / lib_s:>10,.0f} t/s{lib_s / cold_s:>9.2f}x{lib_s / warm_s:>9.2f}x")
    print("cold/tok, warm/tok: minisink's speed over tokenizers' (above 1: minisink is faster)")

