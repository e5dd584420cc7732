"""The import graph of ``fastbert/`` keeps DESIGN.md's layering: no cycles, no upward imports,
no sideways imports between backends (nor between one backend's per-op modules).

The graph is read from the source with ``ast`` (every ``import`` / ``from ... import``, at module
level or inside a function, and ``importlib.import_module`` of a literal name: a lazy import is
still a dependency), so the test needs neither torch nor any optional package. A name computed
at run time (the registry loading each backend by name, the root's lazy attributes) is not an
edge: that is the designed plug-in path. Layers, bottom to top:

    backends < ops < nn < models, integrations < env < bench < demo < cli, __main__

The package root (``fastbert/__init__.py``: ``__version__`` and the functional ops) is importable
from every layer; it is initialised before any submodule. Private root modules (``fastbert._x``,
e.g. the build-manifest reader) are leaves at the bottom layer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fastbert"

LAYERS = {"backends": 0, "ops": 1, "nn": 2, "models": 3, "integrations": 3, "env": 4, "bench": 5,
          "demo": 6, "cli": 7, "__main__": 7}
OP_MODULES = {"attention", "layer_norm", "gelu"}  # one file per op in each backend

# Known violations: none. A new edge that breaks the layering must be fixed, or listed here with
# the change that removes it; the test fails on every edge not listed.
KNOWN_VIOLATIONS: set = set()


def _modules() -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` under fastbert/."""
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The fastbert modules that ``name`` imports (``from pkg import sub`` resolves to the
    submodule when ``sub`` is one, else to the package)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1 packages
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                       for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"):
            targets = [node.args[0].value]  # importlib.import_module("fastbert.x"): a lazy import
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` depends on a.b.c's module
                target = target.rpartition(".")[0]
            if target.startswith("fastbert") and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package root: importable from everywhere
    if parts[1] not in LAYERS:
        assert parts[1].startswith("_") and len(parts) == 2, f"{module}: give it a layer in LAYERS"
        return 0  # a private leaf module of the root (fastbert._build_info ...)
    return LAYERS[parts[1]]


def _backend_group(module: str) -> str | None:
    """Which backend a module of fastbert/backends/ belongs to (None: the shared registry and
    helpers such as ``_philox``): ``reference``, ``torch``, ``triton``, ``cuda``."""
    parts = module.split(".")
    if parts[:2] != ["fastbert", "backends"] or len(parts) == 2:
        return None
    first = parts[2]
    backends = {m.split(".")[2] for m in _modules() if m.startswith("fastbert.backends.")
                and not m.split(".")[2].startswith("_")}
    group = first.lstrip("_").split("_")[0] if first.startswith("_") else first
    return group if group in backends else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict = {}
    low: dict = {}
    stack: list = []
    on_stack: set = set()
    out = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _violations(graph: dict[str, set[str]]) -> set[tuple]:
    found = set()
    for comp in _cycles(graph):
        found.add(("cycle", *comp))
    for src, targets in graph.items():
        for dst in targets:
            ls, ld = _layer(src), _layer(dst)
            if ls is not None and ld is not None and ld > ls:
                found.add(("upward", src, dst))
            gs, gd = _backend_group(src), _backend_group(dst)
            if gs and gd and gs != gd:
                found.add(("sideways", src, dst))
            elif gs and gs == gd and {src.rpartition(".")[2], dst.rpartition(".")[2]} <= OP_MODULES:
                found.add(("sideways", src, dst))  # one backend's per-op modules stay apart
    return found


def test_no_cycles_no_upward_or_sideways_imports():
    found = _violations(_graph())
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "new import-graph violations (kind, from, to):\n" + "\n".join(map(str, new))
    gone = sorted(KNOWN_VIOLATIONS - found)
    if gone:  # a fix landed: say so without failing the branch that made it
        warnings.warn("fixed import-graph violations, delete them from KNOWN_VIOLATIONS: "
                      + "; ".join(map(str, gone)))


def test_the_checker_sees_each_kind_of_violation():
    """The rules on a made-up graph: the test can fail."""
    graph = {
        "fastbert.ops.attention": {"fastbert.nn.modules"},  # upward
        "fastbert.nn.modules": {"fastbert.ops.attention"},  # (and a cycle with the line above)
        "fastbert.backends.torch": {"fastbert.backends.triton.attention", "fastbert.backends"},
        "fastbert.backends.triton.gelu": {"fastbert.backends.triton.layer_norm",
                                          "fastbert.backends.triton._philox"},
        "fastbert.env": {"fastbert.cli"},  # upward, top layers too
        "fastbert.bench.runner": {"fastbert.env", "fastbert"},  # fine: down, and the root
    }
    found = _violations(graph)
    assert found == {
        ("upward", "fastbert.ops.attention", "fastbert.nn.modules"),
        ("cycle", "fastbert.nn.modules", "fastbert.ops.attention"),
        ("sideways", "fastbert.backends.torch", "fastbert.backends.triton.attention"),
        ("sideways", "fastbert.backends.triton.gelu", "fastbert.backends.triton.layer_norm"),
        ("upward", "fastbert.env", "fastbert.cli"),
    }, found


def test_graph_reads_relative_and_lazy_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "fastbert"
    (pkg / "bench").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "env.py").write_text("")
    (pkg / "bench" / "__init__.py").write_text("from .runner import main\n")
    (pkg / "bench" / "runner.py").write_text("def f():\n    from .. import env\n    import fastbert.cli\n"
                                             "    importlib.import_module('fastbert.demo')\n")
    (pkg / "demo.py").write_text("")
    (pkg / "cli.py").write_text("from fastbert.bench import runner\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    graph = _graph()
    assert graph["fastbert.bench"] == {"fastbert.bench.runner"}
    assert graph["fastbert.bench.runner"] == {"fastbert.env", "fastbert.cli", "fastbert.demo"}
    assert graph["fastbert.cli"] == {"fastbert.bench.runner"}
    assert ("cycle", "fastbert.bench.runner", "fastbert.cli") in _violations(graph)


def test_import_fastbert_is_lazy_about_subpackages():
    """``fastbert.models`` works without an explicit import, and ``import fastbert`` alone still
    imports no transformers (a subprocess: this one has imported everything)."""
    code = ("import sys, fastbert\n"
            "assert 'transformers' not in sys.modules, 'import fastbert imported transformers'\n"
            "assert 'fastbert.models' not in sys.modules\n"
            "assert fastbert.models.BertModel.__name__ == 'BertModel'\n"
            "assert fastbert.env.collect_env and 'models' in dir(fastbert)\n"
            "try:\n    fastbert.no_such_thing\nexcept AttributeError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PKG.parent)
    assert proc.returncode == 0, proc.stderr
    assert "module 'fastbert' has no attribute 'no_such_thing'" in proc.stdout
