"""Tensor parallelism: one model over the N ranks of a torch.distributed process group.

    torchrun --nproc-per-node 2 run.py --model llama-2-70b --stream

Every rank holds 1/N of every layer and computes 1/N of its heads; the model files never learn of it.
The sharding is applied from outside, to the model built on the meta device, before any weight is read:

    query/key/value, gate/up     column-wise: rank r computes its own heads, its own MLP columns
    o_proj, down_proj (+ kin)    row-wise: each rank's partial sum, then one all-reduce (a hook)

    x ──┬─ rank 0: q,k,v of heads 0..h/N-1 ── attend ── o_proj[:, its columns] ──┐
        └─ rank 1: q,k,v of heads h/N..   ── attend ── o_proj[:, its columns] ──┴─ all-reduce (sum) ── + x

Attention needs nothing from the other ranks: a head reads only its own keys, so each rank's sink
cache holds only its heads' K and V (the cache sizes its buffers from the K it is given). With fewer
kv heads than ranks (GQA/MQA: Falcon-7B has 1 kv head for 71 query heads) a rank holds the one kv
head its query heads read, and several ranks hold copies of it. MPT's ALiBi slopes are the model's
slopes of the rank's heads (`MptAttention.alibi_heads`). Norms, embeddings and the output head are
replicated: every rank computes the same logits, and with the same seed samples the same token.

Each rank reads only its slices from the safetensors files (`safe_open(...).get_slice`): `shard(model)`
resizes the meta model and returns, per parameter, the `Reader` that cuts its slice, and
`load_model(folder, shard=...)` (minisink/weights/load.py) applies them. No rank ever holds a full
copy of a sharded weight. Costs and limits, on paper: docs/tensor-parallel.md.
"""
import contextlib
import datetime
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

TIMEOUT_ENV = "MINISINK_TP_TIMEOUT"   # seconds a rank waits for the others (joining, every all-reduce)
DEFAULT_TIMEOUT_S = 300
REFUSAL_GRACE_S = 3   # how long ranks > 0 wait before exiting on a refusal, so that rank 0 says it first


class TPError(Exception):
    """Tensor parallel cannot run as asked; the message (one line) says what would."""


# ------------------------------------------------------------------------------ which rank holds what

@dataclass(frozen=True)
class Sizes:
    """What is split: query heads, kv heads, MLP columns."""
    n_head: int
    n_kv_head: int
    ffn: int


def sizes(config) -> Sizes:
    """The split dimensions, from any of the four configs."""
    n_head = getattr(config, "num_attention_heads", None) or config.n_heads
    n_kv = (getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
            or getattr(config, "kv_n_heads", None) or n_head)
    ffn = getattr(config, "intermediate_size", None) or config.ffn_hidden_size
    return Sizes(n_head, n_kv, ffn)


def divides(s: Sizes, world: int) -> bool:
    """N ranks split the query heads and the MLP evenly, and the kv heads either evenly or by copies."""
    kv_ok = s.n_kv_head % world == 0 or world % s.n_kv_head == 0
    return s.n_head % world == 0 and s.ffn % world == 0 and kv_ok


def check_world(config, world: int, name: str = "this model") -> None:
    """Refuse, before any weight is read, a number of ranks that does not split the model."""
    s = sizes(config)
    if divides(s, world):
        return
    works = [n for n in range(1, s.n_head + 1) if divides(s, n)]
    hint = f"--nproc-per-node {', '.join(map(str, works[:-1]))} or {works[-1]}" if len(works) > 1 else "one rank"
    raise TPError(f"tensor parallel over {world} ranks: {name} has {s.n_head} query heads, {s.n_kv_head} kv heads "
                  f"and {s.ffn} MLP columns, which {world} ranks cannot split evenly; use {hint}")


