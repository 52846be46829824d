"""Weight-only quantization (minisink/quantize.py): what each format stores, logits per dtype, GGUF blocks.

Tolerances are stated relative to the largest |logit| of the fp32 model, over a stream that goes
through the sink cache (a prefill that overflows it, then decode steps):

    bf16 model vs fp32                        the cost of bf16 activations alone
    int8 / int4 vs their own weights in fp32  the kernels compute the product of the weights they hold
    int8 / int4 vs fp32                       plus the quantization error itself (int4 the larger)
"""
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import REPO
from minisink.quantize import GROUP_SIZE, Int4Linear, Int8Linear, QuantizeError, load_gguf_blocks, quantize
from minisink.tools.golden import minisink_stream
from minisink.tools.sizing import step_read_bytes
from minisink.weights.load import build_config

# Random tiny models of the four architectures; sizes are multiples of 32 (int4 groups) and of 16
# (the int4 kernel's output rows). Biases where the architecture has them; one tied head.
CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
    "llama-tied": dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=True),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=128, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5),
    "falcon": dict(model_type="falcon", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_kv_heads=2, new_decoder_architecture=True, bias=True),
    "mpt": dict(model_type="mpt", vocab_size=128, d_model=64, n_heads=4, n_layers=2, expansion_ratio=2,
                attn_config=dict(alibi=True, attn_type="grouped_query_attention", kv_n_heads=2)),
}
S, W = 2, 14
CHUNKS = [20, 1, 1, 1, 5, 1, 1, 1]          # a prefill that overflows the 16-slot cache, steps, a chunk, steps
# max |logits - fp32 logits| / max |fp32 logits|, measured 2026-12 with margin (see the module docstring)
# (largest seen: bf16 0.010, int8/int4 against their own weights 0.008, int8 0.014, int4 0.13)
TOLERANCE = {"bf16": 0.025, "int8-own": 0.025, "int4-own": 0.025, "int8": 0.04, "int4": 0.25}


def tiny(name: str) -> nn.Module:
    cls, parsed = build_config(CONFIGS[name])
    torch.manual_seed(sorted(CONFIGS).index(name))
    model = cls(parsed).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def stream_logits(model) -> torch.Tensor:
    ids = torch.randint(0, 128, (sum(CHUNKS),), generator=torch.Generator().manual_seed(1))
    feed, out, at = minisink_stream(model, "sink", S, W), [], 0
    for n in CHUNKS:
        out.append(feed(ids[at:at + n]))
        at += n
    return torch.cat(out)


def with_weights_of(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """A copy of the fp32 `model` whose Linear weights are those `quantized` holds (dequantized)."""
    twin = copy.deepcopy(model)
    for name, m in twin.named_modules():
        if isinstance(m, nn.Linear):
            m.weight = nn.Parameter(quantized.get_submodule(name).weight.float())
    return twin


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_per_dtype_within_stated_tolerances(name):
    model = tiny(name)
    ref = stream_logits(model)
    errors = {"bf16": relative(stream_logits(copy.deepcopy(model).to(torch.bfloat16)), ref)}
    for how in ("int8", "int4"):
        q = quantize(copy.deepcopy(model).to(torch.bfloat16), how)
        assert not any(isinstance(m, nn.Linear) for m in q.modules())             # the output head too
        logits = stream_logits(q)
        errors[f"{how}-own"] = relative(logits, stream_logits(with_weights_of(model, q)))
        errors[how] = relative(logits, ref)
    assert all(errors[k] <= TOLERANCE[k] for k in errors), errors
    assert errors["int4"] > errors["int8"] > 0                                     # the errors are real, and ordered


def test_what_each_format_stores_and_its_error_bound():
    """int8: one scale per row, error at most half a step; int4: a scale and zero per 32, the same bound."""
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    w8 = Int8Linear.from_float(w)
    step8 = w.abs().amax(1, keepdim=True) / 127
    assert w8.int8_weight.dtype == torch.int8 and w8.scales.shape == (48,)
    assert ((w8.weight - w).abs() <= step8 / 2 + 1e-6).all()
    w4 = Int4Linear.from_float(w)
    g = w.view(48, 96 // GROUP_SIZE, GROUP_SIZE)
    step4 = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(GROUP_SIZE, dim=1)
    assert w4.scales_and_zeros.shape == (96 // GROUP_SIZE, 48, 2)
    assert w4.int4_packed.numel() == 48 * 96 // 2                                  # two weights a byte
    assert ((w4.weight - w).abs() <= step4 / 2 + 1e-5).all()
    assert (w4.weight - w).abs().max() > (w8.weight - w).abs().max()


def test_bytes_read_per_token_count_the_quantized_weights():
    model = tiny("llama-tied")
    dense = step_read_bytes(model)
    q8 = step_read_bytes(quantize(copy.deepcopy(model), "int8"))
    q4 = step_read_bytes(quantize(copy.deepcopy(model), "int4"))
    assert dense > q8 > q4
    # fp32 -> int8 with fp32 scales: about a quarter of the matrices' bytes; the tied embedding's
    # lookup row and the norms stay fp32
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert q8 - (dense - 4 * matrices) == matrices + 4 * sum(m.out_features for m in model.modules()
                                                             if isinstance(m, nn.Linear)) + 4 * 64


def test_a_shape_the_int4_kernel_cannot_take_is_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 40))                    # 40 rows: not a multiple of 16
    with pytest.raises(QuantizeError, match=r"^1: a \(40, 32\) weight cannot be int4 .*use --dtype int8\)$"):
        quantize(model, "int4")
    assert all(isinstance(m, nn.Linear) for m in model)                            # all or nothing
    quantize(model, "int8")


# --- GGUF blocks as they are ---------------------------------------------------------------------

def tiny_gguf(tmp_path, matrix_type: str):
    """(gguf path, its converted fp32 folder: gguf's own dequantization) of a random 1-layer Llama
    (hidden 256 for a K-quant, whose blocks hold 256 weights; else 64)."""
    pytest.importorskip("gguf")
    from test_gguf import write_tiny_gguf
    from minisink.weights.gguf import convert
    hidden = 256 if matrix_type.endswith("_K") else 64
    path = write_tiny_gguf(tmp_path / f"tiny.{matrix_type}.gguf", hidden=hidden, matrix_type=matrix_type)
    return path, convert(path, tmp_path / matrix_type)


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear))}


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_0", "Q4_K"])
def test_q4_blocks_run_as_the_very_weights_gguf_dequantizes(tmp_path, kind):
    """fp32 scales: every weight the int4 kernel multiplies by is gguf's own value, bit for bit for
    Q4_0/Q4_1, within fp32 rounding for Q4_K, whose zero 8 d sc - dmin m is a sum (Q and K rows
    un-permuted with their scales). bf16 scales: within bf16's rounding of d and m."""
    from minisink.weights.load import load_model
    path, folder = tiny_gguf(tmp_path, kind)
    dense = linears(load_model(folder))
    exact = load_gguf_blocks(path, folder, dtype=torch.float32)
    near = load_gguf_blocks(path, folder, dtype=torch.bfloat16)
    for name, m in linears(exact).items():
        if name == "lm_head":   # F32 in this file: re-quantized, to int8 (8 bits or more)
            assert isinstance(m, Int8Linear) and isinstance(linears(near)[name], Int8Linear)
            continue
        assert isinstance(m, Int4Linear), name
        w = dense[name].weight
        if kind == "Q4_K":
            assert (m.weight - w).abs().max() <= 2 ** -20 * w.abs().max(), name    # measured: 2^-24 of it
        else:
            assert torch.equal(m.weight, w), name
        assert (linears(near)[name].weight.float() - w).abs().max() <= 2 ** -7 * w.abs().max(), name
    ref, exact = stream_logits(load_model(folder)), stream_logits(exact)
    assert relative(exact, ref) < 1e-2                      # the int8 head is the only approximation
    bf16 = relative(stream_logits(load_model(folder, dtype=torch.bfloat16)), ref)   # bf16 activations alone
    assert relative(stream_logits(near), exact) < 1.5 * bf16   # measured: 0.74x (Q4_1), 0.95x (Q4_0), 1.2x (Q4_K)


