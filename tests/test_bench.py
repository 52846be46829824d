"""The benchmarks' own arithmetic: the bytes a step reads, and `bench gpu` end to end on a CPU."""
import json

import pytest
import torch

from minisink.tools.bench import gpu
from minisink.tools.bench.models import CONFIGS, random_model, scaled
from minisink.tools.sizing import step_read_bytes


def test_a_step_reads_one_row_of_an_untied_embedding_and_all_of_a_tied_one():
    llama = random_model(scaled(CONFIGS["llama-2-7b"], "tiny"))          # untied: embed_tokens, lm_head
    rows, width = llama.model.embed_tokens.weight.shape
    every = sum(p.numel() * p.element_size() for p in llama.parameters())
    assert step_read_bytes(llama) == every - (rows - 1) * width * 4
    mpt = random_model(scaled(CONFIGS["mpt-7b"], "tiny"))                # tied: the head reads it all
    assert step_read_bytes(mpt) == sum(p.numel() * p.element_size() for p in mpt.parameters())


def test_bench_gpu_runs_on_a_cpu_and_writes_its_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    gpu.main(["--models", "mpt-7b,llama-2-7b", "--device", "cpu", "--no-compile", "--tokens", "8",
              "--eager-tokens", "8", "--recompute-tokens", "1", "--block", "4", "--window-size", "60",
              "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [
        (m, mode) for m in ("mpt-7b", "llama-2-7b") for mode in ("sink eager", "recompute")]
    eager = rows[0]
    assert eager["tokens"] == 8 and eager["ms_per_token"] > 0 and eager["host_syncs"] is None
    assert eager["gb_per_s"] == pytest.approx((eager["weights_gb"] + eager["kv_gb"]) / eager["ms_per_token"] * 1e3)
    assert "Summary" in capsys.readouterr().out


def test_host_syncs_and_graph_counts_are_inert_without_cuda():
    calls = []
    assert gpu.host_syncs(lambda: calls.append(1), 3, "cpu") is None and calls == []
    with gpu.GraphCounts() as counts:
        torch.ones(2).sum()
    assert (counts.compiled, counts.captures, counts.replays, counts.skips) == (0, 0, 0, 0)
