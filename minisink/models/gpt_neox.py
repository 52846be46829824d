"""GPT-NeoX (Pythia, GPT-NeoX-20B, StableLM-alpha, RedPajama-INCITE), with the names of the HF checkpoint.

What changes from Llama: LayerNorm with bias instead of RMSNorm; one fused `query_key_value`
projection; RoPE on only the first `rotary_pct` of each head (a quarter in Pythia); a plain GELU MLP
with biases; and, by default, a *parallel* residual: attention and MLP both read the block's input.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attend
from ..cache import DenseCache, SinkCache
from ..config import from_json, refuse
from ..rope import RopeScaling, Rotary, rope_from_config


def gelu_fast(x):  # GPT-NeoX-20B's hidden_act; transformers' FastGELUActivation, op for op
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def gelu_new(x):  # the tanh approximation of OpenAI's GPT-2; transformers' NewGELUActivation
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# `hidden_act` in config.json -> the function. "gelu" is the exact (erf) GELU, which Pythia uses.
ACTIVATIONS = {"gelu": F.gelu, "gelu_fast": gelu_fast, "gelu_new": gelu_new}


@dataclass
class GPTNeoXConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    rotary_pct: float = 0.25                # HF's default when config.json omits it; Pythia says 0.25 too
    rotary_emb_base: float = 10000.0        # NeoX's name for rope_theta
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    hidden_act: str = "gelu"
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = True             # HF's default: Pythia's config.json does not write it

    def __post_init__(self):
        # GPT-NeoX has no head_dim setting: HF always splits hidden_size evenly over the heads
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.rotary_dim = int(self.head_dim * self.rotary_pct)  # int() truncates, as in HF

    @classmethod
    def from_dict(cls, d: dict) -> "GPTNeoXConfig":
        if d.get("hidden_act", "gelu") not in ACTIVATIONS:
            refuse("hidden_act", d["hidden_act"], f"minisink implements {', '.join(ACTIVATIONS)}")
        base, scaling = rope_from_config(d, theta_key="rotary_emb_base")
        # transformers >= 5 writes rotary_pct into `rope_parameters` as partial_rotary_factor
        params = d.get("rope_parameters") or {}
        pct = params.get("partial_rotary_factor", d.get("partial_rotary_factor", d.get("rotary_pct", 0.25)))
        config = from_json(cls, {**d, "rotary_emb_base": base, "rope_scaling": scaling, "rotary_pct": pct})
        if config.hidden_size % config.num_attention_heads:
            refuse("hidden_size", config.hidden_size, f"not a multiple of num_attention_heads={config.num_attention_heads}")
        if config.rotary_dim % 2:
            refuse("rotary_pct", pct, f"gives an odd number of rotary channels ({config.rotary_dim} of {config.head_dim})")
        return config


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        bias = config.attention_bias
        # one projection for q, k and v; its output is laid out head by head: [q0 k0 v0 | q1 k1 v1 | ...]
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=bias)

    def forward(self, x, cache: SinkCache, plan):
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_dim).transpose(1, 2)  # (B, nh, T, 3*hd)
        q, k, v = qkv.chunk(3, dim=-1)                                                # (B, nh, T, hd) each
        k, v = cache.update(self.layer_idx, k, v, plan)                               # (B, nh, L, hd)
        # 1/sqrt(hd): HF's `norm_factor`; the scale uses the whole head, not just its rotary part
        y = attend(q, k, v, plan, self.head_dim ** -0.5)                              # (B, T, nh*hd)
        return self.dense(y)


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_idx: int):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, x, cache, plan):
        attn = self.attention(self.input_layernorm(x), cache, plan)
        if self.use_parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x)): the MLP reads the block's input, not the attention's output
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXModel(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class GPTNeoXForCausalLM(nn.Module):
    # Checkpoints saved by older transformers (Pythia's on the hub) also hold buffers: the causal mask
    # `attention.bias`, its fill value `attention.masked_bias` and the RoPE table
    # `attention.rotary_emb.inv_freq`. The cache's Plan and minisink/rope.py compute those instead.
    ignore_in_checkpoint = [r"\.attention\.(bias|masked_bias)$", r"\.attention\.rotary_emb\.inv_freq$"]

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.config = config
        self.rotary = Rotary(config.rotary_dim, config.rotary_emb_base, config.rope_scaling)  # no weights: tables from positions
        self.gpt_neox = GPTNeoXModel(config)
        # `embed_out` in the checkpoint; transformers >= 5 calls it lm_head in memory, but saves embed_out
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def forward(self, input_ids: torch.Tensor, cache: SinkCache | None = None) -> torch.Tensor:
        """input_ids: (B, T) -> logits (B, T, vocab). Without a cache: a plain causal forward."""
        if cache is None:
            cache = DenseCache(input_ids.shape[1], device=input_ids.device, dtype=self.embed_out.weight.dtype)
        plan = cache.begin(input_ids.shape[1], self.rotary)  # positions, RoPE tables: all layers
        x = self.gpt_neox.embed_in(input_ids)                                           # (B, T, C)
        for layer in self.gpt_neox.layers:
            x = layer(x, cache, plan)
        return self.embed_out(self.gpt_neox.final_layer_norm(x))                        # (B, T, vocab)
