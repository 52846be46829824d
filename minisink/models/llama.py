"""Llama (Llama-2 7B/13B/70B, Llama-3 rope scaling) and Mistral, with the names of the HF checkpoint.

Pre-norm blocks: RMSNorm -> attention (RoPE, grouped-query) -> residual; RMSNorm -> SwiGLU -> residual.

Mistral-7B (`model_type: mistral`) is this model plus a sliding window: a token attends to at most
`sliding_window` keys, itself included (transformers' Mistral differs from its Llama only there).
"""
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attend
from ..cache import DenseCache, SinkCache
from ..config import from_json, refuse
from ..rope import RopeScaling, Rotary, rope_from_config


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: MHA. 70B has 8 kv heads for 64 query heads
    head_dim: int | None = None             # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6              # HF's default; Llama-2 checkpoints say 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None       # Mistral: keys at distance >= this are masked; None: Llama

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        if d.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", d["hidden_act"], "Llama's MLP is SwiGLU (silu)")
        theta, scaling = rope_from_config(d)
        d = {**d, "rope_theta": theta, "rope_scaling": scaling}
        if d.get("model_type") == "mistral":
            # transformers' MistralConfig: 4096 when config.json is silent; null (v0.2+) turns it off
            d["sliding_window"] = d.get("sliding_window", 4096)
        else:
            d.pop("sliding_window", None)  # transformers' Llama has no sliding window, whatever the file says
        window = d.get("sliding_window")
        if window is not None and not (isinstance(window, int) and window > 0):
            refuse("sliding_window", window, "a positive number of tokens, or null")
        return from_json(cls, d)


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32, multiply by the weight in the input dtype, as HF does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cache: SinkCache, plan):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        k, v = cache.update(self.layer_idx, k, v, plan)                               # (B, nkv, L, hd)
        y = attend(q, k, v, plan, self.head_dim ** -0.5)                              # (B, T, nh*hd)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cache, plan):
        x = x + self.self_attn(self.input_layernorm(x), cache, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    # Llama-2 checkpoints on the hub were saved while transformers still kept RoPE's inverse frequencies
    # as a persistent buffer, one per layer; minisink computes them from the config (minisink/rope.py)
    ignore_in_checkpoint = [r"\.self_attn\.rotary_emb\.inv_freq$"]

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling)  # no weights: tables from positions
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, cache: SinkCache | None = None) -> torch.Tensor:
        """input_ids: (B, T) -> logits (B, T, vocab). Without a cache: a plain causal forward."""
        if cache is None:
            cache = DenseCache(input_ids.shape[1], device=input_ids.device, dtype=self.lm_head.weight.dtype)
        plan = cache.begin(input_ids.shape[1], self.rotary)  # positions, RoPE tables: all layers
        if self.config.sliding_window is not None and cache.W > self.config.sliding_window:
            plan = sliding_window(plan, self.config.sliding_window)   # a window narrower than the cache's
        x = self.model.embed_tokens(input_ids)                                          # (B, T, C)
        for layer in self.model.layers:
            x = layer(x, cache, plan)
        return self.lm_head(self.model.norm(x))                                         # (B, T, vocab)


def sliding_window(plan, size: int):
    """Mistral's mask on top of the cache's: no key `size` or more positions behind the query.

    Sinks are exempt: they are kept on purpose (that is StreamingLLM), and a sink cache's window is
    never wider than `size` (run.py and eval.py see to it), so this only ever cuts into a dense
    cache, as transformers' Mistral does (the model asks only then). Window keys' positions are
    their stream indices, so the same rule holds for chunks that overflow the cache.
    """
    keep = (plan.q_pos[:, None] - plan.k_pos[None, :] < size) | plan.is_sink    # (T, L)
    return dataclasses.replace(plan, mask=keep if plan.mask is None else plan.mask & keep)
