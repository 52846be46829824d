"""What the benchmarks run on: real model shapes with random weights, and the machine's facts.

Random weights cost exactly what trained ones cost per token (same shapes, same kernels), so the
benchmarks need no checkpoint. The shapes are the fields of each model's config.json on the hub
that minisink reads; `scaled` shrinks one for a CPU, keeping what makes the architecture itself
(MQA, partial rotary, ALiBi, parallel residual) and the cache size.
"""
import os
import platform
import re
import time
from contextlib import contextmanager
from statistics import median

import torch

from ...weights.load import build_config
from ..sizing import step_read_bytes

CONFIGS = {
    # EleutherAI/pythia-160m: the model of issue 3's CPU benchmark
    "pythia-160m": dict(model_type="gpt_neox", vocab_size=50304, hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12, rotary_pct=0.25, rotary_emb_base=10000,
                        max_position_embeddings=2048, layer_norm_eps=1e-5, use_parallel_residual=True,
                        hidden_act="gelu", tie_word_embeddings=False),
    # the random-weight Llama of minisink/tools/bench/eval.py and issue 18: 134M parameters
    "llama-134m": dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=2048,
                       rms_norm_eps=1e-5),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T: a 1B Llama with grouped-query attention
    "tinyllama-1.1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0),
    "pythia-6.9b": dict(model_type="gpt_neox", vocab_size=50432, hidden_size=4096, intermediate_size=16384,
                        num_hidden_layers=32, num_attention_heads=32, rotary_pct=0.25, rotary_emb_base=10000,
                        max_position_embeddings=2048, layer_norm_eps=1e-5, use_parallel_residual=True,
                        hidden_act="gelu", tie_word_embeddings=False),
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    # 71 query heads of 64 share one kv head (multi-query); lm_head tied to the embedding
    "falcon-7b": dict(model_type="falcon", vocab_size=65024, hidden_size=4544, num_hidden_layers=32,
                      num_attention_heads=71, multi_query=True, parallel_attn=True, bias=False, alibi=False,
                      new_decoder_architecture=False, layer_norm_epsilon=1e-5),
    "mpt-7b": dict(model_type="mpt", vocab_size=50432, d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4,
                   max_seq_len=2048, no_bias=True, attn_config={"alibi": True, "alibi_bias_max": 8}),
}

# (hidden, heads, layers, vocab) of the scaled-down shapes; head_dim 64 as in pythia and falcon
SCALED = {"tiny": (256, 4, 2, 4096), "small": (1024, 16, 8, 32000)}
NAMES = {"gpt_neox": ("hidden_size", "num_attention_heads", "num_hidden_layers"),
         "llama": ("hidden_size", "num_attention_heads", "num_hidden_layers"),
         "falcon": ("hidden_size", "num_attention_heads", "num_hidden_layers"),
         "mpt": ("d_model", "n_heads", "n_layers")}


def scaled(d: dict, shape: str) -> dict:
    """config.json `d` shrunk to `shape` ("tiny", "small"; "full" is `d`): MLP ratio and MQA/MHA kept."""
    if shape == "full":
        return d
    hidden, heads, layers, vocab = SCALED[shape]
    h, nh, nl = NAMES[d["model_type"]]
    out = dict(d, vocab_size=vocab, **{h: hidden, nh: heads, nl: layers})
    if "intermediate_size" in d:
        out["intermediate_size"] = d["intermediate_size"] * hidden // d[h]
    if "num_key_value_heads" in d:
        out["num_key_value_heads"] = heads if d["num_key_value_heads"] == d[nh] else 1
    return out


@contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def random_model(d: dict, device="cpu", dtype=torch.float32, seed: int = 0):
    """The model of config.json `d` with PyTorch's default random init, allocated directly on
    `device` in `dtype` (a 7B model never exists in fp32, nor on the host)."""
    cls, config = build_config(d)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = cls(config)
    return model.eval().requires_grad_(False)


def weight_bytes(model) -> int:
    """Bytes of weights read per token: every parameter once (a tied one once), an untied input
    embedding one row (minisink.tools.sizing.step_read_bytes). gpt-fast counts the whole embedding."""
    return step_read_bytes(model)


def kv_bytes(stream) -> int:
    """Bytes of K and V a decode step reads: every layer's whole buffer (B, kv_heads, S+W, hd)."""
    return sum(t.numel() * t.element_size() for t in [*stream.cache.k, *stream.cache.v])


def bandwidth(threads: int, mb: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write), median of `repeats`."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / median(times[1:])


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn, n: int, device, warmup: int = 2) -> float:
    """Time `fn()` n times after `warmup` calls. On a GPU: the total over n calls / n, synchronised at
    both ends (the GPU runs ahead of Python). On a CPU: the median call, robust to a busy machine."""
    for _ in range(warmup):
        fn()
    sync(device)
    if torch.device(device).type == "cuda":
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - start) / n
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def cpu_name() -> str:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return platform.processor() or "unknown CPU"
    field = lambda key: (re.search(rf"^{key}\s*:\s*(.*)$", text, re.M) or [None, "?"])[1]
    return f"{field('model name')} (family {field('cpu family')}, model {field('model')})"


def machine(device) -> str:
    """One line of facts about where the numbers come from."""
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}")
    return (f"CPU {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")
