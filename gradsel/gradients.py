"""Per-problem GRPO policy gradients, randomly projected on two sides from hooks.

For a linear layer y = W x, one token's gradient is the outer product delta_t x_t^T, and a
problem's gradient is G_p = sum_t delta_t x_t^T over every position of its responses'
sequences. With seeded random matrices R_out (d_out x k_out) and R_in (d_in x k_in):

    R_out^T G_p R_in = sum_t (R_out^T delta_t)(R_in^T x_t)^T          # (k_out, k_in)

so one forward and one backward pass over a packed batch of many problems gives every problem's
projected gradient exactly, without ever forming a parameter gradient. The weights stay frozen;
the first hooked units' outputs are made to require grad, so autograd builds the graph from there.
MoE routers and transformers' fused experts are captured token by token (docs/algorithm.md).

Every non-padding position is captured, prompt positions included: response tokens attend to
the prompt, so delta_t at prompt positions is not zero, and leaving them out would not give the
gradient of W. The loss (advantage times aggregation weight, response tokens only) puts the
right weight into delta_t; padding positions get delta_t = 0 and are dropped.

Features:
- `projected`: the above for every selected unit (default: every Linear, router and fused expert
  stack in the decoder blocks);
- `head`: the output layer only, from the forward pass: delta_t = w_t (softmax - onehot);
- `exact`: full parameter gradients, one backward pass per problem (the reference algorithm).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from dataclasses import asdict, dataclass, field

import numpy as np

from gradsel.errors import GradselError

ADVANTAGES = ("grpo", "drgrpo")
LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
FEATURES = ("projected", "head", "exact")
EPS = 1e-6


@dataclass(frozen=True)
class LossConfig:
    adv: str = "grpo"
    loss_agg: str = "seq-mean-token-mean"


@dataclass(frozen=True)
class ProjectorSpec:
    """Everything that defines a feature space; vectors of different specs never mix."""

    feature: str = "projected"
    seed: int = 0
    k_out: int = 16
    k_in: int = 16
    blocks: int = 1  # independent k_out x k_in sketches per module, averaged (see docs/algorithm.md)
    modules: tuple[str, ...] = ()  # resolved module names, in order
    dims: tuple[tuple[int, int], ...] = ()  # (d_out, d_in) per module
    dtype: str = "float32"
    kind: str = "rademacher"

    @property
    def dim(self) -> int:
        if self.feature == "exact":
            return sum(o * i for o, i in self.dims)
        return len(self.modules) * self.block_dim

    @property
    def block_dim(self) -> int:
        return self.blocks * self.k_out * self.k_in

    def to_dict(self) -> dict:
        return asdict(self)


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


# -- capture units --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptureUnit:
    """One trainable weight matrix whose gradient the feature sketches, or one fused stack of MoE
    expert matrices (sketched as the (n_experts d_out, d_in) matrix the stack forms)."""

    name: str  # the feature's name for it: the module's name; `<experts module>.<parameter>` for experts
    module: object
    param: str  # the weight's attribute on the module
    kind: str  # "linear" (nn.Linear), "router" (an MoE top-k router), "experts" (a fused expert stack)
    d_out: int
    d_in: int
    n_experts: int = 1

    @property
    def parameter_name(self) -> str:
        return self.name if self.kind == "experts" else f"{self.name}.weight"

    def gradient_matrix(self, grad):
        """The parameter's gradient as (d_out, d_in), or (n_experts, d_out, d_in) for experts."""
        return grad.transpose(1, 2) if self.kind == "experts" and self.module.is_transposed else grad


