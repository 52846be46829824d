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


def test_bench_cpu_prints_a_row_per_thread_count_and_dtype(tmp_path, monkeypatch, capsys):
    """The plumbing of `bench cpu` on a tiny GGUF: its conversion, the F32/BF16 files written for
    llama.cpp (read back by the gguf package), one row per thread count and dtype. No timing asserts."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import write_tiny_gguf
    from minisink.tools.bench import cpu
    monkeypatch.setenv("MINISINK_CACHE", str(tmp_path / "cache"))
    source = write_tiny_gguf(tmp_path / "tiny.Q4_1.gguf")
    cpu.main(["--gguf", str(source), "--threads", "1,2", "--dtypes", "fp32,bf16", "--rounds", "1",
              "--tokens", "2", "--no-compile", "--llama", "none"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [(r[0], r[1], r[4]) for r in rows] == [(t, d, f) for t in "12" for d, f in (("fp32", "F32"), ("bf16", "BF16"))]
    assert all(float(r[2]) > 0 and r[3] == r[5] == r[6] == "-" for r in rows)   # eager tok/s; no compiled, no llama.cpp
    assert "pip install llama-cpp-python" in out and "2 threads / 1" in out
    for kind, dtype in (("F32", "float32"), ("BF16", "uint8")):    # what llama.cpp would be given
        written = gguf.GGUFReader(cpu.requantized_gguf(source, kind, tmp_path / "out"))
        original = gguf.GGUFReader(source)
        assert [t.name for t in written.tensors] == [t.name for t in original.tensors]
        q = next(t for t in written.tensors if t.name == "blk.0.attn_q.weight")
        assert q.tensor_type.name == kind
        want = next(t for t in original.tensors if t.name == q.name).data
        got = gguf.quants.dequantize(q.data, q.tensor_type).reshape(want.shape)
        assert abs(got - want).max() <= (0 if kind == "F32" else abs(want).max() / 128)
        assert written.fields["tokenizer.ggml.tokens"].contents() == original.fields["tokenizer.ggml.tokens"].contents()


def test_bench_cpu_times_llama_cpp_on_the_same_files_when_installed(tmp_path, monkeypatch, capsys):
    """With llama-cpp-python installed: its rows, a ratio per dtype, and its logits next to minisink's."""
    pytest.importorskip("llama_cpp")
    from test_gguf import write_tiny_gguf
    from minisink.tools.bench import cpu
    monkeypatch.setenv("MINISINK_CACHE", str(tmp_path / "cache"))
    source = write_tiny_gguf(tmp_path / "tiny.Q4_1.gguf")
    cpu.main(["--gguf", str(source), "--threads", "1", "--dtypes", "fp32,bf16", "--rounds", "1",
              "--tokens", "2", "--no-compile", "--llama", "bindings"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["1"]]
    assert [r[1] for r in rows] == ["fp32", "bf16"]
    assert all(float(r[5]) > 0 and r[6].endswith("x") for r in rows), out
    assert "same argmax: yes" in out and "llama-cpp-python" in out
