"""Attention over shared-prompt rows by blocks, without a dense (T, T) mask.

A shared-prompt row is [prompt | response_1 | ... | response_n] (loss.SharedPromptRow). Through
a dense mask, attention scores every (query, key) pair of the row, although a response sees only
the prompt and its own past: at a prompt of 300 and 8 responses of 126 that is about 0.28 of the
pairs. Here each row's prompt runs causally once, then its responses as one batch over
[the prompt's keys | their own keys]. The outputs are those of the dense mask up to rounding, and
so are the gradients: the prompt's keys and values are expanded to the n responses, so their
gradient is the sum over the responses, as in the dense row.

The function is registered in transformers' AttentionInterface under BLOCKS; `blocks_attention`
switches a model to it for one shared-prompt forward pass and back. It has no mask function, so
transformers builds no mask for that pass; the rows' layout comes as the keyword argument
`shared_prompt_layout`, which transformers passes through the model to every attention call, as
it does flash attention's packed-sequence arguments. Models with sliding-window layers keep the
dense masks (loss._attention_masks), whose window this function does not apply.
"""

from contextlib import contextmanager
from dataclasses import dataclass

BLOCKS = "gradsel_shared_prompt_blocks"


@dataclass(frozen=True)
class RowBlocks:
    """One row's parts. `prompt`: the slice of its prompt's positions (empty for a row with no
    prompt). `index` (n, L): the position of each response's j-th token, the short responses'
    tails repeating their last position (their outputs are dropped). `own` (n, L) bool: which
    entries of `index` are real. `order` (S + N,): the row's real positions in the order the
    outputs are computed, the prompt's then the responses' real ones. `sees` (L, S + L) bool: a
    response's query sees the whole prompt and its own response up to itself."""

    prompt: slice
    index: object
    own: object
    order: object
    sees: object


@dataclass(frozen=True)
class SharedPromptLayout:
    """Built once per batch (`shared_prompt_layout`), read by every layer's attention call."""

    rows: tuple[RowBlocks, ...]


def shared_prompt_layout(segments) -> SharedPromptLayout:
    """The layout of shared-prompt rows from their `segments` (B, T): 0 the prompt, i >= 1 the
    i-th response, -1 padding (loss.batch_tensors). Each part is contiguous."""
    import torch

    rows = []
    for seg in segments.cpu():
        prompt_at = torch.nonzero(seg == 0).flatten()
        prompt = slice(int(prompt_at[0]), int(prompt_at[-1]) + 1) if len(prompt_at) else slice(0, 0)
        spans = [torch.nonzero(seg == i).flatten() for i in range(1, int(seg.max()) + 1)]
        longest = max(len(s) for s in spans)
        index = torch.stack([torch.cat([s, s[-1:].expand(longest - len(s))]) for s in spans])  # (n, L)
        own = torch.stack([torch.arange(longest) < len(s) for s in spans])  # (n, L)
        order = torch.cat([torch.arange(prompt.start, prompt.stop), index[own]])
        S = prompt.stop - prompt.start
        sees = torch.ones((longest, S + longest), dtype=torch.bool)
        sees[:, S:] = torch.ones((longest, longest), dtype=torch.bool).tril()
        device = segments.device
        rows.append(RowBlocks(prompt, index.to(device), own.to(device), order.to(device), sees.to(device)))
    return SharedPromptLayout(tuple(rows))


def shared_prompt_attention(
    module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, shared_prompt_layout=None, **kwargs
):
    """transformers' attention-function contract: query (B, H, T, D), key and value (B, Hkv, T,
    D*) in, the output (B, T, H, Dv) and no weights out. Padding positions' outputs are zero (no
    real position attends to them, and their loss weight is zero). No dropout: the gradient pass
    runs the model in eval mode."""
    import torch
    import torch.nn.functional as F

    layout: SharedPromptLayout = shared_prompt_layout
    if layout is None:
        raise ValueError(f"{BLOCKS} attention needs the shared_prompt_layout keyword argument")
    gqa = query.shape[1] != key.shape[1]
    heads, length, dv = query.shape[1], query.shape[2], value.shape[-1]
    out = []
    for b, row in enumerate(layout.rows):
        q, k, v = query[b], key[b], value[b]  # (H, T, D), (Hkv, T, D), (Hkv, T, Dv)
        p = row.prompt
        n = row.index.shape[0]
        parts = []
        if p.stop > p.start:
            parts.append(
                F.scaled_dot_product_attention(q[:, p], k[:, p], v[:, p], is_causal=True, scale=scaling, enable_gqa=gqa)
            )

        def responses(x):  # (h, T, d) -> (n, h, L, d)
            return x[:, row.index].transpose(0, 1)

        keys = torch.cat([k[:, p].unsqueeze(0).expand(n, -1, -1, -1), responses(k)], dim=2)  # (n, Hkv, S + L, D)
        values = torch.cat([v[:, p].unsqueeze(0).expand(n, -1, -1, -1), responses(v)], dim=2)
        o = F.scaled_dot_product_attention(
            responses(q), keys, values, attn_mask=row.sees, scale=scaling, enable_gqa=gqa
        )
        parts.append(o.transpose(0, 1)[:, row.own])  # (H, N, Dv)
        done = torch.cat(parts, dim=1)  # (H, S + N, Dv)
        out.append(query.new_zeros((heads, length, dv)).index_copy(1, row.order, done))
    return torch.stack(out).transpose(1, 2).contiguous(), None


@contextmanager
def blocks_attention(model):
    """The model's attention is BLOCKS inside, its own outside (restored on any exit)."""
    from transformers import AttentionInterface

    if BLOCKS not in AttentionInterface._global_mapping:
        AttentionInterface.register(BLOCKS, shared_prompt_attention)
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = BLOCKS
    try:
        yield
    finally:
        config._attn_implementation = before
