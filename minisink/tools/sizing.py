"""How large a cache to build for a model: the default window, and whether it fits in memory.

run.py and `python -m minisink eval` both ask here, so one model gets the same cache from both.

    window, notes = choose_window(config_dict, sink_size=4, window_size=None)   # W, lines to print
    check_fits(model_cls, config, sink_size + window, dtype, device)            # before loading weights

The default is the trained context minus the S sinks, with S+W capped at 4096 slots: a model
trained on 128K tokens would otherwise get a 17 GB cache (Llama-3.1-8B in bf16) before it has read
a word, and StreamingLLM's point is that a few thousand slots stream as well as the full context.
"""
import torch

from ..cache import SinkCache

CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length", "max_sequence_length")
DEFAULT_CONTEXT = 2048    # when config.json names no context length (Falcon's configs do not)
MAX_DEFAULT_SLOTS = 4096  # S+W of the default cache, whatever the context


class CacheSizeError(ValueError):
    """A cache the model cannot use, or that would not fit in memory; the message says what to pass."""


def trained_context(config: dict) -> int | None:
    """The model's trained context, as config.json names it (Llama/NeoX/Falcon, MPT, GPT-2, ...)."""
    return next((config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int)), None)


def choose_window(config: dict, sink_size: int, window_size: int | None,
                  sliding_window: int | None = None) -> tuple[int, list[str]]:
    """(W, notes to print) for S = sink_size sinks and the asked window (None: the default).

    `sliding_window` (Mistral's, from the parsed config): the model never attends further back, so
    a cache wider than it would hold tokens no query sees. The default is clamped to it; a window
    asked for explicitly is refused.
    """
    context = trained_context(config)
    known = context or DEFAULT_CONTEXT
    notes = []
    if window_size is None:
        slots = min(known, MAX_DEFAULT_SLOTS, sliding_window or known)
        window_size = slots - sink_size
        why = (f"the trained context {context}" if context else f"{DEFAULT_CONTEXT} (config.json names no context)")
        if slots < known:
            why += f", capped at {slots} slots" + (" (the model's sliding window)" if slots == sliding_window else "")
        if window_size < 1:
            raise CacheSizeError(f"--sink-size {sink_size} leaves no room for a window in a cache of {slots} slots")
        if slots < known or not context:  # the plain case (the whole trained context) needs no word
            notes.append(f"cache: {sink_size} sinks + a window of {window_size} = {why}; --window-size W to change")
    elif sliding_window is not None and sink_size + window_size > sliding_window:
        raise CacheSizeError(f"a cache of {sink_size}+{window_size} slots is wider than the model's sliding window "
                             f"of {sliding_window} tokens, which it never attends past: use --window-size "
                             f"{sliding_window - sink_size} or less")
    if context and sink_size + window_size > context:
        notes.append(f"warning: S+W = {sink_size + window_size} exceeds the trained context of {context}: "
                     "positions past it were never trained, so expect the text to degrade")
    return window_size, notes


