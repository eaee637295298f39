"""The in-pass alignment's validation gradient (`score --alignment lowrank|exact`): the exact
gradient of the validation loss per unit, its SVD truncation with ranks chosen over all units,
and what aligning against it costs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gradsel.core.errors import GradselError
from gradsel.gradients.exact import exact_parameters, parameter_gradients
from gradsel.gradients.loss import Packing, ProblemRollouts
from gradsel.gradients.units import resolve_units


def validation_gradient(
    model,
    groups: Sequence[ProblemRollouts],
    module_names: Sequence[str],
    *,
    loss_agg: str,
    pad_id: int,
    device: str = "cpu",
    max_tokens: int = 8192,
    scales: Sequence[float] | None = None,
    packing: Packing = Packing(),
):
    """The exact gradient of sum_p scale_p * L_p for each unit's weight ((d_out, d_in), or
    (n_experts, d_out, d_in) for experts), scaled to unit Frobenius norm over all units together:
    the validation direction g_V, kept per unit."""
    from dataclasses import replace

    import torch

    if scales is not None:  # scale_p enters through the advantages, which the loss is linear in
        groups = [replace(g, advantages=[a * s for a in g.advantages]) for g, s in zip(groups, scales)]
    units = resolve_units(model, module_names)
    params = exact_parameters(model, [u.parameter_name for u in units])
    grads = parameter_gradients(
        model, groups, params, loss_agg=loss_agg, pad_id=pad_id, device=device, max_tokens=max_tokens, packing=packing
    )
    grads = [u.gradient_matrix(g) for u, g in zip(units, grads)]
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


def truncate_validation_gradient(
    val_grad: Sequence,
    residual: float = LOW_RANK_RESIDUAL,
    max_cost: float = LOW_RANK_MAX_COST,
    tile: int = LOW_RANK_TILE,
) -> list:
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
    ranks = torch.bincount(owner[order[: int(taken.sum())]], minlength=len(matrices)).tolist()
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
    used = sum(
        t.numel() if isinstance(t, torch.Tensor) else t.out_factor.numel() + t.in_factor.numel() for t in matrices
    )
    full = sum(
        t.numel() if isinstance(t, torch.Tensor) else t.out_factor.shape[0] * t.in_factor.shape[0] for t in matrices
    )
    return used / full


def zero_validation_gradient() -> GradselError:
    return GradselError(
        "every validation problem has zero advantage, so the validation gradient is zero",
        "use more rollouts per validation problem (`score --n-val`; refresh keeps the store's) or a validation set the model "
        "sometimes solves",
    )
