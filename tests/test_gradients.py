"""Hook-projected gradients against exact per-problem gradients on real tiny models."""

import numpy as np
import pytest
import torch

from gradsel.gradients import (
    exact_parameters,
    exact_problem_gradient,
    expert_signs,
    group_advantages,
    head_features,
    make_spec,
    module_projections,
    projected_features,
    projection_matrix,
    resolve_units,
)
from gradsel.inputs.models import load_causal_lm
from toy_models import LOSS_AGG, exact_unit_gradients, tiny_config, tiny_moe, toy_groups


def exact_projected(model, group, spec):
    """R_out^T G R_in from the exact per-unit parameter gradients (the oracle); for a fused expert
    stack, the same for the (n_experts d_out, d_in) matrix it forms, with R_out repeated with the
    experts' signs: sum_e s_e R_out^T G_e R_in."""
    out = []
    for u, G in exact_unit_gradients(model, group, spec):
        r_in, r_out = (r.double() for r in module_projections(spec, u.name, u.d_out, u.d_in, "cpu"))
        signs = expert_signs(spec, u.name, u.n_experts)
        G = G.reshape(u.n_experts, u.d_out, u.d_in)
        for b in range(spec.blocks):
            r_o = r_out[:, b * spec.k_out : (b + 1) * spec.k_out]
            r_i = r_in[:, b * spec.k_in : (b + 1) * spec.k_in]
            out.append(sum(s * (r_o.T @ G[e] @ r_i) for e, s in enumerate(signs)).reshape(-1))
    return torch.cat(out).numpy()


def assert_matches_oracle(model, groups, spec, feats):
    for i, g in enumerate(groups):
        oracle = exact_projected(model, g, spec)
        if g.zero_advantage:
            assert not feats[i].any()
        else:
            np.testing.assert_allclose(feats[i], oracle, rtol=2e-3, atol=1e-6 * max(np.abs(oracle).max(), 1e-12))


@pytest.mark.parametrize("max_tokens, blocks", [(10_000, 1), (24, 1), (40, 4)])  # one batch, or many small ones
def test_projection_from_hooks_equals_projected_exact_gradient(max_tokens, blocks):
    model = load_causal_lm("tiny-arith")
    groups = toy_groups()
    spec = make_spec(model, feature="projected", modules=None, sketch=(8, 8), seed=3, dtype="float32", blocks=blocks)
    assert len(spec.modules) == 4 * 7  # q k v o gate up down in each of 4 blocks
    feats = projected_features(model, groups, spec, loss_agg=LOSS_AGG, pad_id=0, max_tokens=max_tokens)
    assert_matches_oracle(model, groups, spec, feats)


@pytest.mark.parametrize("modules", [r"\.layers\.2\.mlp\.", r"\.layers\.[13]\.self_attn\.[qo]_proj"])
def test_backward_that_starts_at_the_first_hooked_module_is_exact(modules):
    """Nothing upstream of the hooked modules is differentiated; their deltas are unchanged."""
    model = load_causal_lm("tiny-arith")
    groups = toy_groups(seed=4)
    spec = make_spec(model, feature="projected", modules=modules, sketch=(4, 4), seed=2, dtype="float32")
    feats = projected_features(model, groups, spec, loss_agg=LOSS_AGG, pad_id=0, max_tokens=40)
    assert_matches_oracle(model, groups, spec, feats)


def test_head_feature_equals_projected_lm_head_gradient():
    model = load_causal_lm("tiny-arith")
    groups = toy_groups(seed=1)
    spec = make_spec(model, feature="head", modules=None, sketch=(8, 8), seed=0, dtype="float32")
    assert spec.modules == ("lm_head",)
    feats = head_features(model, groups, spec, loss_agg=LOSS_AGG, pad_id=0)
    # The oracle: hooks on lm_head only, with a real backward pass.
    hooked = projected_features(model, groups, spec, loss_agg=LOSS_AGG, pad_id=0)
    np.testing.assert_allclose(feats, hooked, rtol=1e-4, atol=1e-7)
    assert not feats[2].any() and feats[0].any()


def test_projector_is_seeded_and_preserves_inner_products():
    a = projection_matrix(7, "layer", "in", 512, 256)
    assert torch.equal(a, projection_matrix(7, "layer", "in", 512, 256))
    assert not torch.equal(a, projection_matrix(8, "layer", "in", 512, 256))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, generator=gen), torch.randn(512, generator=gen)
    y = 0.6 * x + 0.8 * y
    errs = [
        abs(
            float((x @ projection_matrix(s, "m", "in", 512, 256)) @ (y @ projection_matrix(s, "m", "in", 512, 256)))
            - float(x @ y)
        )
        / float(x.norm() * y.norm())
        for s in range(20)
    ]
    assert np.median(errs) < 3 / 256**0.5  # JL: error ~ 1/sqrt(k)


