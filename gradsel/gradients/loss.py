"""The GRPO loss whose gradient gradsel projects: advantages, per-token weights as verl's
loss_agg_mode sets them, packing many problems' sequences into one batch, and the policy loss."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from gradsel.core.choices import LOSS_AGGS
from gradsel.core.errors import GradselError
from gradsel.gradients.attention import blocks_attention, shared_prompt_layout

EPS = 1e-6


@dataclass
class ProblemRollouts:
    """One problem's group: the sequences as generated and their rewards."""

    problem_id: str
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rewards: list[float]
    advantages: list[float] = field(default_factory=list)
    answer_classes: list[int | None] = field(default_factory=list)  # rewards.answer_classes

    @property
    def zero_advantage(self) -> bool:
        return all(a == 0.0 for a in self.advantages)


def group_advantages(rewards: Sequence[float], adv: str = "grpo") -> list[float]:
    """GRPO: (r - mean) / (unbiased std + eps); Dr.GRPO: r - mean. Equal rewards give exact zeros."""
    r = np.asarray(rewards, dtype=np.float64)
    if len(r) < 2 or np.all(r == r[0]):
        return [0.0] * len(r)
    centred = r - r.mean()
    if adv == "drgrpo":
        return centred.tolist()
    return (centred / (r.std(ddof=1) + EPS)).tolist()


def token_weights(group: ProblemRollouts, loss_agg: str) -> list[float]:
    """Per-response weight c_i so that L_p = sum_i c_i * sum_t nll_{i,t}."""
    k = len(group.response_ids)
    lengths = [max(len(r), 1) for r in group.response_ids]
    if loss_agg == "seq-mean-token-mean":
        return [a / (k * n) for a, n in zip(group.advantages, lengths)]
    if loss_agg == "token-mean":
        total = sum(lengths)
        return [a / total for a in group.advantages]
    if loss_agg == "seq-mean-token-sum":
        return [a / k for a in group.advantages]
    raise GradselError(f"unknown loss aggregation {loss_agg!r}", f"choose one of {', '.join(LOSS_AGGS)}")


def groups_from_table(table, adv: str) -> list[ProblemRollouts]:
    """Group a rollouts table (schema.ROLLOUTS) by problem, in first-seen order."""
    groups: dict[str, ProblemRollouts] = {}
    cols = table.select(["problem_id", "prompt_token_ids", "response_token_ids", "reward", "answer_class"]).to_pydict()
    for pid, p, r, rew, answer in zip(
        cols["problem_id"], cols["prompt_token_ids"], cols["response_token_ids"], cols["reward"], cols["answer_class"]
    ):
        g = groups.setdefault(pid, ProblemRollouts(pid, [], [], []))
        g.prompt_ids.append(p)
        g.response_ids.append(r)
        g.rewards.append(rew)
        g.answer_classes.append(answer)
    for g in groups.values():
        g.advantages = group_advantages(g.rewards, adv)
    return list(groups.values())


# -- packing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedSequence:
    slot: int  # index of the problem in the accumulator
    ids: list[int]  # prompt + response
    prompt_len: int
    weight: float  # c_i: the loss is weight * sum of the response tokens' nll


@dataclass(frozen=True)
class SharedPromptRow:
    """Some of one problem's responses over one copy of their prompt, as one packed row:

        prompt[:-1] | prompt[-1] response_1 | prompt[-1] response_2 | ...

    Each response attends to the shared part and its own past only, at the positions it has in
    `prompt + response` (position ids restart after the shared part), so every response sees
    exactly what it sees in its own sequence. The prompt's last token is run once per response
    because its position predicts each response's first token, and k different targets need k
    copies of that position; a copy has the same input and context as the original, so splitting
    a position's gradient among copies changes no weight gradient (sum_i delta_i x^T)."""

    slot: int
    shared: list[int]  # prompt[:-1]
    tails: list[list[int]]  # per response: [prompt[-1], *response]
    weights: list[float]  # c_i per response

    @property
    def ids(self) -> list[int]:
        return self.shared + [t for tail in self.tails for t in tail]


