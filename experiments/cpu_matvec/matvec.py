"""Issue 23, step 1: which mat-vec formulation reads SmolLM2-135M's weights fastest on this CPU.

All 210 block matrices + the tied lm_head (49152 x 576) times one vector, per formulation, per
dtype, interleaved A B C A B C, medians. Usage: python experiments/cpu_matvec/matvec.py [threads] [dtype]
"""
import sys, time
from statistics import median
import torch
import torch.nn.functional as F

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2] if len(sys.argv) > 2 else "fp32"]
only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
torch.set_num_threads(threads)
H, I, L, V, Q, KV = 576, 1536, 30, 49152, 576, 192
shapes = [(Q, H), (KV, H), (KV, H), (H, Q), (I, H), (I, H), (H, I)] * L + [(V, H)]
g = torch.Generator().manual_seed(0)
ws = [torch.randn(s, generator=g).to(dtype) for s in shapes]
xs = {k: torch.randn(1, k, generator=g).to(dtype) for k in (H, I)}
nbytes = sum(w.numel() * w.element_size() for w in ws)

def linear():
    for w in ws:
        F.linear(xs[w.shape[1]], w)

wts = [w.t().contiguous() for w in ws]
def mm_t():
    for wt in wts:
        torch.mm(xs[wt.shape[0]], wt)

variants = {"F.linear": linear, "mm(x, w.T contig)": mm_t}

try:
    mk = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
    def mkldnn():
        for w, p in zip(ws, mk):
            torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
    mkldnn(); variants["mkldnn packed"] = mkldnn
except Exception as e:
    print("mkldnn packed:", type(e).__name__, str(e)[:100])
if dtype == torch.float32:
    try:
        pk = [torch.ops.mkl._mkl_reorder_linear_weight(w, 1) for w in ws]
        def mkl():
            for w, p in zip(ws, pk):
                torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, None, 1)
        mkl(); variants["mkl packed"] = mkl
    except Exception as e:
        print("mkl packed:", type(e).__name__, str(e)[:100])

def reductions(ws, xs_list):
    return [(w * x).sum(-1) if w.dtype == torch.float32 else (w.float() * x.float()).sum(-1).to(w.dtype)
            for w, x in zip(ws, xs_list)]
xl = [xs[w.shape[1]] for w in ws]
t0 = time.perf_counter()
red = torch.compile(reductions, fullgraph=True)
red(ws, xl)
print(f"compile reductions {time.perf_counter() - t0:.0f} s")
variants["compiled (w*x).sum(-1)"] = lambda: red(ws, xl)

def lin_all(ws, xs_list):
    return [F.linear(x, w) for w, x in zip(ws, xl)]
linc = torch.compile(lin_all, fullgraph=True)
linc(ws, xl)
variants["compiled F.linear"] = lambda: linc(ws, xl)

if only:
    variants = {k: v for k, v in variants.items() if any(o in k for o in only)}
# check all give the same
ref = [F.linear(xs[w.shape[1]], w).float() for w in ws[:8] + ws[-1:]]
times = {k: [] for k in variants}
for r in range(5):
    for k, f in variants.items():
        f()
        for _ in range(4):
            t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
print(f"{threads} thread(s), {dtype}, {len(ws)} matrices, {nbytes / 1e6:.0f} MB")
for k, v in times.items():
    m = median(v)
    print(f"  {k:<26} {m * 1e3:7.1f} ms  {nbytes / m / 1e9:5.1f} GB/s")
