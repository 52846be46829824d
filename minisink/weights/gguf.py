"""Convert a llama.cpp GGUF file into a Hugging Face model folder that minisink loads.

    python -m minisink gguf SmolLM2-135M-Instruct.Q4_1.gguf smollm2/ [--dtype fp32|bf16]

A GGUF is one file that holds everything llama.cpp needs: metadata (the architecture's sizes, the
tokenizer's vocabulary and merges) and the tensors, usually quantized. We write what minisink reads:

    GGUF metadata  llama.*      -> config.json            (model_type "llama")
                   tokenizer.*  -> tokenizer.json         (byte-level BPE, HF `tokenizers` layout)
                                   or tokenizer.model     (SentencePiece, for Llama-1/2 vocabularies)
                                   tokenizer_config.json  (BOS/EOS names, chat template)
    GGUF tensors   blk.N.attn_q -> model.safetensors      (HF names, dequantized to fp32 or bf16)

The `gguf` package (PyPI, maintained in llama.cpp) parses the file and dequantizes; it is an optional
extra of minisink (`pip install gguf`). Only what we implement is converted: another architecture, a
pre-tokenizer we do not know, or a quant type `gguf` cannot dequantize is refused by name.

Nothing half-written is ever left in OUT_DIR: the folder is built in a temporary folder beside it and
renamed into place at the end, which is atomic on one file system.
"""
import argparse
import glob
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


class GGUFError(Exception):
    """A GGUF file we cannot convert, or a folder we cannot write; the message (one line) says why."""


def read_gguf(path: Path):
    """A gguf.GGUFReader for `path`, after the checks that give a clearer message than its own."""
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading GGUF files needs the gguf package: pip install gguf") from None
    with open(path, "rb") as f:  # raises FileNotFoundError / IsADirectoryError: caller reports them
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF with b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on a damaged file
        raise GGUFError(f"{path}: not a readable GGUF file, truncated or damaged? ({type(e).__name__}: {e})") from None
    # The reader maps the file and slices tensors out of it lazily, so a truncated file would only
    # fail (or silently yield short tensors) later. Check that every tensor lies inside the file.
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{path}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes:,}, "
                            f"the file at {size:,}")
    return reader