def heads_of(rank: int, world: int, n_head: int, n_kv_head: int) -> tuple[range, range]:
    """(query heads, kv heads) of `rank`: a contiguous block of each. Query head h reads kv head
    h // g (g = n_head // n_kv_head); with fewer kv heads than ranks, N / n_kv ranks share one."""
    per = n_head // world
    q = range(rank * per, (rank + 1) * per)
    g = n_head // n_kv_head
    kv = range(q.start // g, (q.stop - 1) // g + 1)   # the kv heads those queries read
    return q, kv


# ------------------------------------------------------------------------------- reading one's slice

@dataclass
class Reader:
    """How one rank reads its part of a checkpoint tensor: `read(safetensors slice) -> tensor`.
    `shape` is the full tensor's, checked against the file before anything is read."""
    shape: tuple
    read: Callable


def rows(shape, ranges) -> Reader:
    """Rows [a, b) for each (a, b) of `ranges`, in order (dim 0: a weight's output features, a bias)."""
    return Reader(tuple(shape), lambda sl: torch.cat([sl[a:b] for a, b in ranges]))


def columns(shape, a: int, b: int) -> Reader:
    """Columns [a, b) (dim 1: a weight's input features)."""
    return Reader(tuple(shape), lambda sl: sl[:, a:b])


def zeros(shape) -> Reader:
    """A row-parallel bias, on every rank but 0: the all-reduce sums the ranks' outputs, and the
    bias must be added once."""
    return Reader(tuple(shape), lambda sl: torch.zeros(tuple(sl.get_shape())))


def resize(linear: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> None:
    """Give a Linear on the meta device the shape of its slice (no memory: meta)."""
    out_features = out_features or linear.out_features
    in_features = in_features or linear.in_features
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"), requires_grad=False)
    if linear.bias is not None and linear.bias.shape[0] != out_features:
        linear.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False)
    linear.out_features, linear.in_features = out_features, in_features


def merge(ranges):
    """[(0, 4), (4, 8), (10, 12)] -> [(0, 8), (10, 12)]: fewer, larger reads."""
    out = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


# ----------------------------------------------------------------------------------- the sharding

class TensorParallel:
    """`shard(model)` for `load_model`: cuts the meta model down to this rank's part, registers the
    all-reduces, and returns {parameter name: Reader} for the sharded tensors (the rest are read whole)."""

    def __init__(self, rank: int, world: int, group=None):
        self.rank, self.world, self.group = rank, world, group

    def __call__(self, model: nn.Module) -> dict[str, Reader]:
        check_world(model.config, self.world, type(model).__name__)
        self.readers = {}
        for name, module in model.named_modules():
            kind = type(module).__name__
            if kind.endswith("Attention"):
                self.attention(name, module)
            elif kind.endswith("MLP"):
                self.mlp(name, module)
        return self.readers

    # -- attention: heads

    def attention(self, name: str, m: nn.Module) -> None:
        hd, nh = m.head_dim, m.n_head
        nkv = getattr(m, "n_kv_head", nh)   # GPT-NeoX: one kv head per query head
        q, kv = heads_of(self.rank, self.world, nh, nkv)
        kind = type(m).__name__
        if kind == "LlamaAttention":
            self.column(f"{name}.q_proj", m.q_proj, [(q.start * hd, q.stop * hd)])
            for proj in ("k_proj", "v_proj"):
                self.column(f"{name}.{proj}", getattr(m, proj), [(kv.start * hd, kv.stop * hd)])
            out = "o_proj"
        elif kind == "GPTNeoXAttention":   # fused, head by head: [q0 k0 v0 | q1 k1 v1 | ...]
            self.column(f"{name}.query_key_value", m.query_key_value, [(q.start * 3 * hd, q.stop * 3 * hd)])
            out = "dense"
        elif kind == "FalconAttention":    # fused, kv group by kv group: [q_1 .. q_g, k, v | ...]
            g = nh // nkv
            ranges = []
            for j in kv:
                first, last = max(q.start, j * g), min(q.stop, (j + 1) * g)     # this rank's queries of group j
                base = j * (g + 2)
                ranges += [((base + first - j * g) * hd, (base + last - j * g) * hd),  # its query heads
                           ((base + g) * hd, (base + g + 2) * hd)]                  # the group's k and v
            self.column(f"{name}.query_key_value", m.query_key_value, merge(ranges))
            out = "dense"
        elif kind == "MptAttention":       # fused in three blocks: [ Q | K | V ]
            self.column(f"{name}.Wqkv", m.Wqkv, [(q.start * hd, q.stop * hd),
                                                 ((nh + kv.start) * hd, (nh + kv.stop) * hd),
                                                 ((nh + nkv + kv.start) * hd, (nh + nkv + kv.stop) * hd)])
            m.alibi_heads = slice(q.start, q.stop)   # the model's slopes of these heads
            out = "out_proj"
        else:
            raise TPError(f"{kind}: tensor parallel knows Llama, GPT-NeoX, Falcon and MPT attention only")
        m.n_head = len(q)
        if hasattr(m, "n_kv_head"):
            m.n_kv_head = len(kv)
        self.row(f"{name}.{out}", getattr(m, out), q.start * hd, q.stop * hd)

    # -- MLP: columns

    def mlp(self, name: str, m: nn.Module) -> None:
        linears = [(n, c) for n, c in m.named_children() if isinstance(c, nn.Linear)]
        *up, (down_name, down) = linears    # every model lists its MLP's output projection last
        width = down.in_features
        a, b = self.rank * width // self.world, (self.rank + 1) * width // self.world
        for n, c in up:
            self.column(f"{name}.{n}", c, [(a, b)])
        self.row(f"{name}.{down_name}", down, a, b)

    # -- the two kinds of split

    def column(self, name: str, linear: nn.Linear, ranges) -> None:
        """Output features `ranges` of `linear` only; its input is whole, its output this rank's part."""
        self.readers[f"{name}.weight"] = rows(linear.weight.shape, ranges)
        if linear.bias is not None:
            self.readers[f"{name}.bias"] = rows(linear.bias.shape, ranges)
        resize(linear, out_features=sum(b - a for a, b in ranges))

    def row(self, name: str, linear: nn.Linear, a: int, b: int) -> None:
        """Input features [a, b) of `linear`: a partial sum, completed by an all-reduce."""
        self.readers[f"{name}.weight"] = columns(linear.weight.shape, a, b)
        if linear.bias is not None and self.rank != 0:
            self.readers[f"{name}.bias"] = zeros(linear.bias.shape)
        resize(linear, in_features=b - a)
        linear.register_forward_hook(self.all_reduce)

    def all_reduce(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        try:
            dist.all_reduce(output, group=self.group)   # the partial sums of every rank, in place
        except RuntimeError as e:   # a peer exited or stalled past the timeout (DistError is a RuntimeError)
            raise TPError(f"rank {self.rank} of {self.world}: an all-reduce failed: another rank has stopped "
                          f"or stalled past {TIMEOUT_ENV} ({first_line(e)})") from None
        return output


# ------------------------------------------------------------------------------- the process group

@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch (its environment variables)."""
    rank: int
    world: int
    local_rank: int


def launched() -> Launch | None:
    """The torchrun launch this process is part of, or None when it runs on its own. torchrun sets
    WORLD_SIZE even for --nproc-per-node 1: that is tensor parallel over one rank, the NCCL path included."""
    if "WORLD_SIZE" not in os.environ:
        return None
    env = lambda key, default=None: int(os.environ.get(key, default))
    return Launch(env("RANK", 0), env("WORLD_SIZE"), env("LOCAL_RANK", 0))


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0:
        raise TPError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds > 0")
    return value


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes; a one-line refusal when torch lacks it."""
    if not dist.is_available():
        raise TPError(f"this PyTorch ({torch.__version__}) was built without torch.distributed: "
                      "tensor parallel cannot run; run without torchrun")
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise TPError(f"this PyTorch ({torch.__version__}) has no NCCL backend for CUDA tensor parallel; "
                          "use --device cpu (gloo) or a CUDA build of torch with NCCL")
        return "nccl"
    if not dist.is_gloo_available():
        raise TPError(f"this PyTorch ({torch.__version__}) has no gloo backend for CPU tensor parallel")
    return "gloo"


def join(launch: Launch, device: torch.device, init_method: str = "env://") -> TensorParallel:
    """Join the process group (waiting at most MINISINK_TP_TIMEOUT s for the other ranks) and return
    this rank's `shard` for load_model. A rank that never arrives is one line, not a hang."""
    backend, seconds = backend_for(device), timeout_s()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, init_method=init_method, rank=launch.rank, world_size=launch.world,
                                timeout=datetime.timedelta(seconds=seconds),
                                **({"device_id": device} if backend == "nccl" else {}))
        dist.barrier()   # every rank is there: from here on a collective means all of them
    except (RuntimeError, TimeoutError, ValueError) as e:   # DistError subclasses RuntimeError
        raise TPError(f"rank {launch.rank} of {launch.world}: the other ranks did not all join within {seconds:g} s "
                      f"({TIMEOUT_ENV}); a rank failed to start? ({backend}: {first_line(e)})") from None
    return TensorParallel(launch.rank, launch.world)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shared_seed(seed: int | None, device: torch.device) -> int:
    """One seed for every rank: rank 0's (the given one, or a random one), broadcast.

    Why a seed and not a broadcast of every sampled token: every rank already holds the same logits,
    bit for bit (an all-reduce hands every rank the same sum; norms, embeddings and the output head
    are replicated and run the same kernels on the same inputs; tests/test_tp.py checks the equality),
    so the same generator state draws the same token on every rank without a collective per token.
    A broadcast would cost one more latency term per token; on a mix of GPU models, whose kernels may
    round differently, it would be the safe choice."""
    pick = seed if seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
    t = torch.tensor([pick], dtype=torch.long, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


# ------------------------------------------------------------------ run.py and eval under torchrun

_own_stderr = None   # a rank > 0's own stderr, kept aside for a failure that only it can report


def quiet_unless_rank0(launch: Launch | None) -> None:
    """Rank 0 speaks for all: the others' stdout and stderr go nowhere (they would print the same),
    down to the file descriptors, where c10d's C++ logs write. A rank that fails alone leaves the
    others waiting at an all-reduce until the timeout, which rank 0 then reports."""
    global _own_stderr
    if launch is None or launch.rank == 0 or _own_stderr is not None:
        return
    sys.stdout.flush(), sys.stderr.flush()
    _own_stderr = os.fdopen(os.dup(2), "w")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1), os.dup2(null, 2)
    os.close(null)
    sys.stdout = sys.stderr = open(os.devnull, "w")


def speak_after_all() -> None:
    """This rank, rank 0 or not, has something to say that only it knows."""
    if _own_stderr is not None:
        sys.stderr = _own_stderr


def speaks() -> bool:
    """Whether this process prints and writes files: it runs alone, or it is rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank_device(launch: Launch, device: torch.device) -> torch.device:
    """CUDA: one GPU per rank, the one of its LOCAL_RANK (NCCL does not share a GPU between ranks)."""
    if device.type == "cpu":
        return device
    if device.index is not None:   # one rank (start refuses an index for more)
        return device
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise TPError(f"rank {launch.rank} is local rank {launch.local_rank} but this machine has {count} CUDA "
                      f"GPU(s), one per rank: use --nproc-per-node {count} or fewer per machine")
    return torch.device("cuda", launch.local_rank)


def memory_share(launch: Launch | None, device: torch.device) -> float:
    """The part of the model (weights and cache) that this process's device must hold: 1/N of it
    on a GPU of its own; on CPU the ranks of one machine share its memory, LOCAL_WORLD_SIZE/N."""
    if launch is None:
        return 1.0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    return min(1.0, local / launch.world)


def check_launch(config, name: str) -> Launch | None:
    """Steps 1 and 2 of `start`, for a model's config alone (run.py: before its weights download)."""
    launch = launched()
    if launch is not None:
        quiet_unless_rank0(launch)
        with said_by_rank0(launch):
            check_world(config, launch.world, name)
    return launch


@contextlib.contextmanager
def said_by_rank0(launch: Launch):
    """A refusal that every rank meets alike is rank 0's to say. The others wait a moment before they
    exit: torchrun stops every rank when the first one fails, and that one should be rank 0."""
    try:
        yield
    except TPError:
        if launch.rank != 0:
            time.sleep(REFUSAL_GRACE_S)
        raise


def start(config, device: torch.device, name: str) -> tuple[TensorParallel | None, torch.device]:
    """(this rank's `shard` for load_model, its device), or (None, device) when torchrun did not start
    this process. Nothing here reads a weight. In this order, so that a refusal costs nothing:

      1. rank 0 speaks for all: the other ranks' stdout and stderr go nowhere (they would repeat it);
      2. N must split the model's heads: else one line that names the N that would;
      3. the backend (NCCL on CUDA, a GPU per rank; gloo on CPU), else one line;
      4. join the process group, waiting at most MINISINK_TP_TIMEOUT s for the other ranks: a rank
         that never comes is one line from every rank that waited for it, not a hang.
    """
    launch = check_launch(config, name)
    if launch is None:
        return None, device
    with said_by_rank0(launch):
        if device.type not in ("cpu", "cuda"):
            raise TPError(f"tensor parallel runs on cuda (NCCL) or cpu (gloo), not {device.type}: pass --device cpu")
        if device.type == "cuda" and device.index is not None and launch.world > 1:
            raise TPError(f"--device {device} under torchrun with {launch.world} ranks: each rank takes the GPU "
                          "of its LOCAL_RANK; pass --device cuda (or auto)")
        backend_for(device)
        timeout_s()
    try:
        device = rank_device(launch, device)
        return join(launch, device), device
    except TPError:
        speak_after_all()   # only this rank knows: its GPU is missing, or it waited in vain
        raise
