"""experiments/long_stream/run.py: a run killed mid-way (SIGKILL) and resumed writes the same ppl.csv
as an uninterrupted one, byte for byte; the stream is the books in MANIFEST order; stability re-streams.

On the shipped tiny model (minisink/checkpoints/tinystories-1m) and two tiny "books" written here:
a few hundred tokens, blocks of 32, a cache that overflows many times.
"""
import csv
import importlib.util
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "experiments" / "long_stream" / "run.py"
MODEL = REPO / "minisink" / "checkpoints" / "tinystories-1m"
spec = importlib.util.spec_from_file_location("long_stream", SCRIPT)
ls = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ls)

BOOK_A = "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog. " * 8
BOOK_B = "Tom had a big red ball. He threw it high and his friend Sam ran after it, laughing all the way. " * 8


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    folder = tmp_path_factory.mktemp("books")
    (folder / "MANIFEST.csv").write_text("file_name, title, author, language\n"
                                         "b.txt, Book B, Someone, English\na.txt, Book A, Another, English\n")
    (folder / "a.txt").write_text(BOOK_A)
    (folder / "b.txt").write_text(BOOK_B)
    return folder


def argv(books, out, policy="sink", *extra):
    return ["stream", "--model", str(MODEL), "--books", str(books), "--policy", policy, "--sink-size", "2",
            "--window-size", "30", "--tokens", "320", "--block", "32", "--chunk", "12", "--dtype", "fp32",
            "--checkpoint-every", "3", "--malloc", "default", "--out", str(out), *extra]


def main(args):
    threads = torch.get_num_threads()
    try:
        return ls.main(args)
    finally:
        torch.set_num_threads(threads)


def test_stream_is_the_books_in_manifest_order(books, tmp_path):
    assert main(argv(books, tmp_path / "run")) == 0
    rows = list(csv.DictReader((tmp_path / "run" / "ppl.csv").open()))
    assert [int(r["block"]) for r in rows] == list(range(10))
    assert rows[0]["book"] == "Book B" and rows[-1]["book"] == "Book A"     # MANIFEST order, not file names
    for r in rows:
        assert math.isclose(float(r["ppl"]), math.exp(float(r["nll_sum"]) / 32), rel_tol=1e-6)
    perf = list(csv.DictReader((tmp_path / "run" / "perf.csv").open()))
    assert len(perf) == 10 and all(float(p["rss_mib"]) > 0 and float(p["tokens_per_s"]) > 0 for p in perf)


@pytest.mark.parametrize("policy", ["sink", "dense"])
def test_killed_and_resumed_equals_uninterrupted(books, tmp_path, policy):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(argv(books, whole, policy)) == 0
    # a real SIGKILL after row 5 is on disk but before its checkpoint (the last one is after row 3)
    killed = subprocess.run([sys.executable, str(SCRIPT), *argv(books, cut, policy, "--crash-after-rows", "5")],
                            capture_output=True, text=True, cwd=REPO)
    assert killed.returncode == -9, killed.stderr
    assert len((cut / "ppl.csv").read_text().splitlines()) == 1 + 5       # header + 5 rows, 2 of them unsaved
    assert main(argv(books, cut, policy)) == 0                             # resume: same command
    assert (cut / "ppl.csv").read_bytes() == (whole / "ppl.csv").read_bytes()
    assert len((cut / "perf.csv").read_text().splitlines()) == 1 + 10


def test_other_config_refused(books, tmp_path, capsys):
    assert main(argv(books, tmp_path / "run")) == 0
    assert main(argv(books, tmp_path / "run", "sink", "--chunk", "7")) == 1
    assert "another config" in capsys.readouterr().err


def test_stability_fresh_stream_agrees_when_nothing_drifts(books, tmp_path):
    # window attention (no sinks), 4 layers: what a block's first query depends on reaches back
    # 4 x 29 tokens (each layer adds a window), all inside a fresh stream started 128 tokens back,
    # so its NLL must equal the long stream's (only distances reach RoPE); an off-by-one in the fresh
    # stream's text or its scored targets would not. (64 tokens back: 0.09% apart, measured.)
    run = tmp_path / "run"
    assert main(argv(books, run, "window")) == 0
    assert main(["stability", "--run", str(run), "--blocks", "3", "--warmup", "128", "--threads", "1"]) == 0
    rows = list(csv.DictReader((run / "stability.csv").open()))
    assert [int(r["block"]) for r in rows] == ls.spread(10, 3, 5) == [5, 7, 9]
    for r in rows:
        assert abs(float(r["rel_diff"])) < 1e-5, r
        assert r["book"] in ("Book A", "Book B") and int(r["warmup"]) == 128