def test_advantages():
    assert group_advantages([1, 1, 1, 1]) == [0.0] * 4
    a = group_advantages([1, 0, 0, 1])
    assert a[0] == pytest.approx(-a[1]) and a[0] == pytest.approx(0.5 / (np.std([1, 0, 0, 1], ddof=1) + 1e-6))
    assert group_advantages([1, 0], "drgrpo") == [0.5, -0.5]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_architectures_built_in_code(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    groups = toy_groups(seed=2, n_problems=4, vocab=32)
    spec = make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=1, dtype="float32")
    assert len(spec.modules) == 2 * 7
    feats = projected_features(model, groups, spec, loss_agg=LOSS_AGG, pad_id=0, max_tokens=40)
    assert_matches_oracle(model, groups, spec, feats)


def test_unsupported_module_type_is_refused_not_skipped():
    from transformers import AutoModelForCausalLM

    from gradsel.core.errors import GradselError

    model = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    with pytest.raises(GradselError, match="unsupported module type.*Conv1D"):
        make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=0, dtype="float32")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_moe_router_and_fused_experts_equal_projected_exact_gradient(arch):
    model = tiny_moe(arch)
    spec = make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=1, dtype="float32")
    kinds = [u.kind for u in resolve_units(model, spec.modules)]
    moe_layers = 1 if arch == "deepseek_v3" else 2
    assert kinds.count("router") == moe_layers and kinds.count("experts") == 2 * moe_layers  # gate-up, down
    groups = toy_groups(seed=2, n_problems=4, vocab=32)
    assert_matches_oracle(
        model, groups, spec, projected_features(model, groups, spec, loss_agg=LOSS_AGG, pad_id=0, max_tokens=40)
    )


@pytest.mark.parametrize("modules", [r"mlp\.experts\.down_proj", r"\.layers\.0\.mlp\.gate$"])
def test_moe_units_hooked_alone_are_exact(modules):
    """The first hooked unit is an expert stack's second weight, or a router: backward starts there."""
    model = tiny_moe("mixtral")
    spec = make_spec(model, feature="projected", modules=modules, sketch=(4, 4), seed=0, dtype="float32")
    groups = toy_groups(seed=3, n_problems=4, vocab=32)
    assert_matches_oracle(
        model, groups, spec, projected_features(model, groups, spec, loss_agg=LOSS_AGG, pad_id=0, max_tokens=40)
    )


def test_moe_alignment_equals_full_gradient_dot():
    """Against a Qwen2-MoE validation gradient: the exact alignment equals the full-gradient dot,
    and the per-expert low-rank one equals the exact alignment against its truncated matrices."""
    from gradsel.gradients import LowRank, truncate_validation_gradient, validation_gradient

    model = tiny_moe("qwen2_moe")
    groups = toy_groups(seed=5, n_problems=6, vocab=32)
    spec = make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=0, dtype="float32")
    val_grad = validation_gradient(model, groups[3:], spec.modules, loss_agg=LOSS_AGG, pad_id=0)
    exact = [
        sum(float((G * t.double()).sum()) for (_, G), t in zip(exact_unit_gradients(model, g, spec), val_grad))
        for g in groups
    ]
    kw = dict(loss_agg=LOSS_AGG, pad_id=0, max_tokens=30)
    _, dots = projected_features(model, groups, spec, val_grad=val_grad, **kw)
    np.testing.assert_allclose(dots, exact, rtol=1e-4, atol=1e-9)
    assert np.count_nonzero(dots) == sum(not g.zero_advantage for g in groups)

    def dense(t):
        return t.out_factor @ t.in_factor.T if isinstance(t, LowRank) else t

    low = truncate_validation_gradient(val_grad, residual=0.01, max_cost=1 / 4, tile=1)
    assert any(isinstance(e, LowRank) and e.out_factor.shape[1] > 0 for t in low if isinstance(t, list) for e in t)
    truncated = [torch.stack([dense(e) for e in t]) if isinstance(t, list) else dense(t) for t in low]
    _, dots_low = projected_features(model, groups, spec, val_grad=low, **kw)
    _, dots_truncated = projected_features(model, groups, spec, val_grad=truncated, **kw)
    np.testing.assert_allclose(dots_low, dots_truncated, rtol=1e-4, atol=1e-9)


