"""Every bad input, through the real command lines (issue 17): one clear line, nothing written.

Each case runs `python run.py ...`, `python -m minisink eval ...`, `python -m minisink golden ...` or
`python -m minisink train ...` (and `bench ...`) as a subprocess, from the repository root as a user would, and checks
the contract of minisink/tools/cli.py:

    the exit code (1: a file, a model, the input; 2: the command line; 130: Ctrl-C)
    exactly one line on stderr, no traceback, and the bad value named in it
    no file created or modified, in the repository or beside the inputs

Every case fails before a model is loaded where it can, so each costs about one `import torch`.
The cases run four at a time (most of that cost is waiting for the disk and a busy CPU); the files
are compared once before the first and once after the last, so a write by any case fails them all.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO

DEFAULT_MODEL = REPO / "minisink" / "checkpoints" / "tinystories-1m"
TINY_CASE = REPO / "tests" / "golden" / "llama-gqa-s4-w12"
PROGRAMS = {"run": [str(REPO / "run.py")], "eval": ["-m", "minisink", "eval"], "golden": ["-m", "minisink", "golden"],
            "train": ["-m", "minisink", "train"], "bench": ["-m", "minisink", "bench"], "size": ["-m", "minisink", "size"]}
PROG = {"run": "run.py", "eval": "python -m minisink eval", "golden": "python -m minisink golden",
        "train": "python -m minisink train", "bench": "python -m minisink bench", "size": "python -m minisink size"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Bad (and a few good) inputs, made once: broken models, broken text, a file where a folder goes."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "bad.txt").write_bytes(b"Once upon a time\n\nthere was a cat\xff\xfe that sang.\n")
    (d / "empty.txt").write_bytes(b"")
    (d / "empty.jsonl").write_text("\n\n")
    (d / "bad.jsonl").write_bytes(b'{"turns": ["caf\xe9"]}\n')
    (d / "story.txt").write_text("Once upon a time there was a cat.\n\nThe cat sang all day.\n")
    (d / "a-file").write_text("not a folder\n")
    (d / "full").mkdir()
    (d / "full" / "kept.txt").write_text("already here\n")
    weights = load_file(DEFAULT_MODEL / "model.safetensors")
    for name, edit in [("nan", lambda w: torch.full_like(w, float("nan"))), ("int32", lambda w: w.to(torch.int32)),
                       ("list", None)]:
        model = d / f"model-{name}"
        model.mkdir()
        for f in ("config.json", "tokenizer.model"):
            shutil.copy(DEFAULT_MODEL / f, model / f)
        if edit is None:
            (model / "config.json").write_text("[\"not\", \"an\", \"object\"]\n")
            shutil.copy(DEFAULT_MODEL / "model.safetensors", model / "model.safetensors")
        else:
            save_file({k: edit(w) for k, w in weights.items()}, str(model / "model.safetensors"))
    return d


def snapshot(*folders) -> dict:
    """(size, mtime) of every file under the folders (the repository's .git and caches aside)."""
    files = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            dirs[:] = [x for x in dirs if x not in (".git", "__pycache__", ".pytest_cache", ".hypothesis")]
            for name in names:
                st = os.stat(os.path.join(root, name))
                files[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
    return files


def command(program: str, args: list) -> list[str]:
    return [sys.executable, *PROGRAMS[program], *map(str, args)]


ENV = {**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"},
       "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}

# (program, arguments ({i}: the inputs folder), stdin bytes, exit code, what the one line must name)
CASES = {
    # run.py: sampling and threads
    "run top-p 0": ("run", ["--stream", "--top-p", "0"], None, 2, "--top-p: must be > 0 and <= 1 (1 keeps every token), got 0"),
    "run top-p negative": ("run", ["--stream", "--top-p", "-0.5"], None, 2, "got -0.5"),
    "run top-p above 1": ("run", ["--stream", "--top-p", "2"], None, 2, "--top-p: must be > 0 and <= 1 (1 keeps every token), got 2"),
    "run temperature nan": ("run", ["--stream", "--temperature", "nan"], None, 2, "--temperature: must be a finite number, got 'nan'"),
    "run temperature inf": ("run", ["--stream", "--temperature", "inf"], None, 2, "got 'inf'"),
    "run temperature negative": ("run", ["--stream", "--temperature", "-1"], None, 2, "--temperature: must be >= 0 (0 is greedy), got -1"),
    "run temperature not a number": ("run", ["--stream", "--temperature", "hot"], None, 2, "got 'hot'"),
    "run threads 0": ("run", ["--stream", "--threads", "0"], None, 2, "--threads: must be >= 1 and <= "),
    "run threads negative": ("run", ["--stream", "--threads", "-1"], None, 2, "got -1"),
    "run top-k 0": ("run", ["--stream", "--top-k", "0"], None, 2, "--top-k must be >= 1, got 0"),
    "run sink-size negative": ("run", ["--stream", "--sink-size", "-1"], None, 2, "--sink-size must be >= 0, got -1"),
    "run window-size 0": ("run", ["--stream", "--window-size", "0"], None, 2, "--window-size must be >= 1, got 0"),
    "run max-new-tokens 0": ("run", ["--stream", "--max-new-tokens", "0"], None, 2, "--max-new-tokens must be >= 1, got 0"),
    "run unknown policy": ("run", ["--stream", "--policy", "lru"], None, 2, "'lru'"),
    "run unknown flag": ("run", ["--stream", "--sinks", "4"], None, 2, "--sinks"),
    # run.py: devices
    "run device mps": ("run", ["--stream", "--device", "mps"], None, 2, "--device: mps: this PyTorch has no MPS"),
    "run device cuda": ("run", ["--stream", "--device", "cuda"], None, 2, "--device: cuda: this PyTorch sees no CUDA GPU"),
    "run device cuda:7": ("run", ["--stream", "--device", "cuda:7"], None, 2, "cuda:7"),
    "run device nonsense": ("run", ["--stream", "--device", "gpu0"], None, 2, "'gpu0' is not a device"),
    # run.py: models
    "run revision with the default model": ("run", ["--stream", "--revision", "main"], None, 2, "--revision main"),
    "run revision with a local folder": ("run", ["--model", "{i}/model-nan", "--revision", "refs/pr/1"], None, 2,
                                         "{i}/model-nan is a local folder"),
    "run model is a file": ("run", ["--model", "{i}/a-file", "--stream"], None, 1, "{i}/a-file is a file"),
    "run model folder missing": ("run", ["--model", "{i}/no/such", "--stream"], None, 1, "{i}/no/such: no such folder"),
    "run config.json is a list": ("run", ["--model", "{i}/model-list", "--stream"], None, 1,
                                  "{i}/model-list/config.json: expected a JSON object of settings, found a JSON list"),
    "run int32 weights": ("run", ["--model", "{i}/model-int32", "--stream"], None, 1, "model.embed_tokens.weight is int32"),
    "run all-NaN weights": ("run", ["--model", "{i}/model-nan", "--stream"], None, 1,
                            "{i}/model-nan: its first logits are NaN or infinite"),
    "run fp16 on CPU": ("run", ["--stream", "--device", "cpu", "--dtype", "fp16"], None, 1, "--dtype fp16 is refused on CPU"),
    # run.py: text
    "run prompt not UTF-8": ("run", ["--stream", "--prompt", os.fsdecode(b"caf\xe9")], None, 2,
                             "--prompt: not valid UTF-8: byte 0xe9 at offset 3"),
    "run prompts file missing": ("run", ["--prompts", "{i}/no-such.jsonl"], None, 1, "{i}/no-such.jsonl: no such file"),
    "run prompts file empty": ("run", ["--prompts", "{i}/empty.jsonl"], None, 1, "--prompts {i}/empty.jsonl: no turns"),
    "run prompts file not UTF-8": ("run", ["--prompts", "{i}/bad.jsonl"], None, 1,
                                   "--prompts {i}/bad.jsonl: not valid UTF-8: byte 0xe9 at offset 15"),
    "run prompts with stream": ("run", ["--stream", "--prompts", "{i}/empty.jsonl"], None, 2, "--stream and --prompts"),
    "run piped chat line not UTF-8": ("run", ["--max-new-tokens", "2"], b"Hello\nthe cat\xff sang\n", 1,
                                      "stdin line 2: not valid UTF-8: byte 0xff at offset 7"),
    # eval
    "eval device cuda": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/story.txt", "--out", "{i}/out", "--device", "cuda"],
                         None, 2, "--device: cuda: this PyTorch sees no CUDA GPU"),
    "eval device mps": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/story.txt", "--out", "{i}/out", "--device", "mps"],
                        None, 2, "mps"),
    "eval fp16 on CPU": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/story.txt", "--out", "{i}/out", "--dtype", "fp16"],
                         None, 1, "--dtype fp16 is refused on CPU"),
    "eval text missing": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/no-such.txt", "--out", "{i}/out"], None, 1,
                          "{i}/no-such.txt: no such file"),
    "eval text not UTF-8": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/bad.txt", "--out", "{i}/out"], None, 1,
                            "{i}/bad.txt: not valid UTF-8: byte 0xff at offset 33 (line 3)"),
    "eval stdin not UTF-8": ("eval", ["--model", DEFAULT_MODEL, "--text", "-", "--out", "{i}/out"], b"ok \xc3(", 1,
                             "stdin: not valid UTF-8: byte 0xc3 at offset 3"),
    "eval out is a file": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/story.txt", "--out", "{i}/a-file"], None, 1,
                           "{i}/a-file: exists and is not a folder"),
    "eval out required": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/story.txt"], None, 2, "--out"),
    "eval unknown short name": ("eval", ["--model", "pythia-7b", "--text", "{i}/story.txt", "--out", "{i}/out"], None, 1,
                                "unknown model name 'pythia-7b'"),
    "eval config.json is a list": ("eval", ["--model", "{i}/model-list", "--text", "{i}/story.txt", "--out", "{i}/out"],
                                   None, 1, "found a JSON list"),
    "eval tokens 1": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/story.txt", "--out", "{i}/out", "--tokens", "1"],
                      None, 2, "--tokens must be at least 2"),
    "eval unknown policy": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/story.txt", "--out", "{i}/out",
                                     "--policy", "sink,lru"], None, 2, "unknown policy 'lru'"),
    # golden (its documented convention: exit 2 for unusable input, 1 is a failed check)
    "golden make window 0": ("golden", ["make", "--model", TINY_CASE / "model", "--out", "{i}/case", "--window-size", "0"],
                             None, 2, "--window-size: must be >= 1 and <= 100,000 (a golden case is meant to be small), got 0"),
    "golden make out unwritable": ("golden", ["make", "--model", TINY_CASE / "model", "--out", "{i}/a-file/case"], None, 2,
                                   "{i}/a-file/case: cannot be created, {i}/a-file is not a folder"),
    "golden make threads 0": ("golden", ["make", "--model", TINY_CASE / "model", "--out", "{i}/case", "--threads", "0"],
                              None, 2, "--threads: must be >= 1 and <= "),
    "golden make steps 0": ("golden", ["make", "--model", TINY_CASE / "model", "--out", "{i}/case", "--steps", "0"],
                            None, 2, "--steps: must be >= 1 and <= 100,000 (a golden case is meant to be small), got 0"),
    "golden make text not UTF-8": ("golden", ["make", "--model", DEFAULT_MODEL, "--out", "{i}/case", "--text", "{i}/bad.txt"],
                                   None, 2, "{i}/bad.txt: not valid UTF-8: byte 0xff at offset 33"),
    "golden make config.json is a list": ("golden", ["make", "--model", "{i}/model-list", "--out", "{i}/case"], None, 2,
                                          "found a JSON list"),
    "golden check no case": ("golden", ["check", "{i}/full"], None, 2, "no case.json in {i}/full"),
    "golden regenerate no case": ("golden", ["regenerate", "{i}/full"], None, 2, "no case.json in {i}/full"),
    # train: all of it before any training
    "train text missing": ("train", ["--text", "{i}/no-such.txt", "--out", "{i}/model"], None, 1, "{i}/no-such.txt: no such file"),
    "train text empty": ("train", ["--text", "{i}/empty.txt", "--out", "{i}/model"], None, 1, "{i}/empty.txt: 0 paragraph(s)"),
    "train text not UTF-8": ("train", ["--text", "{i}/bad.txt", "--out", "{i}/model"], None, 1,
                             "{i}/bad.txt: not valid UTF-8: byte 0xff at offset 33 (line 3)"),
    "train vocab-size 10": ("train", ["--text", "{i}/story.txt", "--out", "{i}/model", "--vocab-size", "10"], None, 2,
                            "--vocab-size must be >= 261, got 10"),
    "train n-heads 3": ("train", ["--text", "{i}/story.txt", "--out", "{i}/model", "--n-heads", "3"], None, 2,
                        "--n-heads 3 must divide --dim 128"),
    "train n-kv-heads 3": ("train", ["--text", "{i}/story.txt", "--out", "{i}/model", "--n-kv-heads", "3"], None, 2,
                           "--n-kv-heads 3 must divide --n-heads 4"),
    "train lr nan": ("train", ["--text", "{i}/story.txt", "--out", "{i}/model", "--lr", "nan"], None, 2, "--lr must be a finite number > 0, got nan"),
    "train out unwritable": ("train", ["--text", "{i}/story.txt", "--out", "{i}/a-file/model"], None, 1,
                             "{i}/a-file/model: cannot be created, {i}/a-file is not a folder"),
    "train out exists": ("train", ["--text", "{i}/story.txt", "--out", "{i}/full"], None, 2,
                         "--out {i}/full exists and is not empty: pass --overwrite"),
    "train sink-token and bos": ("train", ["--text", "{i}/story.txt", "--out", "{i}/model", "--sink-token", "--bos"], None, 2,
                                 "--sink-token and --bos"),
    "train vocab-size too large for the text": ("train", ["--text", "{i}/story.txt", "--out", "{i}/model"], None, 1,
                                                "--vocab-size 1024 does not fit this text: Vocabulary size too high"),
    # every numeric flag's bounds (issue 26): the machine's CPUs, torch's 64-bit seed, the model's
    # window and the memory free; none may end in a traceback, a signal or a hang
    "run threads above the CPUs": ("run", ["--stream", "--threads", "99999"], None, 2, "--threads: must be >= 1 and <= "),
    "run threads far above the CPUs": ("run", ["--stream", "--threads", "1000000000000"], None, 2, "got 1000000000000"),
    "run seed above 64 bits": ("run", ["--stream", "--seed", str(2**64)], None, 2, "got 18446744073709551616"),
    "run window-size beyond any tensor": ("run", ["--stream", "--window-size", "1000000000000000000000000000000"], None, 2, "of cpu memory is free"),
    "eval window-size beyond any tensor": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/story.txt", "--out", "{i}/out",
                                           "--window-size", "1000000000000000000000000000000"], None, 2, "of cpu memory is free"),
    "golden make threads above the CPUs": ("golden", ["make", "--model", TINY_CASE / "model", "--out", "{i}/case", "--threads", "99999"],
                                           None, 2, "the CPUs this process may use), got 99999"),
    "train threads above the CPUs": ("train", ["--text", "{i}/story.txt", "--out", "{i}/model", "--threads", "99999"], None, 2,
                                     "--threads must be <= "),
    "bench decode threads above the CPUs": ("bench", ["decode", "--threads", "1,99999"], None, 2, "the CPUs this process may use), got 99999"),
}


