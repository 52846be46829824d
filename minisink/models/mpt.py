"""MPT (MosaicML MPT-7B/30B, Replit code models), with the names of the HF checkpoint.

Pre-norm blocks: LayerNorm -> attention (ALiBi, one fused Wqkv) -> residual; LayerNorm -> GELU MLP
-> residual. No position embedding at all: ALiBi biases the scores by distance inside the cache.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..alibi import alibi_slopes
from ..attention import attend
from ..cache import DenseCache, SinkCache
from ..config import from_json, refuse


@dataclass
class MptConfig:
    vocab_size: int
    d_model: int
    n_heads: int
    n_layers: int
    kv_n_heads: int | None = None         # None: MHA. llm-foundry's grouped_query_attention sets it
    expansion_ratio: float = 4            # MLP width = expansion_ratio * d_model
    ffn_hidden_size: int | None = None    # llm-foundry's ffn_config.ffn_hidden_size, overrides the ratio
    max_seq_len: int = 2048               # the trained context; ALiBi itself has no position table
    no_bias: bool = True                  # transformers' default; llm-foundry's is False (configs say it)
    layer_norm_epsilon: float = 1e-5      # mosaicml's LPLayerNorm never sets it: nn.LayerNorm's 1e-5
    alibi_bias_max: float = 8.0
    clip_qkv: float | None = None         # clamp the fused q|k|v to [-clip_qkv, clip_qkv]
    softmax_scale: float | None = None    # None: 1/sqrt(head_dim)
    tie_word_embeddings: bool = True      # mosaicml's MPTs have no lm_head: logits = x @ wte.weight.T

    def __post_init__(self):
        self.kv_n_heads = self.kv_n_heads or self.n_heads
        self.head_dim = self.d_model // self.n_heads
        self.ffn_hidden_size = self.ffn_hidden_size or int(self.d_model * self.expansion_ratio)
        self.softmax_scale = self.softmax_scale or self.head_dim ** -0.5
        self.clip_qkv = self.clip_qkv or None  # 0 means off, as in both implementations

    @classmethod
    def from_dict(cls, d: dict) -> "MptConfig":
        # Two forms: mosaicml's (hub checkpoints with remote code: attn_config and ffn_config as plain
        # dicts, no layer_norm_epsilon) and transformers' MptConfig (attn_config as a sub-config).
        # Both nest the attention settings; transformers defaults ALiBi on, and so do all MPTs.
        attn = {"alibi": True, **(d.get("attn_config") or {})}
        ffn = d.get("ffn_config") or {}
        attn_type = attn.get("attn_type", "multihead_attention")
        if attn_type not in ("multihead_attention", "multiquery_attention", "grouped_query_attention"):
            refuse("attn_config.attn_type", attn_type, "minisink implements multihead, multiquery and grouped-query")
        if not attn["alibi"]:
            # without ALiBi, MPT adds learned absolute positions (learned_pos_emb, a wpe table) or RoPE
            refuse("attn_config.alibi", False, "minisink's MPT needs ALiBi: learned absolute positions "
                   f"(learned_pos_emb={d.get('learned_pos_emb')!r}) cannot be given positions inside a cache")
        for key, fine, why in [("rope", (False, None), "MPT with RoPE is not implemented (ALiBi only)"),
                               ("qk_ln", (False, None), "LayerNorm on queries and keys is not implemented"),
                               ("qk_gn", (False, None), "GroupNorm on queries and keys is not implemented"),
                               ("prefix_lm", (False, None), "prefix-LM attention is bidirectional over the prefix"),
                               ("fused_qkv", (True, None), "separate Wq, Wk, Wv are not implemented"),
                               ("sliding_window_size", (-1, None), "the sink cache is the only window here"),
                               ("attn_logit_softcapping", (None,), "soft-capped scores are not implemented"),
                               ("kv_dim", (None,), "keys and values from another width are not implemented")]:
            if attn.get(key) not in fine:
                refuse(f"attn_config.{key}", attn[key], why)
        if d.get("logit_scale") is not None:
            refuse("logit_scale", d["logit_scale"], "scaled logits are not implemented")
        if d.get("norm_type", "low_precision_layernorm").lower() not in ("low_precision_layernorm", "layernorm"):
            refuse("norm_type", d["norm_type"], "MPT here uses LayerNorm")
        if ffn.get("ffn_type", "mptmlp") != "mptmlp":
            refuse("ffn_config.ffn_type", ffn["ffn_type"], "minisink implements MPT's GELU MLP (mptmlp)")
        act = ffn.get("ffn_act_fn") or {"name": "gelu"}
        if act.get("name") != "gelu" or act.get("approximate", "none") != "none":
            refuse("ffn_config.ffn_act_fn", act, "MPT's MLP uses exact GELU")
        # attn_uses_sequence_id only masks across packed sequences given explicit sequence ids (training)
        kv_n_heads = {"multiquery_attention": 1, "grouped_query_attention": attn.get("kv_n_heads", 1)}.get(attn_type)
        return from_json(cls, {**d, "kv_n_heads": kv_n_heads, "ffn_hidden_size": ffn.get("ffn_hidden_size"),
                               **{k: attn[k] for k in ("alibi_bias_max", "clip_qkv", "softmax_scale") if k in attn}},
                         renames={"hidden_size": "d_model", "num_attention_heads": "n_heads",
                                  "num_hidden_layers": "n_layers"})


class MptAttention(nn.Module):
    def __init__(self, config: MptConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_heads, config.kv_n_heads, config.head_dim
        self.clip_qkv, self.scale, self.alibi_bias_max = config.clip_qkv, config.softmax_scale, config.alibi_bias_max
        self.n_model_heads, self.alibi_heads = config.n_heads, slice(None)  # tensor parallel: a slice of the heads
        bias = not config.no_bias
        # one fused projection; its output is three blocks [ Q (nh*hd) | K (nkv*hd) | V (nkv*hd) ]
        self.Wqkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=bias)

    def forward(self, x, cache: SinkCache, plan):
        B, T, _ = x.shape
        qkv = self.Wqkv(x)                                                            # (B, T, (nh+2nkv)*hd)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                             self.n_kv_head * self.head_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)                  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)               # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)               # (B, nkv, T, hd)
        k, v = cache.update(self.layer_idx, k, v, plan)                               # (B, nkv, L, hd)
        slopes = alibi_slopes(self.n_model_heads, self.alibi_bias_max, device=x.device)[self.alibi_heads]  # (nh,)
        y = attend(q, k, v, plan, self.scale, alibi_slopes=slopes)                    # (B, T, nh*hd)
        return self.out_proj(y)


class MptMLP(nn.Module):
    def __init__(self, config: MptConfig):
        super().__init__()
        bias = not config.no_bias
        self.up_proj = nn.Linear(config.d_model, config.ffn_hidden_size, bias=bias)
        self.down_proj = nn.Linear(config.ffn_hidden_size, config.d_model, bias=bias)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))  # exact (erf) GELU


class MptBlock(nn.Module):
    def __init__(self, config: MptConfig, layer_idx: int):
        super().__init__()
        # mosaicml's LPLayerNorm is nn.LayerNorm run in the autocast dtype; without autocast it is
        # nn.LayerNorm. no_bias removes every bias, the LayerNorms' too.
        bias = not config.no_bias
        self.norm_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=bias)
        self.attn = MptAttention(config, layer_idx)
        self.norm_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=bias)
        self.ffn = MptMLP(config)

    def forward(self, x, cache, plan):
        x = x + self.attn(self.norm_1(x), cache, plan)
        return x + self.ffn(self.norm_2(x))


class MptModel(nn.Module):
    def __init__(self, config: MptConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(MptBlock(config, i) for i in range(config.n_layers))
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=not config.no_bias)


class MptForCausalLM(nn.Module):
    def __init__(self, config: MptConfig):
        super().__init__()
        self.config = config
        self.transformer = MptModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, cache: SinkCache | None = None) -> torch.Tensor:
        """input_ids: (B, T) -> logits (B, T, vocab). Without a cache: a plain causal forward."""
        if cache is None:
            cache = DenseCache(input_ids.shape[1], device=input_ids.device, dtype=self.lm_head.weight.dtype)
        plan = cache.begin(input_ids.shape[1])
        x = self.transformer.wte(input_ids)                                             # (B, T, C)
        for block in self.transformer.blocks:
            x = block(x, cache, plan)
        return self.lm_head(self.transformer.norm_f(x))                                 # (B, T, vocab)
