"""The package's structure as docs/ARCHITECTURE.md states it: rooms, import directions, no
private names across modules, no import circle, every module importable on its own. The
orchestration beside the library (``tasks/``, ``flows/``) is held to the same rules: the
library never imports it, ``tasks`` never imports ``flows``."""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dispersion"

# room -> rooms it may import (besides itself); "top" is dispersion/{config,run,cli}.py
ALLOWED = {
    "core": set(),
    "measure": {"core"},
    "report": {"core", "measure"},
    "training": {"core", "measure", "report"},
    "analyses": {"core", "measure", "report", "training"},
    "top": {"core", "measure", "report", "training", "analyses"},
    "tasks": {"core", "measure", "report", "training", "analyses", "top"},
    "flows": {"core", "measure", "report", "training", "analyses", "top", "tasks"},
}
PACKAGES = ("dispersion", "tasks", "flows")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        folder = ROOT / package
        for info in pkgutil.walk_packages([str(folder)], prefix=f"{package}."):
            rel = info.name.split(".")[1:]
            path = folder.joinpath(*rel)
            out[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
        out[package] = folder / "__init__.py"
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ("tasks", "flows"):
        return parts[0]
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED and parts[1] != "top") \
        else "top"


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) for every dispersion import, lazy ones included."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] in PACKAGES:
                out.append((mod, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
    return out


MODULES = _modules()


def test_rooms_import_downwards_only():
    bad = []
    for mod, path in MODULES.items():
        src = _room(mod)
        for target, names, line in _imports(path, mod):
            targets = [target] + [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for t in targets:
                dst = _room(t)
                if t in PACKAGES or dst == src or dst in ALLOWED[src]:
                    continue
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {t} ({dst})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_private_names_across_modules():
    bad = []
    for mod, path in MODULES.items():
        for target, names, line in _imports(path, mod):
            if target != mod:
                bad += [f"{path.relative_to(ROOT)}:{line}: {target}.{n}" for n in names
                        if n.startswith("_") and n != "__version__"]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        deps = set()
        for target, names, _ in _imports(path, mod):
            deps |= {f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES} or {target}
        graph[mod] = {d for d in deps if d in MODULES and d != mod and not mod.startswith(d + ".")
                      and d not in PACKAGES}
    # a package's __init__ may import its own modules (the registry list): fold it away
    for mod in graph:
        graph[mod] = {d for d in graph[mod] if not (d == mod.rsplit(".", 1)[0])}
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if seen.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in seen:
                visit(d)
        stack.pop()
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    assert not cycles, "\n".join(cycles)


# Loaded once by the parent of the forked children below: third-party libraries only, so that
# each child pays for its own modules, not for torch again (a fresh interpreter per module costs
# seconds of CPU each).
THIRD_PARTY = ("numpy", "torch", "pyarrow", "pyarrow.parquet", "pyarrow.csv", "pydantic", "yaml", "fsspec", "duckdb",
               "transformers", "scipy.stats", "matplotlib", "typer", "ray", "prefect")
FORK_IMPORTS = """
import importlib, os, signal, sys
import matplotlib
matplotlib.use("Agg")
for lib in sys.argv[1].split(","):
    importlib.import_module(lib)
ours = [m for m in sys.modules if m.split(".")[0] in ("dispersion", "tasks", "flows")]
assert not ours, f"loaded before the children: {ours}"
failed = []
for name in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:  # a child: nothing of the package loaded yet
        signal.alarm(120)
        try:
            importlib.import_module(name)
        except BaseException as err:  # noqa: BLE001 - reported by the parent's exit status
            print(f"{name}: {type(err).__name__}: {err}".splitlines()[0], flush=True)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_process():
    """Each module (library, tasks, flows) can be the first of the package a program imports:
    one forked child per module, from a parent that loaded third-party libraries only."""
    r = subprocess.run([sys.executable, "-c", FORK_IMPORTS, ",".join(THIRD_PARTY), *sorted(MODULES)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def test_ray_options_come_from_one_function():
    """Every Ray actor and task takes its resources, retries and environment from
    ``tasks.ray_units.ray_options`` (copies drifted before: one set OMP_NUM_THREADS=0)."""
    import re

    bad = []
    for mod, path in MODULES.items():
        if not mod.startswith(("tasks", "flows")):  # the library imports no Ray
            continue
        text = path.read_text()
        for m in re.finditer(r"\.options\(([^)]*)\)", text):
            if not m.group(1).lstrip().startswith("**ray_options("):
                bad.append(f"{path.relative_to(ROOT)}: .options({m.group(1)[:40]})")
        if re.search(r"runtime_env\s*=|[\"']runtime_env[\"']", text) and mod != "tasks.ray_units":
            bad.append(f"{path.relative_to(ROOT)}: runtime_env outside tasks/ray_units.py")
    assert not bad, "\n".join(bad)


# what loads a model or runs a forward pass: an analysis step declares units (Step.plan) instead
MODEL_WORK = {"load_model", "load_extractor", "read_output_embeddings", "Extractor", "forward_windows", "answer_cloze",
              "measure_texts", "cluster_states", "run_clusters", "condensation_histograms", "condensation_maps",
              "condensation_table", "gap_of_source", "measure_gap", "run_unit", "run_units", "run_leased",
              "AutoModel", "AutoModelForCausalLM", "build_zoo", "finetune"}


def test_analysis_steps_load_no_model():
    """No module under dispersion/analyses/ imports what loads a model or runs a forward pass:
    the runner computes a step's units before the step reads their shards."""
    bad = []
    for mod, path in MODULES.items():
        if not mod.startswith("dispersion.analyses"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bad += [f"{path.relative_to(ROOT)}:{node.lineno}: imports {a.name}" for a in node.names
                        if a.name.rsplit(".", 1)[-1] in MODEL_WORK]
            elif isinstance(node, ast.Attribute) and node.attr in MODEL_WORK:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: uses .{node.attr}")
    assert not bad, "\n".join(bad)
