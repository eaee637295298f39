"""The sketch weighs every module as the full gradient does (issue 26, item 6).

A projection normalised over the wrong dimension (d instead of k, or one side's k for the other)
scales each module's sketched inner product by a factor of its shape, and so reweights modules
against each other in the summed score without any test of the hooks noticing: the hooks compute
exactly the projection they are given. So for modules of different shapes (square, narrow (GQA's
k_proj), 4x tall and 4x wide MLP weights, an MoE router, fused expert stacks) and for real
per-problem gradients A and B, over many projection seeds:

- the mean of the sketch's <R_out^T A R_in, R_out^T B R_in> equals <A, B> (unbiased), within a
  few standard errors of the variance predicted below; and
- its variance equals the exact variance of the Rademacher two-sided sketch at this sketch size
  (within what 400 seeds can tell), computed in closed form from A and B.

Deterministic: fixed seeds, fixed gradients.
"""

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from gradsel.gradients import expert_signs, make_spec, module_projections, projected_features, resolve_units
from toy_models import LOSS_AGG, exact_unit_gradients, tiny_moe, toy_groups

N_SEEDS = 400
# One unit of each shape: the first decoder layer's (its MLP's, for the dense model).
UNITS = {
    "dense": r"\.layers\.0\.(self_attn\.[qk]_proj|mlp\.(up|down)_proj)$",
    "mixtral": r"\.layers\.0\.(self_attn\.q_proj|mlp\.gate|mlp\.experts\.(gate_up|down)_proj)$",
}


def dense_model():
    """A Llama whose MLP is 4x the width (up_proj 128x32, down_proj 32x128), with square q/o
    projections and narrow k/v ones (2 key-value heads of 4)."""
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def two_sided_variance(A, B, k_out: int, k_in: int) -> float:
    """Exact variance of <R_o^T A R_i, R_o^T B R_i> for independent R_o (d_out, k_out) and
    R_i (d_in, k_in) with i.i.d. entries +-1/sqrt(k). Conditioning on R_i, with W = R_i R_i^T,
    C = B W A^T and D = A^T B:
        Var = E_i[(|C|^2 + tr C^2 - 2 sum_a C_aa^2) / k_out] + (|D|^2 + tr D^2 - 2 sum_a D_aa^2) / k_in,
    from E[r_a r_b r_c r_d] = d_ab d_cd + d_ac d_bd + d_ad d_bc - 2 d_abcd for a +-1 vector r, which
    also gives E[W P W] = P + (P^T + tr(P) I - 2 diag(P)) / k_in for the expectations over R_i."""
    A, B = A.double(), B.double()
    D = A.T @ B
    P, Q = B.T @ B, A.T @ A
    diag_d2 = (D.diagonal() ** 2).sum()
    e_c2 = (1 + 1 / k_in) * (P * Q).sum() + (P.trace() * Q.trace() - 2 * (P.diagonal() * Q.diagonal()).sum()) / k_in
    e_trc2 = (D @ D).trace() + ((D * D).sum() + D.trace() ** 2 - 2 * diag_d2) / k_in
    ab, na, nb = (A * B).sum(1), (A * A).sum(1), (B * B).sum(1)
    e_diag_c2 = ((1 + 1 / k_in) * ab**2 + (na * nb - 2 * (A**2 * B**2).sum(1)) / k_in).sum()
    out_side = (e_c2 + e_trc2 - 2 * e_diag_c2) / k_out
    in_side = ((D * D).sum() + (D @ D).trace() - 2 * diag_d2) / k_in
    return float(out_side + in_side)


def predicted_variance(A, B, k_out: int, k_in: int, blocks: int) -> float:
    """The sketch's variance for one unit: `blocks` independent sketches averaged (1/blocks); for an
    expert stack (n, d_out, d_in), one R_out shared by the experts with random signs s, so the
    estimate is the sketch of A_s = sum_e s_e A_e against B_s, averaged over the 2^n sign vectors
    (plus the variance the signs themselves add)."""
    if A.dim() == 2:
        return two_sided_variance(A, B, k_out, k_in) / blocks
    signs = [torch.tensor(s, dtype=torch.float64) for s in itertools.product([1.0, -1.0], repeat=A.shape[0])]
    combos = [(torch.einsum("e,eoi->oi", s, A.double()), torch.einsum("e,eoi->oi", s, B.double())) for s in signs]
    means = np.array([float((a * b).sum()) for a, b in combos])
    return float(np.mean([two_sided_variance(a, b, k_out, k_in) for a, b in combos])) / blocks + float(means.var())