def test_same_seed_same_vectors_other_seed_other_vectors():
    model = load_causal_lm("tiny-arith")
    groups = toy_groups(seed=4)
    feats = [
        projected_features(
            model,
            groups,
            make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=s, dtype="float32"),
            loss_agg=LOSS_AGG,
            pad_id=0,
        )
        for s in (0, 0, 1)
    ]
    assert np.array_equal(feats[0], feats[1])
    assert not np.allclose(feats[0], feats[2])


def test_exact_alignment_in_the_hooked_pass_equals_full_gradient_dot():
    from gradsel.gradients import validation_gradient

    model = load_causal_lm("tiny-arith")
    groups = toy_groups(seed=5)
    spec = make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=0, dtype="float32")
    val_grad = validation_gradient(model, groups[3:], spec.modules, loss_agg=LOSS_AGG, pad_id=0)
    assert abs(float(sum((t.double() ** 2).sum() for t in val_grad)) - 1) < 1e-6
    _, dots = projected_features(model, groups, spec, loss_agg=LOSS_AGG, pad_id=0, max_tokens=30, val_grad=val_grad)
    flat_target = torch.cat([t.reshape(-1) for t in val_grad]).double()
    params = exact_parameters(model, [u.parameter_name for u in resolve_units(model, spec.modules)])
    for g, d in zip(groups, dots):
        exact = float(exact_problem_gradient(model, g, params, loss_agg=LOSS_AGG, pad_id=0).double() @ flat_target)
        assert d == pytest.approx(exact, rel=1e-4, abs=1e-9)


