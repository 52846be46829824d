"""minisink/tools/fast.py: the CPU step's mat-vecs as reductions. The compiled step itself is checked
against eager in tests/test_dtypes.py and tests/test_cache.py (Stream(compile=True) uses it on a CPU)."""
import operator

import torch
import torch.nn.functional as F
from torch import nn

from minisink.tools.fast import MatVecAsReduction, matvec, matvec_as_reduction

def test_matvec_is_f_linear_of_one_row_in_fp32_and_bf16():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(48, 576, generator=g), torch.randn(48, generator=g), torch.randn(1, 1, 576, generator=g)
    assert (matvec(x, w, b) - F.linear(x, w, b)).abs().max() < 1e-4          # fp32: summation order only
    xb, wb = x.bfloat16(), w.bfloat16()
    want = F.linear(xb.float(), wb.float())                                    # the exact products, in fp32
    got = matvec(xb, wb)
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() <= want.abs().max() / 128  # one bf16 rounding
    square = torch.randn(576, 576, generator=g)
    plain = x @ square
    with torch.inference_mode(), MatVecAsReduction():
        assert (x @ w.T - F.linear(x, w)).abs().max() < 1e-4                  # Falcon's product, rewritten
        assert torch.equal(x @ square, plain)                                 # not a weight's transpose: as it is

def test_the_mode_rewrites_only_one_row_f_linear(monkeypatch):
    """One row through nn.Linear: rewritten. A chunk of rows (prefill), and a module that never
    calls F.linear (e.g. a quantized one with its own kernel): untouched."""
    import minisink.tools.fast as fast
    calls = []
    monkeypatch.setattr(fast, "matvec", lambda *a: calls.append("matvec") or matvec(*a))

    class Quantized(nn.Module):            # stands for a Linear another module swapped in
        def forward(self, x):
            calls.append("own kernel")
            return x[..., :4] * 2

    linear, quantized = nn.Linear(16, 8), Quantized()
    step = matvec_as_reduction(lambda x: linear(x))
    with torch.inference_mode():
        one = step(torch.randn(1, 1, 16))
        assert calls == ["matvec"] and one.shape == (1, 1, 8)
        calls.clear()
        assert step(torch.randn(1, 5, 16)).shape == (1, 5, 8) and calls == []
        with MatVecAsReduction():
            quantized(torch.randn(1, 1, 16))
        assert calls == ["own kernel"]


def test_the_traced_cpu_step_of_every_architecture_has_no_linear_left():
    """What Stream(compile=True) hands to inductor on a CPU: dynamo's graph of the step inside the mode
    has reductions where F.linear was (a backend that only records the graph: no C++ compile)."""
    import torch._dynamo
    from test_cache import ARCHS, tiny_model
    from minisink.generate import Stream, decode_one_token
    from minisink.tools.fast import cpu_step

    def linears(step, model):
        graphs = []
        def record(gm, example_inputs):
            graphs.append(gm)
            return gm.forward
        stream = Stream(model, "sink", 2, 6)
        stream.feed(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]]))         # the cache full
        torch._dynamo.reset()
        with torch.inference_mode():
            torch.compile(step, backend=record, fullgraph=True)(model, stream.cache, torch.tensor([3]))
        products = (F.linear, torch._C._nn.linear, torch.matmul, operator.matmul)   # Falcon: x @ w.T
        return sum(node.target in products for gm in graphs for node in gm.graph.nodes)

    for arch in ARCHS:
        model = tiny_model(arch)
        n = sum(isinstance(m, nn.Linear) for m in model.modules())
        assert linears(decode_one_token, model) == n, arch        # the plain step: one product per Linear
        assert linears(cpu_step(decode_one_token), model) == 0, arch
