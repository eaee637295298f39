"""The attention cost of a shared-prompt row's mask: sdpa's forward and backward on one row
(1, 8, T, 64) laid out as `prompt | response_1 | ... | response_k` (each response sees the prompt
and its own past) with the additive float mask gradsel passes, with the same mask as booleans,
and as plain causal attention (what a row without the mask would cost). Interleaved runs.

    .venv/bin/python -m benchmarks.shared_mask [--prompt 300] [--k 8] [--response 126] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def shared_row_mask(prompt: int, k: int, response: int) -> torch.Tensor:
    """(1, 1, T, T) boolean: True where a query may attend to a key."""
    segments = torch.tensor([0] * (prompt - 1) + [i for i in range(1, k + 1) for _ in range(response + 1)])
    positions = torch.cat([torch.arange(prompt - 1)] + [torch.arange(prompt - 1, prompt + response)] * k)
    same = (segments[:, None] == segments[None, :]) | (segments[None, :] == 0)
    return (same & (positions[:, None] >= positions[None, :]))[None, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--response", type=int, default=126)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    allowed = shared_row_mask(args.prompt, args.k, args.response)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    T = allowed.shape[-1]
    masks = {"float": additive, "bool": allowed, "causal": None}

    def once(kind: str) -> float:
        q, k, v = (torch.randn(1, 8, T, 64, requires_grad=True) for _ in range(3))
        t = time.perf_counter()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[kind], is_causal=kind == "causal")
        out.sum().backward()
        return time.perf_counter() - t

    for kind in masks:  # warm-up
        once(kind)
    times = {kind: [] for kind in masks}
    for _ in range(args.repeats):
        for kind in masks:
            times[kind].append(once(kind))
    with torch.no_grad():
        q, k, v = (torch.randn(1, 8, T, 64) for _ in range(3))
        diff = (
            (
                F.scaled_dot_product_attention(q, k, v, attn_mask=additive)
                - F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            )
            .abs()
            .max()
        )
    print(
        f"row of {T} tokens, {float(allowed.float().mean()):.2f} of the (query, key) pairs seen; "
        f"float and bool outputs differ by {float(diff):.1e}"
    )
    for kind, ts in times.items():
        print(f"{kind}: median {statistics.median(ts):.3f} s over {len(ts)} runs")


if __name__ == "__main__":
    main()
