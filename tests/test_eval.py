"""Streaming perplexity (minisink/tools/eval.py): chunked == token-by-token, the policies, the CLI.

The definition of streaming NLL is written out here as a plain loop, one token per forward pass,
and every chunked evaluation is compared with it, for every architecture and for cache shapes
that stress the chunked path (no sinks, a window of one, chunks larger than the cache, chunks that
do not divide the stream).
"""
import csv
import importlib.util
import io
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ASSETS, REPO, STORIES, need_assets
from minisink.tools import eval as ev
from minisink.cache import DenseCache, SinkCache

VOCAB = 97
# Tiny random models, built from config dicts with the checkpoint's names, one per architecture.
TINY = {
    "llama": {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 32, "rms_norm_eps": 1e-5},
    "gpt_neox": {"model_type": "gpt_neox", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "rotary_pct": 0.5,
                 "max_position_embeddings": 32},
    "falcon": {"model_type": "falcon", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 4, "multi_query": True, "parallel_attn": True,
               "max_position_embeddings": 32},
    "mpt": {"model_type": "mpt", "vocab_size": VOCAB, "d_model": 32, "n_heads": 4, "n_layers": 2,
            "max_seq_len": 32},  # ALiBi
}
ARCHS = [a for a in TINY if importlib.util.find_spec(f"minisink.models.{a}") is not None] + ["stories260K"]
# (S, W, chunk): stream of N=73 tokens (72 fed), several times the cache; 8 and 24 divide 72, 5 and 64 do not
CASES = [(4, 12, 5), (0, 16, 8), (2, 1, 24), (1, 7, 64)]
N = 73


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: thread hand-offs cost more than they save (seconds on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(arch: str, seed: int = 0):
    from minisink.weights.load import build_config
    cls, config = build_config(TINY[arch])
    torch.manual_seed(seed)
    model = cls(config).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # far from init, so that attention is far from uniform
        noise = torch.randn(p.shape, generator=g)
        is_norm = "norm" in name or "ln" in name
        p.copy_(1 + 0.2 * noise if is_norm and name.endswith("weight") else 0.4 * noise / p.shape[-1] ** 0.25)
    return model


def story_ids(n: int) -> torch.Tensor:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(STORIES / "tokenizer.model"))
    text = (ASSETS / "text" / "tinystories_val_sample.txt").read_text()[:20 * n]
    return torch.tensor([sp.bos_id()] + sp.encode(text)[:n - 1])


@pytest.fixture(scope="module", params=ARCHS)
def model_and_ids(request):
    if request.param == "stories260K":
        need_assets(STORIES)
        from minisink.weights.load import load_model
        return load_model(STORIES), story_ids(N)
    return tiny_model(request.param), torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(1))


def token_by_token(model, ids, cache) -> torch.Tensor:
    """The definition: one token per forward pass through the cache; nll[t] scores ids[t]."""
    nll = [float("nan")]
    with torch.no_grad():
        for i in range(len(ids) - 1):
            logits = model(ids[None, i:i + 1], cache)[0, -1]
            nll.append(-torch.log_softmax(logits.float(), -1)[ids[i + 1]].item())
    return torch.tensor(nll)


def full_forward_nll(model, ids) -> torch.Tensor:
    """NLL of ids[1:] from one causal forward over ids (no cache across calls)."""
    with torch.no_grad():
        logits = model(ids[None, :-1])[0]
    return -torch.log_softmax(logits.float(), -1).gather(-1, ids[1:, None])[:, 0]


@pytest.mark.parametrize("S,W,chunk", CASES)
def test_chunked_equals_token_by_token(model_and_ids, S, W, chunk):
    model, ids = model_and_ids
    want = token_by_token(model, ids, SinkCache(S, W))
    got = ev.streaming_nll(model, ids, SinkCache(S, W), chunk)
    assert math.isnan(got[0]) and not got[1:].isnan().any()
    assert (got[1:] - want[1:]).abs().max() < 1e-4


def test_dense_chunked_equals_token_by_token(model_and_ids):
    model, ids = model_and_ids
    want = token_by_token(model, ids, DenseCache(4))  # grows as it goes
    got = ev.streaming_nll(model, ids, DenseCache(4), 10)
    assert (got[1:] - want[1:]).abs().max() < 1e-4


