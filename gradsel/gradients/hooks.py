"""The projected and head features from forward and backward hooks: one pass over a packed batch
gives every problem's sketched gradient (and, with a validation gradient, its exact alignment)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial

from gradsel.core.errors import GradselError
from gradsel.gradients.alignment import LowRank
from gradsel.gradients.loss import (
    Packing,
    ProblemRollouts,
    batch_tensors,
    output_layer_sees,
    pack_batches,
    packing_for,
    policy_loss,
)
from gradsel.gradients.sketch import ProjectorSpec, block_outer, expert_signs, module_projections
from gradsel.gradients.units import CaptureUnit, requires_grad_only, resolve_units

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


def _fused_experts_forward(module, hidden_states, top_k_index, top_k_weights, *, observers, batch_slots):
    """A transformers 5 fused-experts forward (hidden_states (n, d), top_k_index and
    top_k_weights (n, top_k)), expert by expert as its eager form, with each hooked weight's input
    and output shown to its observer: observers[param](expert, x, y, slots) -> y. The flags of
    `use_experts_implementation` (gate, bias, transposed storage) and the module's own
    `_apply_gate` are honoured, so any model it decorates computes what it computes unhooked."""
    import torch
    import torch.nn.functional as F

    slots = batch_slots.current.reshape(-1)
    if hidden_states.shape[0] != slots.numel():
        raise GradselError(
            f"{type(module).__name__} sees {hidden_states.shape[0]} tokens, not the batch's {slots.numel()}",
            "exclude its experts with --modules",
        )
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


class BatchSlots:
    """The packed batch the model is running, as its hooks see it: `current` holds its slots
    (B, T), one problem per row (a sequence, or shared-prompt responses), -1 on padding; set
    before each forward pass."""

    def __init__(self) -> None:
        self.current = None


def _linear_hook(
    name: str, m_idx: int, r_in, r_out, acc, dots, batch_slots: BatchSlots, blocks: int, unit_val_grad=None
):
    """The forward hook of a Linear unit: it projects x_t (and, with a validation gradient, holds
    what the alignment needs) and registers the backward hook that adds the problem's sketched
    delta_t x_t^T into acc[:, m_idx] (and its alignment into dots). A Linear sees the batch's
    tokens as (batch, seq, d) or in another token-major layout (`_token_major`)."""
    import torch

    low_rank = unit_val_grad if isinstance(unit_val_grad, LowRank) else None
    k_in, k_out = r_in.shape[1], r_out.shape[1]  # blocks * k_in, blocks * k_out
    if low_rank is not None:  # (d_in, blocks k_in + r) and (d_out, blocks k_out + r)
        r_in = torch.cat([r_in, low_rank.in_factor], dim=1)
        r_out = torch.cat([r_out, low_rank.out_factor], dim=1)

    def forward_hook(module, inputs, output):
        x = inputs[0]
        slots = batch_slots.current  # (B, T)
        if not _token_major(x.shape, slots.shape):
            raise GradselError(
                f"module {name} sees inputs of shape {tuple(x.shape)}, not (batch, seq, d)", "exclude it with --modules"
            )
        x = x.reshape(*slots.shape, -1)
        row_slot = slots.amax(1)  # (B,): the row's problem, whichever side its padding is on
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
            per_row = torch.einsum(
                "rtbo,rtbi->rboi", d_proj.reshape(B, T, blocks, -1), x_proj.reshape(B, T, blocks, -1)
            )
            acc[:, m_idx].index_add_(0, row_slot, per_row.reshape(B, -1))
            if x_held is not None:  # delta_t . (G_V x_t): one more matmul, the cost of the forward
                gx = x_held.float() @ unit_val_grad.T  # (B, T, d_out)
                dots.index_add_(0, row_slot, ((grad * gx).sum(-1) * real[..., 0]).sum(-1).double())

        output = _require_grad(output)
        output.register_hook(grad_hook)
        return output

    return forward_hook


def _router_hooks(name: str, observe, batch_slots: BatchSlots, unit_val_grad=None):
    """(pre-hook, forward hook) of a router unit: its input made tracked, so the logits and the
    scores made from them are; its per-token logits shown to `observe` (_token_observer)."""

    def pre_hook(module, args):
        x = args[0]
        return args if x.requires_grad else (x.detach().requires_grad_(True), *args[1:])

    def forward_hook(module, inputs, output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        logits = output[0] if isinstance(output, tuple) else None
        if (
            logits is None
            or logits.shape != (x.shape[0], module.weight.shape[0])
            or x.shape[0] != batch_slots.current.numel()
        ):
            raise GradselError(
                f"router {name} ({type(module).__name__}) does not return its per-token logits first",
                "exclude it with --modules",
            )
        observe(x, logits, batch_slots.current.reshape(-1), val_grad=unit_val_grad)
        return output

    return pre_hook, forward_hook


def _expert_observer(observe, signs, unit_val_grad=None):
    """The observer of one hooked weight of a fused-experts unit (_fused_experts_forward): expert
    e's delta is signed by signs[e] (expert_signs) and aligned with its own validation gradient."""

    def observer(e, x, y, slots):
        return observe(x, y, slots, sign=float(signs[e]), val_grad=None if unit_val_grad is None else unit_val_grad[e])

    return observer


