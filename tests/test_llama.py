"""Llama: parity with transformers on tiny random configs, real weights (stories260K), loader errors."""
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import STORIES, need_assets
from minisink.cache import DenseCache, SinkCache
from minisink.weights.load import LoadError, load_model

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5)
CONFIGS = {
    # Llama-2 7B/13B: MHA, untied head; config.json written the way hub checkpoints write it
    "mha-untied-hubform": dict(num_key_value_heads=4, rope_theta=10000.0),
    # Llama-2 70B: GQA; plus the options that change the math
    "gqa-tied-bias-linear-sharded": dict(num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                                         mlp_bias=True, rope_theta=500.0,
                                         rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # dynamic NTK, active: 64 tokens > max_position_embeddings
    "mqa-dynamic": dict(num_key_value_heads=1, max_position_embeddings=32,
                        rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    # Llama 3.1 frequencies, and a head_dim that is not hidden/heads
    "gqa-llama3-headdim": dict(num_key_value_heads=2, head_dim=16, rope_theta=50000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from HF's tiny init, so that a wrong eps, bias or layout shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise / p.shape[-1] ** 0.25)


def save_hf_llama(folder, name, seed=0):
    kwargs = dict(BASE, **CONFIGS[name])
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    randomize(model, seed)
    model.save_pretrained(folder, max_shard_size="20KB" if "sharded" in name else "1GB")
    if "hubform" in name:  # transformers 5 writes rope_parameters; the hub has rope_theta/rope_scaling
        config = json.loads((folder / "config.json").read_text())
        config.pop("rope_parameters")
        config.update(rope_theta=10000.0, rope_scaling=None)
        (folder / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_hf_llama(folder, request.param)
    return request.param, hf, load_model(folder), folder


def test_logits_match_transformers(pair):
    name, hf, ours, folder = pair
    if "sharded" in name:
        assert (folder / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, BASE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    got = ours(ids)
    assert (got - want).abs().max() < 1e-4


def test_token_by_token_matches_full_forward(pair):
    name, _, ours, _ = pair
    ids = torch.randint(0, BASE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense, sink = DenseCache(4), SinkCache(4, 60)  # DenseCache grows; S+W >= 64: nothing evicted
        steps = [(ours(ids[:, t:t + 1], dense)[:, 0], ours(ids[:, t:t + 1], sink)[:, 0]) for t in range(64)]
        want = ours(ids).unbind(1)
    if "dynamic" in name:
        # Dynamic NTK rescales RoPE by the longest position in use, so a 64-token forward rotates
        # token 5 differently from the forward that produced token 5's hidden states: the method has
        # no incremental form past the trained context (transformers' cache differs too). Within
        # the trained context it is plain RoPE and must match.
        steps, want = steps[:32], ours(ids[:, :32]).unbind(1)
    for t, ((d, s), w) in enumerate(zip(steps, want)):
        assert (d - w).abs().max() < 1e-4, f"dense cache, step {t}"
        assert (s - w).abs().max() < 1e-4, f"sink cache, step {t}"


# --- real weights: stories260K from ../shared ---------------------------------------------------

def test_stories260k_greedy_200_matches_llama2c():
    need_assets(STORIES)
    import sentencepiece
    from minisink.generate import Stream
    model = load_model(STORIES)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(STORIES / "tokenizer.model"))
    stream = Stream(model, "sink", sink_size=4, window_size=508)
    tokens = [int(t) for t in stream.generate(torch.tensor([[sp.bos_id()]]), max_new_tokens=200)]
    assert sp.decode(tokens) == (STORIES / "expected_greedy_200.txt").read_text()


def test_stories260k_nll_matches_transformers():
    need_assets(STORIES)
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(STORIES / "tokenizer.model"))
    text = (STORIES.parents[1] / "text" / "tinystories_val_sample.txt").read_text()
    ids = torch.tensor([[sp.bos_id()] + sp.encode(text[:20000])[:1999]])
    assert ids.shape[1] == 2000
    hf = transformers.LlamaForCausalLM.from_pretrained(STORIES).eval()
    ours = load_model(STORIES)
    with torch.no_grad():
        # the model's context is 512: score the 2,000 tokens in independent 500-token blocks
        blocks = ids.split(500, dim=1)
        nll = lambda logits, block: torch.nn.functional.cross_entropy(logits[0, :-1], block[0, 1:])
        want = torch.stack([nll(hf(block).logits, block) for block in blocks]).mean()
        got = torch.stack([nll(ours(block), block) for block in blocks]).mean()
    assert abs(got - want) < 1e-5


# --- loader errors: each one names the file and what is wrong -----------------------------------

@pytest.fixture
def folder(tmp_path):
    save_hf_llama(tmp_path, "mha-untied-hubform")
    return tmp_path


def rewrite(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def load_error(folder) -> str:
    with pytest.raises(LoadError) as e:
        load_model(folder)
    return str(e.value)


def test_missing_tensor(folder):
    rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert "checkpoint has no tensor model.layers.1.mlp.up_proj.weight" in load_error(folder)


def test_unexpected_tensor(folder):
    rewrite(folder, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    assert load_error(folder).endswith("model.safetensors: unexpected tensor model.layers.0.extra.weight "
                                       "(not a parameter of LlamaForCausalLM with this config.json)")


def test_llama2_checkpoint_with_rotary_inv_freq_buffers_loads(folder):
    """Llama-2 as published on the hub: one self_attn.rotary_emb.inv_freq buffer per layer beside the
    weights. They are ignored (minisink computes RoPE from the config); the logits are unchanged."""
    ids = torch.randint(0, BASE["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(3))
    want = load_model(folder)(ids)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)  # head_dim 8, as transformers 4.31 saved it
    rewrite(folder, lambda t: t.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(2)}))
    assert "model.layers.1.self_attn.rotary_emb.inv_freq" in load_file(folder / "model.safetensors")
    assert torch.equal(load_model(folder)(ids), want)


def test_shape_mismatch(folder):
    rewrite(folder, lambda t: t.update({"model.norm.weight": torch.ones(31)}))
    assert "expected tensor model.norm.weight of shape (32,), found (31,)" in load_error(folder)


def test_truncated_safetensors(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    message = load_error(folder)
    assert message.startswith(f"{path}: not a readable safetensors file")


def test_corrupt_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert "model.safetensors: not a readable safetensors file" in load_error(folder)


def test_only_pickles(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    message = load_error(folder)
    assert "found only pickled checkpoint(s) (pytorch_model.bin)" in message
    assert "safetensors only, because unpickling can run arbitrary code" in message


def test_no_weights_at_all(folder):
    (folder / "model.safetensors").unlink()
    assert load_error(folder) == f"{folder}: no model.safetensors or model.safetensors.index.json"


def test_missing_shard(tmp_path):
    save_hf_llama(tmp_path, "gqa-tied-bias-linear-sharded")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    assert f"names shard {shard.name}, which is missing" in load_error(tmp_path)


def test_unknown_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    assert "unknown model_type 'gpt2'; minisink knows llama, gpt_neox, falcon, mpt" in load_error(folder)


@pytest.mark.parametrize("setting, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_unsupported_setting_is_refused(folder, setting, message):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, **setting)))
    assert message in load_error(folder)


def test_no_config(tmp_path):
    assert load_error(tmp_path) == f"{tmp_path}: no config.json (expected a Hugging Face model folder)"
