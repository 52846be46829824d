"""Two cache policies on one model, live: what StreamingLLM fixes, seen as it happens.

    python run.py --compare window,sink                    # SmolLM2-135M-Instruct, cache 4+60, both streams
    python run.py --compare window,sink --text book.txt    # each policy's running perplexity of a text

Both policies get the same model, the same first tokens, the same cache size (S+W slots: `window`
keeps the S+W most recent tokens, `sink` keeps S sinks and W recent ones) and the same seed, so
they write the same text until the first eviction; from then on only the cache differs.

Generating, the two streams are printed in interleaved blocks, each headed by how many tokens its
cache has evicted so far. With --text, the text is fed through both caches instead (in chunks:
exact, see minisink/tools/eval.py) and each policy's running perplexity is printed as it goes,
over all tokens and over those after the first eviction: the paper's Figure 3, live.

Nothing here re-implements the method: the streams are minisink.generate.Stream, the text goes
through generate.prefill into generate.make_cache's caches, and NLL is eval.token_nll.
"""
import math
import sys

import torch

from ..generate import Stream, make_cache, prefill
from .eval import token_nll


def shape(policy: str, sink_size: int, window_size: int) -> str:
    """How a policy uses the S+W slots."""
    if policy == "window":
        return f"0 sinks + {sink_size + window_size} recent"
    if policy == "dense":
        return "every token kept"
    return f"{sink_size} sinks + {window_size} recent"


def evicted(stream: Stream) -> int:
    return 0 if stream.policy == "dense" else max(0, stream.tokens_seen - stream.capacity)


def generate_side_by_side(model, tokenizer, first_ids: list[int], policies: list[str], sink_size: int,
                          window_size: int, max_new_tokens: int, seed: int, sample: dict, block: int = 32,
                          out=None) -> dict:
    """Both streams, `block` tokens of one then `block` of the other, each printed as it is produced.
    Returns policy -> the ids it generated."""
    out = out or sys.stdout
    streams = {p: Stream(model, policy=p, sink_size=sink_size, window_size=window_size) for p in policies}
    gens = {p: s.generate(torch.tensor([first_ids]), max_new_tokens=max_new_tokens, seed=seed, **sample)
            for p, s in streams.items()}
    decoders = {p: tokenizer.stream_decoder() for p in policies}
    ids = {p: [] for p in policies}
    done = 0
    while done < max_new_tokens:
        n = min(block, max_new_tokens - done)
        for p in policies:
            s = streams[p]
            out.write(f"\n== {p} ({shape(p, sink_size, window_size)}) | tokens {done + 1}-{done + n} | "
                      f"{evicted(s):,} evicted so far ==\n")
            for _ in range(n):
                token = int(next(gens[p])[0])
                ids[p].append(token)
                if token < tokenizer.vocab_size:
                    out.write(decoders[p].push(token))
                    out.flush()
            out.write(decoders[p].flush() + "\n")
            out.flush()
        done += n
    for p in policies:
        gens[p].close()
    return ids


@torch.inference_mode()
def perplexity_side_by_side(model, ids: list[int], policies: list[str], sink_size: int, window_size: int,
                            chunk: int | None = None, every: int = 64, out=None) -> dict:
    """Feed the stream `ids` through each policy's cache, chunk by chunk, printing every `every`
    tokens each policy's running perplexity (all tokens; tokens after the first eviction).
    Returns policy -> (perplexity of all tokens, perplexity after the first eviction)."""
    out = out or sys.stdout
    p0 = next(model.parameters())
    capacity = sink_size + window_size
    caches = {p: make_cache(p, sink_size, window_size, p0.device, p0.dtype) for p in policies}
    chunk = chunk or min(window_size, every)
    stream = torch.tensor(ids, device=p0.device)
    nll = {p: torch.full((len(ids),), float("nan")) for p in policies}
    ppl = lambda x: math.exp(x.double().mean().item()) if x.numel() else float("nan")
    result = {}
    for start in range(0, len(ids) - 1, every):
        end = min(start + every, len(ids) - 1)        # feed tokens start .. end-1, score start+1 .. end
        for p in policies:
            def score(offset, logits, p=p, start=start):
                a = start + offset
                nll[p][a + 1:a + 1 + logits.shape[1]] = token_nll(logits[0], stream[a + 1:a + 1 + logits.shape[1]]).cpu()
            prefill(model, caches[p], stream[None, start:end], chunk, each=score)
            result[p] = (ppl(nll[p][1:end + 1]), ppl(nll[p][capacity + 1:end + 1]))
        line = " | ".join(f"{p} ppl {a:8.2f}, after the first eviction " + (f"{b:8.2f}" if end > capacity else "  (none)")
                          for p, (a, b) in result.items())
        if len(policies) == 2 and end > capacity:
            line += f" | {policies[0]}/{policies[1]} after it: {result[policies[0]][1] / result[policies[1]][1]:.2f}x"
        out.write(f"tokens {end + 1:>6,}: {line}\n")
        out.flush()
    return result
