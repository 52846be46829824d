"""The default cache (minisink/tools/sizing.py), shared by run.py and minisink.tools.eval, on real config.json files."""
import json

import pytest
import torch

from conftest import ASSETS, need_assets
from minisink.weights.load import build_config
from minisink.tools.sizing import CacheSizeError, cache_bytes, check_fits, choose_window, trained_context

CONFIGS = ASSETS / "configs"


def real(name: str) -> dict:
    return json.loads((need_assets(CONFIGS / name) / "config.json").read_text())


def window_for(name: str, sink_size=4, window_size=None):
    config = real(name)
    return choose_window(config, sink_size, window_size, getattr(build_config(config)[1], "sliding_window", None))


def test_trained_context_as_each_architecture_names_it():
    assert trained_context({"max_position_embeddings": 4096}) == 4096
    assert trained_context({"max_seq_len": 2048, "model_type": "mpt"}) == 2048
    assert trained_context({"model_type": "falcon"}) is None


@pytest.mark.parametrize("name, window, says", [
    ("llama-2-7b-hf", 4092, None),        # the whole trained context: the plain case, nothing to say
    ("meta-llama-3-8b", 4092, "= the trained context 8192, capped at 4096 slots;"),
    ("llama-3.1-8b", 4092, "= the trained context 131072, capped at 4096 slots;"),
    ("mistral-7b-v0.1", 4092, "capped at 4096 slots (the model's sliding window)"),
    ("pythia-6.9b-deduped", 2044, None),
    ("falcon-7b-instruct", 2044, "= 2048 (config.json names no context)"),
])
def test_default_window(name, window, says):
    got, notes = window_for(name)
    assert got == window
    if says is None:
        assert notes == []
    else:
        assert len(notes) == 1 and says in notes[0]


def test_a_window_past_the_trained_context_is_warned_about():
    window, notes = window_for("llama-2-7b-hf", window_size=8000)
    assert window == 8000 and notes == ["warning: S+W = 8004 exceeds the trained context of 4096: positions "
                                        "past it were never trained, so expect the text to degrade"]
    assert window_for("llama-2-7b-hf", window_size=4092) == (4092, [])


def test_a_cache_wider_than_mistrals_sliding_window_is_refused():
    with pytest.raises(CacheSizeError, match="wider than the model's sliding window of 4096 tokens.*--window-size 4092"):
        window_for("mistral-7b-v0.1", window_size=4093)


def test_cache_bytes_of_llama_3_1_8b():
    """32 layers x (K, V) x 8 kv heads x 128 x 2 bytes = 128 KiB per slot: 4096 slots are 0.5 GiB, while
    the whole 131,072-token context would be 17 GB (the default's cap exists for this)."""
    cls, config = build_config(real("llama-3.1-8b"))
    assert cache_bytes(cls, config, 4096, torch.bfloat16) == 4096 * 32 * 2 * 8 * 128 * 2
    assert cache_bytes(cls, config, 131072, torch.bfloat16) / 1e9 == pytest.approx(17.18, abs=0.01)


def test_falcon_40b_cache_counts_its_grouped_kv_heads():
    cls, config = build_config(real("falcon-40b-refinedweb"))  # 8 kv heads of 64, 60 layers
    assert cache_bytes(cls, config, 100, torch.float32) == 100 * 60 * 2 * 8 * 64 * 4


def test_check_fits_refuses_with_the_sizes(monkeypatch):
    import minisink.tools.sizing as sizing
    monkeypatch.setattr(sizing, "free_memory", lambda device: 16 * 10**9)
    cls, config = build_config(real("llama-2-7b-hf"))
    check_fits(cls, config, 4096, torch.bfloat16, torch.device("cpu"))  # 13.48 + 2.15 GB: fits in 16
    with pytest.raises(CacheSizeError, match=r"a cache of 4,096 slots needs 4.29 GB and the weights 26.95 GB in "
                                             r"float32, but only 16.00 GB of cpu memory is free"):
        check_fits(cls, config, 4096, torch.float32, torch.device("cpu"))
