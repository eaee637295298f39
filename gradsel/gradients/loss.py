"""The GRPO loss whose gradient gradsel projects: advantages, per-token weights as verl's
loss_agg_mode sets them, packing many problems' sequences into one batch, and the policy loss."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from gradsel.choices import LOSS_AGGS
from gradsel.errors import GradselError

EPS = 1e-6


@dataclass(frozen=True)
class LossConfig:
    adv: str = "grpo"
    loss_agg: str = "seq-mean-token-mean"


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
    for pid, p, r, rew, answer in zip(cols["problem_id"], cols["prompt_token_ids"], cols["response_token_ids"],
                                      cols["reward"], cols["answer_class"]):
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


def pack_batches(groups: Sequence[ProblemRollouts], loss_agg: str, max_tokens: int) -> Iterator[list[PackedSequence]]:
    """Sequences of non-zero-advantage problems, sorted by length, packed under a token budget
    (padded length x count). Deterministic for the same inputs."""
    seqs = []
    for slot, g in enumerate(groups):
        if g.zero_advantage:
            continue
        for p, r, w in zip(g.prompt_ids, g.response_ids, token_weights(g, loss_agg)):
            if r and w != 0.0:
                seqs.append(PackedSequence(slot, list(p) + list(r), len(p), w))
    seqs.sort(key=lambda s: (len(s.ids), s.slot))
    batch: list[PackedSequence] = []
    for s in seqs:
        if batch and len(s.ids) * (len(batch) + 1) > max_tokens:
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def _batch_tensors(batch: Sequence[PackedSequence], pad_id: int, device):
    """Right-padded ids, attention mask, per-position loss weights and problem slots.

    weights[b, t] multiplies the nll of predicting token t+1 from position t.
    slots[b, t] is the problem slot of a real position, -1 for padding.
    """
    import torch

    T = max(len(s.ids) for s in batch)
    B = len(batch)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    weights = torch.zeros((B, T), dtype=torch.float32)
    slots = torch.full((B, T), -1, dtype=torch.long)
    for b, s in enumerate(batch):
        n = len(s.ids)
        ids[b, :n] = torch.tensor(s.ids)
        mask[b, :n] = 1
        weights[b, s.prompt_len - 1:n - 1] = s.weight
        slots[b, :n] = s.slot
    return ids.to(device), mask.to(device), weights.to(device), slots.to(device)


def _weighted_nll(logits, ids, weights):
    """sum_t w_t * nll(ids[t+1] | logits[t]), in float32.

    Fused cross-entropy over every position, the targets shifted left by one: the last position
    of each row has weight 0 (_batch_tensors), so its stand-in target never counts, and no
    (batch, seq - 1, vocab) copy of the logits is made."""
    import torch
    import torch.nn.functional as F

    targets = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll * weights.reshape(-1)).sum()


@contextmanager
def _output_layer_sees(model, rows, cols, captured: dict | None = None):
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


def policy_loss(model, ids, mask, weights, *, all_logits: bool = False):
    """sum_t w_t * nll(ids[t+1] | ids[:t+1]) over a packed batch, in float32.

    Only positions with a non-zero weight (response tokens) reach the output layer. Prompt and
    padding positions get no loss weight, so their logits (and the softmax over the vocabulary)
    never reach a gradient: every gradient is unchanged, and the output layer and the loss do
    N/(B T) of the work. `all_logits` keeps every position, for when the output layer is hooked.
    """
    import torch
    import torch.nn.functional as F

    if all_logits:
        return _weighted_nll(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, weights)
    rows, cols = torch.nonzero(weights, as_tuple=True)  # the last position of a row never has weight
    with _output_layer_sees(model, rows, cols):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if logits.shape[:2] != (1, rows.numel()):  # a model that bypasses its output module's forward
        return _weighted_nll(logits, ids, weights)
    nll = F.cross_entropy(logits[0].float(), ids[rows, cols + 1], reduction="none")
    return (nll * weights[rows, cols]).sum()