def test_other_gguf_types_are_re_quantized_never_to_fewer_bits(tmp_path):
    """Q8_0: no kernel takes a scale per 32 int8s, so int8 per channel; Q5_0 has fewer than 8 bits: int4."""
    for kind, cls in (("Q8_0", Int8Linear), ("Q5_0", Int4Linear)):
        path, folder = tiny_gguf(tmp_path, kind)
        model = load_gguf_blocks(path, folder, dtype=torch.bfloat16)
        assert {type(m) for n, m in linears(model).items() if n != "lm_head"} == {cls}, kind


def test_run_py_int4_on_a_gguf_reports_the_bytes_it_reads(tmp_path):
    path, _ = tiny_gguf(tmp_path, "Q4_1")
    env = {"MINISINK_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "run.py", "--model", str(path), "--dtype", "int4", "--stream",
                          "--max-new-tokens", "4", "--temperature", "0", "--no-status"],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "MB of int4 weights + bfloat16 parameters per token" in out.stderr.splitlines()[-1]


def test_smollm2_q4_1_file_runs_as_its_own_weights(smollm2):
    """The shipped SmolLM2 file: its 210 Q4_1 matrices become Int4Linear, and (fp32 scales) they are
    gguf's own dequantization bit for bit; the Q8_0 head is re-quantized to int8."""
    from minisink.weights.load import load_model
    from minisink.weights.smollm2 import smollm2_gguf
    model = load_gguf_blocks(smollm2_gguf(), smollm2, dtype=torch.float32)
    kinds = [type(m).__name__ for m in linears(model).values()]
    assert kinds.count("Int4Linear") == 210 and type(model.lm_head) is Int8Linear
    dense = load_model(smollm2)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.17.self_attn.k_proj", "model.layers.29.mlp.down_proj"):
        assert torch.equal(model.get_submodule(name).weight, dense.get_submodule(name).weight), name


def test_eval_int4_on_a_gguf_scores_the_file_near_its_fp32_dequantization(tmp_path, capsys, monkeypatch):
    """`python -m minisink eval --dtype int4` loads the same way as run.py (minisink.quantize.load_quantized)."""
    from minisink.tools import eval as ev
    path, _ = tiny_gguf(tmp_path, "Q4_1")
    monkeypatch.setenv("MINISINK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "text.txt").write_text("the the he t " * 40)
    ppl = {}
    for dtype in ("fp32", "int4"):
        args = ["--model", str(path), "--text", str(tmp_path / "text.txt"), "--tokens", "64", "--policy", "sink",
                "--sink-size", "2", "--window-size", "14", "--out", str(tmp_path / dtype), "--dtype", dtype]
        assert ev.main(args) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sink "))
        ppl[dtype] = float(row.split()[2])
    assert ppl["int4"] != ppl["fp32"] and abs(ppl["int4"] / ppl["fp32"] - 1) < 0.05, ppl