def test_low_rank_alignment_equals_the_dot_with_its_truncated_target():
    """The factors ride along with the projections: the dots equal the exact hooked pass run
    against the truncated matrices, and the truncation stays within LOW_RANK_MAX_COST of the exact
    alignment's work."""
    from gradsel.gradients import (
        LOW_RANK_MAX_COST,
        LowRank,
        alignment_cost,
        truncate_validation_gradient,
        validation_gradient,
    )

    model = load_causal_lm("tiny-arith")
    groups = toy_groups(seed=5)
    spec = make_spec(model, feature="projected", modules=None, sketch=(4, 4), seed=0, dtype="float32")
    val_grad = validation_gradient(model, groups[3:], spec.modules, loss_agg=LOSS_AGG, pad_id=0)
    assert 0 < alignment_cost(truncate_validation_gradient(val_grad, tile=1)) <= LOW_RANK_MAX_COST == 1 / 32
    low = truncate_validation_gradient(val_grad)  # ranks rounded up to whole tiles of 16
    assert any(isinstance(t, LowRank) and t.out_factor.shape[1] > 0 for t in low)
    assert all(t.out_factor.shape[1] % 16 == 0 for t in low if isinstance(t, LowRank))
    assert alignment_cost(val_grad) == 1
    kw = dict(loss_agg=LOSS_AGG, pad_id=0, max_tokens=30)
    # and a budget so small that some units get rank 0: they add nothing to the dot
    tiny_budget = truncate_validation_gradient(val_grad, max_cost=1 / 256)
    assert {t.out_factor.shape[1] for t in tiny_budget} == {0, 16}
    for truncated in (low, tiny_budget):
        dense = [lr.out_factor @ lr.in_factor.T if isinstance(lr, LowRank) else lr for lr in truncated]
        feats_low, dots_low = projected_features(model, groups, spec, val_grad=truncated, **kw)
        feats_dense, dots_dense = projected_features(model, groups, spec, val_grad=dense, **kw)
        np.testing.assert_allclose(dots_low, dots_dense, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(feats_low, feats_dense, rtol=1e-4, atol=1e-5)  # the same sketch, in a wider matmul
        assert np.count_nonzero(dots_low) == sum(not g.zero_advantage for g in groups)


def with_spectrum(singular_values, shape=(64, 48), seed=0):
    """A (d_out, d_in) matrix with these singular values (the rest 0) and random singular vectors."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(shape[0], len(singular_values), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], len(singular_values), generator=gen, dtype=torch.float64))
    return (u * torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def test_truncate_validation_gradient_spends_its_budget_where_the_norm_is():
    """Ranks are chosen over all matrices at once, by squared norm kept per multiply-add: a steep
    spectrum gets the rank it needs before a flat one gets its second component, and each kept
    matrix is the best fit of its rank (Eckart-Young)."""
    from gradsel.gradients import LowRank, alignment_cost, truncate_validation_gradient

    steep = with_spectrum([10.0, 5.0, 1.0, 0.1, 0.1], seed=1)
    flat = with_spectrum([0.5] * 20, seed=2)
    # room for 4 components of width 64 + 48; one matrix per module, as the hooks see them
    budget = 4 * (64 + 48) / (2 * 64 * 48)
    low = truncate_validation_gradient([steep.float(), flat.float()], residual=1e-6, max_cost=budget, tile=1)
    assert [t.out_factor.shape[1] for t in low] == [3, 1]  # by sigma^2: 100, 25, 1, then 0.25 over 0.01
    assert alignment_cost(low) == pytest.approx(budget)
    for t, g in zip(low, (steep, flat)):
        assert isinstance(t, LowRank)
        r = t.out_factor.shape[1]
        residual = float((g - t.out_factor.double() @ t.in_factor.double().T).norm())
        assert residual == pytest.approx(float(torch.linalg.svdvals(g)[r:].norm()), rel=1e-4)
    # with budget to spare, the residual rule stops it: all but 5% of the norm of both together
    low = truncate_validation_gradient([steep.float(), flat.float()], residual=0.05, max_cost=1.0, tile=1)
    kept = [t.out_factor.shape[1] for t in low]
    total = float(steep.norm() ** 2 + flat.norm() ** 2)
    lost = float(sum(torch.linalg.svdvals(g)[r:].square().sum() for g, r in zip((steep, flat), kept)))
    assert lost <= 0.05**2 * total and kept[0] == 3 and 0 < kept[1] < 20
    # ranks fill whole tiles of columns (they cost no more time); a tile past the matrix stops at its rank
    low = truncate_validation_gradient(
        [steep.float(), flat.float(), with_spectrum([1e-3], seed=3).float()], residual=1e-6, max_cost=budget, tile=16
    )
    assert [t.out_factor.shape[1] for t in low] == [16, 16, 0]


def test_weighted_nll_is_the_shifted_token_loss():
    """The fused loss equals sum_t w_t * -log softmax(logits_t)[ids_{t+1}], written out."""
    import torch

    from gradsel.gradients.loss import weighted_nll

    torch.manual_seed(0)
    logits, ids, w = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7)), torch.rand(3, 7)
    w[:, -1] = 0  # as batch_tensors guarantees: the last position predicts nothing
    logp = torch.log_softmax(logits, dim=-1)
    expected = sum(-w[b, t] * logp[b, t, ids[b, t + 1]] for b in range(3) for t in range(6))
    assert torch.allclose(weighted_nll(logits, ids, w), expected, rtol=1e-6, atol=1e-6)


def test_policy_loss_on_weighted_positions_only_equals_the_full_logits_loss():
    """Gathering the response positions before the output layer changes no value and no gradient."""
    from gradsel.gradients.loss import batch_tensors, pack_batches, policy_loss, weighted_nll

    model = load_causal_lm("tiny-arith")
    batch = batch_tensors(next(pack_batches(toy_groups(seed=3), LOSS_AGG, 200)), 0, "cpu")
    ids, mask, weights = batch.ids, batch.mask, batch.weights
    params = exact_parameters(model, [n for n, _ in model.named_parameters()])
    results = []
    for all_logits in (False, True):
        model.zero_grad(set_to_none=True)
        loss = policy_loss(model, batch, all_logits=all_logits)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in params]))
    (gathered, g_grads), (full, f_grads) = results
    assert torch.allclose(full, weighted_nll(model(input_ids=ids, attention_mask=mask).logits, ids, weights))
    assert 0 < int((weights != 0).sum()) < weights.numel()  # prompt and padding positions were left out
    assert torch.allclose(gathered, full, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_grads, f_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_truncate_validation_gradient_caps_the_rank_of_an_unstructured_gradient():
    """A full-rank G_V would need nearly every singular value for a 5% residual; the cap keeps the
    alignment's cost bounded and keeps the top of the spectrum, the best approximation of that rank."""
    from gradsel.gradients import truncate_validation_gradient

    g = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    (low,) = truncate_validation_gradient([g], max_cost=1 / 8, tile=1)
    rank = low.out_factor.shape[1]
    assert rank == int(64 * 48 / 8 / (64 + 48))
    s = torch.linalg.svdvals(g.double())
    residual = float((g.double() - low.out_factor.double() @ low.in_factor.double().T).norm())
    assert residual == pytest.approx(float(s[rank:].norm()), rel=1e-4)  # Eckart-Young: the best rank-r fit
