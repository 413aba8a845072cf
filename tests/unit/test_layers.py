"""The package's layers (docs/architecture.md): imports run one way, from a higher layer to a lower one.

The import graph is read from the source with ``ast`` (module-level and function-level imports alike, plus
the lazy ``"rtdmd_ray.x.y:attr"`` registry strings that ``importlib`` resolves), so a lazy import inside a
function cannot slip an arrow past the rules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rtdmd_ray"

# unit -> layer; a unit is a folder of rtdmd_ray/ or a module at its root. A unit may import units of a LOWER
# layer only (and itself): two units of one layer never import each other.
LAYERS: dict[str, int] = {
    "algorithms": 0,
    "config": 0,
    "shapes": 0,
    "models": 1,
    "rewards": 1,
    "types": 2,
    "data": 3,
    "runs": 3,
    "stages": 4,
    "roles": 5,
    "eval": 6,
    "driver": 7,
    "cold_start": 7,
    "quickstart": 8,
    "cli": 9,
}
# Ray-free units: the maths, the models, the rewards and one rank's work run without a Ray runtime
RAY_FREE = {"algorithms", "config", "shapes", "models", "rewards", "types", "data", "stages"}
# what the package root may hold: the entry points, the shared batch types and the package marker
ROOT_MODULES = {"__init__", "cli", "driver", "cold_start", "quickstart", "types"}
REGISTRY_STRING = re.compile(r"^(rtdmd_ray(?:\.\w+)+):\w+$")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """Every module of the project that ``path`` names: imports (at any depth) and registry strings."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = REGISTRY_STRING.match(node.value)
            if m:
                out.add(m.group(1))
    return out


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (names that are not modules map to their package)."""
    mods = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for imp in imports_of(path):
            if imp != "rtdmd_ray" and not imp.startswith("rtdmd_ray."):
                continue
            while imp not in mods and "." in imp:
                imp = imp.rpartition(".")[0]
            if imp != name and imp != "rtdmd_ray":
                deps.add(imp)
        graph[name] = deps
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per arrow against ``LAYERS``: an unknown unit, or an import of a unit not strictly lower."""
    bad = []
    for mod, deps in sorted(graph.items()):
        src = unit_of(mod)
        if src == "__init__":
            continue
        if src not in LAYERS:
            bad.append(f"{mod}: unit {src!r} has no layer in LAYERS (add it, with the rule it follows)")
            continue
        for dep in sorted(deps):
            dst = unit_of(dep)
            if dst == src or dst == "__init__":
                continue
            if dst not in LAYERS or LAYERS[dst] >= LAYERS[src]:
                bad.append(
                    f"{mod} (layer {LAYERS[src]}, {src}) imports {dep} "
                    f"(layer {LAYERS.get(dst, '?')}, {dst}): a layer imports only lower layers"
                )
    return bad


def test_layers_hold() -> None:
    bad = layer_violations(import_graph())
    assert not bad, "arrows against the layers (docs/architecture.md):\n" + "\n".join(bad)


def test_ray_free_layers_do_not_import_ray() -> None:
    bad = []
    for name, path in project_modules().items():
        if unit_of(name) in RAY_FREE:
            rays = sorted(i for i in imports_of(path) if i == "ray" or i.startswith("ray."))
            if rays:
                bad.append(f"{name} imports {rays}")
    assert not bad, "Ray-free layers import Ray:\n" + "\n".join(bad)


def test_package_root_holds_entry_points_only() -> None:
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root <= ROOT_MODULES, f"modules at the package root beyond the entry points: {root - ROOT_MODULES}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(LAYERS), f"folders without a layer: {folders - set(LAYERS)}"
    for folder in folders:
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text())) or ""
        assert "Layer" in doc, f"{folder}/__init__.py: its docstring must say its layer and what it imports"


@pytest.mark.parametrize(
    ("graph", "expect"),
    [
        ({"rtdmd_ray.stages.rl_step": {"rtdmd_ray.roles.learner"}}, "imports rtdmd_ray.roles.learner"),
        ({"rtdmd_ray.models.sd3": {"rtdmd_ray.rewards.multi"}}, "a layer imports only lower layers"),
        ({"rtdmd_ray.newthing.x": set()}, "has no layer"),
    ],
)
def test_checker_catches_arrows_against_the_layers(graph: dict[str, set[str]], expect: str) -> None:
    bad = layer_violations(graph)
    assert bad and expect in bad[0]


def test_checker_reads_lazy_and_registry_imports(tmp_path: Path) -> None:
    # the graph must see imports inside functions and importlib registry strings, not only top-level imports
    graph = import_graph()
    assert "rtdmd_ray.models.shapes" in graph["rtdmd_ray.models"]  # "rtdmd_ray.models.shapes:build_..."
    assert "rtdmd_ray.rewards.multi" in graph["rtdmd_ray.stages.rl_step"]  # imported inside bp_scorer_fn
