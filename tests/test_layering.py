"""The house stands: gradsel's folders are floors of the pipeline, and no module imports a floor
above its own, or a sibling on its floor, or closes an import cycle. Imports inside functions
count: a lazy import is still a dependency."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gradsel"

# Lowest floor first. A folder may import its own modules and any folder on a lower floor.
FLOORS = [
    ["core"],  # errors, files, console, choices, schemas
    ["store"],  # the store directory, its stages and vectors
    ["inputs"],  # problems, snapshot, models
    ["rewards"],  # reward records, payouts
    ["rollout"],  # stage 1
    ["gradients"],  # stage 2
    ["selection"],  # stage 3
    ["pipeline"],  # the recipes over the stages
    ["review", "integrations", "demo"],  # readers of a finished store, trainers, the bundled demo
    ["cli"],  # the command line
]
FLOOR = {folder: level for level, folders in enumerate(FLOORS) for folder in folders}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every gradsel module a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gradsel")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("gradsel"):
            found.add(node.module)
            # `from gradsel.core import console` imports the module gradsel.core.console
            found |= {
                f"{node.module}.{a.name}"
                for a in node.names
                if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
            }
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOOR) else None


def test_every_folder_has_a_floor():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(FLOOR), "declare each gradsel folder's floor in FLOORS"


def test_no_module_imports_a_higher_floor_or_a_sibling_folder():
    wrong = []
    for module, targets in graph().items():
        here = folder(module)
        for target in targets:
            there = folder(target)
            if here is None or there is None or there == here:
                continue
            if FLOOR[there] >= FLOOR[here]:
                wrong.append(f"{module} (floor {FLOOR[here]}) imports {target} (floor {FLOOR[there]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            # a package's __init__ importing its own modules is not a cycle of the code's design
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)
