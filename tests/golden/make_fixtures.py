"""Make the committed golden cases from scratch: tiny seeded models, their inputs, their outputs.

    python tests/golden/make_fixtures.py            # makes every case in a temporary folder: says what differs
    python tests/golden/make_fixtures.py --write    # rewrites the committed cases (after the above)

Each tiny case folder gets model/config.json and model/model.safetensors: a random model of one
architecture, its weights drawn from a seeded generator, so this script rewrites the same bytes
every time. The case runs an eviction-heavy stream on it (a prompt 2.5-6x the cache, then as many
greedy steps, and a continuation as long as the prompt); S and W differ from case to case.

stories260K (a real trained Llama) lives in ../shared/assets, not in the repository: its case records
the sha256 of its files and is made only when the assets are there.

To re-record the outputs of existing cases after a deliberate change to minisink's numerics, without
touching weights or inputs: `python -m minisink golden regenerate --write`.
"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from minisink.tools import golden  # noqa: E402
from minisink.weights.load import build_config  # noqa: E402

VOCAB = 64  # small enough that golden.safetensors keeps whole rows of logits

# config.json of each tiny model, in the form hub checkpoints write it. Each is one that transformers
# reads the same way minisink does (its MPT, e.g., has no expansion_ratio, alibi_bias_max or biases).
TINY = {
    "llama-gqa-s4-w12": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=VOCAB, hidden_size=16,
        intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
        tie_word_embeddings=False),
    "gpt_neox-s1-w7": dict(  # Pythia's layout: parallel residual, half of each head rotated here
        architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", vocab_size=VOCAB, hidden_size=16,
        intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, rotary_pct=0.5, rotary_emb_base=10000,
        max_position_embeddings=256, layer_norm_eps=1e-5, hidden_act="gelu", use_parallel_residual=True,
        tie_word_embeddings=False),
    "falcon-mqa-s2-w5": dict(  # falcon-7b's layout: one kv head, parallel attention, tied head
        architectures=["FalconForCausalLM"], model_type="falcon", vocab_size=VOCAB, hidden_size=16,
        num_hidden_layers=2, num_attention_heads=2, multi_query=True, parallel_attn=True,
        new_decoder_architecture=False, bias=False, alibi=False, layer_norm_epsilon=1e-5, rope_theta=10000.0,
        max_position_embeddings=256),
    "mpt-alibi6-s3-w10": dict(  # 6 heads: ALiBi slopes interleaved from those of 8
        architectures=["MptForCausalLM"], model_type="mpt", vocab_size=VOCAB, d_model=24, n_heads=6,
        n_layers=2, expansion_ratio=4, max_seq_len=256, no_bias=True,
        attn_config={"alibi": True, "alibi_bias_max": 8}),
}
# (S, W, prompt length, greedy steps, continuation length, minisink's prefill chunk when making,
#  seed of the weights: the first of 1000, 1001, ... whose greedy run does not settle on one token)
STREAMS = {
    "llama-gqa-s4-w12": (4, 12, 40, 40, 40, 0, 1000),
    "gpt_neox-s1-w7": (1, 7, 40, 40, 40, 6, 1000),
    "falcon-mqa-s2-w5": (2, 5, 40, 40, 40, 0, 1001),
    "mpt-alibi6-s3-w10": (3, 10, 40, 40, 40, 9, 1000),
}
STORIES = REPO.parent / "shared" / "assets" / "models" / "stories260K"
STORIES_TEXT = REPO.parent / "shared" / "assets" / "text" / "tinystories_val_sample.txt"


def random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter of the model, named as the checkpoint names it (minisink's names are those).

    The scales are a compromise. Sharp attention (large query/key projections) makes a wrong position
    or a wrong eviction show clearly in the logits; small embeddings keep a (tied) head from predicting
    the current token again and again, so that greedy decoding keeps changing token. But a random
    model that is too sharp amplifies float rounding: these keep fp32 within ~1e-5 of fp64, ten times
    below the tolerance, so that two correct implementations agree however they order their sums.
    """
    cls, cfg = build_config(config)
    with torch.device("meta"):
        model = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():  # tied weights appear once, under their first name
        noise = torch.randn(p.shape, generator=g)
        if p.ndim == 1:                          # 1-d weights are norms'; the rest are biases
            out[name] = (1.0 + 0.3 * noise) if name.endswith("weight") else 0.2 * noise
        elif "emb" in name or name.endswith("wte.weight"):
            out[name] = 0.3 * noise
        elif any(qk in name for qk in ("q_proj", "k_proj", "query_key_value", "Wqkv")):
            out[name] = 2.5 * noise / p.shape[1] ** 0.5
        else:
            out[name] = 1.5 * noise / p.shape[1] ** 0.5
    return out


