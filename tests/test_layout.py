"""The layout contract: one installed import name, layers that only point down, no import cycles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PORTIONS = ("flows", "stages", "testbed", "trainer", "pipeline", "data_schemas")


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(*(f"trace_rl.{p}" for p in PORTIONS), exclude_type_checking_imports=True)


def _cycle_from(graph: grimp.ImportGraph, start: str, nodes: set[str]) -> list[str] | None:
    stack, path, on_path, seen = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))], [start], {start}, set()
    while stack:
        node, children = stack[-1]
        for child in children:
            if child not in nodes:
                continue
            if child in on_path:
                return path[path.index(child):] + [child]
            if child not in seen:
                seen.add(child)
                stack.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                path.append(child)
                on_path.add(child)
                break
        else:
            stack.pop()
            on_path.discard(path.pop())
    return None


def test_no_import_cycle_between_files():
    graph = _graph()
    nodes = set(graph.modules)
    for module in sorted(nodes):
        cycle = _cycle_from(graph, module, nodes)
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_contract_is_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_every_package_ships_py_typed_and_the_cli_reports_its_version():
    """PEP 561 markers in each mapped package (package-data "*" = py.typed), and `--version`
    prints the installed distribution's version."""
    import tomllib
    from importlib.metadata import version

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    tool = pyproject["tool"]["setuptools"]
    assert tool["package-data"]["*"] == ["py.typed"]
    for package in tool["packages"]:
        folder = ROOT / package.removeprefix("trace_rl.").replace(".", "/")
        assert (folder / "py.typed").is_file(), folder
    out = subprocess.run([sys.executable, "-m", "trace_rl.flows.cli", "--version"], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == f"trace-rl {version('trace-rl')}", out