def step_read_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step must read: every parameter once (a tied one once, as
    parameters() lists it), except an input embedding that is not also the output head, of which a
    step reads one row. Not the parameter count: Llama-134M's untied embedding is 18% of its bytes.
    Quantized weights (minisink/quantize.py) are buffers, integers and scales: all of them are read."""
    heads = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    lookup = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - heads
    params = sum((p[0] if id(p) in lookup else p).numel() * p.element_size() for p in model.parameters())
    return params + sum(b.numel() * b.element_size() for b in model.buffers())


def cache_bytes(model_cls, config, capacity: int, dtype: torch.dtype, batch_size: int = 1) -> int:
    """Bytes of the K and V buffers that a SinkCache of `capacity` slots allocates for this model.

    Measured, not computed per architecture: one token goes through the model on the meta device
    (shapes only, no memory, no arithmetic), and the cache allocates its buffers there."""
    from ..weights.load import on_meta  # late: load imports this module's neighbours
    model = on_meta(model_cls, config).to(dtype)
    cache = SinkCache(0, capacity, device="meta", dtype=dtype)
    with torch.no_grad():
        model(torch.zeros(batch_size, 1, dtype=torch.long, device="meta"), cache)
    return sum(t.numel() * t.element_size() for t in cache.k + cache.v)


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: the GPU's free memory, or the OS's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:  # Linux
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # elsewhere we cannot tell: do not refuse
        return None


def check_fits(model_cls, config, capacity: int, dtype: torch.dtype, device: torch.device, share: float = 1.0) -> None:
    """Refuse, before any weight is loaded, a model + cache larger than the memory left on `device`.
    `share`: the part of both that `device` holds (tensor parallel: minisink/tools/tp.py memory_share)."""
    free = free_memory(torch.device(device))
    if free is None:
        return
    from ..weights.load import on_meta
    model = on_meta(model_cls, config)
    weights = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    # Each slot holds a key and a value per layer, neither wider than the model (GQA and MQA are
    # narrower): a bound without a forward pass. Only when it does not fit is the cache measured
    # exactly, by a pass on the meta device, which imports torch._dynamo (seconds on a busy CPU).
    width = max(m.embedding_dim for m in model.modules() if isinstance(m, torch.nn.Embedding))
    layers = max(len(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    cache = 2 * capacity * width * layers * dtype.itemsize
    weights, cache = weights * share, cache * share
    if weights + cache > free:
        try:
            cache = cache_bytes(model_cls, config, capacity, dtype) * share
        except Exception:  # a capacity beyond what a tensor can hold: torch raises one of several kinds
            pass  # the bound already says it does not fit
    if weights + cache > free:
        gb = lambda n: f"{n / 1e9:,.2f} GB"
        raise CacheSizeError(f"a cache of {capacity:,} slots needs {gb(cache)} and the weights {gb(weights)} in "
                             f"{str(dtype).removeprefix('torch.')}" + (f" (this rank's part: {share:.2g} of the model's)" if share < 1 else "") +
                             f", but only {gb(free)} of {device.type} memory is free: pass a smaller --window-size "
                             "(or a smaller --dtype" + (", or more ranks)" if share < 1 else ")"))


# ------------------------------------------------------------------ how many GPUs (tensor parallel)

GPU_HEADROOM = 0.10   # of each GPU's memory, kept for the CUDA context, activations and the allocator


def rank_bytes(model_cls, config, cache: int, dtype: torch.dtype, world: int) -> tuple[int, int]:
    """(weights, cache) bytes that one of `world` tensor-parallel ranks holds, given the whole
    `cache`'s bytes (cache_bytes): its shard of the model, cut on the meta device as
    minisink/tools/tp.py cuts it for loading (no memory), and its kv heads' part of the cache (with
    fewer kv heads than ranks, a copy of one)."""
    from ..weights.load import on_meta
    from . import tp
    model = on_meta(model_cls, config)
    if world > 1:
        tp.TensorParallel(0, world)(model)
    unique = {id(p): p for p in model.parameters()}.values()   # a tied head once
    weights = sum(p.numel() for p in unique) * dtype.itemsize
    s = tp.sizes(config)
    kv = len(tp.heads_of(0, world, s.n_head, s.n_kv_head)[1])
    return weights, cache * kv // s.n_kv_head


def gpus_needed(model_cls, config, cache: int, dtype: torch.dtype, gpu_bytes: float,
                headroom: float = GPU_HEADROOM) -> tuple[int | None, list[int]]:
    """(the fewest tensor-parallel ranks, one GPU of `gpu_bytes` each, whose weights + cache (`cache`
    bytes for the whole model) fit in (1 - headroom) of it, or None past 64; the numbers of ranks
    that split the model's heads)."""
    from . import tp
    s = tp.sizes(config)
    splits = [n for n in range(1, s.n_head + 1) if tp.divides(s, n)]
    for n in (n for n in splits if n <= 64):
        if sum(rank_bytes(model_cls, config, cache, dtype, n)) <= (1 - headroom) * gpu_bytes:
            return n, splits
    return None, splits


def main(argv=None) -> int:
    """python -m minisink size FOLDER|config.json ... [--gpu-gb 80] [--dtype bf16] [--slots 4096]"""
    import argparse
    import json
    from pathlib import Path
    from . import cli
    from ..weights.load import DTYPES, build_config, read_config

    p = cli.Parser(prog="python -m minisink size",
                   description="How many GPUs each model needs under tensor parallel: weights + a sink cache + headroom")
    p.add_argument("models", nargs="+", metavar="FOLDER|config.json", help="model folders, or their config.json files")
    p.add_argument("--gpu-gb", type=cli.float_between(0, 1e6, " (GB of one GPU)"), default=80, help="memory of one GPU, GB (default 80)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="weights and cache (default bf16)")
    p.add_argument("--slots", type=cli.int_between(1, 2**31, " (cache slots)"), default=MAX_DEFAULT_SLOTS,
                   help=f"cache slots S+W (default {MAX_DEFAULT_SLOTS}, run.py's largest default)")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]

    def run(_):
        print(f"| model | weights GB | cache GB ({args.slots:,} slots) | {args.gpu_gb:g} GB GPUs ({args.dtype}, "
              f"{GPU_HEADROOM:.0%} kept free) | per GPU GB | ranks that split the heads |")
        print("|---|---|---|---|---|---|")
        for name in args.models:
            path = Path(name)
            config = json.loads(cli.read_text(path)) if path.is_file() else read_config(path)
            cls, parsed = build_config(config, where=name)
            cache = cache_bytes(cls, parsed, args.slots, dtype)
            n, splits = gpus_needed(cls, parsed, cache, dtype, args.gpu_gb * 1e9)
            weights, _ = rank_bytes(cls, parsed, cache, dtype, 1)
            label = path.parent.name if path.is_file() else path.name
            per = f"{sum(rank_bytes(cls, parsed, cache, dtype, n)) / 1e9:,.1f}" if n else "-"
            print(f"| {label} | {weights / 1e9:,.1f} | {cache / 1e9:,.2f} | {n or 'none of 64 or fewer'} | {per} | "
                  f"{', '.join(map(str, splits))} |")
        return 0
    return cli.main("python -m minisink size", run, argv)