@dataclass(frozen=True)
class Packing:
    """How sequences are laid out in the packed passes; the vectors are the same, up to float32
    rounding, for every choice. `share_prompts`: a problem's responses share one copy of their
    prompt (SharedPromptRow), so a problem costs P + kR tokens instead of k(P + R); used only
    where `shared_prompt_support` finds the model takes it. `padding_side`: where each packed
    row's padding goes."""

    share_prompts: bool = True
    padding_side: str = "right"


PLAIN = Packing(share_prompts=False)


def _distinct_responses(
    group: ProblemRollouts, weights: Sequence[float]
) -> dict[tuple[int, ...], list[tuple[list[int], float]]]:
    """A problem's responses by prompt, identical ones merged: per prompt, each distinct response
    once with the summed weight of its copies. Copies have identical per-token gradients, so one
    carrying their weight gives the same gradient; where the weights cancel (every response one
    answer: GRPO's advantages sum to zero) the gradient is exactly zero and the response is
    dropped, rather than left to float32 rounding (a cosine of noise, which `select` would rank)."""
    merged: dict[tuple[int, ...], dict[tuple[int, ...], list[float]]] = {}
    for p, r, w in zip(group.prompt_ids, group.response_ids, weights):
        if r and w != 0.0:
            merged.setdefault(tuple(p), {}).setdefault(tuple(r), []).append(w)
    return {
        prompt: [(list(r), sum(ws)) for r, ws in responses.items() if abs(sum(ws)) > 1e-12 * sum(abs(w) for w in ws)]
        for prompt, responses in merged.items()
    }


def _shared_rows(slot: int, group: ProblemRollouts, weights: Sequence[float], max_tokens: int) -> list[SharedPromptRow]:
    """A problem's distinct responses (_distinct_responses) with one prompt (a problem whose
    rollouts saw different prompts gets a row per prompt), each prompt's responses split into as
    few rows of near-equal counts as keep every row under `max_tokens` (a row of one response may
    be longer, as a plain sequence may)."""
    by_prompt = _distinct_responses(group, weights)
    rows = []
    for prompt, items in by_prompt.items():
        if not items:
            continue
        if not prompt:  # no prompt to share (the first response token is never predicted)
            rows += [SharedPromptRow(slot, [], [r], [w]) for r, w in items]
            continue
        shared, last = list(prompt[:-1]), prompt[-1]
        tails = [[last, *r] for r, _ in items]
        n_rows = 1
        while n_rows < len(items):
            chunks = np.array_split(np.arange(len(items)), n_rows)
            if all(len(shared) + sum(len(tails[i]) for i in c) <= max_tokens for c in chunks):
                break
            n_rows += 1
        for c in np.array_split(np.arange(len(items)), n_rows):
            rows.append(SharedPromptRow(slot, shared, [tails[i] for i in c], [items[i][1] for i in c]))
    return rows


def pack_batches(
    groups: Sequence[ProblemRollouts], loss_agg: str, max_tokens: int, share_prompts: bool = False
) -> Iterator[list[PackedSequence] | list[SharedPromptRow]]:
    """Rows of non-zero-advantage problems, sorted by length, packed under a token budget
    (padded length x count). A row is one sequence (PackedSequence), or with `share_prompts`
    one problem's responses over one copy of its prompt (SharedPromptRow). Deterministic for the
    same inputs."""
    seqs = []
    for slot, g in enumerate(groups):
        if g.zero_advantage:
            continue
        weights = token_weights(g, loss_agg)
        if share_prompts:
            seqs += _shared_rows(slot, g, weights, max_tokens)
            continue
        for p, responses in _distinct_responses(g, weights).items():
            seqs += [PackedSequence(slot, list(p) + r, len(p), w) for r, w in responses]
    seqs.sort(key=lambda s: (len(s.ids), s.slot))
    batch: list = []
    for s in seqs:
        if batch and len(s.ids) * (len(batch) + 1) > max_tokens:
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


