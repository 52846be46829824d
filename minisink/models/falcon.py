"""Falcon (falcon-7b, falcon-40b/180b, Falcon2-11B), with the names of the HF checkpoint.

What Falcon changes from Llama: LayerNorm (with bias) instead of RMSNorm; one fused query_key_value
projection; multi-query (7b) or grouped-query (40b/180b) attention; attention and a GELU MLP run in
parallel on the same input and share one residual add; lm_head tied to the word embeddings.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import attend
from ..cache import DenseCache, SinkCache
from ..config import from_json, refuse
from ..rope import RopeScaling, Rotary, rope_from_config


@dataclass
class FalconConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_kv_heads: int | None = None             # new_decoder_architecture only; 40b: 8 for 128 query heads
    new_decoder_architecture: bool = False      # 40b/180b/11B: grouped kv heads, always parallel
    multi_query: bool = True                    # old architecture: 1 kv head (7b), else one per query head
    parallel_attn: bool = True
    num_ln_in_parallel_attn: int | None = None  # None: 2 (ln_attn, ln_mlp) in the new architecture, else 1
    ffn_hidden_size: int | None = None          # None: 4 * hidden_size
    bias: bool = False
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = True            # HF's default for Falcon, unlike Llama's

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            refuse("hidden_size", self.hidden_size, f"not a multiple of num_attention_heads={self.num_attention_heads}")
        self.head_dim = self.hidden_size // self.num_attention_heads  # derived; config.json has no head_dim
        if self.new_decoder_architecture:
            self.num_kv_heads = self.num_kv_heads or self.num_attention_heads
        else:  # the old architecture ignores num_kv_heads
            self.num_kv_heads = 1 if self.multi_query else self.num_attention_heads
        if self.num_attention_heads % self.num_kv_heads:
            refuse("num_kv_heads", self.num_kv_heads, "must divide num_attention_heads")
        if self.num_ln_in_parallel_attn is None:
            self.num_ln_in_parallel_attn = 2 if self.new_decoder_architecture else 1
        self.ffn_hidden_size = self.ffn_hidden_size or 4 * self.hidden_size

    @classmethod
    def from_dict(cls, d: dict) -> "FalconConfig":
        if "n_head" in d or d.get("model_type") in ("RefinedWebModel", "RefinedWeb"):
            # The first hub releases (custom code, model_type RefinedWeb*) name n_head, n_layer, n_head_kv.
            # HF's convert_custom_code_checkpoint.py renames them and sets new_decoder_architecture
            # exactly when n_head_kv is present (the 40b code had no flag: it was always grouped).
            d = {"new_decoder_architecture": "n_head_kv" in d, **d}
        if d.get("alibi"):
            refuse("alibi", d["alibi"], "ALiBi Falcons (falcon-rw-*) are not implemented; minisink's Falcon uses RoPE")
        if d.get("apply_residual_connection_post_layernorm"):  # old custom-code setting, ignored by HF's Falcon
            refuse("apply_residual_connection_post_layernorm", True, "the residual is the layer input, not its norm")
        if d.get("activation", "gelu") != "gelu":
            refuse("activation", d["activation"], "Falcon's MLP is GELU (exact, erf)")
        theta, scaling = rope_from_config(d)
        renames = {"n_head": "num_attention_heads", "n_layer": "num_hidden_layers", "n_head_kv": "num_kv_heads"}
        config = from_json(cls, {**d, "rope_theta": theta, "rope_scaling": scaling}, renames)
        # combinations that HF's FalconDecoderLayer builds but cannot run (missing norms)
        if config.new_decoder_architecture and not config.parallel_attn:
            refuse("parallel_attn", False, "the new_decoder_architecture is always parallel")
        if config.num_ln_in_parallel_attn not in (1, 2) or (
                config.num_ln_in_parallel_attn == 2 and not config.new_decoder_architecture):
            refuse("num_ln_in_parallel_attn", config.num_ln_in_parallel_attn,
                   "Falcon has 1 norm, or 2 (ln_attn, ln_mlp) in the new_decoder_architecture")
        return config


class FalconLinear(nn.Linear):
    """nn.Linear with the bias added after the matmul instead of fused into it: Falcon was trained
    that way, and in bf16 the extra rounding shows, so HF's port keeps it (FalconLinear)."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class FalconAttention(nn.Module):
    def __init__(self, config: FalconConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_kv_heads, config.head_dim
        bias, qkv_dim = config.bias, (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.query_key_value = FalconLinear(config.hidden_size, qkv_dim, bias=bias)  # fused q, k, v
        self.dense = FalconLinear(self.n_head * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, x, cache: SinkCache, plan):
        B, T, _ = x.shape
        g = self.n_head // self.n_kv_head  # query heads per kv head
        # The fused output is laid out per kv head: [q_1 .. q_g, k, v]. One view reads all three
        # plans of HF's _split_heads: 7b MQA (one group: [q heads | k | v]), MHA (g=1: [q, k, v] per
        # head) and 40b/180b grouped. Query head h lands in group h // g, which is where attend looks.
        qkv = self.query_key_value(x).view(B, T, self.n_kv_head, g + 2, self.head_dim)
        q = qkv[:, :, :, :g].reshape(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = qkv[:, :, :, g].transpose(1, 2)                                              # (B, nkv, T, hd)
        v = qkv[:, :, :, g + 1].transpose(1, 2)                                          # (B, nkv, T, hd)
        k, v = cache.update(self.layer_idx, k, v, plan)                               # (B, nkv, L, hd)
        y = attend(q, k, v, plan, self.head_dim ** -0.5)                              # (B, T, nh*hd)
        return self.dense(y)


class FalconMLP(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        bias = config.bias
        self.dense_h_to_4h = FalconLinear(config.hidden_size, config.ffn_hidden_size, bias=bias)
        self.dense_4h_to_h = FalconLinear(config.ffn_hidden_size, config.hidden_size, bias=bias)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, config: FalconConfig, layer_idx: int):
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_epsilon
        self.parallel_attn = config.parallel_attn
        self.two_norms = config.parallel_attn and config.num_ln_in_parallel_attn == 2
        if self.two_norms:  # 40b/180b: attention and MLP normalise the same input with their own norm
            self.ln_attn = nn.LayerNorm(C, eps=eps)
            self.ln_mlp = nn.LayerNorm(C, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(C, eps=eps)
        if not config.parallel_attn:
            self.post_attention_layernorm = nn.LayerNorm(C, eps=eps)
        self.self_attention = FalconAttention(config, layer_idx)
        self.mlp = FalconMLP(config)

    def forward(self, x, cache, plan):
        if not self.parallel_attn:  # sequential, as in Llama
            x = x + self.self_attention(self.input_layernorm(x), cache, plan)
            return x + self.mlp(self.post_attention_layernorm(x))
        # parallel: attention and MLP both read x (normalised), one residual add for the two
        h_attn = self.ln_attn(x) if self.two_norms else self.input_layernorm(x)
        h_mlp = self.ln_mlp(x) if self.two_norms else h_attn
        return x + (self.mlp(h_mlp) + self.self_attention(h_attn, cache, plan))  # summed in HF's order


class FalconModel(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(FalconDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class FalconForCausalLM(nn.Module):
    # No ignore_in_checkpoint: Falcon checkpoints hold parameters only (the custom code's rotary
    # inv_freq was a non-persistent buffer).

    def __init__(self, config: FalconConfig):
        super().__init__()
        self.config = config
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling)  # no weights: tables from positions
        self.transformer = FalconModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, cache: SinkCache | None = None) -> torch.Tensor:
        """input_ids: (B, T) -> logits (B, T, vocab). Without a cache: a plain causal forward."""
        if cache is None:
            cache = DenseCache(input_ids.shape[1], device=input_ids.device, dtype=self.lm_head.weight.dtype)
        plan = cache.begin(input_ids.shape[1], self.rotary)  # positions, RoPE tables: all layers
        x = self.transformer.word_embeddings(input_ids)                                 # (B, T, C)
        for layer in self.transformer.h:
            x = layer(x, cache, plan)
        return self.lm_head(self.transformer.ln_f(x))                                   # (B, T, vocab)
