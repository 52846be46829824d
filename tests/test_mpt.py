"""MPT: parity with transformers' MptForCausalLM on tiny random configs, and the cache paths.

transformers' MPT implements what the hub's MPT checkpoints use, and silently drops four settings
that mosaicml's own code (the remote code of those checkpoints, and llm-foundry) honours:
`no_bias: false` (biases on every Linear and LayerNorm), `expansion_ratio` != 4,
`attn_config.alibi_bias_max` != 8 and grouped-query attention. For those, the reference is the
transformers model given what mosaicml's code would build (`mosaicml_reference`), so the math
compared is still transformers' forward pass.
"""
import json
from functools import partial

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import MptConfig as HFMptConfig
from transformers import MptForCausalLM as HFMptForCausalLM
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from minisink.cache import DenseCache, SinkCache
from minisink.weights.load import LoadError, load_model

T, VOCAB = 64, 96
TINY = dict(n_layers=2, vocab_size=VOCAB, max_seq_len=128)  # HF's ALiBi table must cover T

CONFIGS = {
    # mpt-7b in miniature (4 heads, no biases, tied head), sharded, with the hub's config.json
    "mpt7b": dict(hf=dict(d_model=32, n_heads=4, **TINY), form="mpt-7b", shard=True),
    # 6 heads (ALiBi slopes interleaved from 8), clip_qkv, softmax_scale, alibi_bias_max, a large
    # eps (a wrong one would show); config.json as transformers writes it
    "6heads-clip": dict(hf=dict(d_model=48, n_heads=6, layer_norm_epsilon=0.05, **TINY,
                                attn_config=dict(clip_qkv=0.5, softmax_scale=0.3, alibi_bias_max=16)),
                        form="transformers"),
    # 12 heads, no_bias=false, expansion_ratio 2, an untied lm_head; llm-foundry's config.json
    "12heads-bias": dict(hf=dict(d_model=48, n_heads=12, no_bias=False, expansion_ratio=2,
                                 tie_word_embeddings=False, **TINY), form="llm-foundry"),
    # llm-foundry's grouped_query_attention: 4 query heads over 2 kv heads, and multiquery (1)
    "gqa": dict(hf=dict(d_model=32, n_heads=4, **TINY), form="llm-foundry", kv_n_heads=2),
    "mqa": dict(hf=dict(d_model=32, n_heads=4, **TINY, attn_config=dict(clip_qkv=1.0)), form="llm-foundry",
                kv_n_heads=1),
}


def randomize(model: nn.Module, seed: int):
    """Weights large enough that a wrong layout, bias, eps or slope shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim == 2:
                p.copy_(r if name.endswith("wte.weight") else r / p.shape[1] ** 0.5)
            else:
                p.copy_(1 + 0.3 * r if "norm" in name and name.endswith("weight") else 0.2 * r)


def mosaicml_reference(hf_cfg: dict, seed: int) -> HFMptForCausalLM:
    """transformers' MPT, given the parts that mosaicml's code builds from this config and it drops."""
    model = HFMptForCausalLM(HFMptConfig(**hf_cfg)).eval()
    C, ratio = hf_cfg["d_model"], hf_cfg.get("expansion_ratio", 4)
    for block in model.transformer.blocks:
        block.ffn.up_proj = nn.Linear(C, ratio * C, bias=False)
        block.ffn.down_proj = nn.Linear(ratio * C, C, bias=False)
    if not hf_cfg.get("no_bias", True):
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and name != "lm_head":
                m.bias = nn.Parameter(torch.zeros(m.weight.shape[0]))
    bias_max = hf_cfg.get("attn_config", {}).get("alibi_bias_max", 8)
    model.transformer.build_mpt_alibi_tensor = partial(_alibi, bias_max=bias_max)
    randomize(model, seed)
    return model


def _alibi(num_heads, sequence_length, alibi_bias_max=8, device=None, bias_max=8):
    return build_mpt_alibi_tensor(num_heads, sequence_length, bias_max, device)


def hub_config(hf_cfg: dict, form: str, kv_n_heads=None) -> dict:
    """config.json as mosaicml's checkpoints have it: mpt-7b's (2023) or llm-foundry's later form."""
    a = hf_cfg.get("attn_config", {})
    attn = {"alibi": True, "alibi_bias_max": a.get("alibi_bias_max", 8), "attn_impl": "torch", "attn_pdrop": 0,
            "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": a.get("clip_qkv"),
            "prefix_lm": False, "qk_ln": False, "softmax_scale": a.get("softmax_scale")}
    d = {"architectures": ["MPTForCausalLM"], "attn_config": attn,
         "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig",
                      "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
         "d_model": hf_cfg["d_model"], "emb_pdrop": 0, "embedding_fraction": 1.0,
         "expansion_ratio": hf_cfg.get("expansion_ratio", 4),
         "init_config": {"name": "kaiming_normal_", "fan_mode": "fan_in", "init_nonlinearity": "relu"},
         "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None, "max_seq_len": hf_cfg["max_seq_len"],
         "model_type": "mpt", "n_heads": hf_cfg["n_heads"], "n_layers": hf_cfg["n_layers"],
         "no_bias": hf_cfg.get("no_bias", True), "norm_type": "low_precision_layernorm", "resid_pdrop": 0,
         "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "float32", "transformers_version": "4.28.1",
         "use_cache": False, "verbose": 0, "vocab_size": hf_cfg["vocab_size"]}
    if form == "llm-foundry":
        attn.update({"attn_impl": "flash", "qk_gn": False, "fused_qkv": True, "sliding_window_size": -1,
                     "rope": False, "rope_theta": 10000, "rope_impl": "dail", "kv_n_heads": kv_n_heads or 1})
        if kv_n_heads:
            attn["attn_type"] = "grouped_query_attention" if kv_n_heads > 1 else "multiquery_attention"
        d.update({"ffn_config": {"ffn_type": "mptmlp", "fc_type": "torch"}, "fc_type": "torch",
                  "tie_word_embeddings": hf_cfg.get("tie_word_embeddings", True), "use_pad_tok_in_ffn": True})
    return d


