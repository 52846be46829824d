"""Weight-only quantization, applied to a loaded model from outside: int8 per output channel, int4 per group.

    model = load_model(folder, dtype=torch.bfloat16)
    quantize(model, "int8")                   # every nn.Linear, the output head included -> Int8Linear
    quantize(model, "int4", group_size=32)    # -> Int4Linear
    model = load_gguf_blocks("model.Q4_1.gguf", folder)   # a llama.cpp file's own blocks, bf16 scales (fast)
    model = load_gguf_blocks("model.Q4_1.gguf", folder, dtype=torch.float32)   # fp32 scales: exact, slow

A decode step multiplies every weight matrix by one vector, so its time is the time to read the
weights: fewer bits per weight, fewer bytes, faster steps. Only the weights shrink; activations, norms,
the embedding lookup (one row a token) and the KV cache keep the model's dtype. The model files never
learn of it: their nn.Linear modules are swapped for these two, which compute the same `x @ W.T + b`.

    int8   W[n, :] = scale[n] * q[n, :]                      q in -127..127, one scale per output row
    int4   W[n, k] = scale[n, g] * (q[n, k] - 8) + zero[n, g]  q in 0..15, g = k // group_size

The products run in PyTorch's own CPU kernels, which read the packed integers and dequantize as they
go (torch.ops.aten._weight_int8pack_mm, _weight_int4pack_mm_for_cpu). Chosen by measurement
(docs/quantize.md, `python -m minisink bench quantize`): with bf16 activations they beat bf16
F.linear 2-3x on one SmolLM2 step; with fp32 or fp16 activations they take a path 8-30x slower, and
dequantize-then-F.linear is 9-14x slower. Their scales must have the activations' dtype, so run.py
computes in bf16 around them.

A GGUF file's blocks are used as they are where the format is exactly one of these (load_gguf_blocks):

    Q4_1  w = d * q + m per 32 weights, q in 0..15      -> int4: scale d, zero m + 8d   (exact)
    Q4_0  w = d * (q - 8) per 32                        -> int4: scale d, zero 0        (exact)
    Q4_K  w = d sc_j * q - dmin m_j per 32, in 256s    -> int4: scale d sc_j, zero 8 d sc_j - dmin m_j  (exact)
    Q8_0  w = d * q per 32, q int8                      -> no kernel takes a scale per 32 int8s:
          re-quantized to int8 per channel (from its exact fp32 values)
    F32 / F16 / BF16 matrices, and every other type the gguf package can dequantize (Q5_x, Q6_K, ...):
          re-quantized from the fp32 values: to int8 when the file had 8 bits or more, else to int4

"Exact" means the fp32 kernel computes the file's own weights: d and m are fp16, so d, m + 8d and every
(q - 8) d + (m + 8d) are fp32 numbers up to fp32 rounding (tests/test_quantize.py compares them with
gguf's own dequantization). bf16 scales are not: bf16 keeps 8 bits of d's 11, so with bf16 activations
a Q4_1 file runs as a near neighbour of itself. Types gguf cannot dequantize are refused by name
(minisink/weights/gguf.py).
"""
import numpy as np
import torch
from torch import nn

DTYPES = ("int8", "int4")
GROUP_SIZE = 32    # llama.cpp's block: Q4_0, Q4_1, Q8_0 hold 32 weights each


class QuantizeError(Exception):
    """A model or file this module cannot quantize as asked; the message (one line) says why."""


# ------------------------------------------------------------------------------------------ int8

class Int8Linear(nn.Module):
    """y = x @ (scale * q).T + b with q int8 (out, in) and one scale per output row."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("int8_weight", q)         # (out, in) int8
        self.register_buffer("scales", scales)         # (out,), the activations' dtype
        self.register_buffer("bias", bias)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None):
        """Symmetric, per output row: the row's largest |w| maps to 127, so zero stays exactly zero."""
        dtype = dtype or w.dtype
        w = w.float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127      # (out,)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales.to(dtype), None if bias is None else bias.to(dtype))

    def forward(self, x):
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.int8_weight, self.scales)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """The weights this module multiplies by, (out, in) in the activations' dtype (dequantized)."""
        return self.int8_weight.to(self.scales.dtype) * self.scales[:, None]


# ------------------------------------------------------------------------------------------ int4