def sketched_dot(spec, unit, A, B) -> float:
    """<f(A), f(B)> for the unit's feature f as the hooks compute it (test_gradients.exact_projected:
    sum over experts of s_e R_out^T G_e R_in, blocks side by side)."""
    r_in, r_out = (r.double() for r in module_projections(spec, unit.name, unit.d_out, unit.d_in, "cpu"))
    s = torch.tensor(expert_signs(spec, unit.name, unit.n_experts), dtype=torch.float64)
    A, B = (G.double().reshape(unit.n_experts, unit.d_out, unit.d_in) for G in (A, B))
    fa = r_out.T @ torch.einsum("e,eoi->oi", s, A) @ r_in  # (blocks k_out, blocks k_in): blocks on the diagonal
    fb = r_out.T @ torch.einsum("e,eoi->oi", s, B) @ r_in
    total = 0.0
    for b in range(spec.blocks):
        o, i = slice(b * spec.k_out, (b + 1) * spec.k_out), slice(b * spec.k_in, (b + 1) * spec.k_in)
        total += float((fa[o, i] * fb[o, i]).sum())
    return total


@pytest.mark.parametrize("arch, k_out, k_in, blocks", [("dense", 8, 4, 1), ("mixtral", 4, 8, 2)])
def test_sketch_is_unbiased_per_module_with_the_predicted_variance(arch, k_out, k_in, blocks):
    model = dense_model() if arch == "dense" else tiny_moe("mixtral")
    groups = toy_groups(seed=2, n_problems=4, vocab=32, zero_at=())
    spec0 = make_spec(
        model, feature="projected", modules=UNITS[arch], sketch=(k_out, k_in), seed=0, dtype="float32", blocks=blocks
    )
    units = resolve_units(model, spec0.modules)
    shapes = {(u.kind, u.n_experts, u.d_out, u.d_in) for u in units}
    if arch == "dense":  # square, narrow, 4x tall, 4x wide
        assert {(o, i) for _, _, o, i in shapes} == {(32, 32), (16, 32), (128, 32), (32, 128)}
    else:
        assert {k for k, *_ in shapes} == {"linear", "router", "experts"} and len(units) == 4
    grads = [[G for _, G in exact_unit_gradients(model, g, spec0)] for g in groups[:2]]

    # The features the hooks store are these projections (one seed, both problems).
    feats = projected_features(model, groups[:2], spec0, loss_agg=LOSS_AGG, pad_id=0).astype(np.float64)
    per_unit = feats.reshape(2, len(units), -1)
    for m, u in enumerate(units):
        assert float(per_unit[0, m] @ per_unit[1, m]) == pytest.approx(
            sketched_dot(spec0, u, grads[0][m], grads[1][m]), rel=1e-3, abs=1e-12
        )

    for a, b in ((0, 1), (1, 1)):  # two problems' inner product, and a squared norm
        exact = np.array([float((A.double() * B.double()).sum()) for A, B in zip(grads[a], grads[b])])
        predicted = np.array([predicted_variance(A, B, k_out, k_in, blocks) for A, B in zip(grads[a], grads[b])])
        samples = np.array(
            [
                [sketched_dot(replace(spec0, seed=seed), u, A, B) for u, A, B in zip(units, grads[a], grads[b])]
                for seed in range(N_SEEDS)
            ]
        )
        for m, u in enumerate(units):
            where = f"{u.name} {u.kind} {u.n_experts}x{u.d_out}x{u.d_in}, problems {a},{b}"
            se = (predicted[m] / N_SEEDS) ** 0.5
            assert abs(samples[:, m].mean() - exact[m]) <= 4 * se, where
            assert 0.7 <= samples[:, m].var() / predicted[m] <= 1.4, where
        # the summed score: modules' projections are independent, so the variances add
        total = samples.sum(1)
        assert abs(total.mean() - exact.sum()) <= 4 * (predicted.sum() / N_SEEDS) ** 0.5
        assert 0.7 <= total.var() / predicted.sum() <= 1.4