def group_kv(hf: HFMptForCausalLM, n_kv: int) -> dict:
    """Make `hf` a grouped-query model in disguise: query head h reads kv head h // g, so each kv
    head's K and V rows appear g times in its MHA Wqkv. Returns the checkpoint of the GQA model."""
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    C, nh = hf.config.d_model, hf.config.n_heads
    g = nh // n_kv
    with torch.no_grad():
        for i, block in enumerate(hf.transformer.blocks):
            q, k, v = block.attn.Wqkv.weight.split(C)                       # each (C, C), rows head-major
            k, v = (w.view(nh, C // nh, C)[::g] for w in (k, v))            # (nkv, hd, C)
            block.attn.Wqkv.weight.copy_(torch.cat([q] + [w.repeat_interleave(g, 0).reshape(C, C) for w in (k, v)]))
            state[f"transformer.blocks.{i}.attn.Wqkv.weight"] = torch.cat([q, k.reshape(-1, C), v.reshape(-1, C)])
    return state




@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    """(name, minisink model, input ids, transformers' logits, folder) for one config."""
    name, spec = request.param, CONFIGS[request.param]
    seed = list(CONFIGS).index(name)
    folder = tmp_path_factory.mktemp(name)
    hf = mosaicml_reference(spec["hf"], seed)
    if spec.get("kv_n_heads"):
        save_file({k: v.contiguous() for k, v in group_kv(hf, spec["kv_n_heads"]).items()},
                  str(folder / "model.safetensors"))
    else:
        hf.save_pretrained(folder, max_shard_size="20KB" if spec.get("shard") else "1GB")
    if spec["form"] != "transformers":
        (folder / "config.json").write_text(json.dumps(hub_config(spec["hf"], spec["form"], spec.get("kv_n_heads"))))
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad():
        want = hf(ids).logits
    return name, load_model(folder), ids, want, folder


def test_logits_match_transformers(case):
    name, model, ids, want, folder = case
    if name == "mpt7b":
        assert len(list(folder.glob("model-*.safetensors"))) > 1, "meant to test a sharded checkpoint"
    got = model(ids)
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, f"{name}: max abs diff {diff:.2e}"


def test_dense_cache_token_by_token(case):
    _, model, ids, want, _ = case
    cache = DenseCache(8)  # small on purpose: it has to grow
    got = torch.cat([model(ids[:, t:t + 1], cache) for t in range(T)], dim=1)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("chunk", [1, 16])
def test_sink_cache_that_holds_everything_is_dense(case, chunk):
    _, model, ids, want, _ = case
    cache = SinkCache(4, T - 4)
    got = torch.cat([model(ids[:, t:t + chunk], cache) for t in range(0, T, chunk)], dim=1)
    assert (got - want).abs().max().item() < 1e-4


def test_clip_qkv_is_active(case):
    """The clip configs would pass without the clamp if no q, k or v ever reached the limit."""
    name, _, ids, want, folder = case
    if not CONFIGS[name]["hf"].get("attn_config", {}).get("clip_qkv"):
        pytest.skip("no clip_qkv in this config")
    model = load_model(folder)
    for block in model.transformer.blocks:
        block.attn.clip_qkv = None
    assert (model(ids) - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("setting, change", [
    ("attn_config.qk_ln", {"attn_config": {"qk_ln": True}}),
    ("attn_config.alibi", {"attn_config": {"alibi": False}, "learned_pos_emb": True}),
    ("attn_config.rope", {"attn_config": {"rope": True}}),
    ("attn_config.prefix_lm", {"attn_config": {"prefix_lm": True}}),
    ("attn_config.attn_type", {"attn_config": {"attn_type": "cross_attention"}}),
    ("attn_config.sliding_window_size", {"attn_config": {"sliding_window_size": 256}}),
    ("logit_scale", {"logit_scale": "inv_sqrt_d_model"}),
    ("norm_type", {"norm_type": "rmsnorm"}),
    ("ffn_config.ffn_type", {"ffn_config": {"ffn_type": "mptglu"}}),
    ("ffn_config.ffn_act_fn", {"ffn_config": {"ffn_type": "mptmlp", "ffn_act_fn": {"name": "silu"}}}),
])
def test_unsupported_setting_is_refused(tmp_path, setting, change):
    d = hub_config(dict(d_model=32, n_heads=4, **TINY), "llm-foundry")
    for key, value in change.items():
        d[key] = {**d[key], **value} if isinstance(value, dict) and key in d else value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(LoadError, match=setting.replace(".", r"\.") + "="):
        load_model(tmp_path)
