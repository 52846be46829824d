"""ALiBi (Press et al., 2022) as MPT uses it, with distances measured inside the cache.

ALiBi adds `-slope_h * (query_pos - key_pos)` to the attention scores of head h. Under StreamingLLM
those positions are cache positions (see minisink/cache.py), so a sink key is never further than
S+W-1 from the query, however long the stream has been.
"""
import math

import torch


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8.0, device=None) -> torch.Tensor:
    """(n_heads,) fp32 slopes, MPT's recipe: geometric in 2^(-alibi_bias_max/n) for a power of two.

    For a head count that is not a power of two, MPT takes the next power of two and interleaves:
    the odd-indexed slopes first, then the even ones, truncated to n_heads (mpt-7b/attention.py).
    """
    n = 2 ** math.ceil(math.log2(n_heads))
    exponent = torch.arange(1, n + 1, dtype=torch.int64, device=device).float() * (alibi_bias_max / n)
    slopes = 1.0 / torch.pow(2, exponent)
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes
