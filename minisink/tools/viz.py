"""What the tutorials share: attention maps from the model's own code, sink mass, reference curves.

Tutorials import this module instead of copying code between them. Nothing here changes how a model
runs: attention maps come from `minisink.attention.attention_probs`, `attend` written out,
called with the queries and the keys the cache stored in the forward pass; perplexities come from `minisink.tools.eval`.

- `attention_maps(model, ids)`: (layers, B, heads, T, T) probabilities of a causal forward.
- `mass_on_first(P, k, skip)` and `uniform_mass(T, k, skip)`: how much attention late queries put on
  the first k tokens, and what spreading it evenly would give (k / (t + 1) for the query at t).
- `policy_nll(...)`: `minisink.tools.eval.policy_nll`, remembered for the process, so that tutorials run one
  after another (tutorials/run.py, tests/test_tutorials.py) share one computation instead of
  repeating it; `recompute_nll_at` scores only chosen tokens, with only the last position's logits.
- `reference_curves()`: per-token NLL of five 7B models (dense, window, sinks) measured on a GPU by the
  attention_sinks package (../shared/assets/reference/attention_sinks), for plotting beside ours.
- `draw_schemes(axes, ...)`: the paper's Figure 1, drawn from the cache objects themselves.

matplotlib is imported inside the functions that draw, so the library does not need it.
"""
import csv
import hashlib
from pathlib import Path

import torch

from . import eval as ev
from ..attention import attention_probs
from ..cache import DenseCache, SinkCache

# the offline assets beside the checkout (../shared/assets), as the tests and tutorials find them
REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "assets" / "reference" / "attention_sinks"
REFERENCE_MODELS = {"llama_2_7b": "Llama-2-7B", "mpt_7b": "MPT-7B", "falcon_7b": "Falcon-7B",
                    "pythia_6.9b": "Pythia-6.9B", "mistral_7b": "Mistral-7B"}
REFERENCE_FILES = {"dense": "transformers.csv", "window": "windowed.csv", "sink": "attention_sinks.csv"}


@torch.no_grad()
def attention_maps(model, ids: torch.Tensor) -> torch.Tensor:
    """(layers, B, heads, T, T) attention probabilities of a causal forward over ids (B, T).

    For Llama-architecture models (model.model.layers[i].self_attn with q_proj, k_proj, rotary). A
    forward pre-hook records what each attention module is called with (the normalised hidden states,
    the cache and its Plan); the module's own query projection, the keys the cache stored and
    `attention_probs` then give the probabilities, rotated and masked exactly as in the forward pass.
    """
    seen = {}   # layer index -> (x, cache, plan)
    record = lambda module, args: seen.__setitem__(module.layer_idx, args)
    hooks = [layer.self_attn.register_forward_pre_hook(record) for layer in model.model.layers]
    try:
        model(ids)                                  # no cache given: a DenseCache of len(ids)
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for layer in model.model.layers:
        attn = layer.self_attn
        x, cache, plan = seen[attn.layer_idx]
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)      # (B, nh, T, hd)
        k = cache.k[attn.layer_idx][:, :, :T]      # (B, nkv, T, hd) as the cache stored them: rotated
        maps.append(attention_probs(q, k, plan, attn.head_dim ** -0.5))
        seen.pop(attn.layer_idx)                    # free each layer's activations once used
    return torch.stack(maps)


def mass_on_first(P: torch.Tensor, k: int = 1, skip: int = 0) -> torch.Tensor:
    """P (..., T, T) -> (...) the mean, over queries t >= skip, of the attention on keys 0 .. k-1."""
    return P[..., skip:, :k].sum(-1).mean(-1)


def uniform_mass(T: int, k: int = 1, skip: int = 0) -> float:
    """What `mass_on_first` would give if every query spread its attention evenly: the query at t
    sees t + 1 keys, so k of them get k / (t + 1) (all of it while t < k)."""
    return sum(min(1.0, k / (t + 1)) for t in range(skip, T)) / (T - skip)


# --- perplexities, computed once per process ---------------------------------------------------

_memo: dict = {}


def _key(model, ids: torch.Tensor, *rest) -> tuple:
    return (id(model), hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest(), *rest)


def policy_nll(model, ids: torch.Tensor, policy: str, sink_size: int, window_size: int) -> torch.Tensor:
    """`minisink.tools.eval.policy_nll` (N,), remembered: the same call again returns the same tensor."""
    key = _key(model, ids, policy, sink_size, window_size)
    if key not in _memo:
        _memo[key] = ev.policy_nll(model, ids, policy, sink_size, window_size)
    return _memo[key]


def recompute_nll_at(model, ids: torch.Tensor, cache_size: int, targets: torch.Tensor,
                     batch_size: int = 8) -> torch.Tensor:
    """`minisink.tools.eval.window_nll` (len(targets),), remembered: NLL of ids[t] for each t in
    targets from a fresh forward over the C tokens before it. Needs t >= C. Recompute costs C
    token-forwards per scored token, so a tutorial scores a sample of the tokens."""
    key = _key(model, ids, "recompute_at", cache_size, tuple(targets.tolist()))
    if key not in _memo:
        _memo[key] = ev.window_nll(model, ids, cache_size, targets, batch_size)
    return _memo[key]


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32 on the CPU, loaded once per process."""
    if "smollm2" not in _memo:
        from ..weights.load import load_model
        from ..weights.smollm2 import smollm2_folder
        from ..text.tokenizer import load_tokenizer
        folder = smollm2_folder()
        _memo["smollm2"] = load_model(folder), load_tokenizer(folder)
    return _memo["smollm2"]


# --- the reference measurements of real 7B models ----------------------------------------------

def reference_curves(folder: Path = REFERENCE) -> dict:
    """{model name: {policy: (input_length (n,), nll (n,))}} from the attention_sinks benchmark CSVs.

    Measured on a GPU by the attention_sinks package (tomaarsen/attention_sinks), token by token on
    the first book of the PG19 test set; window = the last 1024 tokens, sink = 4 + 1020 (its README).
    """
    curves = {}
    for sub, name in REFERENCE_MODELS.items():
        curves[name] = {}
        for policy, file in REFERENCE_FILES.items():
            rows = list(csv.DictReader((Path(folder) / sub / file).read_text().splitlines()))
            curves[name][policy] = (torch.tensor([int(r["input_length"]) for r in rows]),
                                    torch.tensor([float(r["nll"]) for r in rows]))
    return curves


def moving_average(x: torch.Tensor, width: int) -> torch.Tensor:
    """(n - width + 1,) mean of each run of `width` consecutive values (NaNs not allowed)."""
    return x.double().unfold(0, width, 1).mean(-1).float()


POLICY_STYLE = {"dense": dict(color="tab:blue"), "window": dict(color="tab:orange", lw=2),
                "sink": dict(color="tab:green"), "recompute": dict(color="black", ls="--", lw=1)}


def plot_reference(ax, curves: dict, width: int = 256, ylim=(1.0, 9.0)) -> None:
    """Moving-average NLL of the five 7B models, window (orange) against sink (green), log-free axis."""
    for name, by_policy in curves.items():
        for policy in ("window", "sink"):
            x, nll = by_policy[policy]
            ax.plot(x[width - 1:].numpy(), moving_average(nll, width).numpy(), lw=1,
                    color=POLICY_STYLE[policy]["color"], alpha=0.8)
        x, nll = by_policy["window"]
        ax.annotate(name, (x[-1].item(), moving_average(nll, width)[-1].item()), fontsize=7,
                    xytext=(3, 0), textcoords="offset points", va="center", clip_on=True)
    ax.axvline(1024, color="grey", ls=":", lw=0.8)
    ax.set(ylim=ylim, xlabel="token index", ylabel=f"NLL, moving average of {width} tokens (nats)",
           title="five 7B models, PG19, cache 1024 (measured on a GPU by\nattention_sinks): "
                 "window (orange) vs 4 sinks + 1020 (green)")


# --- the paper's Figure 1, from the cache objects ----------------------------------------------

def cache_rows(cache: SinkCache, T: int) -> torch.Tensor:
    """(T, T) bool: row t holds the tokens token t attends to when streamed one at a time."""
    rows = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        plan = cache.begin(1)
        in_use = cache.slot_token[:plan.k_pos.shape[0]]  # a filling cache plans only the slots in use
        keys = in_use if plan.mask is None else in_use[plan.mask[0]]   # the tokens the query may see
        rows[t, keys] = True
    return rows


def draw_schemes(axes, T: int = 14, S: int = 2, W: int = 5, notes: dict | None = None) -> dict:
    """The four schemes of the paper's Figure 1, one per axis, from minisink's own caches.

    Dense: DenseCache; window: SinkCache(0, S+W); sink: SinkCache(S, W), each streamed T tokens one at
    a time, row t = the tokens its query sees. Recompute keeps no cache: row t is the last S+W tokens,
    all of which are encoded again (shaded) for that one prediction. `notes` adds a line per scheme
    (e.g. measured perplexity). Returns the (T, T) rows per scheme.
    """
    import matplotlib.colors as mcolors
    from matplotlib.patches import Rectangle

    C = S + W
    dense = cache_rows(DenseCache(4), T)
    window = cache_rows(SinkCache(0, C), T)
    sink = cache_rows(SinkCache(S, W), T)
    schemes = {"dense": (dense, "O(T²) total, O(T) per token;\ncache grows without bound"),
               "window": (window, "O(TL) total, O(L) per token;\nbreaks when token 0 is evicted"),
               "recompute": (window, "O(TL²) total, O(L²) per token:\nthe window re-encoded each step"),
               "sink": (sink, "O(TL) total, O(L) per token;\nS sinks + W recent, L = S+W")}
    colours = {"dense": "tab:blue", "window": "tab:orange", "recompute": "dimgray", "sink": "tab:green"}
    for ax, (name, (rows, cost)) in zip(axes, schemes.items()):
        image = rows.float().numpy()
        if name == "sink":
            image = image + (rows & (torch.arange(T) < S)).float().numpy()    # sinks drawn darker
        cmap = mcolors.ListedColormap(["white", colours[name], "darkgreen"][:3 if name == "sink" else 2])
        ax.imshow(image, cmap=cmap, vmin=0, vmax=2 if name == "sink" else 1)
        if name == "recompute":
            for t in range(T):                         # the whole window is encoded again: hatch it
                first = max(0, t - C + 1)
                ax.add_patch(Rectangle((first - 0.5, t - 0.5), t - first + 1, 1, fill=False, hatch="///",
                                       lw=0, color="white"))
        ax.set_xticks(range(0, T, 2))
        ax.set_yticks(range(0, T, 2))
        ax.tick_params(labelsize=6)
        ax.set_xlabel("key: token j", fontsize=7)
        title = f"{name}\n{cost}"
        if notes and name in notes:
            title += f"\n{notes[name]}"
        ax.set_title(title, fontsize=8)
    axes[0].set_ylabel("query: token t", fontsize=7)
    return {name: rows for name, (rows, _) in schemes.items()}

