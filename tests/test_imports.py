"""The package import graph points one way (docs/design.md, "Where things are"): no circles between
packages, and the lower packages import nothing above them. Read from the source with `ast`, imports
inside functions included, so a lazy import cannot hide a circle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[1] / "service"

# Each unit's rank: a unit may import units of a lower rank only (equal ranks do not import each other).
RANKS = {
    "errors": 0, "types": 0, "metrics": 0, "namespaces": 1, "kvcache": 1, "auth": 2,
    "editlog": 2, "retrieval": 2, "hooks": 2, "config": 3, "settings_args": 4,
    "locate": 3, "engine": 3, "router": 3, "edits": 4,
    "dataplane": 5, "transport": 5,
    "compose": 6, "client": 7, "eval": 7, "cli": 8, "__main__": 9,
}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "service" or len(parts) < 2 or parts[1] in ("_proto", "__init__", "__version__"):
        return None
    return parts[1]


def import_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in SERVICE.rglob("*.py"):
        rel = path.relative_to(SERVICE.parent).with_suffix("")
        src = _unit(".".join(rel.parts))
        if src is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
                if node.module == "service":
                    names = [f"service.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                dst = _unit(name)
                if dst is not None and dst != src:
                    edges[src].add(dst)
    return edges


def test_every_unit_has_a_rank() -> None:
    paths = SERVICE.rglob("*.py")
    units = {_unit(".".join(p.relative_to(SERVICE.parent).with_suffix("").parts)) for p in paths}
    assert units - {None} <= set(RANKS), f"give these a rank in RANKS: {sorted(units - {None} - set(RANKS))}"


def test_imports_point_down_only() -> None:
    upward = sorted(
        f"{src} -> {dst}" for src, dsts in import_graph().items() for dst in dsts if RANKS[dst] >= RANKS[src]
    )
    assert not upward, f"imports that point up or sideways: {upward}"


def test_no_circles_between_units() -> None:
    graph = import_graph()
    seen: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(unit: str, path: list[str]) -> None:
        seen[unit] = 1
        for nxt in sorted(graph.get(unit, ())):
            assert seen.get(nxt) != 1, f"import circle: {' -> '.join([*path, unit, nxt])}"
            if nxt not in seen:
                visit(nxt, [*path, unit])
        seen[unit] = 2

    for unit in sorted(graph):
        if unit not in seen:
            visit(unit, [])
