"""A tensor-parallel rank holds 1/N of the layers, reads only its slices, and its resident memory
shows it (minisink/tools/tp.py, minisink/weights/load.py, minisink/tools/bench/tp_memory.py).

Loading a rank's shard needs no collective, so these run in one process (the bytes) and in fresh
subprocesses (the resident memory), with no process group.
"""
import contextlib

import pytest
import torch

from minisink.tools import tp
from minisink.tools.bench.tp_memory import measure, random_llama
from minisink.weights import load
from test_tp import CONFIGS, write_model


class SpyFile:
    """A safetensors file that records what is read from it: whole tensors, and slices with the
    number of elements each slice read returned."""

    def __init__(self, f, log):
        self.f, self.log = f, log

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        self.log.append(("whole", name, None))
        return self.f.get_tensor(name)

    def get_slice(self, name):
        sl, log = self.f.get_slice(name), self.log

        class SpySlice:
            def get_shape(self):
                return sl.get_shape()

            def __getitem__(self, index):
                part = sl[index]
                log.append(("slice", name, part.numel()))
                return part
        return SpySlice()


def spied_load(monkeypatch, folder, shard):
    log, real = [], load.safe_open

    @contextlib.contextmanager
    def spy_open(*args, **kwargs):
        with real(*args, **kwargs) as f:
            yield SpyFile(f, log)
    monkeypatch.setattr(load, "safe_open", spy_open)
    return load.load_model(folder, shard=shard), log


@pytest.mark.parametrize("name", ["llama-gqa", "falcon-gqa", "mpt-gqa", "gpt_neox"])
@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_reads_only_its_slices_and_holds_1_over_n_of_the_layers(monkeypatch, tmp_path, name, world):
    folder = write_model(tmp_path / name, CONFIGS[name], seed=0)
    full = load.load_model(folder)
    full_bytes = {n: p.numel() * p.element_size() for n, p in full.named_parameters()}
    for rank in range(world):
        shard = tp.TensorParallel(rank, world)
        model, log = spied_load(monkeypatch, folder, shard)
        sharded = {n for n in shard.readers if n.endswith(".weight")}   # (a row-parallel bias: rank 0's, whole)
        assert sharded, "nothing was sharded"
        for kind, tensor, numel in log:
            if tensor in sharded:
                # never the whole tensor: each slice read is at most 1/N of it (6 kv heads split evenly)
                assert kind == "slice", f"rank {rank}: {tensor} read whole"
                assert numel * world <= full.get_parameter(tensor).numel(), (tensor, numel)
        mine = dict(model.named_parameters())
        read_whole = {t for kind, t, _ in log if kind == "whole"}
        assert read_whole and not read_whole & sharded
        for n in read_whole:   # norms, embeddings, the output head (and rank 0's row-parallel biases)
            assert mine[n].shape == full.get_parameter(n).shape, n
        got = sum(mine[n].numel() * mine[n].element_size() for n in sharded)
        assert got * world == sum(full_bytes[n] for n in sharded), f"rank {rank}: not 1/{world} of the layers"


def test_resident_memory_per_rank_is_about_1_over_n(tmp_path):
    """A random Llama of ~0.2 GB (fp32), rank 0 of N = 1 and 2, each in a fresh process: its resident
    memory once every weight has been read (RSS) and its high-water mark while loading (peak)."""
    folder = random_llama(tmp_path / "llama", 0.2, hidden=768)   # 7 layers; the largest tensor 7 MB
    one, two = measure(folder, [1, 2])
    assert one["params"] > 1.5e8 and 0.95 < one["rss"] / one["params"] < 1.1, one   # N=1 maps all of it
    assert two["params"] / one["params"] < 0.53, two   # 0.51: the embeddings and norms are replicated
    # measured 0.63 and 0.65 (the copies out of the file's mapping leave ~20 MB to the allocator);
    # a rank that kept the file mapped, or read a whole tensor, would be near 1
    assert two["rss"] / one["rss"] < 0.7, (one, two)
    assert two["peak"] / one["rss"] < 0.75, (one, two)   # no moment holds the whole checkpoint


def test_gpus_needed_for_the_papers_largest_models():
    """From the real config.json files: Llama-2-70B in bf16 needs two 80 GB GPUs (138 GB of weights),
    Falcon-180B eight (357 GB; 3, 5, 6 and 7 ranks do not split its 232 heads and 8 kv heads)."""
    import torch
    from conftest import ASSETS, need_assets
    from minisink.tools.sizing import gpus_needed, rank_bytes
    from minisink.weights.load import build_config, read_config
    need_assets(ASSETS / "configs")
    # (GPUs, splits, layers x kv heads): the cache of 4096 slots, K and V of 128-wide heads, in bf16
    want = {"llama-2-70b-hf": (2, [1, 2, 4, 8, 16, 32, 64], 80 * 8), "falcon-180b-chat": (8, [1, 2, 4, 8, 232], 80 * 8)}
    for name, (n, splits, heads) in want.items():
        cls, config = build_config(read_config(ASSETS / "configs" / name))
        cache = 2 * heads * 4096 * 128 * 2   # what sizing.cache_bytes measures (1.34 GB): a meta pass, seconds
        assert gpus_needed(cls, config, cache, torch.bfloat16, 80e9) == (n, splits), name
        whole, _ = rank_bytes(cls, config, cache, torch.bfloat16, 1)
        part, part_cache = rank_bytes(cls, config, cache, torch.bfloat16, n)
        assert whole / n < part < whole / n * 1.05, name   # 1/N of the layers, plus what is replicated
        assert part_cache == cache // n
