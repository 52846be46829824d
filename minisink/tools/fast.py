"""A CPU decode step whose mat-vecs run at the memory limit: F.linear rewritten as a reduction.

A decode step is ~all mat-vec: one token's row times every weight matrix, the tied lm_head
included. On the CPUs of this project MKL's and oneDNN's mat-vec read the weights at a fraction of
the memory bandwidth (issue 23: SmolLM2-135M's 211 matrices, 1 thread, AMD Zen 4: F.linear fp32
12.2 GB/s, bf16 7.6 GB/s), while the same product written as an elementwise product and a sum,

    y[o] = sum_i x[i] * w[o, i]          (x[..., None, :] * w).sum(-1)

and compiled by inductor, is one fused loop that streams each weight row once, in fp32
accumulators (19.5 and 14.0 GB/s there; experiments/cpu_matvec/ measures it on your machine).
Written eagerly the same line would materialise a weight-sized temporary, so the rewrite is only
ever traced under torch.compile; an eager step keeps F.linear.

Applied from outside, like tensor parallelism (minisink/tools/tp.py): no model file changes. The
rewrite is a TorchFunctionMode around the decode step, which sees every `F.linear` the step calls
(nn.Linear's forward, a tied lm_head) and every `x @ w.T` (Falcon's FalconLinear), so all four
architectures get it, and a model whose Linear modules another module replaced (quantized weights
with their own kernels) is left to those kernels: only one row of input times a float weight
matrix, through F.linear or `@` against a weight's transpose, is rewritten.

    step = torch.compile(matvec_as_reduction(decode_one_token), fullgraph=True)   # minisink/generate.py

`Stream(compile=True)` does this on a CPU (`cpu_step`); a GPU's compiled step is unchanged (its
mat-vecs already run at its bandwidth, and CUDA graphs replay them).
"""
import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) with one row, weight (out, in) -> (..., out): F.linear as a product and a sum,
    accumulated in fp32 whatever the dtype (as oneDNN's bf16 mat-vec does)."""
    y = (x[..., None, :].float() * weight.float()).sum(-1).to(x.dtype)   # (..., out, in) -> (..., out)
    return y if bias is None else y + bias


def is_weight(w) -> bool:
    return isinstance(w, torch.Tensor) and w.dim() == 2 and w.layout == torch.strided and w.is_floating_point()


def one_row(x) -> bool:
    """A single row: a batch of rows is a matrix product, where gemm wins."""
    return isinstance(x, torch.Tensor) and x.dim() >= 1 and x.numel() == x.shape[-1]


class MatVecAsReduction(TorchFunctionMode):
    """Inside it, a single row times a weight matrix becomes `matvec`: `F.linear(x, w, b)`, and
    `x @ w.T` (Falcon's FalconLinear adds its bias after the product, as HF's does). Everything else
    runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and one_row(args[0]) and is_weight(args[1]):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return matvec(args[0], args[1], bias)
        if func in (torch.Tensor.__matmul__, torch.matmul) and len(args) == 2 and one_row(args[0]) and is_weight(args[1]):
            w = args[1].T                                  # (out, in)
            if w.is_contiguous():                          # x @ w.T of a weight w, not any matrix
                return matvec(args[0], w)
        return func(*args, **kwargs)


def matvec_as_reduction(step):
    """`step` (any function of a model's decode) with its one-row F.linear calls as reductions.
    Meant to be compiled: eagerly a reduction over a weight-sized product is slower than F.linear."""
    @functools.wraps(step)
    def fast(*args, **kwargs):
        with MatVecAsReduction():
            return step(*args, **kwargs)
    return fast


def cpu_step(step):
    """The step a compiled CPU stream runs: `step` with its mat-vecs as reductions. The one place
    that chooses the CPU mat-vec (docs/benchmarks.md, issue 23, has the measurements)."""
    return matvec_as_reduction(step)
