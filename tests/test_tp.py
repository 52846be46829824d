"""Tensor parallel (minisink/tools/tp.py) on CPU with gloo: sharded streams equal the single process.

Ranks are real processes (torch.multiprocessing, spawn), joined over TCP on localhost. Every
multiprocess test has a deadline and MINISINK_TP_TIMEOUT is short, so a broken collective fails the
test instead of hanging CI. One spawn per world size runs all its models: starting a process that
imports torch is the expensive part.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO
from minisink.tools import tp
from minisink.weights.load import build_config, load_model

DEADLINE_S = 240   # for one spawn of all ranks, on a busy 2-core machine

# Random tiny models whose 12 query heads split over 2 and 3 ranks: GQA with 6 kv heads (each rank
# holds whole groups), MQA with 1 (every rank holds a copy of it). Biases where the architecture has
# them, so the row-parallel bias (added once, by rank 0) is exercised.
CONFIGS = {
    "llama-gqa": dict(model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=12, num_key_value_heads=6, attention_bias=True, mlp_bias=True),
    "llama-mqa": dict(model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=12, num_key_value_heads=1, tie_word_embeddings=True),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=12, rotary_pct=0.5, use_parallel_residual=True),
    "gpt_neox-seq": dict(model_type="gpt_neox", vocab_size=96, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=12, rotary_pct=0.5, use_parallel_residual=False),
    "falcon-gqa": dict(model_type="falcon", vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=12,
                       num_kv_heads=6, new_decoder_architecture=True, bias=True),
    "falcon-mqa": dict(model_type="falcon", vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=12,
                       multi_query=True, new_decoder_architecture=False, ffn_hidden_size=96),
    "mpt-gqa": dict(model_type="mpt", vocab_size=96, d_model=48, n_heads=12, n_layers=2, expansion_ratio=2,
                    no_bias=False, attn_config=dict(alibi=True, attn_type="grouped_query_attention", kv_n_heads=6)),
    "mpt-mqa": dict(model_type="mpt", vocab_size=96, d_model=48, n_heads=12, n_layers=2, expansion_ratio=2,
                    attn_config=dict(alibi=True, attn_type="multiquery_attention")),
}
S, W = 2, 6                                       # C = 8 slots; the stream is 5x that
CHUNKS = [5, 11, *[1] * 9, 9, *[1] * 6]           # 40 tokens: a prefill that overflows the cache, steps, a chunk, steps


def write_model(folder, config: dict, seed: int):
    """A model folder of random weights (normal, wide enough that every head matters)."""
    folder.mkdir(parents=True)
    cls, parsed = build_config(config)
    torch.manual_seed(seed)
    model = cls(parsed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def stream_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """(T, vocab): the stream of ids fed in CHUNKS (chunked prefill and decode steps) through a sink cache."""
    from minisink.tools.golden import minisink_stream
    feed = minisink_stream(model, "sink", S, W)
    out, at = [], 0
    for n in CHUNKS:
        out.append(feed(ids[at:at + n]))
        at += n
    return torch.cat(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: dict, out: str):
    """One rank: join, load each model sharded, stream, save what it saw (every rank, to compare)."""
    torch.set_num_threads(1)
    shard = tp.join(tp.Launch(rank, world, rank), torch.device("cpu"), init_method=f"tcp://127.0.0.1:{port}")
    results = {}
    ids = torch.tensor(jobs["ids"])
    for name, folder in jobs["models"].items():
        model = load_model(folder, shard=shard)
        results[name] = dict(logits=stream_logits(model, ids),
                             param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    if jobs.get("golden"):
        from minisink.tools import golden
        for name in jobs["golden"]:
            case = golden.load_case(REPO / "tests" / "golden" / name)
            model = load_model(golden.check_model_folder(case), dtype=golden.DTYPES[case.dtype], shard=shard)
            report = golden.check(case, golden.minisink_logits(model), who=f"minisink, rank {rank} of {world}")
            results[name] = dict(passed=report.passed, report=str(report))
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    tp.leave()


def run_ranks(world: int, jobs: dict, out) -> list[dict]:
    """Spawn `world` ranks of _worker; fail (and kill them) past the deadline instead of hanging."""
    import torch.multiprocessing as mp
    os.environ[tp.TIMEOUT_ENV] = "60"
    ctx = mp.start_processes(_worker, args=(world, free_port(), jobs, str(out)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks did not finish within {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: folder} of the random models, and the single-process logits of each."""
    root = tmp_path_factory.mktemp("tp")
    folders = {name: str(write_model(root / name, c, seed=i)) for i, (name, c) in enumerate(CONFIGS.items())}
    ids = torch.randint(0, 96, (sum(CHUNKS),), generator=torch.Generator().manual_seed(0))
    reference = {name: stream_logits(load_model(f), ids) for name, f in folders.items()}
    return folders, ids.tolist(), reference


def golden_cases() -> list[str]:
    """The committed cases whose model ships with them (test_golden.py's TINY)."""
    return sorted(p.parents[1].name for p in (REPO / "tests" / "golden").glob("*/model/config.json"))


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_stream_equals_single_process(models, world, tmp_path):
    folders, ids, reference = models
    jobs = dict(models=folders, ids=ids, golden=golden_cases() if world == 2 else [])
    ranks = run_ranks(world, jobs, tmp_path)
    for name in folders:
        want = reference[name]
        got = ranks[0][name]["logits"]
        assert got.shape == want.shape == (sum(CHUNKS), 96)
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-5 * scale, f"{name}: {(got - want).abs().max()} vs {scale}"
        for r in range(1, world):  # every rank computes the same logits: the same sample follows
            assert torch.equal(ranks[r][name]["logits"], got), f"{name}: rank {r} differs from rank 0"
        # each rank holds about 1/N of the layers (the embeddings and norms are whole on every rank)
        full = sum(p.numel() * 4 for p in load_model(folders[name]).parameters())
        assert ranks[0][name]["param_bytes"] < full * (1 / world + 0.35), name
    for name in jobs["golden"]:
        for r in range(world):
            assert ranks[r][name]["passed"], ranks[r][name]["report"]
    if world == 2:
        assert len(jobs["golden"]) == 4   # all four architectures' committed cases