# The same contract, in this process (no `import torch` per case): each program's own parser, or
# run.py / eval up to where they read the model's config. Cases whose real behaviour is a crash
# (a signal, an overflow inside torch) stay in CASES, as subprocesses.
IN_PROCESS = {
    # (program, arguments, exit code, what the one line must name)
    "run seed negative": ("run", ["--stream", "--seed", "-1"], 2, "--seed: must be >= 0 and <= 18,446,744,073,709,551,615 (a 64-bit seed), got -1"),
    "run sink-size fills the cache": ("run", ["--stream", "--sink-size", "256"], 2, "--sink-size 256 leaves no room for a window in a cache of 256 slots"),
    "run window-size beyond memory": ("run", ["--stream", "--window-size", "1000000000000"], 2, "of cpu memory is free: pass a smaller --window-size"),
    "run top-k above 64 bits is fine but not a crash": ("run", ["--stream", "--top-k", "x"], 2, "--top-k"),
    "eval sink-size fills the cache": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/story.txt", "--out", "{i}/out",
                                        "--sink-size", "99999"], 2, "--sink-size 99999 leaves no room"),
    "eval chunk-size 0": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/story.txt", "--out", "{i}/out", "--chunk-size", "0"], 2, "--chunk-size >= 1"),
    "eval sweep-sinks beyond the cache": ("eval", ["--model", DEFAULT_MODEL, "--text", "{i}/story.txt", "--out", "{i}/out",
                                           "--window-size", "8", "--sweep-sinks", "0,99"], 2, "--sweep-sinks: 99 sinks leave no window"),
    "golden regenerate threads above the CPUs": ("golden", ["regenerate", "--threads", "99999"], 2, "the CPUs this process may use), got 99999"),
    "golden make seed above 64 bits": ("golden", ["make", "--model", TINY_CASE / "model", "--out", "{i}/case", "--seed", "1000000000000000000000000000000"], 2, "(a 64-bit seed)"),
    **{f"golden make {flag} huge": ("golden", ["make", "--model", TINY_CASE / "model", "--out", "{i}/case", f"--{flag}", "1000000000000"], 2, f"--{flag}: must be >= ") for flag in
       ("sink-size", "window-size", "prompt-len", "steps", "continuation-len", "prefill-chunk")},
    "train seed above 64 bits": ("train", ["--text", "{i}/story.txt", "--out", "{i}/model", "--seed", "1000000000000000000000000000000"], 2,
                                 "--seed must be < 2^64"),
    **{f"train {flag} beyond memory": ("train", ["--text", "{i}/story.txt", "--out", "{i}/model", f"--{flag}", "1000000000000"], 2,
                                        "GB of memory is free") for flag in ("dim", "n-layers", "hidden-dim", "context", "batch-size")},
    "train vocab-size beyond memory": ("train", ["--text", "{i}/story.txt", "--out", "{i}/model", "--vocab-size", "1000000000000"], 2,
                                       "GB of memory is free"),
    "bench decode position-threads 0": ("bench", ["decode", "--position-threads", "0"], 2, "--position-threads: must be >= 1"),
    "bench decode caches huge": ("bench", ["decode", "--caches", "1000000000000000000000000000000"], 2, "(cache slots a benchmark allocates)"),
    "bench decode caches not numbers": ("bench", ["decode", "--caches", "a,b"], 2, "--caches: expected an integer"),
    "bench decode steps 0": ("bench", ["decode", "--steps", "0"], 2, "--steps: must be >= 1"),
    "bench decode rounds huge": ("bench", ["decode", "--rounds", "1000000000000000000000000000000"], 2, "(timed steps)"),
    "bench decode recompute-steps negative": ("bench", ["decode", "--recompute-steps", "-1"], 2, "--recompute-steps: must be >= 0"),
    "bench decode positions 0": ("bench", ["decode", "--positions", "0"], 2, "--positions: must be >= 1"),
    "bench eval threads above the CPUs": ("bench", ["eval", "--threads", "99999"], 2, "the CPUs this process may use), got 99999"),
    "bench eval tokens huge": ("bench", ["eval", "--tokens", "1000000000000000000000000000000"], 2, "--tokens: must be >= 2"),
    "bench eval prefix negative": ("bench", ["eval", "--prefix", "-1"], 2, "--prefix: must be >= 0"),
    "bench eval sink-size huge": ("bench", ["eval", "--sink-size", "1000000000000000000000000000000"], 2, "--sink-size: must be >= 0"),
    "bench eval window-size 0": ("bench", ["eval", "--window-size", "0"], 2, "--window-size: must be >= 1"),
    "bench eval chunk-size 0": ("bench", ["eval", "--chunk-size", "0"], 2, "--chunk-size: must be >= 1"),
    "bench eval device cuda": ("bench", ["eval", "--device", "cuda"], 2, "this PyTorch sees no CUDA GPU"),
    "bench gpu threads above the CPUs": ("bench", ["gpu", "--threads", "99999"], 2, "the CPUs this process may use), got 99999"),
    **{f"bench gpu {flag} out of range": ("bench", ["gpu", f"--{flag}", value], 2, f"--{flag}: must be >= ")
       for flag, value in [("tokens", "0"), ("eager-tokens", "0"), ("recompute-tokens", "-1"), ("block", "0"),
                           ("sync-steps", "-1"), ("sink-size", "1000000000000000000000000000000"), ("window-size", "0"), ("profile", "-1")]},
    "bench startup runs 0": ("bench", ["startup", "--runs", "0"], 2, "--runs: must be >= 1"),
    "bench startup tokens huge": ("bench", ["startup", "--tokens", "1000000000000000000000000000000"], 2, "--tokens: must be >= 1"),
    "bench tokenizer repeat 0": ("bench", ["tokenizer", "--repeat", "0"], 2, "--repeat: must be >= 1"),
    # the benchmarks and the sizing note of issues 23 and 24
    **{f"bench {name} {flag} {value}": ("bench", [name, f"--{flag}", value], 2, phrase) for name, flag, value, phrase in [
        ("cpu", "threads", "0", "the CPUs this process may use), got 0"),
        ("cpu", "threads", "1,99999", "the CPUs this process may use), got 99999"),
        ("cpu", "rounds", "0", "--rounds: must be >= 1"),
        ("cpu", "tokens", "100000000000", "(timed steps)"),
        ("quantize", "threads", "99999", "the CPUs this process may use), got 99999"),
        ("quantize", "rounds", "0", "--rounds: must be >= 1"),
        ("quantize", "steps", "-1", "--steps: must be >= 1"),
        ("tp_memory", "random", "-1", "--random: must be > 0"),
        ("tp_memory", "random", "1e9", "(GB of fp32 weights written to a temporary folder)"),
        ("tp_memory", "random", "nan", "must be a finite number"),
        ("tp_memory", "ranks", "0", "--ranks: must be >= 1"),
        ("tp_memory", "ranks", "1,100", "(processes on this machine)")]},
    "size gpu-gb 0": ("size", [DEFAULT_MODEL, "--gpu-gb", "0"], 2, "--gpu-gb: must be > 0"),
    "size gpu-gb inf": ("size", [DEFAULT_MODEL, "--gpu-gb", "inf"], 2, "--gpu-gb: must be a finite number"),
    "size gpu-gb huge": ("size", [DEFAULT_MODEL, "--gpu-gb", "1e30"], 2, "(GB of one GPU)"),
    "size slots 0": ("size", [DEFAULT_MODEL, "--slots", "0"], 2, "--slots: must be >= 1"),
    "size slots huge": ("size", [DEFAULT_MODEL, "--slots", "1000000000000000000000"], 2, "(cache slots)"),
    "size gpu-gb negative": ("size", [DEFAULT_MODEL, "--gpu-gb", "-80"], 2, "--gpu-gb: must be > 0"),
    "size gpu-gb not a number": ("size", [DEFAULT_MODEL, "--gpu-gb", "eighty"], 2, "--gpu-gb: expected a number"),
    "size slots negative": ("size", [DEFAULT_MODEL, "--slots", "-4096"], 2, "--slots: must be >= 1"),
    "run compare one policy": ("run", ["--compare", "sink"], 2, "--compare: expected two different policies"),
    "run compare the same twice": ("run", ["--compare", "sink,sink"], 2, "got 'sink,sink'"),
    "run compare recompute": ("run", ["--compare", "window,recompute"], 2, "e.g. window,sink"),
    "run text without compare": ("run", ["--text", "README.md"], 2, "--text goes with --compare"),
    "run text-tokens 1": ("run", ["--compare", "window,sink", "--text", "README.md", "--text-tokens", "1"], 2,
                          "--text-tokens: must be >= 2"),
    "run compare sink with no sinks": ("run", ["--compare", "window,sink", "--model", DEFAULT_MODEL, "--sink-size", "0"], 2,
                                       "--compare ...sink needs --sink-size >= 1"),
}


