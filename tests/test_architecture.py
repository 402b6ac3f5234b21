"""The module layers of docs/architecture.md, kept true: no import cycle, and no module imports one of a
higher layer than its own. Imports are read with ``ast`` from the source (function-local imports
count too), so nothing is executed.

Layers, lowest first (a module may import its own layer and the ones below):
    0 config -> 1 data, model, flops -> 2 parallel -> 3 train -> 4 train.callbacks
    -> 5 analysis, export, eval, experiments, generate, balance (the tools on top)
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# prefix -> layer; the longest matching prefix wins. A module no prefix covers fails the test: declare it.
LAYERS = {
    "loopmoe.config": 0, "loopmoe.config_help": 0, "loopmoe.tokenizer_json": 0, "loopmoe.idx_format": 0,
    "loopmoe.tokenizer_fingerprint": 0,
    "loopmoe.data": 1, "loopmoe.model": 1, "loopmoe.flops": 1,
    "loopmoe.parallel": 2,
    "loopmoe.train": 3,
    "loopmoe.train.callbacks": 4,
    "loopmoe.analysis": 5, "loopmoe.export": 5, "loopmoe.eval": 5, "loopmoe.eval_tasks": 5,
    "loopmoe.experiments": 5, "loopmoe.generate": 5, "loopmoe.balance": 5, "loopmoe.plot": 5,
    "loopmoe": 5,  # the package's own __init__ (imports nothing)
}
# The pure-torch files the export copies next to the remote-code model: torch only, nothing of ours.
TORCH_ONLY = ("loopmoe.model.core", "loopmoe.model.schedule")


def _modules(pkg: str) -> dict[str, pathlib.Path]:
    out = {}
    for p in sorted((ROOT / pkg).rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = {**_modules("loopmoe"), **_modules("data_tools")}


def _is_package(name: str) -> bool:
    p = MODULES.get(name)
    return p is not None and p.name == "__init__.py"


def imports(name: str) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (``from X import Y`` counts X.Y when it is a
    module). The implicit import of parent packages is not an edge."""
    path = MODULES[name]
    here = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                pkg = here.split(".")
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # import a.b.c of a module a.b's attribute c
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def layer(name: str) -> int | None:
    best = None
    for prefix, lay in LAYERS.items():
        if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, lay)
    return None if best is None else best[1]


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if m.startswith("loopmoe") and layer(m) is None]
    assert not missing, f"declare the layer of {missing} in tests/test_architecture.py LAYERS and docs/architecture.md"


def test_no_backward_import_between_layers():
    bad = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
           for m in sorted(GRAPH) if m.startswith("loopmoe") for t in sorted(GRAPH[m])
           if t.startswith("loopmoe") and layer(t) is not None and layer(m) is not None and layer(t) > layer(m)]
    assert not bad, "imports against the layer order (move the shared piece down a layer):\n" + "\n".join(bad)


def test_the_package_never_imports_data_tools():
    bad = [m for m in GRAPH if m.startswith("loopmoe") and any(t.startswith("data_tools") for t in GRAPH[m])]
    assert not bad, f"{bad} import data_tools (the offline tools sit above the package)"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, f"import cycles (function-local imports count): {cycles}"


def test_cycle_finder_finds_a_cycle():  # the checker itself can fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", TORCH_ONLY)
def test_exported_core_files_import_only_torch(name):
    tree = ast.parse(MODULES[name].read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    assert roots <= {"torch", "math", "__future__", "dataclasses", "typing"}, \
        f"{name} is copied into every Hugging Face export: it may import only torch and the standard library"


def test_docs_name_every_layer():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for prefix in LAYERS:
        if prefix != "loopmoe":
            assert prefix.removeprefix("loopmoe.") in doc, f"docs/architecture.md does not mention {prefix}"


def test_the_export_ships_every_file_its_remote_code_imports():
    """Every relative import of the remote-code files names a file hf.py copies into the export, and the
    shared core and schedule are the training model's own files (not second copies)."""
    from loopmoe.export.hf import REMOTE_FILES

    for name in ("modeling_loopmoe.py", "modeling_loopmoe_layers.py", "configuration_loopmoe.py"):
        tree = ast.parse(pathlib.Path(REMOTE_FILES[name]).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert f"{node.module}.py" in REMOTE_FILES, f"{name} imports .{node.module}, which is not exported"
    assert pathlib.Path(REMOTE_FILES["loopmoe_core.py"]) == MODULES["loopmoe.model.core"]
    assert pathlib.Path(REMOTE_FILES["loopmoe_schedule.py"]) == MODULES["loopmoe.model.schedule"]
