"""Capture units: the weight matrices whose gradients a feature sketches (every decoder Linear,
MoE routers, fused expert stacks), found by name or pattern."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from gradsel.core.errors import GradselError

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
            r"narrow --modules to those, e.g. --modules '\.layers\.\d+\.self_attn\.'",
        )
    if not chosen:
        raise GradselError(
            f"no Linear, router or expert weight matches {regex.pattern!r}",
            "check --modules against model.named_modules(); an expert weight is named "
            "<experts module>.gate_up_proj (or .up_proj) and .down_proj",
        )
    return chosen


def resolve_units(model, names: Sequence[str]) -> list[CaptureUnit]:
    """The units of a spec's module names, in the spec's order."""
    found = {}
    for name, module in model.named_modules():
        for u in _units_of(name, module) or []:
            found[u.name] = u
    missing = [n for n in names if n not in found]
    if missing:
        raise GradselError(
            f"the model has no capturable module {missing[0]!r}", "score with the model the store was made with"
        )
    return [found[n] for n in names]


@contextmanager
def requires_grad_only(model, params: Sequence = ()) -> Iterator[None]:
    """Let autograd track exactly `params` of the model's parameters (none by default: the hooked
    pass differentiates activations, never weights) while the block runs, then give every
    parameter back the requires_grad flag it had, on an error too: the model is the caller's, and
    one scored in a notebook and then trained must still train."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    wanted = {id(p) for p in params}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