@contextmanager
def _capture(
    units: Sequence[CaptureUnit], projections, acc, batch_slots: BatchSlots, blocks, signs, val_grad=None, dots=None
):
    """Hooks that project x_t and delta_t of each unit and add the outer products into
    acc[slot, unit] (n_slots, n_units, k_out * k_in). With a validation gradient per unit, they also add
    <delta_t x_t^T, G_V> into dots[slot]: exactly, delta_t . (G_V x_t), for a (d_out, d_in)
    tensor; as (B^T delta_t) . (A^T x_t) for a LowRank G_V ~= B A^T, where, for a Linear, the
    factors ride along with the projections in the same two matmuls. Always removed on exit.

    Linears are hooked by `_linear_hook`, routers by `_router_hooks`; fused experts run a patched
    forward (`_fused_experts_forward`) that shows each hooked weight to its `_expert_observer`.
    Routers and experts see flattened tokens; each token's problem comes from `batch_slots`."""
    handles, patched = [], {}
    for m_idx, unit in enumerate(units):
        r_in, r_out = projections[m_idx]
        unit_val_grad = None if val_grad is None else val_grad[m_idx]
        if unit.kind == "linear":
            hook = _linear_hook(
                unit.name, m_idx, r_in, r_out, acc, dots, batch_slots, blocks, _unit_val_grad(unit_val_grad)
            )
            handles.append(unit.module.register_forward_hook(hook))
            continue
        observe = _token_observer(m_idx, r_in, r_out, acc, dots, blocks)
        if unit.kind == "router":
            pre, post = _router_hooks(unit.name, observe, batch_slots, unit_val_grad)
            handles += [unit.module.register_forward_pre_hook(pre), unit.module.register_forward_hook(post)]
        else:
            patched.setdefault(unit.module, {})[unit.param] = _expert_observer(observe, signs[m_idx], unit_val_grad)
    for module, observers in patched.items():
        module.forward = partial(_fused_experts_forward, module, observers=observers, batch_slots=batch_slots)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module in patched:
            del module.forward  # back to the class's forward


def projected_features(
    model,
    groups: Sequence[ProblemRollouts],
    spec: ProjectorSpec,
    *,
    loss_agg: str,
    pad_id: int,
    device: str = "cpu",
    max_tokens: int = 8192,
    progress=None,
    val_grad: list | None = None,
    packing: Packing = Packing(),
):
    """(n_problems, spec.dim) float32 array of projected gradients; zero rows for zero advantage.

    With `val_grad` (per unit, the validation gradient: a (d_out, d_in) tensor or its LowRank
    factors; for experts, one of those per expert), also returns the inner products
    <g_p, val_grad> (float64), computed in the same pass. `packing` lays the sequences out (by
    default a problem's responses share one copy of its prompt where the model takes it).
    """
    import torch

    units = resolve_units(model, spec.modules)
    projections = [module_projections(spec, u.name, u.d_out, u.d_in, device) for u in units]
    signs = [expert_signs(spec, u.name, u.n_experts) for u in units]
    acc = torch.zeros((len(groups), len(units), spec.block_dim), dtype=torch.float32, device=device)
    dots = torch.zeros(len(groups), dtype=torch.float64, device=device)
    batch_slots = BatchSlots()
    head_hooked = any(u.module is model.get_output_embeddings() for u in units)
    packing = packing_for(model, packing)
    with requires_grad_only(model), _capture(units, projections, acc, batch_slots, spec.blocks, signs, val_grad, dots):
        for rows in pack_batches(groups, loss_agg, max_tokens, packing.share_prompts):
            batch = batch_tensors(rows, pad_id, device, packing.padding_side)
            batch_slots.current = batch.slots
            policy_loss(model, batch, all_logits=head_hooked).backward()
            if progress:
                progress(len(rows), batch.n_tokens)
    features = acc.reshape(len(groups), -1).cpu().numpy()
    return (features, dots.cpu().numpy()) if val_grad is not None else features


def head_features(
    model,
    groups: Sequence[ProblemRollouts],
    spec: ProjectorSpec,
    *,
    loss_agg: str,
    pad_id: int,
    device: str = "cpu",
    max_tokens: int = 8192,
    progress=None,
    packing: Packing = Packing(),
):
    """Output-layer gradient from the forward pass alone: delta_t = w_t (softmax_t - onehot_t)."""
    import torch

    (head,) = resolve_units(model, spec.modules)
    r_in, r_out = module_projections(spec, head.name, head.d_out, head.d_in, device)
    acc = torch.zeros((len(groups), spec.block_dim), dtype=torch.float32, device=device)
    packing = packing_for(model, packing)
    with torch.no_grad():
        for packed in pack_batches(groups, loss_agg, max_tokens, packing.share_prompts):
            batch = batch_tensors(packed, pad_id, device, packing.padding_side)
            ids, weights, slots = batch.ids, batch.weights, batch.slots
            rows, cols = torch.nonzero(weights, as_tuple=True)  # response positions only: (N,)
            captured = {}
            with output_layer_sees(model, rows, cols, captured):
                logits = batch.forward(model).logits[0].float()  # (N, V)
            if "h" not in captured:  # the model computed its logits without calling its output module
                raise GradselError(
                    f"{type(model).__name__} does not call its output layer as a module, so "
                    "--feature head cannot see its input",
                    "use --feature projected",
                )
            probs = torch.softmax(logits, dim=-1)
            probs[torch.arange(len(rows), device=probs.device), ids[rows, cols + 1]] -= 1
            delta = probs * weights[rows, cols].unsqueeze(-1)  # d(sum w nll)/d logits
            h = captured["h"][0].float() @ r_in
            acc.index_add_(0, slots[rows, cols], block_outer(delta @ r_out, h, spec.blocks))
            if progress:
                progress(len(packed), batch.n_tokens)
    return acc.cpu().numpy()
