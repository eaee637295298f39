"""The caller's model comes back as it went in (issue 26, item 8): every gradient pass gives each
parameter back its requires_grad flag, when it returns and when it raises. A user who scores a
model in a notebook and then trains it must train it."""

import pytest
import torch

from gradsel.core.errors import GradselError
from gradsel.gradients import (
    ProblemRollouts,
    exact_parameters,
    exact_problem_gradient,
    group_advantages,
    make_spec,
    projected_features,
    resolve_units,
    truncate_validation_gradient,
    validation_gradient,
)
from gradsel.inputs.models import load_causal_lm
from toy_models import LOSS_AGG, toy_groups


def flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def with_flags(pattern: str):
    """tiny-arith with every parameter trainable ("all"), or every other one ("mix")."""
    model = load_causal_lm("tiny-arith")
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(pattern == "all" or i % 2 == 0)
    return model


def broken_group() -> ProblemRollouts:
    """A problem whose response holds a token id beyond the vocabulary: the forward pass raises
    inside the gradient pass, after the flags were changed."""
    g = ProblemRollouts("bad", [[5, 6, 7]] * 2, [[8, 10_000], [9, 2]], [1.0, 0.0])
    g.advantages = group_advantages(g.rewards)
    return g


def passes(model):
    """Every entry point that turns gradients on or off: the hooked pass (plain, and aligned against
    a full and a truncated validation gradient), the validation gradient, the exact reference."""
    groups = toy_groups(seed=1)
    spec = make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=0, dtype="float32")
    kw = dict(loss_agg=LOSS_AGG, pad_id=0, max_tokens=64)
    params = exact_parameters(model, [u.parameter_name for u in resolve_units(model, spec.modules)])
    val_grad = validation_gradient(model, groups, spec.modules, **kw)
    low = truncate_validation_gradient(val_grad)
    return {
        "projected": lambda gs=groups: projected_features(model, gs, spec, **kw),
        "validation gradient": lambda gs=groups: validation_gradient(model, gs, spec.modules, **kw),
        "aligned": lambda gs=groups: projected_features(model, gs, spec, val_grad=val_grad, **kw),
        "lowrank": lambda gs=groups: projected_features(model, gs, spec, val_grad=low, **kw),
        "exact": lambda gs=groups: [exact_problem_gradient(model, g, params, loss_agg=LOSS_AGG, pad_id=0) for g in gs],
    }


@pytest.mark.parametrize("pattern", ["all", "mix"])
def test_every_pass_gives_the_flags_back(pattern):
    model = with_flags(pattern)
    before = flags(model)
    for name, run in passes(model).items():
        assert flags(model) == before, "computing the validation gradient"
        run()
        assert flags(model) == before, name
    # and the model still trains: a loss over every trainable parameter reaches them all
    model.zero_grad(set_to_none=True)
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    assert all((p.grad is not None) == before[n] for n, p in model.named_parameters())


@pytest.mark.parametrize("pattern", ["all", "mix"])
def test_a_pass_that_raises_gives_the_flags_back(pattern):
    model = with_flags(pattern)
    before = flags(model)
    for name, run in passes(model).items():
        with pytest.raises(IndexError):
            run([broken_group()])
        assert flags(model) == before, name
    # a validation set whose every problem has zero advantage: the validation gradient refuses it
    same = ProblemRollouts("same", [[5, 6]] * 2, [[7, 2], [8, 2]], [1.0, 1.0])
    same.advantages = group_advantages(same.rewards)
    spec = make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=0, dtype="float32")
    with pytest.raises(GradselError, match="zero advantage"):
        validation_gradient(model, [same], spec.modules, loss_agg=LOSS_AGG, pad_id=0)
    assert flags(model) == before