class Int4Linear(nn.Module):
    """y = x @ W.T + b, W[n, k] = scale[n, g] * (q[n, k] - 8) + zero[n, g], g = k // group_size.

    The kernel's layout: q packed two to a byte by _convert_weight_to_int4pack_for_cpu, and
    scales_and_zeros (in / group_size, out, 2), the activations' dtype. It wants out % 16 == 0."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.register_buffer("int4_packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        sz = torch.stack([scales, zeros], dim=-1)                            # (out, groups, 2)
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).to(dtype).contiguous())  # (groups, out, 2)
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = GROUP_SIZE,
                   dtype: torch.dtype | None = None):
        """Asymmetric per group: each group's min and max map to q = 0 and 15 (gpt-fast's choice)."""
        dtype = dtype or w.dtype
        out, inp = w.shape
        g = w.float().reshape(out, inp // group_size, group_size)           # (out, groups, group)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)                              # (out, groups)
        scales = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15)
        # lo + q * scale == (q - 8) * scale + (lo + 8 * scale): the kernel's zero is the value at q = 8
        return cls(q.reshape(out, inp), scales, lo + 8 * scales, group_size, bias, dtype)

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self.int4_packed,
                                                       self.group_size, self.scales_and_zeros)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> torch.Tensor:
        """The weights the kernel multiplies by, (out, in): the kernel's own product with the identity."""
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype, device=self.int4_packed.device)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.int4_packed, self.group_size,
                                                          self.scales_and_zeros).T


# ------------------------------------------------------------------------------ applied to a model

def check_shape(name: str, linear: nn.Linear, how: str, group_size: int) -> None:
    out, inp = linear.weight.shape
    if how == "int4" and (inp % group_size or out % 16):
        raise QuantizeError(f"{name}: a ({out}, {inp}) weight cannot be int4 with groups of {group_size}: the "
                            f"kernel needs in_features divisible by {group_size} and out_features by 16 "
                            "(use --dtype int8)")


def quantized(linear: nn.Linear, how: str, group_size: int = GROUP_SIZE, dtype=None) -> nn.Module:
    if how == "int8":
        return Int8Linear.from_float(linear.weight.data, linear.bias, dtype)
    return Int4Linear.from_float(linear.weight.data, linear.bias, group_size, dtype)


def quantize(model: nn.Module, how: str, group_size: int = GROUP_SIZE, dtype: torch.dtype | None = None) -> nn.Module:
    """Swap every nn.Linear of `model` (in place) for its int8 or int4 version, computing in `dtype`
    (default: each Linear's own dtype; with a dtype, the rest of the model is cast to it too).

    The output head is a Linear too, so it is quantized; a head tied to the input embedding keeps
    the embedding's float weights for the lookup (one row per token) and reads the quantized copy
    for the logits. Every shape is checked before anything is swapped: all or nothing."""
    if how not in DTYPES:
        raise QuantizeError(f"unknown weight quantization {how!r} (known: {', '.join(DTYPES)})")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, m in linears.items():
        check_shape(name, m, how, group_size)
    for name, m in linears.items():
        replace(model, name, quantized(m, how, group_size, dtype))
    return model if dtype is None else model.to(dtype)


def replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ----------------------------------------------------------------------------- GGUF blocks as they are

# bytes of one block of 32 weights
Q4_0_BLOCK, Q4_1_BLOCK = 18, 20


def nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) values 0..15: llama.cpp puts weight j in the low nibble of byte j
    and weight 16 + j in the high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def q4_blocks(data: np.ndarray, kind: str, out: int, inp: int):
    """A Q4_0 or Q4_1 tensor's raw bytes (out, bytes per row) -> q (out, in), scale and zero (out, in/32), fp32,
    in the int4 kernel's convention w = scale * (q - 8) + zero."""
    groups = inp // GROUP_SIZE
    size = Q4_1_BLOCK if kind == "Q4_1" else Q4_0_BLOCK
    blocks = np.ascontiguousarray(data).reshape(out, groups, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)          # (out, groups)
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:]
        zero = m + 8 * d          # d q + m == d (q - 8) + (m + 8 d)
    else:
        qs = blocks[..., 2:]
        zero = np.zeros_like(d)   # d (q - 8): the kernel's form already
    q = nibbles(qs).reshape(out, inp)
    return torch.from_numpy(q.astype(np.int32)), torch.from_numpy(d), torch.from_numpy(zero)


Q4_K_BLOCK = 144   # 256 weights: d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles


