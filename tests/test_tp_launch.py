"""run.py under torchrun (minisink/tools/tp.py `start`): the same greedy text as one process, and
the refusals (an N that does not split the heads, a rank that never joins) as one line, without a hang.

Every process here has a deadline (subprocess timeouts) and MINISINK_TP_TIMEOUT is a few seconds,
so a broken launch fails a test instead of hanging CI. torchrun adds its own report of a failed
rank (a traceback of torch.distributed.elastic) after ours: the tests read run.py's lines only.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO
from test_tp import free_port

TINY = REPO / "minisink" / "checkpoints" / "tinystories-1m"   # 4 heads


def env(**extra) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("HF_TOKEN", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**clean, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", "MINISINK_TP_TIMEOUT": "60", **extra}


def torchrun(n: int, *args, timeout=120, **extra) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node n run.py args` on localhost (a free port: tests may run side by side)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(REPO / "run.py"), *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env(**extra), capture_output=True, encoding="utf-8", timeout=timeout)


def ours(stderr: str) -> list[str]:
    """run.py's own lines on stderr (torchrun's warnings and its report of failed ranks left out)."""
    return [line for line in stderr.splitlines() if line.startswith("run.py:")]


def test_smollm2_over_3_ranks_gives_the_same_greedy_text(smollm2):
    """9 query heads, 3 kv heads: a kv head per rank. A cache of 4+8 slots, so the stream evicts. In
    fp32, the exactness dtype (auto is bf16 on CPU for SmolLM2): in bf16 each rank rounds its partial
    sums before the all-reduce, and the greedy text parted from one process's after 8 tokens."""
    args = ["--model", smollm2, "--dtype", "fp32", "--stream", "--prompt", "The capital of France", "--temperature", 0,
            "--max-new-tokens", 16, "--sink-size", 4, "--window-size", 8]
    single = subprocess.Popen([sys.executable, str(REPO / "run.py"), *map(str, args)], cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
    sharded = torchrun(3, *args)
    out, err = single.communicate(timeout=120)
    assert single.returncode == 0, err
    assert sharded.returncode == 0, sharded.stderr
    assert len(out.split()) > 8, out          # real text, not an empty stream
    assert sharded.stdout == out              # rank 0 alone prints, and prints what one process does
    summary = ours(sharded.stderr)[-1]
    assert "16 tokens generated" in summary and "12/12 slots" in summary, summary


def test_an_n_that_does_not_split_the_heads_is_one_line_before_any_weight(tmp_path):
    """The model folder has no weights at all: a load would say so. The refusal names the N that work."""
    folder = tmp_path / "no-weights"
    folder.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(TINY / name, folder / name)
    t0 = time.monotonic()
    done = torchrun(3, "--model", folder, "--stream", "--max-new-tokens", 2, timeout=60)
    assert done.returncode != 0
    lines = ours(done.stderr)
    assert len(lines) == 1, done.stderr       # rank 0's line; ranks 1 and 2 stay quiet
    assert lines[0].startswith("run.py: error: tensor parallel over 3 ranks: no-weights has 4 query heads"), lines
    assert "use --nproc-per-node 1, 2 or 4" in lines[0], lines
    assert f'{REPO / "run.py"}", line' not in done.stderr and "minisink/tools" not in done.stderr  # none of ours
    assert time.monotonic() - t0 < 60


def test_a_rank_that_never_joins_is_one_line_not_a_hang():
    """A launch of 2 where only one rank starts: rank 0 (which waits for its peer) and rank 1 (which
    finds no rank 0 to connect to) each give up after MINISINK_TP_TIMEOUT, with one line."""
    timeout_s = 2
    procs = []
    for rank in (0, 1):   # two separate launches on two ports: each rank is alone in its group
        launch = env(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port()), MINISINK_TP_TIMEOUT=str(timeout_s))
        procs.append(subprocess.Popen([sys.executable, str(REPO / "run.py"), "--stream", "--max-new-tokens", "2"],
                                      cwd=REPO, env=launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      encoding="utf-8"))
    t0 = time.monotonic()
    for rank, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"rank {rank} hung past 90 s with MINISINK_TP_TIMEOUT={timeout_s}")
        assert p.returncode == 1, err
        assert out == ""
        lines = err.strip("\n").split("\n")
        assert len(lines) == 1, err           # c10d's C++ retries and frames stay off a rank > 0's stderr too
        assert lines[0].startswith(f"run.py: error: rank {rank} of 2: the other ranks did not all join within "
                                   f"{timeout_s} s (MINISINK_TP_TIMEOUT)"), lines
    assert time.monotonic() - t0 < 60


def test_eval_over_2_ranks_writes_what_one_process_writes(tmp_path):
    """`torchrun -m minisink eval`: the same streaming perplexities as one process (fp32, a stream 3x
    the 4+60 cache, so it evicts; 4 heads, 2 per rank), within 1e-5."""
    book = tmp_path / "book.txt"
    book.write_text(" ".join(f"Once upon a time there was a cat called {name}, and it was happy." for name in
                             ("Tom", "Lily", "Ben", "Sue", "Max", "Mia") * 20))
    args = ["--model", TINY, "--text", book, "--tokens", 200, "--policy", "window,sink", "--sink-size", 4,
            "--window-size", 60, "--chunk-size", 16, "--dtype", "fp32"]
    single = subprocess.run([sys.executable, "-m", "minisink", "eval", *map(str, args), "--out", str(tmp_path / "one")],
                            cwd=REPO, env=env(), capture_output=True, encoding="utf-8", timeout=120)
    assert single.returncode == 0, single.stderr
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "minisink", "eval", *map(str, args), "--out", str(tmp_path / "two")]
    sharded = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, encoding="utf-8", timeout=120)
    assert sharded.returncode == 0, sharded.stderr
    one = sorted(p.name for p in (tmp_path / "one").iterdir() if p.suffix == ".csv")
    two = sorted(p.name for p in (tmp_path / "two").iterdir() if p.suffix == ".csv")
    assert one and one == two
    import csv
    for name in one:
        rows1 = list(csv.DictReader(open(tmp_path / "one" / name)))
        rows2 = list(csv.DictReader(open(tmp_path / "two" / name)))
        assert len(rows1) == len(rows2) > 0
        for a, b in zip(rows1, rows2):
            assert a.keys() == b.keys()
            for key in a:
                try:
                    x, y = float(a[key]), float(b[key])
                except ValueError:
                    assert a[key] == b[key], (name, key)
                    continue
                if "time" in key or "tok_s" in key or key.endswith("_s"):
                    continue   # timings differ, the numbers do not
                assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (name, key, x, y)
