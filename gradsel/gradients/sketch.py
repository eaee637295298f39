"""The two-sided random projection: the projector spec (what a store's vectors were made with),
seeded projection matrices per unit, and building a spec for a model."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from gradsel.core.choices import FEATURES
from gradsel.core.errors import GradselError
from gradsel.gradients.units import select_units


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
    r_in = projection_matrix(spec.seed, name, "in", d_in, spec.blocks * spec.k_in, spec.kind) * spec.blocks**0.5
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


def make_spec(
    model,
    *,
    feature: str,
    modules: str | None,
    sketch: tuple[int, int],
    seed: int,
    dtype: str,
    kind: str = "rademacher",
    blocks: int = 1,
) -> ProjectorSpec:
    if feature not in FEATURES:
        raise GradselError(f"unknown feature {feature!r}", f"choose one of {', '.join(FEATURES)}")
    if feature == "exact":  # the reference: every parameter (or the --modules units' weights), no projection
        named = list(model.named_parameters())
        if modules:
            params = dict(named)
            named = [(u.parameter_name, params[u.parameter_name]) for u in select_units(model, modules)]
        return ProjectorSpec(
            feature=feature,
            seed=seed,
            k_out=0,
            k_in=0,
            modules=tuple(n for n, _ in named),
            dims=tuple((p.numel(), 1) for _, p in named),
            dtype=dtype,
            kind="none",
        )
    chosen = select_units(model, modules, feature=feature)
    return ProjectorSpec(
        feature=feature,
        seed=seed,
        k_out=sketch[0],
        k_in=sketch[1],
        blocks=blocks,
        modules=tuple(u.name for u in chosen),
        dims=tuple((u.n_experts * u.d_out, u.d_in) for u in chosen),
        dtype=dtype,
        kind=kind,
    )
