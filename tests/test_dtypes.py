"""fp16/bf16, compiled and GPU paths: proven against fp32 and against transformers, not assumed.

Where rounding matters, minisink computes in fp32 exactly where transformers does. That is checked
op by op (`test_precision_of_sensitive_ops_is_transformers`) by recording the dtypes the aten ops
actually receive, in both implementations:
- attention softmax: fp32 in and out, then cast to the model dtype. transformers does the same for
  Llama, GPT-NeoX and MPT; its eager Falcon calls softmax(dtype=bf16), whose kernel computes in fp32
  and rounds once, which gives the same numbers (`test_half_softmax_kernel_rounds_once`).
- Llama's RMSNorm: upcast to fp32, normalise, cast back, then multiply by the weight (LlamaRMSNorm).
- LayerNorm (GPT-NeoX, Falcon, MPT): a plain nn.LayerNorm run in the model's dtype, as transformers
  does. PyTorch's kernel computes mean and variance in fp32 for fp16/bf16 input, so its result is
  within one rounding of fp32 LayerNorm (`test_half_layer_norm_kernel_is_fp32_rounded_once`): an
  upcast would change nothing.
- RoPE cos/sin: fp32 tables from integer positions, cast to the model dtype (minisink/rope.py).
- ALiBi: the bias is fp32 and promotes the scores to fp32 before the softmax, in both.

Tolerances are in units of the dtype's roundoff u (bf16: 2^-8, fp16: 2^-11; half of finfo.eps)
times the size of what is compared; each says why.
"""
import copy

import pytest
import torch
import transformers
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from minisink.cache import Plan, SinkCache
from minisink.generate import Stream, decode_one_token, prefill
from minisink.weights.load import load_model
from minisink.rope import Rotary
from test_cache import NaiveCache, tiny_model

# fp16 has CPU kernels in torch 2.13 for every op the models use (matmul, LayerNorm, GELU, SDPA)
DTYPES = [torch.bfloat16, torch.float16]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
V = 97

# Logits of a correct low-precision forward sit a small multiple of u * max|logit| from fp32: each op
# rounds its output once, and the error of the (few) roundings along a path adds up. transformers'
# own bf16/fp16 forward of these 2-layer models is 1.2 to 3.6 u * max|logit| from fp32 (measured
# with the weights below). 8 leaves 2x for a different but correct order of rounding, and two
# correct implementations can differ by at most the sum of their errors (< 8 when each is < 4).
LOGIT_TOL = 8

HF_CONFIGS = {  # tiny, and in shapes transformers' classes accept (its MPT: MHA, expansion 4)
    "llama": transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5),
    "gpt_neox": transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, rotary_pct=0.25),
    "falcon": transformers.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        multi_query=True, parallel_attn=True, bias=False, alibi=False),
    "mpt": transformers.MptConfig(vocab_size=V, d_model=48, n_heads=6, n_layers=2, max_seq_len=128),
}
ARCHS = list(HF_CONFIGS)


def roundoff(dtype) -> float:
    return torch.finfo(dtype).eps / 2


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of unit scale (logits of a few units; MPT's tied N(0, 1) embedding gives ~40)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 2:
                p.copy_(r if "emb" in name or "wte" in name else r / p.shape[1] ** 0.5)
            else:
                p.copy_(1 + 0.2 * r if "norm" in name and name.endswith("weight") else 0.1 * r)


@pytest.fixture(scope="module", params=ARCHS)
def saved(request, tmp_path_factory):
    """(arch, folder with a random transformers checkpoint, ids, fp32 logits of transformers)."""
    arch = request.param
    hf = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[arch], attn_implementation="eager").eval()
    randomize(hf, ARCHS.index(arch))
    folder = tmp_path_factory.mktemp(arch)
    hf.save_pretrained(folder)
    ids = torch.randint(0, V, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return arch, folder, ids, hf(ids).logits


def load_hf(folder, dtype, device="cpu"):
    # from_pretrained in the dtype (not .to(dtype)): transformers then keeps its RoPE inv_freq in fp32
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="eager").eval().to(device)