def _is_router(module) -> bool:
    """transformers 5's MoE routers (MixtralTopKRouter, DeepseekV3TopkRouter, ...): a (n_experts,
    d) weight applied as F.linear to the flattened hidden states, the logits returned first."""
    own = [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    return "router" in type(module).__name__.lower() and own == ["weight"]


def _expert_parameters(module) -> list[str] | None:
    """The fused weights of a transformers 5 experts module (decorated by
    `use_experts_implementation`, so its flags say how to apply them), or None."""
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed")):
        return None
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    own = {n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2}
    expected = set(names) | ({f"{n}_bias" for n in names} if module.has_bias else set())
    return names if own == expected or own == set(names) else None


def _units_of(name: str, module) -> list[CaptureUnit] | None:
    """The capture units a module holds itself: [] for none, None for a weight gradsel cannot capture."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return [CaptureUnit(name, module, "weight", "linear", *module.weight.shape)]
    if not any(p.dim() >= 2 for p in module.parameters(recurse=False)):
        return []
    if _is_router(module):
        return [CaptureUnit(name, module, "weight", "router", *module.weight.shape)]
    experts = _expert_parameters(module)
    if experts is None:
        return None
    units = []
    for p in experts:
        n, a, b = getattr(module, p).shape
        d_out, d_in = (b, a) if module.is_transposed else (a, b)
        units.append(CaptureUnit(f"{name}.{p}", module, p, "experts", d_out, d_in, n))
    return units


def select_units(model, pattern: str | None = None, *, feature: str = "projected") -> list[CaptureUnit]:
    """The weight matrices whose gradients form the feature, in a fixed order.

    Default: every Linear inside the decoder blocks (names with `.layers.<i>.` or `.h.<i>.`), and
    in MoE blocks the router and the fused experts. A matching module that owns a weight matrix of
    another kind (GPT-2's Conv1D, say) is refused, never skipped.
    """
    if feature == "head":
        head = model.get_output_embeddings()
        name = next(n for n, m in model.named_modules() if m is head)
        return _units_of(name, head)
    regex = re.compile(pattern) if pattern else re.compile(r"\.(layers|h|blocks)\.\d+\.")
    chosen, refused = [], []
    for name, module in model.named_modules():
        if not name:
            continue
        units = _units_of(name, module)
        if units is None:
            if regex.search(name):
                refused.append(f"{name} ({type(module).__name__})")
            continue
        chosen += [u for u in units if regex.search(u.name)]
    if refused:
        raise GradselError(
            f"unsupported module type for gradient capture: {', '.join(refused[:3])}"
            + (f" and {len(refused) - 3} more" if len(refused) > 3 else ""),
            "gradsel captures nn.Linear layers, MoE routers and transformers' fused experts; "
            r"narrow --modules to those, e.g. --modules '\.layers\.\d+\.self_attn\.'")
    if not chosen:
        raise GradselError(f"no Linear, router or expert weight matches {regex.pattern!r}",
                          "check --modules against model.named_modules(); an expert weight is named "
                          "<experts module>.gate_up_proj (or .up_proj) and .down_proj")
    return chosen


def resolve_units(model, names: Sequence[str]) -> list[CaptureUnit]:
    """The units of a spec's module names, in the spec's order."""
    found = {}
    for name, module in model.named_modules():
        for u in _units_of(name, module) or []:
            found[u.name] = u
    missing = [n for n in names if n not in found]
    if missing:
        raise GradselError(f"the model has no capturable module {missing[0]!r}", "score with the model the store was made with")
    return [found[n] for n in names]


def projection_matrix(seed: int, name: str, side: str, d: int, k: int, kind: str = "rademacher"):
    """A seeded (d, k) matrix with entries of variance 1/k, so inner products are preserved in
    expectation. Generated on the CPU so every device gets the same numbers."""
    import torch

    digest = hashlib.sha256(f"{seed}/{name}/{side}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    if kind == "gaussian":
        return torch.randn(d, k, generator=gen) / k**0.5
    return (torch.randint(0, 2, (d, k), generator=gen).float() * 2 - 1) / k**0.5


def module_projections(spec: ProjectorSpec, name: str, d_out: int, d_in: int, device):
    """(R_in, R_out) of one module: `blocks` independent sketches side by side. Each block's R_in
    has entry variance 1/k_in; R_out keeps the 1/(blocks k_out) of a (d_out, blocks k_out) matrix,
    so the concatenated feature's inner product is the average of the blocks' estimates."""
    r_in = projection_matrix(spec.seed, name, "in", d_in, spec.blocks * spec.k_in, spec.kind) * spec.blocks ** 0.5
    r_out = projection_matrix(spec.seed, name, "out", d_out, spec.blocks * spec.k_out, spec.kind)
    return r_in.to(device), r_out.to(device)


def expert_signs(spec: ProjectorSpec, name: str, n_experts: int) -> list[float]:
    """Seeded +-1 per expert of a fused stack ([1.0] for any other unit). A stack (n_experts, d_out,
    d_in) is sketched as one (n_experts d_out, d_in) matrix whose R_out is R_out repeated with
    these signs: R_out^T G R_in = sum_e s_e R_out^T G_e R_in. The signs make different experts'
    cross terms cancel in expectation, so inner products are kept as with independent R_out per
    expert, at the memory of one."""
    if n_experts == 1:
        return [1.0]
    return (projection_matrix(spec.seed, name, "experts", n_experts, 1, "rademacher")[:, 0]).tolist()


def block_outer(d_proj, x_proj, blocks: int):
    """Per-token, per-block outer products: (n, B*k_out), (n, B*k_in) -> (n, B*k_out*k_in)."""
    n = d_proj.shape[0]
    return (d_proj.reshape(n, blocks, -1, 1) * x_proj.reshape(n, blocks, 1, -1)).reshape(n, -1)


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


# -- projected feature from hooks -----------------------------------------------------------------

def _require_grad(y):
    """y itself if autograd tracks it; else a tracked copy. At the first hooked units nothing
    upstream needs a gradient, so backward starts there (skipping the embedding's and their inputs'
    gradients). The clone keeps the model's own in-place ops off a leaf tensor."""
    return y if y.requires_grad else y.requires_grad_(True).clone()


def _unit_val_grad(t):
    """A unit's validation gradient as the hooks use it: None where there is nothing to align
    (no validation gradient, or a LowRank of rank 0, which adds nothing to the dot)."""
    return None if isinstance(t, LowRank) and t.in_factor.shape[1] == 0 else t


def _token_observer(m_idx, r_in, r_out, acc, dots, blocks):
    """For units that see flattened tokens (routers, experts): observe(x, y, slots, sign, val_grad)
    adds sum over each problem's tokens of sign (R_out^T delta_t)(R_in^T x_t)^T into acc[:, m_idx],
    and <delta_t x_t^T, val_grad> into dots, for x (n, d_in), the unit's output y (n, d_out) and
    slots (n,) (-1 on padding, where delta_t is 0). Returns y, tracked by autograd."""
    def observe(x, y, slots, sign=1.0, val_grad=None):
        val_grad = _unit_val_grad(val_grad)
        x = x.detach().float()
        x_proj = x @ r_in  # (n, blocks * k_in)
        x_low = x @ val_grad.in_factor if isinstance(val_grad, LowRank) else None  # (n, r)
        index = slots.clamp(min=0)
        real = (slots >= 0).unsqueeze(-1)

        def grad_hook(grad):
            grad = grad.float() * real  # (n, d_out)
            acc[:, m_idx].index_add_(0, index, block_outer((grad @ r_out) * sign, x_proj, blocks))
            if x_low is not None:
                dots.index_add_(0, index, ((grad @ val_grad.out_factor) * x_low).sum(-1).double())
            elif val_grad is not None:
                dots.index_add_(0, index, (grad * (x @ val_grad.T)).sum(-1).double())

        y = _require_grad(y)
        y.register_hook(grad_hook)
        return y

    return observe


def _fused_experts_forward(module, hidden_states, top_k_index, top_k_weights, *, observers, slots_ref):
    """A transformers 5 fused-experts forward (hidden_states (n, d), top_k_index and
    top_k_weights (n, top_k)), expert by expert as its eager form, with each hooked weight's input
    and output shown to its observer: observers[param](expert, x, y, slots) -> y. The flags of
    `use_experts_implementation` (gate, bias, transposed storage) and the module's own
    `_apply_gate` are honoured, so any model it decorates computes what it computes unhooked."""
    import torch
    import torch.nn.functional as F

    slots = slots_ref[0].reshape(-1)
    if hidden_states.shape[0] != slots.numel():
        raise GradselError(f"{type(module).__name__} sees {hidden_states.shape[0]} tokens, not the batch's "
                           f"{slots.numel()}", "exclude its experts with --modules")
    up = "gate_up_proj" if module.has_gate else "up_proj"

    def apply(param, e, x, token):
        w = getattr(module, param)[e]
        y = x @ w if module.is_transposed else F.linear(x, w)
        if module.has_bias:
            y = y + getattr(module, f"{param}_bias")[e]
        observe = observers.get(param)
        return observe(e, x, y, slots[token]) if observe else y

    out = torch.zeros_like(hidden_states)
    n_experts = getattr(module, up).shape[0]
    for e in torch.unique(top_k_index).tolist():  # sorted: the same order every run
        if e >= n_experts:  # an expert-parallel sentinel: not this rank's expert
            continue
        token, pos = torch.where(top_k_index == e)
        h = apply(up, e, hidden_states[token], token)
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        y = apply("down_proj", e, h, token) * top_k_weights[token, pos, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def _token_major(shape, slots_shape) -> bool:
    """Whether an input of `shape` (..., d) holds the batch's (B, T) tokens in order: (B, T, d) as
    such, flattened (an MoE block's (B T, d)), or with singleton axes (DeepSeek's (B, 1, T, d))."""
    lead = shape[:-1]
    if len(lead) == 1:
        return lead[0] == slots_shape.numel()
    return tuple(s for s in lead if s != 1) == tuple(s for s in slots_shape if s != 1)


@contextmanager
def _capture(units: Sequence[CaptureUnit], projections, acc, slots_ref, blocks, signs, val_grad=None, dots=None):
    """Hooks that project x_t and delta_t of each unit and add the outer products into
    acc[slot, unit] (n_slots, n_units, k_out * k_in). With a validation gradient per unit, they also add
    <delta_t x_t^T, G_V> into dots[slot]: exactly, delta_t . (G_V x_t), for a (d_out, d_in)
    tensor; as (B^T delta_t) . (A^T x_t) for a LowRank G_V ~= B A^T, where, for a Linear, the
    factors ride along with the projections in the same two matmuls. Always removed on exit.

    A Linear sees the batch's tokens as (batch, seq, d) or in another token-major layout
    (`_token_major`); routers and experts see flattened tokens, and each token's problem comes
    from slots_ref[0] flattened."""
    import torch

    handles, patched = [], {}

    def linear_hook(m_idx, r_in, r_out):
        unit_val_grad = _unit_val_grad(val_grad[m_idx]) if val_grad is not None else None
        low_rank = unit_val_grad if isinstance(unit_val_grad, LowRank) else None
        k_in, k_out = r_in.shape[1], r_out.shape[1]  # blocks * k_in, blocks * k_out
        if low_rank is not None:  # (d_in, blocks k_in + r) and (d_out, blocks k_out + r)
            r_in = torch.cat([r_in, low_rank.in_factor], dim=1)
            r_out = torch.cat([r_out, low_rank.out_factor], dim=1)

        def forward_hook(module, inputs, output):
            x = inputs[0]
            slots = slots_ref[0]  # (B, T): one sequence, so one problem, per row; -1 on padding
            if not _token_major(x.shape, slots.shape):
                raise GradselError(f"module {units[m_idx].name} sees inputs of shape {tuple(x.shape)}, not "
                                   "(batch, seq, d)", "exclude it with --modules")
            x = x.reshape(*slots.shape, -1)
            row_slot = slots[:, 0]  # (B,)
            real = (slots >= 0).unsqueeze(-1)  # (B, T, 1)
            x = x.detach()  # a view: q, k and v share one input
            x_proj = x.float() @ r_in  # (B, T, blocks * k_in [+ r])
            x_low = None
            if low_rank is not None:
                x_proj, x_low = x_proj[..., :k_in], x_proj[..., k_in:]
            # With frozen weights autograd keeps no x for weight gradients; the exact alignment
            # holds the (shared) view until backward, where G_V x_t is formed and dropped.
            x_held = x if unit_val_grad is not None and low_rank is None else None

            def grad_hook(grad):
                grad = grad.float().reshape(*slots.shape, -1)  # a no-op in float32; one copy in bfloat16
                d_proj = (grad @ r_out) * real  # (B, T, blocks * k_out [+ r])
                if x_low is not None:  # (B^T delta_t) . (A^T x_t), summed over each row's tokens
                    d_proj, d_low = d_proj[..., :k_out], d_proj[..., k_out:]
                    dots.index_add_(0, row_slot, (d_low * x_low).sum((1, 2)).double())
                B, T = d_proj.shape[:2]
                # Sum over a row's tokens inside the batched matmul: (B, blocks, k_out, k_in).
                per_row = torch.einsum("rtbo,rtbi->rboi", d_proj.reshape(B, T, blocks, -1),
                                       x_proj.reshape(B, T, blocks, -1))
                acc[:, m_idx].index_add_(0, row_slot, per_row.reshape(B, -1))
                if x_held is not None:  # delta_t . (G_V x_t): one more matmul, the cost of the forward
                    gx = x_held.float() @ unit_val_grad.T  # (B, T, d_out)
                    dots.index_add_(0, row_slot, ((grad * gx).sum(-1) * real[..., 0]).sum(-1).double())

            output = _require_grad(output)
            output.register_hook(grad_hook)
            return output

        return forward_hook

    def router_hooks(m_idx, observe):
        def pre_hook(module, args):  # so that the logits, and the scores made from them, are tracked
            x = args[0]
            return args if x.requires_grad else (x.detach().requires_grad_(True), *args[1:])

        def forward_hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            logits = output[0] if isinstance(output, tuple) else None
            if logits is None or logits.shape != (x.shape[0], module.weight.shape[0]) \
                    or x.shape[0] != slots_ref[0].numel():
                raise GradselError(f"router {units[m_idx].name} ({type(module).__name__}) does not return its "
                                   "per-token logits first", "exclude it with --modules")
            observe(x, logits, slots_ref[0].reshape(-1), val_grad=None if val_grad is None else val_grad[m_idx])
            return output

        return pre_hook, forward_hook

    for m_idx, unit in enumerate(units):
        r_in, r_out = projections[m_idx]
        if unit.kind == "linear":
            handles.append(unit.module.register_forward_hook(linear_hook(m_idx, r_in, r_out)))
            continue
        observe = _token_observer(m_idx, r_in, r_out, acc, dots, blocks)
        if unit.kind == "router":
            pre, post = router_hooks(m_idx, observe)
            handles += [unit.module.register_forward_pre_hook(pre), unit.module.register_forward_hook(post)]
        else:  # experts: expert e's delta is signed by signs[m_idx][e] (expert_signs)
            def expert_observer(e, x, y, slots, observe=observe, m_idx=m_idx):
                return observe(x, y, slots, sign=float(signs[m_idx][e]),
                               val_grad=None if val_grad is None else val_grad[m_idx][e])
            patched.setdefault(unit.module, {})[unit.param] = expert_observer
    for module, observers in patched.items():
        module.forward = partial(_fused_experts_forward, module, observers=observers, slots_ref=slots_ref)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module in patched:
            del module.forward  # back to the class's forward


def projected_features(model, groups: Sequence[ProblemRollouts], spec: ProjectorSpec, *, loss_agg: str,
                       pad_id: int, device: str = "cpu", max_tokens: int = 8192, progress=None,
                       val_grad: list | None = None):
    """(n_problems, spec.dim) float32 array of projected gradients; zero rows for zero advantage.

    With `val_grad` (per unit, the validation gradient: a (d_out, d_in) tensor or its LowRank
    factors; for experts, one of those per expert), also returns the inner products
    <g_p, val_grad> (float64), computed in the same pass.
    """
    import torch

    units = resolve_units(model, spec.modules)
    projections = [module_projections(spec, u.name, u.d_out, u.d_in, device) for u in units]
    signs = [expert_signs(spec, u.name, u.n_experts) for u in units]
    acc = torch.zeros((len(groups), len(units), spec.block_dim), dtype=torch.float32, device=device)
    dots = torch.zeros(len(groups), dtype=torch.float64, device=device)
    slots_ref = [None]
    for p in model.parameters():
        p.requires_grad_(False)
    head_hooked = any(u.module is model.get_output_embeddings() for u in units)
    with _capture(units, projections, acc, slots_ref, spec.blocks, signs, val_grad, dots):
        for batch in pack_batches(groups, loss_agg, max_tokens):
            ids, mask, weights, slots = _batch_tensors(batch, pad_id, device)
            slots_ref[0] = slots
            policy_loss(model, ids, mask, weights, all_logits=head_hooked).backward()
            if progress:
                progress(len(batch), int(mask.sum()))
    features = acc.reshape(len(groups), -1).cpu().numpy()
    return (features, dots.cpu().numpy()) if val_grad is not None else features


def validation_gradient(model, groups: Sequence[ProblemRollouts], module_names: Sequence[str], *, loss_agg: str,
                    pad_id: int, device: str = "cpu", max_tokens: int = 8192, scales: Sequence[float] | None = None):
    """The exact gradient of sum_p scale_p * L_p for each unit's weight ((d_out, d_in), or
    (n_experts, d_out, d_in) for experts), scaled to unit Frobenius norm over all units together:
    the validation direction g_V, kept per unit."""
    from dataclasses import replace

    import torch

    if scales is not None:  # scale_p enters through the advantages, which the loss is linear in
        groups = [replace(g, advantages=[a * s for a in g.advantages]) for g, s in zip(groups, scales)]
    units = resolve_units(model, module_names)
    params = exact_parameters(model, [u.parameter_name for u in units])
    grads = _parameter_gradients(model, groups, params, loss_agg=loss_agg, pad_id=pad_id, device=device,
                                 max_tokens=max_tokens)
    grads = [u.gradient_matrix(g) for u, g in zip(units, grads)]
    for p in model.parameters():
        p.requires_grad_(False)
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    if total == 0:
        raise zero_validation_gradient()
    return [g / total.float() for g in grads]


@dataclass(frozen=True)
class LowRank:
    """A module's validation gradient as G ~= out_factor @ in_factor.T: (d_out, r) and (d_in, r)."""

    out_factor: object
    in_factor: object


# The truncated G_V keeps all but this share of its Frobenius norm (over all units together).
# Validation gradients are sums of few outer products and their spectra fall fast: on tiny-arith
# a 5% residual alone keeps 6-22 of each module's 192 singular values (docs/benchmarks.md).
LOW_RANK_RESIDUAL = 0.05
# ... but the components chosen never cost more than this share of the exact alignment's
# multiply-adds per token: sum over units of r (d_in + d_out) <= LOW_RANK_MAX_COST * sum of
# d_in d_out, about 1/64 of the pass (a forward and an input-gradient matmul per unit cost
# 2 d_in d_out), whatever G_V looks like. One without structure (a random model, a large and
# varied validation set) would otherwise need nearly full rank, and the alignment would cost as
# much as the weight gradient the hooks avoid.
LOW_RANK_MAX_COST = 1 / 32
# Each rank is then rounded up to a multiple of this. Matmuls run in column tiles: on the
# development CPU a (2048, 512) @ (512, n) product took 200 us at n = 16 and 330-460 us at n = 8,
# 24 or 26. The components that fill a started tile cost no time, and the projections' own 16
# columns are one tile already. So the pass pays at most one more tile per side per module
# beyond the budget.
LOW_RANK_TILE = 16


def _matrices(val_grad: Sequence) -> list:
    """A per-unit validation gradient as one entry per matrix: an expert stack, a (n_experts, d_out, d_in)
    tensor or a list of per-expert entries, gives one per expert."""
    return [m for t in val_grad for m in (t if isinstance(t, list) or getattr(t, "ndim", 2) == 3 else [t])]


def truncate_validation_gradient(val_grad: Sequence, residual: float = LOW_RANK_RESIDUAL,
                    max_cost: float = LOW_RANK_MAX_COST, tile: int = LOW_RANK_TILE) -> list:
    """Truncate the validation gradient by SVD, with the ranks chosen over all matrices at once.

    The singular components of every matrix (each expert's its own) are taken in order of
    sigma^2 / (d_out + d_in), the squared norm a component keeps per multiply-add per token, until
    those taken hold all but `residual` of G_V's norm, or the next would take them over `max_cost`
    of the exact alignment's multiply-adds. A fixed budget so goes where G_V's norm is: a module
    with a steep spectrum gets the rank it needs, one whose G_V is small or flat a low rank,
    possibly 0 (it then adds nothing to the dot). Each non-zero rank is then rounded up to a
    multiple of `tile` (LOW_RANK_TILE). A matrix whose rank would cost as much per token as the
    matrix itself (r (d_in + d_out) >= d_in d_out) keeps the full matrix. A fused expert stack
    (n_experts, d_out, d_in) becomes a list with one entry per expert.
    """
    import torch

    matrices = _matrices(val_grad)
    # singular values on the CPU, whatever the device: the choice is bookkeeping over small vectors;
    # the singular vectors come later, only where a rank is kept
    spectra = [torch.linalg.svdvals(m.double()).cpu() for m in matrices]
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(spectra)])  # (components,)
    energy = torch.cat(spectra) ** 2
    width = torch.tensor([sum(m.shape) for m in matrices], dtype=torch.float64)[owner]  # its multiply-adds
    order = torch.sort(energy / width, descending=True, stable=True).indices  # stable: each matrix's own order
    kept_before = torch.cumsum(energy[order], 0) - energy[order]
    cost = torch.cumsum(width[order], 0)
    # both sums grow along the order, so the components taken are a prefix of it
    taken = (kept_before < (1 - residual**2) * energy.sum()) & (cost <= max_cost * sum(m.numel() for m in matrices))
    ranks = torch.bincount(owner[order[:int(taken.sum())]], minlength=len(matrices)).tolist()
    ranks = [min(-(-r // tile) * tile, min(m.shape)) for r, m in zip(ranks, matrices)]

    def truncate(m, rank):
        if rank * sum(m.shape) >= m.numel():
            return m
        if rank == 0:
            return LowRank(m.new_zeros(m.shape[0], 0), m.new_zeros(m.shape[1], 0))
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        return LowRank((u[:, :rank] * s[:rank]).to(m.dtype), vh[:rank].T.contiguous().to(m.dtype))

    truncated = iter([truncate(m, r) for m, r in zip(matrices, ranks)])
    return [[next(truncated) for _ in g] if g.dim() == 3 else next(truncated) for g in val_grad]


def alignment_cost(val_grad: Sequence) -> float:
    """Multiply-adds per token of aligning against `val_grad` (truncate_validation_gradient's output), as a share
    of the exact alignment's: r (d_out + d_in) for a LowRank matrix, d_out d_in for a full one."""
    import torch

    matrices = _matrices(val_grad)
    used = sum(t.numel() if isinstance(t, torch.Tensor) else t.out_factor.numel() + t.in_factor.numel()
               for t in matrices)
    full = sum(t.numel() if isinstance(t, torch.Tensor) else t.out_factor.shape[0] * t.in_factor.shape[0]
               for t in matrices)
    return used / full


def zero_validation_gradient() -> GradselError:
    return GradselError("every validation problem has zero advantage, so the validation gradient is zero",
                        "use more rollouts per validation problem (`score --n-val`; refresh keeps the store's) or a validation set the model "
                        "sometimes solves")


def head_features(model, groups: Sequence[ProblemRollouts], spec: ProjectorSpec, *, loss_agg: str,
                  pad_id: int, device: str = "cpu", max_tokens: int = 8192, progress=None):
    """Output-layer gradient from the forward pass alone: delta_t = w_t (softmax_t - onehot_t)."""
    import torch

    (head,) = resolve_units(model, spec.modules)
    r_in, r_out = module_projections(spec, head.name, head.d_out, head.d_in, device)
    acc = torch.zeros((len(groups), spec.block_dim), dtype=torch.float32, device=device)
    with torch.no_grad():
        for batch in pack_batches(groups, loss_agg, max_tokens):
            ids, mask, weights, slots = _batch_tensors(batch, pad_id, device)
            rows, cols = torch.nonzero(weights, as_tuple=True)  # response positions only: (N,)
            captured = {}
            with _output_layer_sees(model, rows, cols, captured):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float()  # (N, V)
            if "h" not in captured:  # the model computed its logits without calling its output module
                raise GradselError(f"{type(model).__name__} does not call its output layer as a module, so "
                                   "--feature head cannot see its input", "use --feature projected")
            probs = torch.softmax(logits, dim=-1)
            probs[torch.arange(len(rows), device=probs.device), ids[rows, cols + 1]] -= 1
            delta = probs * weights[rows, cols].unsqueeze(-1)  # d(sum w nll)/d logits
            h = captured["h"][0].float() @ r_in
            acc.index_add_(0, slots[rows, cols], block_outer(delta @ r_out, h, spec.blocks))
            if progress:
                progress(len(batch), int(mask.sum()))
    return acc.cpu().numpy()


# -- exact feature: the reference algorithm -----------------------------------------------------

def exact_problem_gradient(model, group: ProblemRollouts, params, *, loss_agg: str, pad_id: int,
                           device: str = "cpu"):
    """Full gradient of L_p over `params` (flattened, float32), one backward pass per problem."""
    import torch

    if group.zero_advantage:
        return torch.zeros(sum(p.numel() for p in params), device=device)
    grads = _parameter_gradients(model, [group], params, loss_agg=loss_agg, pad_id=pad_id, device=device,
                                 max_tokens=1 << 30)
    return torch.cat([g.reshape(-1) for g in grads])


def _parameter_gradients(model, groups: Sequence[ProblemRollouts], params, *, loss_agg: str, pad_id: int,
                         device: str, max_tokens: int) -> list:
    """float32 gradients of sum_p L_p over `params` (which require grad), left off the model."""
    import torch

    model.zero_grad(set_to_none=True)
    for batch in pack_batches(groups, loss_agg, max_tokens):
        ids, mask, weights, _ = _batch_tensors(batch, pad_id, device)
        policy_loss(model, ids, mask, weights).backward()
    grads = [p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
             for p in params]
    model.zero_grad(set_to_none=True)  # the returned tensors live on; the model holds no .grad
    return grads


def exact_parameters(model, names: Sequence[str]):
    """Turn on gradients for the named parameters only, and return them in order."""
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def make_spec(model, *, feature: str, modules: str | None, sketch: tuple[int, int], seed: int,
              dtype: str, kind: str = "rademacher", blocks: int = 1) -> ProjectorSpec:
    if feature not in FEATURES:
        raise GradselError(f"unknown feature {feature!r}", f"choose one of {', '.join(FEATURES)}")
    if feature == "exact":  # the reference: every parameter (or the --modules units' weights), no projection
        named = list(model.named_parameters())
        if modules:
            params = dict(named)
            named = [(u.parameter_name, params[u.parameter_name]) for u in select_units(model, modules)]
        return ProjectorSpec(feature=feature, seed=seed, k_out=0, k_in=0, modules=tuple(n for n, _ in named),
                             dims=tuple((p.numel(), 1) for _, p in named), dtype=dtype, kind="none")
    chosen = select_units(model, modules, feature=feature)
    return ProjectorSpec(feature=feature, seed=seed, k_out=sketch[0], k_in=sketch[1], blocks=blocks,
                         modules=tuple(u.name for u in chosen),
                         dims=tuple((u.n_experts * u.d_out, u.d_in) for u in chosen), dtype=dtype, kind=kind)