def write_model(folder: Path, config: dict, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(random_weights(config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})


def make_all(dest: Path) -> list[str]:
    """Make every case under `dest`; returns the names made."""
    torch.set_num_threads(1)  # the same kernels, in the same order, whatever machine makes them
    made = []
    for i, (name, config) in enumerate(TINY.items()):
        S, W, P, N, C, chunk, seed = STREAMS[name]
        write_model(dest / name / "model", config, seed)
        g = torch.Generator().manual_seed(2000 + i)
        ids = torch.randint(0, VOCAB, (P + C,), generator=g).tolist()
        golden.make(dest / name / "model", dest / name, prompt=ids[:P], continuation=ids[P:], steps=N,
                    sink_size=S, window_size=W, prefill_chunk=chunk, name=name,
                    description=f"tiny random {config['model_type']} (seed {seed}), random ids "
                                f"(seed {2000 + i}); made by tests/golden/make_fixtures.py")
        print(f"{name}: S={S} W={W}, prompt {P}, {N} steps, continuation {C}")
        made.append(name)
    if not STORIES.exists():
        print(f"SKIP stories260K-s4-w20: {STORIES} not found")
        return made
    from minisink.text.tokenizer import load_tokenizer
    tok = load_tokenizer(STORIES)
    ids = tok.encode(STORIES_TEXT.read_text(encoding="utf-8")[:4000], bos=True)
    P, C = 56, 56
    golden.make(STORIES, dest / "stories260K-s4-w20", prompt=ids[:P], continuation=ids[P:P + C], steps=40,
                sink_size=4, window_size=20, name="stories260K-s4-w20",
                description="stories260K (a real trained Llama, not committed: ../shared/assets); BOS + "
                            "the start of tinystories_val_sample.txt; made by tests/golden/make_fixtures.py")
    print(f"stories260K-s4-w20: S=4 W=20, prompt {P}, 40 steps, continuation {C}")
    return made + ["stories260K-s4-w20"]


def differences(made: Path, committed: Path) -> list[str]:
    """The files of case folder `made` whose bytes differ from `committed`'s (case.json compared
    without the model's source path, which is relative to where the case lives)."""
    out = []
    for file in sorted(p.relative_to(made) for p in made.rglob("*") if p.is_file()):
        new, old = made / file, committed / file
        if file.name == "case.json" and old.is_file():
            a, b = json.loads(new.read_text()), json.loads(old.read_text())
            a["model"].pop("source"), b["model"].pop("source")
            same = a == b
        else:
            same = old.is_file() and new.read_bytes() == old.read_bytes()
        if not same:
            out.append(str(file))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the committed cases in tests/golden")
    args = parser.parse_args(argv)
    if args.write:
        make_all(HERE)
        return 0
    with tempfile.TemporaryDirectory(prefix="minisink-golden-") as tmp:
        changed = {name: differences(Path(tmp) / name, HERE / name) for name in make_all(Path(tmp))}
    for name, files in changed.items():
        print(f"{name}: {'same bytes as committed' if not files else 'differs in ' + ', '.join(files)}")
    print("nothing written" + ("; pass --write to rewrite the committed cases" if any(changed.values()) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