def test_policies_agree_until_the_first_eviction_and_differ_after(model_and_ids):
    model, ids = model_and_ids
    S, W = 2, 14
    C = S + W
    nll = {p: ev.policy_nll(model, ids, p, S, W, chunk_size=9) for p in ev.POLICIES}
    for p in ("window", "sink", "recompute"):
        # tokens 1..C are predicted from the whole prefix by every policy
        assert (nll[p][1:C + 1] - nll["dense"][1:C + 1]).abs().max() < 1e-4, p
        # token C+1 onwards: something was evicted (or re-encoded), so the numbers must move
        assert (nll[p][C + 1:] - nll["dense"][C + 1:]).abs().max() > 1e-3, p
    assert (nll["sink"][C + 1:] - nll["window"][C + 1:]).abs().max() > 1e-3
    assert (nll["sink"][C + 1:] - nll["recompute"][C + 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("S,W", [(4, N - 4), (1, 200)])
def test_sink_cache_that_holds_the_stream_is_dense(model_and_ids, S, W):
    model, ids = model_and_ids
    want = full_forward_nll(model, ids)
    for policy in ("sink", "window", "recompute", "dense"):
        got = ev.policy_nll(model, ids, policy, S, W, chunk_size=16)
        assert (got[1:] - want).abs().max() < 1e-4, policy


def test_recompute_is_a_fresh_forward_on_each_window(model_and_ids):
    model, ids = model_and_ids
    C = 10
    got = ev.recompute_nll(model, ids, C)
    assert (ev.recompute_nll(model, ids, C, batch_size=7) - got)[1:].abs().max() < 1e-5
    for t in [0, 1, C - 2, C - 1, C, C + 1, 40, N - 2]:  # window ends at t, predicts t+1
        window = ids[max(0, t - C + 1):t + 1]
        with torch.no_grad():
            logits = model(window[None])[0, -1]   # positions 0 .. len-1
        want = -torch.log_softmax(logits.float(), -1)[ids[t + 1]]
        assert abs(got[t + 1] - want) < 1e-4, t


def test_stories260k_dense_degrades_past_its_context_and_sink_does_not():
    """The real model: dense past its 512-token context gets worse; a 4+124 sink cache stays put."""
    need_assets(STORIES)
    from minisink.weights.load import load_model
    model, ids = load_model(STORIES), story_ids(1200)
    dense = ev.policy_nll(model, ids, "dense", 4, 124)
    sink = ev.policy_nll(model, ids, "sink", 4, 124)
    past = slice(700, None)  # well past the trained context
    assert ev.perplexity(dense[past], 0) > 1.2 * ev.perplexity(sink[past], 0)  # measured: 5.46 vs 4.05


# ---------------------------------------------------------------------------------------------------
# The command line


def cli(*args):
    # one thread: on a busy 2-core machine, two threads waiting on each other cost 5x here
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "minisink", "eval", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_csv_png_and_tables(tmp_path):
    need_assets(STORIES)
    text = ASSETS / "text" / "tinystories_val_sample.txt"
    r = cli("--model", STORIES, "--text", text, "--tokens", 300, "--sink-size", 4, "--window-size", 60,
            "--chunk-size", 100, "--out", tmp_path, "--sweep-sinks", "0,1,4")
    assert r.returncode == 0, r.stderr
    with (tmp_path / "streaming_ppl_tokens.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 300 and rows[0]["id"] == "1" and rows[0]["nll_sink"] == ""
    assert set(rows[0]) == {"token", "id", "nll_dense", "nll_window", "nll_sink", "nll_recompute"}
    with (tmp_path / "streaming_ppl_summary.csv").open() as f:
        summary = {row["policy"]: row for row in csv.DictReader(f)}
    assert list(summary) == list(ev.POLICIES)
    sweep = (tmp_path / "streaming_ppl_sweep.csv").read_text()
    assert "sink 0+64" in sweep and "sink 4+60" in sweep
    # the sweep's 4+60 is the sink policy and its 0+64 the window policy: same runs, same numbers
    assert f"{float(summary['sink']['ppl']):.3f}" in r.stdout.splitlines()[-2]
    assert (tmp_path / "streaming_ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "recompute" in r.stdout and "4+60" in r.stdout


def test_cli_missing_file_is_one_line_and_exit_1(tmp_path):
    r = cli("--model", STORIES, "--text", "no/such/file.txt", "--out", tmp_path)
    assert r.returncode == 1
    assert r.stderr == "python -m minisink eval: error: no/such/file.txt: no such file\n"


@pytest.mark.parametrize("args, message, code", [
    (["--policy", "sink,bogus"], "unknown policy 'bogus'; choose from dense, window, sink, recompute", 2),
    (["--sweep-sinks", "0,64"], "--sweep-sinks: 64 sinks leave no window in a cache of 64", 2),
    (["--tokens", "1"], "--tokens must be at least 2", 2),
    (["--dtype", "fp8"], "--dtype 'fp8': choose one of", 2),
    (["--model", "/nonexistent"], "/nonexistent: no such folder", 1),
])
def test_user_errors_are_one_line(tmp_path, capsys, args, message, code):
    base = {"--model": str(STORIES), "--text": __file__, "--out": str(tmp_path), "--window-size": "60"}
    base.update(zip(args[::2], args[1::2]))
    try:
        got = ev.main([x for kv in base.items() for x in kv])
    except SystemExit as e:  # a usage error exits from argparse
        got = e.code
    assert got == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_main_reads_stdin_without_tqdm_or_matplotlib(tmp_path, monkeypatch, capsys):
    need_assets(STORIES)
    monkeypatch.setitem(sys.modules, "tqdm", None)        # import fails: plain progress line
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails: no PNG, a note
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Once upon a time, there was a little cat. " * 20)))
    code = ev.main(["--model", str(STORIES), "--text", "-", "--tokens", "80", "--policy", "window,sink",
                    "--sink-size", "2", "--window-size", "14", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0
    assert "window: 79/79 tokens" in err and "matplotlib is not installed" in err
    assert not (tmp_path / "streaming_ppl.png").exists()
    assert (tmp_path / "streaming_ppl_summary.csv").is_file() and "sink" in out


def test_window_defaults_to_the_models_context_like_run_py(tmp_path, capsys):
    """stories260K was trained on 512 tokens: the default cache is 4 + 508, as run.py's; the whole
    trained context is the plain case, named in the header line and not announced apart."""
    need_assets(STORIES)
    code = ev.main(["--model", str(STORIES), "--text", __file__, "--tokens", "40", "--policy", "sink",
                    "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0
    assert "minisink.tools.eval: cache:" not in err
    assert "cache 4+508" in err