def q4_k_blocks(data: np.ndarray, out: int, inp: int):
    """A Q4_K tensor's raw bytes -> q (out, in), scale and zero (out, in/32), fp32, as q4_blocks.

    Q4_K is eight groups of 32 under one pair of fp16 numbers: group j has w = d sc_j q - dmin m_j,
    sc_j and m_j 6-bit integers packed into 12 bytes (llama.cpp's get_scale_min_k4):

        j < 4:   sc = s[j] & 63                          m = s[j + 4] & 63
        j >= 4:  sc = s[j + 4] & 15 | (s[j - 4] >> 6) << 4   m = s[j + 4] >> 4 | (s[j] >> 6) << 4

    and its 128 bytes hold four runs of 32: run r's low nibbles are group 2r, its high ones 2r + 1."""
    supers = inp // 256
    blocks = np.ascontiguousarray(data).reshape(out, supers, Q4_K_BLOCK)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)            # (out, supers, 1)
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    s = blocks[..., 4:16].astype(np.uint8)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    m = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    scale = d * sc.astype(np.float32)                                          # (out, supers, 8)
    zero = 8 * scale - dmin * m.astype(np.float32)       # d sc q - dmin m == d sc (q - 8) + (8 d sc - dmin m)
    runs = blocks[..., 16:].reshape(out, supers, 4, 1, 32)
    q = np.concatenate([runs & 0x0F, runs >> 4], axis=3).reshape(out, inp)     # (run, low/high, 32) -> groups
    return (torch.from_numpy(q.astype(np.int32)), torch.from_numpy(scale.reshape(out, -1)),
            torch.from_numpy(zero.reshape(out, -1)))


EXACT_INT4 = ("Q4_0", "Q4_1", "Q4_K")
EIGHT_BITS_OR_MORE = ("F32", "F16", "BF16", "Q8_0", "Q8_1", "Q8_K", "F64")


def load_gguf_blocks(gguf_path, folder, dtype: torch.dtype = torch.bfloat16, device="cpu") -> nn.Module:
    """The model of a GGUF file with its Q4_0/Q4_1/Q4_K matrices run as they are, by the int4 kernel.

    `folder` is the file's converted model folder (minisink/weights/gguf.py: config, tokenizer, fp32
    weights for everything else). Other matrices are re-quantized from their fp32 values: int8 when
    the file held them in 8 bits or more (Q8_0, F16, ...), int4 otherwise (Q5_x, K-quants).
    `dtype` is the activations' (and so the scales') dtype: fp32 keeps the file's weights exact."""
    from .weights.gguf import hf_name, read_gguf, unpermute_rows, GGUFError
    from .weights.load import load_model

    model = load_model(folder, dtype=torch.float32, device=device)  # re-quantize from fp32, not from dtype
    reader = read_gguf(gguf_path)
    kinds = {hf_name(t.name, gguf_path).removesuffix(".weight"): t for t in reader.tensors}
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if "lm_head" in linears and "lm_head" not in kinds:   # tied: the head is the embedding's tensor
        kinds["lm_head"] = kinds["model.embed_tokens"]
    swaps = {}
    for name, linear in linears.items():
        t = kinds[name]
        kind = t.tensor_type.name
        out, inp = linear.weight.shape
        if kind in EXACT_INT4:
            check_shape(name, linear, "int4", GROUP_SIZE)
            q, scale, zero = q4_k_blocks(t.data, out, inp) if kind == "Q4_K" else q4_blocks(t.data, kind, out, inp)
            rows = heads.get(name.rpartition(".")[2])
            if rows:  # llama.cpp's row order for RoPE (minisink/weights/gguf.py): undo it, rows carry their scales
                q, scale, zero = (unpermute_rows(a, rows) for a in (q, scale, zero))
            swaps[name] = Int4Linear(q, scale, zero, GROUP_SIZE, linear.bias, dtype)
        else:
            how = "int8" if kind in EIGHT_BITS_OR_MORE else "int4"
            check_shape(name, linear, how, GROUP_SIZE)
            swaps[name] = quantized(linear, how, dtype=dtype)
    if not swaps:
        raise GGUFError(f"{gguf_path}: no weight matrices found")
    for name, module in swaps.items():
        replace(model, name, module.to(device))
    return model.to(dtype)   # the rest (embedding, norms) in the activations' dtype; integers stay integers


def load_quantized(model_arg, folder, how: str, dtype: torch.dtype = torch.bfloat16, device="cpu") -> nn.Module:
    """What `--dtype int8|int4` loads, for run.py and the evaluator alike. `model_arg` is what the user
    named (a .gguf file, or anything else), `folder` the model folder it resolved to: int4 on a .gguf
    runs the file's own Q4_0/Q4_1 blocks (load_gguf_blocks); otherwise every matrix is quantized from
    the folder's weights: from fp32 when the checkpoint is fp32 (a converted GGUF), else from `dtype`
    (the activations' dtype; a bf16 checkpoint loses nothing, and never takes 4 bytes a weight)."""
    from pathlib import Path
    from .weights.load import load_model, read_config
    gguf = Path(str(model_arg or "")).expanduser()
    if how == "int4" and gguf.suffix.lower() == ".gguf" and gguf.is_file():
        return load_gguf_blocks(gguf, folder, dtype=dtype, device=device)
    source = torch.float32 if read_config(folder).get("torch_dtype") in ("float32", "fp32") else dtype
    return quantize(load_model(folder, dtype=source, device=device), how, dtype=dtype)