class RecordDtypes(TorchDispatchMode):
    """Records (aten op, dtype of its first tensor input) for the ops where precision matters."""
    SENSITIVE = ("aten._softmax.", "aten._safe_softmax.", "aten.rsqrt.", "aten.mean.", "aten.native_layer_norm.",
                 "aten.cos.", "aten.sin.", "aten._scaled_dot_product")

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(self.SENSITIVE):
            first = next(a for a in args if isinstance(a, torch.Tensor))
            self.seen.add((name.split(".")[1], first.dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", DTYPES)
def test_precision_of_sensitive_ops_is_transformers(saved, dtype):
    arch, folder, ids, _ = saved
    ours, hf = RecordDtypes(), RecordDtypes()
    with torch.no_grad():
        with ours:
            load_model(folder, dtype)(ids)
        with hf:
            load_hf(folder, dtype)(ids)
    # minisink attends through SDPA, whose CPU kernel keeps its softmax in fp32 for bf16/fp16 inputs
    # (test_half_softmax_kernel_rounds_once, and tests/test_attention.py's low-precision bound);
    # transformers' eager attention calls softmax itself
    # (with ALiBi's float mask, PyTorch's math path: its softmax in fp32)
    softmax = {("_softmax", torch.float32), ("_safe_softmax", torch.float32)}
    fused = {(op, dt) for op, dt in ours.seen if op.startswith("_scaled_dot_product")}
    assert fused or softmax & ours.seen, ours.seen
    assert not {op for op, dt in ours.seen - fused if dt != torch.float32} - {"native_layer_norm"}
    assert ours.seen - fused - softmax == {(op, dt) for op, dt in hf.seen if op != "_softmax"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_softmax_kernel_rounds_once(dtype):
    """softmax(x, dtype=half) == softmax(x, dtype=fp32).to(half): the kernel works in fp32 inside."""
    x = (torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 8).to(dtype)
    assert torch.equal(torch.softmax(x, -1, dtype=dtype), torch.softmax(x, -1, dtype=torch.float32).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_layer_norm_kernel_is_fp32_rounded_once(dtype):
    """nn.LayerNorm on fp16/bf16 input is as accurate as LayerNorm in fp32 rounded once to the dtype.

    Inputs far from zero mean (offset 100, spread 3) are the case an upcast would be for: mean and
    variance in half precision lose the spread. The kernel stays within one rounding of the output's
    scale (measured: 0.66 u); the same formula with each op rounded to the dtype is 7-8 u off.
    """
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 64, 300, generator=g) * 3 + 100).to(dtype)
    w, b = (1 + 0.2 * torch.randn(300, generator=g)).to(dtype), (0.1 * torch.randn(300, generator=g)).to(dtype)
    exact = torch.nn.functional.layer_norm(x.float(), (300,), w.float(), b.float())
    bound = roundoff(dtype) * exact.abs().max()
    assert (torch.nn.functional.layer_norm(x, (300,), w, b).float() - exact).abs().max() <= bound
    centred = x - x.mean(-1, keepdim=True)                                   # the counterfactual
    naive = centred * torch.rsqrt((centred * centred).mean(-1, keepdim=True) + 1e-5) * w + b
    assert (naive.float() - exact).abs().max() > 4 * bound


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_transformers_bit_for_bit(dtype):
    from minisink.models.llama import LlamaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm as HFLlamaRMSNorm
    g = torch.Generator().manual_seed(0)
    ours, theirs = LlamaRMSNorm(256, 1e-5), HFLlamaRMSNorm(256, 1e-5)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.2 * torch.randn(256, generator=g))
        theirs.weight.copy_(ours.weight)
        x = (torch.randn(8, 256, generator=g) * 30).to(dtype)
        assert torch.equal(ours.to(dtype)(x), theirs.to(dtype)(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_tables_are_fp32(dtype):
    """Rotating a half-precision head at cache positions up to 4095 costs a few roundings, no more.

    Tables in the model's dtype would round the angle pos * freq itself: at position 4000 a bf16
    angle is off by up to 8 radians. The counterfactual is computed here to show the bound bites.
    """
    rope, hd = Rotary(128), 128
    pos = torch.arange(4096)                      # every position a cache of 4096 slots hands out
    x = torch.randn(1, 2, 4096, hd, generator=torch.Generator().manual_seed(0)).to(dtype)
    exact = rope(x.float(), pos, pos[-1])         # fp32 rotation of the same (rounded) input
    bound = 4 * roundoff(dtype) * x.abs().max().item()  # x*cos, x2*sin, their sum, the final rounding
    assert (rope(x, pos, pos[-1]).float() - exact).abs().max() <= bound

    angles = pos.to(dtype)[:, None] * rope.inv_freq("cpu", pos[-1]).to(dtype)  # the mistake
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x.chunk(2, dim=-1)
    wrong = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    assert (wrong.float() - exact).abs().max() > 50 * bound


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_agree_with_fp32_and_transformers(saved, dtype, device):
    arch, folder, ids, want = saved
    ids, want = ids.to(device), want.to(device)
    with torch.no_grad():
        ours = load_model(folder, dtype, device)(ids).float()
        theirs = load_hf(folder, dtype, device)(ids).logits.float()
    tol = LOGIT_TOL * roundoff(dtype) * want.abs().max()
    assert (theirs - want).abs().max() <= tol, "transformers itself is outside the bound"
    assert (ours - want).abs().max() <= tol
    assert (ours - theirs).abs().max() <= tol


class NaiveCacheOn(NaiveCache):
    """test_cache's oracle, with its positions on `device`."""

    def __init__(self, S, W, device):
        super().__init__(S, W)
        self.device = device

    def begin(self, T, rope=None):
        plan = super().begin(T)                          # positions on the CPU, moved here
        self.pos, dev = self.pos.to(self.device), self.device
        plan = Plan(plan.q_pos.to(dev), plan.k_pos.to(dev), plan.is_sink.to(dev), mask=None)
        if rope is not None:
            plan.rope, plan.q_rope = rope, rope.tables(self.pos[-1:], self.pos[-1], torch.float32)
        return plan


def stream(model, ids, cache, prompt_len, chunk):
    """Prefill `prompt_len` tokens in chunks, then decode the rest one token at a time."""
    with torch.no_grad():
        out = [model(ids[:, s:min(s + chunk, prompt_len)], cache) for s in range(0, prompt_len, chunk)]
        out += [decode_one_token(model, cache, ids[:, t])[:, None] for t in range(prompt_len, ids.shape[1])]
    return torch.cat(out, 1).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_sink_cache_in_bf16_matches_dense_and_oracle(arch, device):
    """In bf16 the sink cache computes what the dense forward and the naive oracle compute.

    Same tolerance as above, scaled by the logits: the two sides are the same mathematics rounded in
    a different order (chunked vs whole matmuls), each a few u from the fp32 answer.
    """
    model = tiny_model(arch).to(device)
    lp = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.randint(0, 61, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
    tol = LOGIT_TOL * roundoff(torch.bfloat16)
    with torch.no_grad():
        dense = lp(ids).float()                               # one forward, DenseCache in bf16
        scale = model(ids).abs().max()
    never_evicts = stream(lp, ids, SinkCache(4, 60, device, torch.bfloat16), prompt_len=30, chunk=7)
    assert (never_evicts - dense).abs().max() <= tol * scale
    oracle = stream(lp, ids, NaiveCacheOn(2, 10, device), prompt_len=0, chunk=1)  # evicts from token 13 on
    with torch.no_grad():
        scale = stream(model, ids, NaiveCacheOn(2, 10, device), 0, 1).abs().max()
    for chunk in (5, 30):
        got = stream(lp, ids, SinkCache(2, 10, device, torch.bfloat16), prompt_len=30, chunk=chunk)
        assert (got - oracle).abs().max() <= tol * scale


def compiled_and_eager_streams(model, S, W, steps, dtype=torch.float32, device="cpu"):
    """Stream(compile=True) and an eager Stream fed the same tokens: the cache full, then `steps` more.

    Returns both streams and the per-step logits. Counts the graphs dynamo built for the step.
    """
    torch._dynamo.reset()
    counters.clear()
    model = model.to(device=device, dtype=dtype)
    ids = torch.randint(0, 61, (1, S + W + 3 + steps), generator=torch.Generator().manual_seed(0)).to(device)
    eager, compiled = Stream(model, "sink", S, W), Stream(model, "sink", S, W, compile=True)
    prompt = S + W + 3                         # the cache is full, and its ring has moved on
    eager.feed(ids[:, :prompt]), compiled.feed(ids[:, :prompt])
    n = compiled.cache.n
    pairs = [(eager.feed(ids[:, t:t + 1]).float(), compiled.feed(ids[:, t:t + 1]).float())
             for t in range(prompt, ids.shape[1])]
    assert compiled.cache.n is n and compiled.cache.n.device.type == torch.device(device).type
    return eager, compiled, pairs


def test_compiled_decode_step_matches_eager_on_cpu():
    """torch.compile (inductor, C++ on CPU) of the decode step: same logits, same cache, one graph.

    fullgraph=True refuses any graph break, so a host sync (.item(), int(tensor)) in the step would
    fail to compile; and one graph for 10 steps means the position and the ring's slot index were
    tensors updated on the device: a Python int would be baked in and recompiled at every step.
    mode="reduce-overhead" (CUDA graphs) does nothing on CPU. Cold compile: 20-40 s on 2 busy cores.
    """
    eager, compiled, pairs = compiled_and_eager_streams(tiny_model("llama"), S=2, W=6, steps=10)
    # inductor fuses and reorders fp32 reductions (over <= 64 terms here): differences of a few fp32
    # roundings of the logits, far below 1e-5
    for want, got in pairs:
        assert (got - want).abs().max() < 1e-5
    assert counters["stats"]["unique_graphs"] == 1
    assert int(compiled.cache.n) == int(eager.cache.n) == 21
    assert torch.equal(compiled.cache.slot_token, eager.cache.slot_token)
    for k_c, k_e in zip(compiled.cache.k, eager.cache.k):
        assert (k_c - k_e).abs().max() < 1e-5


# --- CUDA only: the same checks where they matter, at a real shape ---------------------------------

PYTHIA_6_9B_LAYER = transformers.GPTNeoXConfig(  # pythia-6.9b's config.json, one layer, a small vocabulary
    vocab_size=1024, hidden_size=4096, intermediate_size=16384, num_hidden_layers=1, num_attention_heads=32,
    rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048, layer_norm_eps=1e-5,
    use_parallel_residual=True, hidden_act="gelu")


def check_real_shape_layer(folder, device, dtype, T=512):
    """One pythia-6.9b layer: low precision vs fp32, vs transformers, and the sink cache vs dense."""
    ids = torch.randint(0, 1024, (1, T), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        want = load_hf(folder, torch.float32, device)(ids).logits.float()
        theirs = load_hf(folder, dtype, device)(ids).logits.float()
        ours = load_model(folder, dtype, device)
        got = ours(ids).float()
    tol = LOGIT_TOL * roundoff(dtype) * want.abs().max()
    assert (theirs - want).abs().max() <= tol, "transformers itself is outside the bound"
    assert (got - want).abs().max() <= tol
    assert (got - theirs).abs().max() <= tol
    sink = stream(ours, ids, SinkCache(4, T, device, dtype), prompt_len=T // 2, chunk=100)  # never evicts
    assert (sink - got).abs().max() <= tol
    return ours


@pytest.fixture(scope="module")
def pythia_layer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pythia-6.9b-layer")
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(PYTHIA_6_9B_LAYER).save_pretrained(folder)  # transformers' init
    return folder


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_real_shape_layer(pythia_layer, dtype):
    check_real_shape_layer(pythia_layer, "cuda", dtype)


@CUDA
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_decode_step_never_syncs(arch):
    """Eager decode steps on CUDA with host syncs turned into errors."""
    model = tiny_model(arch).to("cuda", torch.bfloat16)
    cache = SinkCache(2, 6, "cuda", torch.bfloat16)
    ids = torch.randint(0, 61, (1, 20), device="cuda")
    with torch.no_grad():
        prefill(model, cache, ids[:, :10], chunk_size=10)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in range(10, 20):
                decode_one_token(model, cache, ids[:, t])
        finally:
            torch.cuda.set_sync_debug_mode("default")


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_decode_step_matches_eager(dtype):
    """Stream(compile=True) on CUDA: reduce-overhead, i.e. CUDA graphs, 10 steps past a full cache."""
    eager, compiled, pairs = compiled_and_eager_streams(tiny_model("llama"), 2, 6, 10, dtype, "cuda")
    scale = max(want.abs().max() for want, _ in pairs)
    # fp32: reordered reductions (see the CPU test); bf16: inductor keeps fused intermediates in fp32
    # where eager rounds them, so the two differ by the low-precision budget
    tol = 1e-5 if dtype == torch.float32 else LOGIT_TOL * roundoff(dtype) * scale
    for want, got in pairs:
        assert (got - want).abs().max() <= tol
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled.cache.slot_token, eager.cache.slot_token)


@CUDA
def test_cuda_compiled_real_shape_layer_matches_eager(pythia_layer):
    model = load_model(pythia_layer, torch.bfloat16, "cuda")
    _, _, pairs = compiled_and_eager_streams(model, 4, 508, 10, torch.bfloat16, "cuda")
    scale = max(want.abs().max() for want, _ in pairs)
    for want, got in pairs:
        assert (got - want).abs().max() <= LOGIT_TOL * roundoff(torch.bfloat16) * scale