def metadata(reader) -> dict:
    """The GGUF's key/value metadata as plain Python values (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header's own counters, not metadata
            continue
        value = field.contents()
        if isinstance(value, float):
            # GGUF stores float32: 1e-5 reads back as 9.999999747378752e-06. Write the shortest
            # decimal that is the same float32, which is the number the original config had.
            value = float(str(np.float32(value)))
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# config.json


def llama_config(meta: dict, has_output: bool, path: Path) -> dict:
    """config.json for a GGUF whose general.architecture is "llama" (Llama 1-3, Mistral, SmolLM)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (the converter knows: llama)")
    a = lambda key, default=None: meta.get(f"llama.{key}", default)
    hidden, n_head = a("embedding_length"), a("attention.head_count")
    head_dim = a("attention.key_length") or a("rope.dimension_count") or hidden // n_head
    if a("rope.dimension_count", head_dim) != head_dim:  # partial rotary: not a Llama
        raise GGUFError(f"{path}: rope.dimension_count {a('rope.dimension_count')} != head_dim {head_dim} "
                        "(partial rotary embeddings) is not supported")
    scaling = a("rope.scaling.type", "none")
    if scaling == "none":
        rope_scaling = None
    elif scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": a("rope.scaling.factor")}
    else:
        raise GGUFError(f"{path}: llama.rope.scaling.type {scaling!r} is not supported (supported: none, linear)")
    vocab = a("vocab_size") or len(meta["tokenizer.ggml.tokens"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": a("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "max_position_embeddings": a("context_length"),
        "rms_norm_eps": a("attention.layer_norm_rms_epsilon"),
        "rope_theta": a("rope.freq_base", 10000.0),
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        # llama.cpp writes no output.weight when the head shares the embedding matrix
        "tie_word_embeddings": not has_output,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


# ---------------------------------------------------------------------------------------------
# Tensors


# llama.cpp's tensor names -> HF's. "{}" is the layer number.
TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{}.attn_norm": "model.layers.{}.input_layernorm",
    "blk.{}.attn_q": "model.layers.{}.self_attn.q_proj",
    "blk.{}.attn_k": "model.layers.{}.self_attn.k_proj",
    "blk.{}.attn_v": "model.layers.{}.self_attn.v_proj",
    "blk.{}.attn_output": "model.layers.{}.self_attn.o_proj",
    "blk.{}.ffn_norm": "model.layers.{}.post_attention_layernorm",
    "blk.{}.ffn_gate": "model.layers.{}.mlp.gate_proj",
    "blk.{}.ffn_up": "model.layers.{}.mlp.up_proj",
    "blk.{}.ffn_down": "model.layers.{}.mlp.down_proj",
}


def hf_name(gguf_name: str, path: Path) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    base, _, kind = gguf_name.rpartition(".")  # kind: weight or bias
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit():
        template, layer = f"blk.{{}}.{parts[2]}", parts[1]
    else:
        template, layer = base, None
    if template not in TENSOR_NAMES:
        raise GGUFError(f"{path}: tensor {gguf_name} has no counterpart in a Llama checkpoint (not supported)")
    return f"{TENSOR_NAMES[template].format(layer)}.{kind}"


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo the row order llama.cpp gives Q and K weights.

    HF's Llama rotates pairs (i, i + d/2) of each head's d dimensions (rotate_half); llama.cpp
    rotates neighbours (2i, 2i + 1). So its converter reorders each head's rows: HF row i goes to
    2i and row d/2 + i to 2i + 1. Reading the rows as (head, i, pair) and swapping the last two
    axes puts them back:

        llama.cpp rows of a head:  0 d/2  1 d/2+1  2 ...     (head, d/2, 2)
        HF rows of a head:         0 1 2 ... d/2 d/2+1 ...   (head, 2, d/2)
    """
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def dequantize(tensor, path: Path) -> torch.Tensor:
    """One GGUF tensor as a torch fp32 tensor, in HF's (out_features, in_features) order."""
    from gguf import GGMLQuantizationType, quants

    try:
        values = quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, KeyError):
        name = GGMLQuantizationType(tensor.tensor_type).name
        raise GGUFError(f"{path}: tensor {tensor.name} is quantized as {name}, which the gguf package "
                        "cannot dequantize (try a newer gguf, or another quantization of the model)") from None
    # GGUF lists dimensions fastest first ([in, out]); numpy's shape is the reverse, as torch wants.
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy: the file is mapped read-only


def convert_tensors(reader, config: dict, path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # Llama 3.1's frequency factors, as a tensor
            raise GGUFError(f"{path}: tensor rope_freqs.weight (Llama-3.1 style rope scaling) is not supported")
        name = hf_name(tensor.name, path)
        w = dequantize(tensor, path)
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, config["num_key_value_heads"])
        state[name] = w
    return state


# ---------------------------------------------------------------------------------------------
# Tokenizer


# tokenizer.ggml.pre (llama.cpp's name for how text is cut into words before BPE) -> the HF
# pre-tokenizer that cuts the same way. llama.cpp's "smollm" is two regexes: \p{N} (every digit
# alone), then GPT-2's; as a tokenizer.json it is SmolLM's own: Digits, then ByteLevel.
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "gpt-2": BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (gguf.TokenType)


def tokenizer_files(meta: dict, path: Path) -> dict[str, bytes]:
    """{file name: contents} of the tokenizer: tokenizer.json for a byte-level BPE vocabulary
    (tokenizer.ggml.model "gpt2"), tokenizer.model for a SentencePiece one ("llama")."""
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        return {"tokenizer.json": json_bytes(tokenizer_json(meta, path))}
    if model == "llama":
        return {"tokenizer.model": sentencepiece_model(meta)}
    raise GGUFError(f"{path}: tokenizer.ggml.model {model!r} is not supported (supported: gpt2, i.e. "
                    "byte-level BPE, and llama, i.e. SentencePiece)")