@dataclass
class PackedBatch:
    """A packed batch as tensors (B rows, T positions).

    weights[b, t] multiplies the nll of predicting ids[b, t+1] from position t; slots[b, t] is
    the problem slot of a real position, -1 for padding; every real position of a row belongs
    to one problem. Plain rows carry a (B, T) padding mask; shared-prompt rows (and left-padded
    plain rows) their position ids and each position's part (`segments`: 0 the shared prompt, i
    the i-th response, -1 padding), from which the forward pass builds the block layout or the
    dense masks."""

    ids: object
    weights: object
    slots: object
    mask: object | None = None  # (B, T) long, plain rows
    positions: object | None = None  # (B, T) long, shared-prompt rows
    segments: object | None = None  # (B, T) long, shared-prompt rows
    shared: bool = False  # SharedPromptRow rows (not plain rows through the 4D path)

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) positions run."""
        return int((self.slots >= 0).sum())

    def forward(self, model, attention: str | None = None):
        """The model's output on this batch. Plain rows pass their 2D padding mask. Shared-prompt
        rows pass their position ids and either their layout to the block attention
        (attention.py; `attention="blocks"`) or the additive 4D masks (`"mask"`: per attention
        kind, with the model's sliding window as transformers would apply it to each original
        sequence); by default, whichever `shared_prompt_support` found exact for the model."""
        if self.segments is None:
            return model(input_ids=self.ids, attention_mask=self.mask, use_cache=False)
        if self.shared and (attention or shared_prompt_attention(model)) == "blocks":
            with blocks_attention(model):
                return model(
                    input_ids=self.ids,
                    position_ids=self.positions,
                    use_cache=False,
                    shared_prompt_layout=shared_prompt_layout(self.segments),
                )
        masks = _attention_masks(model, _attend(self.segments, self.positions), self.positions)
        return model(input_ids=self.ids, position_ids=self.positions, use_cache=False, attention_mask=masks)


def _attention_masks(model, attend, positions):
    """Additive float masks (B, 1, T, T) in the model's dtype from `attend`; a dict per layer
    kind where the config has sliding-window layers (transformers' `layer_types`), the window
    applied on position ids (a key at least `sliding_window` positions back is not seen)."""
    import torch

    dtype = next(model.parameters()).dtype
    config = model.config
    window = getattr(config, "sliding_window", None) or None
    layer_types = set(getattr(config, "layer_types", None) or []) if hasattr(config, "layer_types") else set()

    def additive(allowed):
        return (
            torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            .masked_fill(~allowed, torch.finfo(dtype).min)
            .unsqueeze(1)
        )

    def windowed():
        near = positions.unsqueeze(2) - positions.unsqueeze(1) < window
        return attend & (near | torch.eye(attend.shape[1], dtype=torch.bool, device=attend.device))

    if layer_types:
        if "sliding_attention" in layer_types and window is not None:
            return {"full_attention": additive(attend), "sliding_attention": additive(windowed())}
        return additive(attend)
    return additive(windowed() if window is not None else attend)


def batch_tensors(
    batch: Sequence[PackedSequence] | Sequence[SharedPromptRow], pad_id: int, device, padding_side: str = "right"
) -> PackedBatch:
    """A packed batch's tensors, each row's padding on `padding_side`. Every row's last real
    position predicts nothing (weight 0)."""
    import torch

    T = max(len(s.ids) for s in batch)
    B = len(batch)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    weights = torch.zeros((B, T), dtype=torch.float32)
    slots = torch.full((B, T), -1, dtype=torch.long)
    shared = isinstance(batch[0], SharedPromptRow)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    for b, s in enumerate(batch):
        n = len(s.ids)
        start = 0 if padding_side == "right" else T - n
        ids[b, start : start + n] = torch.tensor(s.ids)
        slots[b, start : start + n] = s.slot
        if not shared:
            weights[b, start + s.prompt_len - 1 : start + n - 1] = s.weight
            positions[b, start : start + n] = torch.arange(n)
            segments[b, start : start + n] = 1
            continue
        at = start + len(s.shared)
        positions[b, start:at] = torch.arange(len(s.shared))
        segments[b, start:at] = 0
        for i, (tail, w) in enumerate(zip(s.tails, s.weights), start=1):
            m = len(tail)
            positions[b, at : at + m] = torch.arange(len(s.shared), len(s.shared) + m)
            segments[b, at : at + m] = i
            weights[b, at : at + m - 1] = w  # tail[0] (the prompt's last token) predicts the first response token
            at += m
    if not shared and padding_side == "right":
        return PackedBatch(ids.to(device), weights.to(device), slots.to(device), mask=(slots >= 0).long().to(device))
    # left padding: a 2D mask with padding first would shift the positions; the 4D path states
    # them, so the plain rows go through it as one-segment rows
    return PackedBatch(
        ids.to(device),
        weights.to(device),
        slots.to(device),
        positions=positions.to(device),
        segments=segments.to(device),
        shared=shared,
    )


def _attend(segments, positions):
    """(B, T, T) bool, which keys each query sees in rows laid out by `segments` (0 the shared
    prompt, i >= 1 the i-th part, -1 padding): its own part and the prompt, causally."""
    import torch

    real = segments >= 0
    same_part = (segments.unsqueeze(2) == segments.unsqueeze(1)) | (segments.unsqueeze(1) == 0)
    causal = positions.unsqueeze(2) >= positions.unsqueeze(1)
    attend = real.unsqueeze(2) & real.unsqueeze(1) & same_part & causal
    eye = torch.eye(segments.shape[1], dtype=torch.bool, device=segments.device)
    return attend | eye.unsqueeze(0)  # padding sees itself: no empty softmax row


def weighted_nll(logits, ids, weights):
    """sum_t w_t * nll(ids[t+1] | logits[t]), in float32.

    Fused cross-entropy over every position, the targets shifted left by one: the last position
    of each row has weight 0 (batch_tensors), so its stand-in target never counts, and no
    (batch, seq - 1, vocab) copy of the logits is made."""
    import torch
    import torch.nn.functional as F

    targets = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll * weights.reshape(-1)).sum()


@contextmanager
def output_layer_sees(model, rows, cols, captured: dict | None = None):
    """Feed the output layer only the hidden states at (rows, cols): (B, T, d) -> (1, N, d).
    The model's own code after the layer (logit soft-capping, say) still runs."""

    def gather(module, args):
        h = args[0][rows, cols].unsqueeze(0)
        if captured is not None:
            captured["h"] = h
        return (h, *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def policy_loss(model, batch: PackedBatch, *, all_logits: bool = False):
    """sum_t w_t * nll(ids[t+1] | its context) over a packed batch, in float32.

    Only positions with a non-zero weight (response tokens) reach the output layer. Prompt and
    padding positions get no loss weight, so their logits (and the softmax over the vocabulary)
    never reach a gradient: every gradient is unchanged, and the output layer and the loss do
    N/(B T) of the work. `all_logits` keeps every position, for when the output layer is hooked.
    """
    import torch
    import torch.nn.functional as F

    ids, weights = batch.ids, batch.weights
    if all_logits:
        return weighted_nll(batch.forward(model).logits, ids, weights)
    rows, cols = torch.nonzero(weights, as_tuple=True)  # the last position of a row never has weight
    with output_layer_sees(model, rows, cols):
        logits = batch.forward(model).logits
    if logits.shape[:2] != (1, rows.numel()):  # a model that bypasses its output module's forward
        return weighted_nll(logits, ids, weights)
    nll = F.cross_entropy(logits[0].float(), ids[rows, cols + 1], reduction="none")
    return (nll * weights[rows, cols]).sum()


# -- where prompt sharing applies -----------------------------------------------------------------

_SHARED_SUPPORT = weakref.WeakKeyDictionary()  # model -> (why not or None, "blocks" | "mask" | None)


def shared_prompt_support(model) -> str | None:
    """None where `model` computes shared-prompt rows exactly as their own sequences; else why it
    cannot, in words. Decided once per model: its attention must be eager or sdpa, its layers of
    kinds whose masks gradsel builds (full, sliding window), and a probe problem (two responses,
    the prompt longer than a small sliding window) must give the same logits both ways, within
    the dtype's rounding: through the block attention (attention.py) where no layer has a sliding
    window, else (or where that differs) through dense 4D masks."""
    if model not in _SHARED_SUPPORT:
        _SHARED_SUPPORT[model] = _probe_shared_rows(model)
    return _SHARED_SUPPORT[model][0]


def shared_prompt_attention(model) -> str | None:
    """How `model` attends over shared-prompt rows: "blocks" (attention.py), "mask" (dense 4D
    masks), or None where it cannot share prompts (shared_prompt_support says why)."""
    shared_prompt_support(model)
    return _SHARED_SUPPORT[model][1]


def packing_for(model, packing: Packing) -> Packing:
    """`packing`, without prompt sharing where the model cannot take it (shared_prompt_support);
    that is said once per model on stderr. The vectors are the same either way."""
    if not packing.share_prompts:
        return packing
    first = model not in _SHARED_SUPPORT
    reason = shared_prompt_support(model)
    if reason is None:
        return packing
    if first:
        from gradsel.core import console

        console.warn(
            f"prompts are not shared in the gradient pass: {reason}; each rollout runs its prompt "
            "(the vectors are the same, the pass is slower)"
        )
    return replace(packing, share_prompts=False)


def _probe_shared_rows(model) -> tuple[str | None, str | None]:
    import torch

    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("eager", "sdpa"):
        return f"attention implementation {impl!r} takes no custom 4D mask (eager and sdpa do)", None
    kinds = set(getattr(config, "layer_types", None) or []) if hasattr(config, "layer_types") else set()
    if kinds - {"full_attention", "sliding_attention"}:
        unknown = sorted(kinds - {"full_attention", "sliding_attention"})
        return f"layer kinds {unknown} need masks gradsel does not build", None
    window = getattr(config, "sliding_window", None) or None
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (window + 4 if window is not None and window < 256 else 6,), generator=gen)
    responses = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (3, 2)]
    group = ProblemRollouts("probe", [prompt.tolist()] * 2, responses, [1.0, 0.0], advantages=[1.0, -1.0])
    device = next(model.parameters()).device
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2

    def response_logits(share: bool, attention: str | None = None):
        batch = batch_tensors(next(pack_batches([group], "seq-mean-token-sum", 1 << 30, share)), 0, device)
        with torch.no_grad():
            logits = batch.forward(model, attention).logits.float()
        # per response (its weight tells it apart), the logits at its weighted positions in order
        return {float(w): logits[batch.weights == w] for w in batch.weights.unique().tolist() if w != 0}

    def same(plain, shared):
        return all(
            w in shared
            and shared[w].shape == ref.shape
            and float((shared[w] - ref).abs().max()) <= tolerance * float(ref.abs().max())
            for w, ref in plain.items()
        )

    plain = response_logits(False)
    # the block attention applies no sliding window; a model whose attention it does not
    # reproduce (or whose forward does not pass its layout through) uses the dense masks
    if window is None and "sliding_attention" not in kinds:
        try:
            if same(plain, response_logits(True, "blocks")):
                return None, "blocks"
        except Exception:
            pass
    try:
        shared = response_logits(True, "mask")
    except Exception as exc:  # a model whose forward refuses position ids or a 4D mask
        name = type(model).__name__
        return f"{name} refuses a 4D attention mask with position ids ({type(exc).__name__}: {exc})", None
    if not same(plain, shared):
        return f"{type(model).__name__} does not give a response the same logits over a shared prompt", None
    return None, "mask"
