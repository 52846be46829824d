"""The first README command, timed as a newcomer meets it: `python run.py --stream` in a fresh clone.

    python -m minisink bench startup [--runs 5] [--tokens 200]

Each run copies run.py and minisink/ into a new temporary folder (a clone without ../shared beside
it), starts `python run.py --stream --max-new-tokens N --seed I` there with the environment as it is
minus any thread settings (OMP_NUM_THREADS, MKL_NUM_THREADS: a newcomer has none), and measures

    first token   seconds from starting the process to the first byte of text on stdout: Python's
                  start, `import torch`, loading the model, the first forward
    tok/s         what run.py's summary reports: the decode steps after the first token
    stderr        anything on stderr besides the summary line (a warning, say) is printed

The median of the runs is what to quote, with the load average beside it: on a shared machine both
numbers move with what else runs. The goal of issue 17: first token within 5 s, at least 20 tok/s.
"""
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import cli

REPO = Path(__file__).resolve().parents[3]


def fresh_clone(dest: Path) -> Path:
    shutil.copytree(REPO / "minisink", dest / "minisink", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "run.py", dest / "run.py")
    return dest


def one_run(folder: Path, tokens: int, seed: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "run.py", "--stream", "--max-new-tokens", str(tokens), "--seed", str(seed)],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    first = time.perf_counter() - start
    text = proc.stdout.read()
    err = proc.stderr.read().decode()
    proc.wait()
    lines = err.strip().splitlines()
    summary = lines[-1] if lines else ""
    rate = re.search(r"then ([\d,.]+) tok/s", summary)
    return {"first_s": first, "tok_s": float(rate.group(1).replace(",", "")) if rate else float("nan"),
            "load": load, "extra_stderr": lines[:-1], "code": proc.returncode, "chars": len(text) + 1}


def main(argv=None):
    p = cli.Parser(prog="python -m minisink bench startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=cli.int_between(1, 1000, " (runs of a few seconds each)"), default=5)
    p.add_argument("--tokens", type=cli.bench_steps(1), default=200, help="tokens per run (default 200)")
    args = p.parse_args(argv)
    print(f"`python run.py --stream --max-new-tokens {args.tokens}` in a fresh copy, {args.runs} runs; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{'run':>4} {'first token':>12} {'tok/s':>8} {'load avg (1 min)':>17}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="minisink-startup-") as tmp:
        folder = fresh_clone(Path(tmp))
        for i in range(args.runs):
            r = one_run(folder, args.tokens, seed=i)
            runs.append(r)
            print(f"{i + 1:>4} {r['first_s']:>10.2f} s {r['tok_s']:>8.1f} {r['load']:>17.2f}"
                  + ("" if r["code"] == 0 else f"  exit code {r['code']}"))
            for line in r["extra_stderr"]:
                print(f"     stderr: {line}")
    first = statistics.median(r["first_s"] for r in runs)
    rate = statistics.median(r["tok_s"] for r in runs)
    load = statistics.median(r["load"] for r in runs)
    warned = sum(bool(r["extra_stderr"]) for r in runs)
    print(f"median: first token {first:.2f} s, {rate:.1f} tok/s, load average {load:.2f}; "
          f"{warned} of {len(runs)} runs printed something on stderr besides the summary")
    print(f"goal (issue 17): first token <= 5 s: {'met' if first <= 5 else 'NOT met'}; "
          f">= 20 tok/s: {'met' if rate >= 20 else 'NOT met'}")