def in_process(program: str, args: list[str]) -> tuple[int, str]:
    """(exit code, stderr) of a program's main(args), run here."""
    import contextlib
    import io
    sys.path.insert(0, str(REPO))
    import run as run_py
    from minisink.tools import bench, eval as ev, golden, sizing, train
    main = {"run": run_py.main, "eval": ev.main, "golden": golden.main, "train": train.main, "bench": bench.main,
            "size": sizing.main}[program]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.mark.parametrize("name", list(IN_PROCESS))
def test_bad_number_is_one_line(name, inputs, monkeypatch):
    program, args, code, phrase = IN_PROCESS[name]
    if "cuda" in name and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [str(a).replace("{i}", str(inputs)) for a in args]
    before = snapshot(REPO, inputs)
    returncode, err = in_process(program, args)
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith(PROG[program]) and "error: " in lines[0], err
    assert phrase.replace("{i}", str(inputs)) in lines[0], (phrase, lines[0])
    assert returncode == code, err
    assert snapshot(REPO, inputs) == before


@pytest.fixture(scope="module")
def results(request, inputs) -> dict:
    """name -> (exit code, stderr) of every selected case, and the files changed while they ran."""
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input_is_one_line"]

    def run(name):
        program, args, stdin, _, _ = CASES[name]
        args = [str(a).replace("{i}", str(inputs)) for a in args]
        result = subprocess.run(command(program, args), cwd=REPO, env=ENV, input=stdin or b"",
                                capture_output=True, timeout=600)
        return name, (result.returncode, result.stderr.decode("utf-8", "replace"))

    before = snapshot(REPO, inputs)
    with ThreadPoolExecutor(max_workers=4) as pool:
        out = dict(pool.map(run, selected))
    after = snapshot(REPO, inputs)
    out["changed files"] = sorted(set(before.items()) ^ set(after.items()))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line(name, inputs, results):
    program, _, _, code, phrase = CASES[name]
    if "cuda" in name and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    if "mps" in name and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS GPU")
    phrase = phrase.replace("{i}", str(inputs))
    returncode, err = results[name]
    assert "Traceback" not in err, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith(f"{PROG[program]}"), err
    assert "error: " in lines[0] and phrase in lines[0], (phrase, lines[0])
    assert returncode == code, err
    assert not results["changed files"], "created or modified while the cases ran"


