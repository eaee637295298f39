"""Per-problem GRPO policy gradients, randomly projected on two sides from hooks.

For a linear layer y = W x, one token's gradient is the outer product delta_t x_t^T, and a
problem's gradient is G_p = sum_t delta_t x_t^T over every position of its responses'
sequences. With seeded random matrices R_out (d_out x k_out) and R_in (d_in x k_in):

    R_out^T G_p R_in = sum_t (R_out^T delta_t)(R_in^T x_t)^T          # (k_out, k_in)

so one forward and one backward pass over a packed batch of many problems gives every problem's
projected gradient exactly, without ever forming a parameter gradient. The weights stay frozen
during the pass (units.requires_grad_only gives each its flag back after); the first hooked units' outputs are made to require grad, so autograd builds the graph from there.
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

The package, by concern: `loss` (advantages, verl's loss aggregation, packing, the policy loss),
`units` (which weight matrices are captured), `sketch` (the projector spec and its seeded
matrices), `hooks` (the projected and head features in one pass), `alignment` (the validation
gradient of `--alignment lowrank|exact` and its truncation), `exact` (full gradients, the
reference). This module re-exports what the rest of gradsel uses.
"""

from gradsel.gradients.alignment import (
    LOW_RANK_MAX_COST,
    LOW_RANK_RESIDUAL,
    LOW_RANK_TILE,
    LowRank,
    alignment_cost,
    truncate_validation_gradient,
    validation_gradient,
    zero_validation_gradient,
)
from gradsel.gradients.exact import exact_parameters, exact_problem_gradient
from gradsel.gradients.hooks import head_features, projected_features
from gradsel.gradients.loss import (
    PLAIN,
    Packing,
    ProblemRollouts,
    group_advantages,
    groups_from_table,
    pack_batches,
    packing_for,
    policy_loss,
    shared_prompt_attention,
    shared_prompt_support,
    token_weights,
)
from gradsel.gradients.sketch import (
    FEATURES,
    ProjectorSpec,
    expert_signs,
    make_spec,
    module_projections,
    projection_matrix,
)
from gradsel.gradients.units import CaptureUnit, resolve_units, select_units

__all__ = [
    "FEATURES",
    "LOW_RANK_MAX_COST",
    "LOW_RANK_RESIDUAL",
    "LOW_RANK_TILE",
    "PLAIN",
    "CaptureUnit",
    "LowRank",
    "Packing",
    "ProblemRollouts",
    "ProjectorSpec",
    "alignment_cost",
    "exact_parameters",
    "exact_problem_gradient",
    "expert_signs",
    "group_advantages",
    "groups_from_table",
    "head_features",
    "make_spec",
    "module_projections",
    "pack_batches",
    "packing_for",
    "policy_loss",
    "projected_features",
    "projection_matrix",
    "resolve_units",
    "select_units",
    "shared_prompt_attention",
    "shared_prompt_support",
    "token_weights",
    "truncate_validation_gradient",
    "validation_gradient",
    "zero_validation_gradient",
]
