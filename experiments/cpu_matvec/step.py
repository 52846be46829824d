"""Issue 23: SmolLM2-135M decode step (Stream S=4 W=252, cache full): eager, compiled, compiled with
the mat-vecs as reductions (a TorchFunctionMode around the step). Usage: step.py threads dtype"""
import sys, time
from statistics import median
import torch, torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from minisink.generate import Stream, decode_one_token
from minisink.weights.load import load_model
from minisink.weights.smollm2 import smollm2_folder

threads = int(sys.argv[1]); dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2]]
which = sys.argv[3].split(",") if len(sys.argv) > 3 else ["eager", "compiled", "reduce"]
torch.set_num_threads(threads)
model = load_model(smollm2_folder(), dtype=dtype, device="cpu")

class MatVec(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].numel() == args[0].shape[-1]:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            y = (x[..., None, :].float() * w.float()).sum(-1).to(x.dtype)
            return y if b is None else y + b
        return func(*args, **kwargs)

def reduce_step(model, cache, token):
    with MatVec():
        return decode_one_token(model, cache, token)

ids = torch.randint(0, 49152, (1, 400), generator=torch.Generator().manual_seed(0))
streams, compile_s = {}, {}
for name in which:
    torch._dynamo.reset()
    s = Stream(model, "sink", 4, 252, compile=name != "eager")
    if name == "reduce":
        import torch._dynamo
        for buf in s.cache.tensors():
            torch._dynamo.mark_static_address(buf)
        s.step = torch.compile(reduce_step, fullgraph=True)
    s.feed(ids[:, :300])
    t = time.perf_counter(); s.feed(ids[:, 300:301]); compile_s[name] = time.perf_counter() - t
    streams[name] = s
    print(name, f"first step {compile_s[name]:.1f} s", flush=True)
# parity of logits between variants on the same next token
outs = {k: s.feed(ids[:, 301:302]).float() for k, s in streams.items()}
base = outs[which[0]]
for k, o in outs.items():
    print(f"  {k}: max |logit - {which[0]}| {(o - base).abs().max():.2e}, argmax same {bool((o.argmax(-1) == base.argmax(-1)).all())}")
times = {k: [] for k in streams}
src = iter(torch.randint(0, 49152, (10000,)).tolist())
for r in range(5):
    for k, s in streams.items():
        for _ in range(5):
            tok = torch.tensor([[next(src)]])
            t = time.perf_counter(); s.feed(tok); times[k].append(time.perf_counter() - t)
print(f"{threads} thread(s) {dtype}")
for k, v in times.items():
    print(f"  {k:<10} {median(v) * 1e3:7.1f} ms/token  {1 / median(v):6.1f} tok/s")