def test_the_table_covers_every_cli():
    counts = {p: sum(case[0] == p for case in [*CASES.values(), *IN_PROCESS.values()]) for p in PROGRAMS}
    assert sum(counts.values()) >= 40 and min(counts.values()) >= 8, counts


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc to see torch being imported")
@pytest.mark.parametrize("program, args", [
    ("run", ["--stream"]),
    ("eval", ["--model", DEFAULT_MODEL, "--text", "README.md", "--out", "unused"]),
    ("golden", ["check", "tests/golden"]),
    ("train", ["--text", "README.md", "--out", "unused"]),
])
def test_ctrl_c_while_torch_imports_exits_130(program, args):
    """SIGINT once torch's library is mapped into the process, i.e. in the middle of `import torch`."""
    proc = subprocess.Popen(command(program, args), cwd=REPO, env=ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "torch was never imported"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.decode() == f"{PROG[program]}: interrupted\n", err


def test_the_default_model_starts_without_torch_compile_and_without_warnings():
    """Nothing slow by accident: a stream on the default model never imports torch._dynamo (2 s of
    `import` on a busy CPU, 40% of the first README command's start), picks one thread for it, and
    prints nothing on stderr but the summary (no NumPy warning from torch)."""
    probe = ("import sys, runpy; sys.argv = ['run.py', '--stream', '--max-new-tokens', '5', '--seed', '0']\n"
             "try:\n    runpy.run_path('run.py', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
             "import torch\nprint(code, 'torch._dynamo' in sys.modules, torch.get_num_threads())")
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.splitlines()[-1] == "0 False 1", result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.py: 5 tokens generated"), result.stderr


@pytest.mark.parametrize("cmd", [
    ["run.py", "--list-models"],
    ["run.py", "--stream", "--max-new-tokens", "5", "--seed", "0"],
    ["-m", "minisink", "golden", "check", "tests/golden"],
    ["-m", "minisink", "golden", "regenerate"],           # a report: writes only with --write
    ["tests/golden/make_fixtures.py"],                 # makes in a temporary folder, compares
])
def test_documented_commands_that_do_not_write_leave_the_checkout_as_it_was(cmd):
    before = snapshot(REPO)
    result = subprocess.run([sys.executable, *cmd], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert snapshot(REPO) == before, sorted(set(snapshot(REPO).items()) ^ set(before.items()))
