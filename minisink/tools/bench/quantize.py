"""The mat-vecs of one SmolLM2-135M decode step, per weight format and kernel (minisink/quantize.py).

    python -m minisink bench quantize [--threads 1 2] [--rounds 5]

One step multiplies a vector by 211 matrices: 30 layers of q, k, v, o (576 and 192 rows of 576),
gate, up (1536 x 576), down (576 x 1536), and the 49152 x 576 output head. Random weights of those
shapes (the values do not change the time). Formats run interleaved A B C ... A B C ..., and each
reports its median ms per step, and the GB/s of weight bytes that implies.
"""
import statistics
import time

import torch
import torch.nn.functional as F

from ...quantize import Int4Linear, Int8Linear
from .. import cli

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30 + [(49152, 576)]


def nbytes(module_or_tensor) -> int:
    if isinstance(module_or_tensor, torch.Tensor):
        return module_or_tensor.numel() * module_or_tensor.element_size()
    return sum(b.numel() * b.element_size() for b in module_or_tensor.buffers())


def inputs(dtype):
    """One input vector per matrix, (1, in_features)."""
    return [torch.randn(1, i, dtype=dtype) for _, i in SHAPES]


def formats(weights):
    """{name: (step function of the inputs, activations dtype, bytes read)}."""
    out = {}
    for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        ws = [w.to(dt) for w in weights]
        out[f"{tag} F.linear"] = (lambda xs, ws=ws: [F.linear(x, w) for x, w in zip(xs, ws)], dt, sum(map(nbytes, ws)))
        i8 = [Int8Linear.from_float(w, dtype=dt) for w in weights]
        out[f"int8 _weight_int8pack_mm, {tag} act"] = (lambda xs, ms=i8: [m(x) for x, m in zip(xs, ms)], dt, sum(map(nbytes, i8)))
        i4 = [Int4Linear.from_float(w, dtype=dt) for w in weights]
        out[f"int4 _weight_int4pack_mm_for_cpu g32, {tag} act"] = (lambda xs, ms=i4: [m(x) for x, m in zip(xs, ms)], dt,
                                                                  sum(map(nbytes, i4)))
        # the alternative to a fused kernel: dequantize the weights, then a dense product
        out[f"int8 dequantize-then-F.linear, {tag} act"] = (lambda xs, ms=i8: [F.linear(x, m.weight) for x, m in zip(xs, ms)], dt,
                                                           sum(map(nbytes, i8)))
    return out


def main(argv=None):
    p = cli.Parser(prog="python -m minisink bench quantize", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=cli.threads, nargs="+", default=[1, 2], help=f"torch CPU thread counts; {cli.THREADS_HELP}")
    p.add_argument("--rounds", type=cli.bench_steps(1), default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=cli.bench_steps(1), default=3, help="steps per format per round (default 3)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * 0.02 for o, i in SHAPES]
    fmts = formats(weights)
    print(f"torch {torch.__version__}; one step = {len(SHAPES)} mat-vecs, SmolLM2-135M shapes; "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps")
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = {name: [] for name in fmts}
        with torch.inference_mode():
            for name, (step, dt, _) in fmts.items():  # warm up
                step(inputs(dt))
            for _ in range(args.rounds):
                for name, (step, dt, _) in fmts.items():
                    xs = inputs(dt)
                    for _ in range(args.steps):
                        t = time.perf_counter()
                        step(xs)
                        times[name].append(time.perf_counter() - t)
        print(f"\n{threads} thread(s)    ms/step   GB/s   MB read/step")
        for name, (_, _, read) in fmts.items():
            ms = statistics.median(times[name]) * 1e3
            print(f"  {name:<48} {ms:7.2f} {read / ms / 1e6:6.1f} {read / 1e6:8.1f}")
