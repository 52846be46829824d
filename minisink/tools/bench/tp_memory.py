"""What one tensor-parallel rank holds: its weights' bytes and its resident memory, for N = 1, 2, 3...

    python -m minisink bench tp_memory --model FOLDER --ranks 1,2,3
    python -m minisink bench tp_memory --random 1.3        # a random Llama of ~1.3 GB (fp32) in a temp dir

Each rank is measured in a fresh process that loads its shard exactly as it does under torchrun
(`load_model(folder, shard=TensorParallel(rank, N))`, minisink/tools/tp.py): loading needs no
collective, so no process group is started. Three numbers per rank, from /proc/self/status:

    parameters  bytes of the rank's parameters (a tied weight once)
    RSS         resident memory once loaded and every weight read once, minus before the load
                (torch imported, nothing loaded); split into anonymous memory (the rank's own
                copies) and file-mapped pages (safetensors maps the checkpoint; a weight read
                whole is used in place, from the page cache, which the ranks of a machine share)
    peak        the high-water mark of resident memory, minus the same baseline
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import cli


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def one_rank(folder: str, rank: int, world: int) -> dict:
    """Load rank `rank` of `world` in this process, read every weight once (as a decode step does:
    a weight that safetensors maps without copying is resident only once touched); what it costs."""
    import torch
    from minisink.tools.tp import TensorParallel
    from minisink.weights.load import load_model
    torch.set_num_threads(1)
    base = {k: status_kb(k) for k in ("VmRSS", "RssAnon", "RssFile")}
    model = load_model(folder, shard=TensorParallel(rank, world) if world > 1 else None)
    unique = {p.untyped_storage().data_ptr(): p for p in model.parameters()}   # a tied weight once
    for p in unique.values():
        p.sum()
    now = {k: status_kb(k) - base[k] for k in base}
    params = sum(p.numel() * p.element_size() for p in unique.values())
    return dict(rank=rank, world=world, params=params, rss=now["VmRSS"], anon=now["RssAnon"], file=now["RssFile"],
                peak=status_kb("VmHWM") - base["VmRSS"])


def measure(folder, worlds, ranks_of=lambda world: [0]) -> list[dict]:
    """One fresh process per (N, rank)."""
    rows = []
    for world in worlds:
        for rank in ranks_of(world):
            code = f"import json, sys; from minisink.tools.bench.tp_memory import one_rank; " \
                   f"print(json.dumps(one_rank({str(folder)!r}, {rank}, {world})))"
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  env={"OMP_NUM_THREADS": "1", **os.environ})
            if done.returncode != 0:
                raise SystemExit(f"rank {rank} of {world}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def random_llama(folder: Path, gigabytes: float, hidden: int = 1536) -> Path:
    """A random Llama (fp32) of about `gigabytes`, with a small vocabulary, so that almost all of it
    is layers that tensor parallelism splits (the embedding and norms are replicated). 12 heads,
    6 kv heads and 3 x hidden MLP columns: N = 1, 2, 3, 6 split it."""
    from safetensors.torch import save_file
    from minisink.weights.load import build_config
    ffn, heads = 3 * hidden, 12
    per_layer = (4 * hidden * hidden + 3 * hidden * ffn) * 4
    layers = max(1, round(gigabytes * 1e9 / per_layer))
    config = dict(model_type="llama", vocab_size=1024, hidden_size=hidden, intermediate_size=ffn,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2)
    folder.mkdir(parents=True, exist_ok=True)
    cls, parsed = build_config(config)
    model = cls(parsed)   # torch's random init: values do not matter here, bytes do
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["world"] == 1), None)
    mb = lambda n: f"{n / 1e6:,.0f}"
    lines = ["| N | rank | parameters MB | of N=1 | RSS MB | of N=1 | anonymous + file-mapped MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        of = lambda key: f"{r[key] / full[key]:.2f}" if full else ""
        lines.append(f"| {r['world']} | {r['rank']} | {mb(r['params'])} | {of('params')} | {mb(r['rss'])} | "
                     f"{of('rss')} | {mb(r['anon'])} + {mb(r['file'])} | {mb(r['peak'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m minisink bench tp_memory", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model folder (default: SmolLM2-135M-Instruct, minisink/weights/smollm2.py)")
    p.add_argument("--random", type=cli.float_between(0, 64, " (GB of fp32 weights written to a temporary folder)"), metavar="GB", help="measure a random Llama of about GB gigabytes instead")
    p.add_argument("--ranks", type=cli.int_list(cli.int_between(1, 64, " (processes on this machine)")), default=None, help="numbers of ranks N, e.g. 1,2,3 (default: the N <= 4 that split the model)")
    p.add_argument("--every-rank", action="store_true", help="measure every rank of each N, not rank 0 alone")
    args = p.parse_args(argv)
    ranks_of = (lambda world: range(world)) if args.every_rank else (lambda world: [0])
    with tempfile.TemporaryDirectory() as tmp:
        if args.random:
            folder = random_llama(Path(tmp) / "random-llama", args.random)
        else:
            from minisink.weights.smollm2 import smollm2_folder
            folder = Path(args.model) if args.model else smollm2_folder()
        from minisink.tools import tp
        from minisink.weights.load import build_config, read_config
        split = tp.sizes(build_config(read_config(folder))[1])
        worlds = args.ranks if args.ranks else [n for n in range(1, 5) if tp.divides(split, n)]
        print(f"{folder.name}: one fresh process per rank, fp32, N = {', '.join(map(str, worlds))}", file=sys.stderr)
        print(table(measure(folder, worlds, ranks_of)))
    return 0
