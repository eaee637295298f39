"""Full parameter gradients, one backward pass per problem: the reference algorithm."""

from __future__ import annotations

from collections.abc import Sequence

from gradsel.gradients.loss import Packing, ProblemRollouts, batch_tensors, pack_batches, packing_for, policy_loss
from gradsel.gradients.units import requires_grad_only

# -- exact feature: the reference algorithm -----------------------------------------------------


def exact_problem_gradient(
    model,
    group: ProblemRollouts,
    params,
    *,
    loss_agg: str,
    pad_id: int,
    device: str = "cpu",
    packing: Packing = Packing(),
):
    """Full gradient of L_p over `params` (flattened, float32), one backward pass per problem."""
    import torch

    if group.zero_advantage:
        return torch.zeros(sum(p.numel() for p in params), device=device)
    grads = parameter_gradients(
        model, [group], params, loss_agg=loss_agg, pad_id=pad_id, device=device, max_tokens=1 << 30, packing=packing
    )
    return torch.cat([g.reshape(-1) for g in grads])


def parameter_gradients(
    model,
    groups: Sequence[ProblemRollouts],
    params,
    *,
    loss_agg: str,
    pad_id: int,
    device: str,
    max_tokens: int,
    packing: Packing = Packing(),
) -> list:
    """float32 gradients of sum_p L_p over `params`, left off the model. Only `params` require
    grad during the pass; every flag is the caller's again afterwards."""
    import torch

    packing = packing_for(model, packing)
    model.zero_grad(set_to_none=True)
    with requires_grad_only(model, params):
        for rows in pack_batches(groups, loss_agg, max_tokens, packing.share_prompts):
            policy_loss(model, batch_tensors(rows, pad_id, device, packing.padding_side)).backward()
    grads = [
        p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32) for p in params
    ]
    model.zero_grad(set_to_none=True)  # the returned tensors live on; the model holds no .grad
    return grads


def exact_parameters(model, names: Sequence[str]):
    """The named parameters, in order (each gradient pass turns on their gradients, and only
    theirs, for its own duration)."""
    named = dict(model.named_parameters())
    return [named[n] for n in names]