def tokenizer_json(meta: dict, path: Path) -> dict:
    """The HF tokenizer.json of a byte-level BPE ("gpt2") GGUF vocabulary."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported "
                        f"(supported: {', '.join(PRE_TOKENIZERS)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    # Control tokens (<|im_start|>, <|endoftext|>) are special: matched whole in the text and
    # decoded to nothing. User-defined ones are matched whole but print as themselves.
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind == CONTROL}
             for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": BYTE_LEVEL,  # trims offsets only: adds no BOS (add_bos_token is false)
        "decoder": BYTE_LEVEL,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": [m.split(" ") for m in meta.get("tokenizer.ggml.merges", [])]},
    }


def sentencepiece_model(meta: dict) -> bytes:
    """A SentencePiece tokenizer.model (a ModelProto, protobuf) for a "llama" GGUF vocabulary.

    The GGUF holds each piece's text, score and type (SentencePiece's own type numbers), which is
    all a BPE ModelProto needs. We write the protobuf bytes by hand, field numbers from
    sentencepiece_model.proto, rather than depend on the protobuf package for six fields:

        ModelProto      1 pieces (repeated): 1 piece, 2 score, 3 type
                        2 trainer_spec:      3 model_type (BPE = 2), 35 byte_fallback, 40-43 unk/bos/eos/pad id
                        3 normalizer_spec:   1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces
    """
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    BYTE = 6
    pieces = b"".join(
        _pb(1, _pb(1, tok.encode("utf-8")) + _pb(2, float(score)) + _pb(3, kind))
        for tok, score, kind in zip(tokens, scores, types))
    token_id = lambda key, default: meta.get(f"tokenizer.ggml.{key}_token_id", default)
    trainer = (_pb(3, 2) + _pb(35, BYTE in types) + _pb(40, token_id("unknown", 0)) + _pb(41, token_id("bos", 1))
               + _pb(42, token_id("eos", 2)) + _pb(43, token_id("padding", -1)))
    # Llama's normalizer: no Unicode normalization ("identity"), a space before the text, and
    # runs of spaces kept as they are (llama.cpp tokenizes this way too)
    normalizer = (_pb(1, b"identity") + _pb(3, meta.get("tokenizer.ggml.add_space_prefix", True))
                  + _pb(4, False))
    return pieces + _pb(2, trainer) + _pb(3, normalizer)


def _pb(field: int, value) -> bytes:
    """One protobuf field: bytes (length-delimited), float (fixed 32-bit), bool or int (varint)."""
    if isinstance(value, bytes):
        return _varint(field << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(field << 3 | 5) + struct.pack("<f", value)
    return _varint(field << 3 | 0) + _varint(int(value) & (2 ** 64 - 1))  # negative ints: 10 bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytearray([n]))


def tokenizer_config(meta: dict) -> dict:
    """BOS/EOS by name (what minisink's tokenizer loader reads), and the chat template if any."""
    tokens = meta["tokenizer.ggml.tokens"]
    name = lambda key: tokens[meta[key]] if key in meta else None
    config = {"bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
              "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False)}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


# ---------------------------------------------------------------------------------------------
# The whole conversion


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def convert(gguf_path, out_dir, dtype: str = "fp32") -> Path:
    """Convert `gguf_path` into the model folder `out_dir` (which must not exist, or be empty)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in ("fp32", "bf16"):
        raise GGUFError(f"--dtype {dtype}: choose fp32 or bf16")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GGUFError(f"{out_dir} already exists and is not an empty folder; choose another OUT_DIR")
    try:
        reader = read_gguf(gguf_path)
    except OSError as e:
        raise GGUFError(f"{gguf_path}: cannot read it ({e.strerror or e})") from None
    meta = metadata(reader)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = llama_config(meta, has_output, gguf_path)
    tokenizer = tokenizer_files(meta, gguf_path)  # refuse an unknown tokenizer before the slow part
    config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    state = convert_tensors(reader, config, gguf_path)
    if dtype == "bf16":
        state = {name: w.to(torch.bfloat16) for name, w in state.items()}

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    except OSError as e:
        raise GGUFError(f"cannot write {out_dir}: {out_dir.parent} is not writable ({e.strerror or e})") from None
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        for name, contents in tokenizer.items():
            (tmp / name).write_bytes(contents)
        write_json(tmp / "tokenizer_config.json", tokenizer_config(meta))
        write_json(tmp / "converted_from.json", {"gguf": gguf_path.name, "sha256": sha256(gguf_path),
                                                 "general.name": meta.get("general.name"), "dtype": dtype})
        # Atomic: OUT_DIR appears complete or not at all. rename(2) replaces an empty folder and
        # fails on a full one, e.g. when another process finished the same conversion first.
        os.chmod(tmp, 0o755)  # mkdtemp made it private to us
        os.rename(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise GGUFError(f"cannot write {out_dir}: {e.strerror or e}") from None
        raise
    return out_dir


STALE_PARTIAL_S = 3600   # a conversion takes seconds to minutes; a .partial folder this old was orphaned


def remove_stale_partials(out_dir: Path) -> None:
    """Delete the temporary folders of conversions into out_dir that were killed (SIGKILL, power loss:
    nothing ran to clean up) over an hour ago. Younger ones may belong to a conversion still running."""
    for old in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*.partial"):
        try:
            if time.time() - old.stat().st_mtime > STALE_PARTIAL_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # gone already: another process cleaned it
            pass


def cache_root(cache_dir=None) -> Path:
    """Where minisink keeps what it downloads and converts: cache_dir, $MINISINK_CACHE, or ~/.cache/minisink."""
    return Path(cache_dir or os.environ.get("MINISINK_CACHE") or Path.home() / ".cache" / "minisink").expanduser()


def cached_conversion(gguf_path, cache_dir=None) -> Path:
    """The fp32 model folder of `gguf_path`, converted on first use into <cache>/gguf/NAME-SHA12/.

    The folder is named by the file's content, so an edited file converts afresh. Two processes
    may convert at once: each renames its own complete copy into place, the loser's rename fails
    and it uses the winner's.
    """
    gguf_path = Path(gguf_path)
    try:
        digest = sha256(gguf_path)
    except OSError as e:
        raise GGUFError(f"{gguf_path}: cannot read it ({e.strerror or e})") from None
    folder = cache_root(cache_dir) / "gguf" / f"{gguf_path.stem}-{digest[:12]}"
    if not (folder / "converted_from.json").is_file():
        print(f"converting {gguf_path} (once) into {folder}", file=sys.stderr)
        try:
            convert(gguf_path, folder)
        except GGUFError:
            if not (folder / "converted_from.json").is_file():
                raise
    return folder


def json_bytes(value) -> bytes:
    return (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(path: Path, value) -> None:
    path.write_bytes(json_bytes(value))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minisink gguf", description=__doc__.split("\n")[0])
    parser.add_argument("gguf", help="the .gguf file")
    parser.add_argument("out_dir", help="the model folder to create (must not exist, or be empty)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the weights written")
    args = parser.parse_args(argv)
    try:
        folder = convert(args.gguf, args.out_dir, args.dtype)
    except GGUFError as e:
        print(f"minisink.weights.gguf: error: {e}", file=sys.stderr)
        return 1
    tokenizer = "tokenizer.model" if (folder / "tokenizer.model").is_file() else "tokenizer.json"
    print(f"wrote {folder}: config.json, model.safetensors ({args.dtype}), {tokenizer}")
    return 0

