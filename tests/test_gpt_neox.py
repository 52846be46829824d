"""GPT-NeoX / Pythia: parity with transformers on tiny random checkpoints, and cache equivalence.

Each config is saved by transformers with random weights (LayerNorms included, so a wrong epsilon,
bias or q/k/v layout shows), loaded by minisink.weights.load.load_model, and compared on logits.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minisink.cache import DenseCache, SinkCache
from minisink.weights.load import LoadError, load_model
from minisink.models.gpt_neox import GPTNeoXConfig, GPTNeoXForCausalLM

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    # Pythia's settings: parallel residual, a quarter of each head rotated, exact GELU, untied head
    "pythia": dict(rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, hidden_act="gelu"),
    # sequential residual, full rotary, tied head, non-default eps and base, NeoX-20B's gelu_fast; sharded
    "sequential_tied": dict(rotary_pct=1.0, rotary_emb_base=500, use_parallel_residual=False, layer_norm_eps=1e-2,
                            tie_word_embeddings=True, hidden_act="gelu_fast"),
    # no attention biases, half rotary, gelu_new, linear rope scaling
    "no_bias_scaled": dict(rotary_pct=0.5, attention_bias=False, hidden_act="gelu_new",
                           rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # 8 heads of 8 channels: rotary_pct 0.25 leaves only 2 rotated channels per head
    "many_heads": dict(num_attention_heads=8, rotary_pct=0.25, layer_norm_eps=1e-3, hidden_act="gelu"),
}
T = 64


def hub_form(d: dict) -> dict:
    """config.json as the hub's checkpoints write it (transformers 4.x): rotary_pct, rotary_emb_base, rope_scaling."""
    d = dict(d)
    rope = d.pop("rope_parameters")
    d["rotary_pct"], d["rotary_emb_base"] = rope["partial_rotary_factor"], rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        d["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}
    return d


def copy_checkpoint(src, dst) -> None:
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform and LayerNorms are far from identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name or "layer_norm" in name:
                p.copy_((1.0 + 0.3 * noise) if name.endswith("weight") else 0.3 * noise)
            else:
                p.copy_(0.15 * noise)


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(folder, transformers model, input ids) for one config, saved once per module."""
    name = request.param
    torch.manual_seed(0)
    hf_config = transformers.GPTNeoXConfig(**{**TINY, **CONFIGS[name]}, attn_implementation="eager")
    hf = transformers.GPTNeoXForCausalLM(hf_config).eval()
    randomize_(hf, seed=list(CONFIGS).index(name))
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder, **({"max_shard_size": "20KB"} if name == "sequential_tied" else {}))
    ids = torch.randint(0, TINY["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))
    return folder, hf, ids


@pytest.fixture(scope="module")
def reference(checkpoint):
    folder, hf, ids = checkpoint
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("form", ["transformers5", "hub"])
def test_logits_match_transformers(checkpoint, reference, form, tmp_path):
    folder, hf, ids = checkpoint
    if form == "hub":  # same weights, config.json rewritten the way Pythia's is written
        copy_checkpoint(folder, tmp_path)
        cfg = json.loads((folder / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps(hub_form(cfg)))
        assert "rotary_pct" in (tmp_path / "config.json").read_text()
        folder = tmp_path
    model = load_model(folder)
    assert model.config.rotary_dim == int(model.config.head_dim * hf.config.rope_parameters["partial_rotary_factor"])
    logits = model(ids)
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() < 1e-4


def test_sharded_checkpoint_was_sharded(checkpoint):
    folder, hf, _ = checkpoint
    if hf.config.tie_word_embeddings:  # the "sequential_tied" config is the sharded one
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("model-*.safetensors"))) > 1


def test_dense_cache_token_by_token(checkpoint, reference):
    folder, _, ids = checkpoint
    model = load_model(folder)
    cache = DenseCache(8)  # starts small, so the decode also exercises its growth
    steps = torch.cat([model(ids[:, t : t + 1], cache) for t in range(T)], dim=1)
    assert (steps - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("chunk", [1, 16])
def test_sink_cache_that_holds_everything_is_dense(checkpoint, reference, chunk):
    folder, _, ids = checkpoint
    model = load_model(folder)
    cache = SinkCache(4, T - 4)
    out = torch.cat([model(ids[:, t : t + chunk], cache) for t in range(0, T, chunk)], dim=1)
    assert (out - reference).abs().max().item() < 1e-4


def test_legacy_buffers_in_checkpoint_are_skipped(checkpoint, reference, tmp_path):
    """Pythia's hub checkpoints still carry attention.bias/masked_bias/rotary_emb.inv_freq buffers."""
    folder, hf, ids = checkpoint
    copy_checkpoint(folder, tmp_path)
    legacy = {}
    for i in range(hf.config.num_hidden_layers):
        legacy[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
        legacy[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        legacy[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    save_file(legacy, tmp_path / "legacy.safetensors", metadata={"format": "pt"})
    index = tmp_path / "model.safetensors.index.json"
    weight_map = (json.loads(index.read_text())["weight_map"] if index.is_file() else
                  {name: "model.safetensors" for name in load_file(tmp_path / "model.safetensors")})
    index.write_text(json.dumps({"weight_map": {**weight_map, **{name: "legacy.safetensors" for name in legacy}}}))
    assert (load_model(tmp_path)(ids) - reference).abs().max().item() < 1e-4


# Pythia-160m's config.json as published on the hub (EleutherAI/pythia-160m)
PYTHIA_160M = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
    "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 12,
    "num_hidden_layers": 12, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
    "use_parallel_residual": True, "vocab_size": 50304,
}


def test_pythia_160m_config_builds_the_same_parameters_as_transformers():
    config = GPTNeoXConfig.from_dict(PYTHIA_160M)
    assert (config.head_dim, config.rotary_dim, config.rotary_emb_base) == (64, 16, 10000.0)
    assert config.attention_bias and config.use_parallel_residual and not config.tie_word_embeddings
    with torch.device("meta"):
        ours = GPTNeoXForCausalLM(config)
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**PYTHIA_160M))
    theirs = {n.replace("lm_head.", "embed_out."): tuple(p.shape) for n, p in hf.named_parameters()}
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == theirs
    assert hf.config.rope_parameters["partial_rotary_factor"] == config.rotary_pct


@pytest.mark.parametrize("setting, value", [("hidden_act", "relu"), ("rotary_pct", 0.3),
                                            ("rope_scaling", {"type": "yarn", "factor": 4.0})])
def test_unsupported_setting_is_refused(setting, value, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**PYTHIA_160M, setting: value}))
    with pytest.raises(LoadError) as e:
        load_model(tmp_path)
    name = "rope_scaling.rope_type" if setting == "rope_scaling" else setting
    shown = "yarn" if setting == "rope_scaling" else value
    assert name in str(e.value) and repr(shown) in str(e.value)
