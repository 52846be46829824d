"""Falcon parity against transformers on tiny random checkpoints, and cache equivalence.

Each case is saved by transformers' own FalconForCausalLM (safetensors) and loaded by minisink's
loader, so the test covers the names, the fused qkv layouts, the norms and the config parsing.
"""
import json
import re

import pytest
import torch

from minisink.cache import DenseCache, SinkCache
from minisink.config import ConfigError
from minisink.weights.load import LoadError, load_model
from minisink.models.falcon import FalconConfig

transformers = pytest.importorskip("transformers")

VOCAB, B, T = 100, 2, 64
BASE = dict(vocab_size=VOCAB, num_hidden_layers=2, alibi=False)
CASES = {
    # falcon-7b: MQA with 71 heads (not a power of two), parallel attention, one norm, tied lm_head
    "7b_mqa_71_heads": dict(hidden_size=71 * 4, num_attention_heads=71, multi_query=True, parallel_attn=True,
                            new_decoder_architecture=False, bias=False, ffn_hidden_size=96,
                            layer_norm_epsilon=1e-2),
    # falcon-40b/180b: grouped kv heads, ln_attn + ln_mlp, untied, linear rope scaling; saved sharded
    "40b_grouped": dict(hidden_size=64, num_attention_heads=8, num_kv_heads=2, new_decoder_architecture=True,
                        parallel_attn=True, bias=False, tie_word_embeddings=False, layer_norm_epsilon=3e-2,
                        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
    # Falcon2-11B style: new architecture with a single norm, MQA within it, other theta, bias
    "11b_one_norm": dict(hidden_size=48, num_attention_heads=6, num_kv_heads=1, new_decoder_architecture=True,
                         num_ln_in_parallel_attn=1, parallel_attn=True, bias=True, ffn_hidden_size=80,
                         rope_parameters={"rope_type": "default", "rope_theta": 500042.0}),
    # sequential attention -> MLP with post_attention_layernorm, full MHA ([q, k, v] per head), bias
    "sequential_mha": dict(hidden_size=32, num_attention_heads=4, multi_query=False, parallel_attn=False,
                           new_decoder_architecture=False, bias=True, tie_word_embeddings=False,
                           layer_norm_epsilon=1e-1),
}




def hf_model(kwargs, seed=0):
    torch.manual_seed(seed)
    model = transformers.FalconForCausalLM(transformers.FalconConfig(**BASE, **kwargs)).eval()
    with torch.no_grad():  # non-trivial values everywhere, so a wrong eps, bias or layout shows
        for name, p in model.named_parameters():
            if "ln" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif p.dim() == 2 and "word_embeddings" not in name:  # scaled to the fan-in: O(1) activations
                p.copy_(torch.randn_like(p) * 1.5 / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, HF logits, minisink model, input ids) for one config, saved and loaded once."""
    name = request.param
    model = hf_model(CASES[name])
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder, max_shard_size="40KB" if name == "40b_grouped" else "50GB")
    if name == "40b_grouped":
        assert (folder / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    return name, want, load_model(folder), ids, folder


def test_logits_match_transformers(case):
    name, want, model, ids, _ = case
    got = model(ids)
    assert got.shape == (B, T, VOCAB)
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, f"{name}: max abs diff {diff}"


def test_dense_cache_token_by_token(case):
    name, want, model, ids, _ = case
    cache = DenseCache(8)  # small on purpose: it grows while decoding
    got = torch.cat([model(ids[:, t:t + 1], cache) for t in range(T)], dim=1)
    assert (got - want).abs().max().item() < 1e-4, name


def test_sink_cache_that_never_evicts_is_dense(case):
    name, want, model, ids, _ = case
    cache = SinkCache(4, T - 4)
    # a prefill chunk, then token by token
    got = torch.cat([model(ids[:, :16], cache)] + [model(ids[:, t:t + 1], cache) for t in range(16, T)], dim=1)
    assert (got - want).abs().max().item() < 1e-4, name


def hub_form(d: dict, name: str) -> dict:
    """config.json as the hub has it, from what transformers 5 wrote."""
    d = dict(d)
    rope = d.pop("rope_parameters")  # transformers 4: rope_theta (+ rope_scaling) at the top level
    d["rope_theta"] = rope["rope_theta"]
    if rope["rope_type"] != "default":
        d["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}
    if name == "7b_mqa_71_heads":
        # tiiuae/falcon-7b before the port to transformers: custom code, n_head / n_layer
        d.update(model_type="RefinedWebModel", n_head=d.pop("num_attention_heads"), n_layer=d.pop("num_hidden_layers"),
                 apply_residual_connection_post_layernorm=False)
        del d["new_decoder_architecture"], d["num_kv_heads"]
    if name == "40b_grouped":
        # tiiuae/falcon-40b before the port: n_head_kv implies the new decoder architecture
        d.update(model_type="RefinedWeb", n_head=d.pop("num_attention_heads"), n_layer=d.pop("num_hidden_layers"),
                 n_head_kv=d.pop("num_kv_heads"))
        del d["new_decoder_architecture"], d["num_ln_in_parallel_attn"]
    return d


def test_hub_config_forms(case):
    name, want, _, ids, folder = case
    config = folder / "config.json"
    config.write_text(json.dumps(hub_form(json.loads(config.read_text()), name)))
    got = load_model(folder)(ids)
    assert (got - want).abs().max().item() < 1e-4, name


def test_mqa_71_heads_shapes():
    c = FalconConfig.from_dict({"model_type": "RefinedWebModel", "vocab_size": 65024, "hidden_size": 4544,
                                "n_head": 71, "n_layer": 32, "multi_query": True, "parallel_attn": True})
    assert (c.num_attention_heads, c.num_kv_heads, c.head_dim, c.new_decoder_architecture) == (71, 1, 64, False)
    assert c.num_ln_in_parallel_attn == 1 and c.tie_word_embeddings and c.ffn_hidden_size == 4 * 4544


@pytest.mark.parametrize("setting, value, message", [
    ("alibi", True, "alibi=True"),
    ("activation", "relu", "activation='relu'"),
    ("apply_residual_connection_post_layernorm", True, "apply_residual_connection_post_layernorm=True"),
    ("num_ln_in_parallel_attn", 2, "num_ln_in_parallel_attn=2"),  # two norms only in the new architecture
    ("rope_scaling", {"type": "yarn", "factor": 2.0}, "rope_type='yarn'"),
])
def test_unsupported_setting_is_refused(setting, value, message):
    d = {"model_type": "falcon", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, setting: value}
    with pytest.raises(ConfigError, match=re.escape(message)):
        FalconConfig.from_dict(d)


def test_alibi_refused_by_loader(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "alibi": True, "vocab_size": VOCAB,
                                                      "hidden_size": 32, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4}))
    with pytest.raises(LoadError, match="alibi=True"):
        load_model(tmp_path)
