"""The package's layers, enforced: imports flow cli -> workflow -> runtime -> kernels, the
language imports none of them (nor torch), and no module graph has a cycle. Every import counts,
including the ones inside functions, so a lazy import cannot hide a back edge."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# (package-relative folder, dotted prefix); grammar and kernels are installed inside the package
TREES = [(ROOT / "triton_dsl", "triton_dsl"), (ROOT / "kernels", "triton_dsl.kernels"),
         (ROOT / "grammar", "triton_dsl.grammar")]
# a module may import its own layer and any layer of a lower rank; top-level leaf modules
# (version, files) are rank 0 utilities, the facade (api, the package __init__) sits below cli
RANK = {"version": 0, "files": 0, "grammar": 0, "kernels": 0, "lang": 0, "runtime": 1,
        "workflow": 2, "api": 3, "__init__": 3, "__main__": 4, "cli": 4}


def _modules():
    mods = {}
    for folder, prefix in TREES:
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            mods[name] = (path, path.name == "__init__.py")
    return mods


def _imports(name, path, is_pkg):
    """Absolute names of the triton_dsl modules (or packages) a file imports."""
    package = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from . import x` imports x
    return {m for m in found if m == "triton_dsl" or m.startswith("triton_dsl.")}


def _layer(name):
    parts = name.split(".")
    if name == "triton_dsl":
        return "__init__"
    return parts[1]


def _graph():
    mods = _modules()
    graph = {}
    for name, (path, is_pkg) in mods.items():
        graph[name] = {m for m in _imports(name, path, is_pkg) if m in mods and m != name}
    return graph


def test_every_layer_is_known():
    unknown = {_layer(n) for n in _graph()} - set(RANK)
    assert not unknown, f"add these to RANK in tests/test_layers.py: {sorted(unknown)}"


def test_imports_flow_one_way():
    bad = []
    for name, deps in _graph().items():
        for dep in deps:
            if RANK[_layer(dep)] > RANK[_layer(name)]:
                bad.append(f"{name} imports {dep}")
            if _layer(name) == "lang" and _layer(dep) not in ("lang", "version", "files",
                                                               "grammar"):
                bad.append(f"{name} (language) imports {dep}")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is how packages work, not a cycle
    def edges(n):
        return {d for d in graph[n] if not (n.startswith(d + ".") and d != n)}
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for d in sorted(edges(n)):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("banned", ["torch", "triton", "numpy"])
def test_language_imports_no_heavy_modules(banned):
    for path in (ROOT / "triton_dsl" / "lang").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            assert not any(n == banned or n.startswith(banned + ".") for n in names), \
                f"{path.name} imports {banned}"


def test_the_guard_sees_a_back_edge(tmp_path, monkeypatch):
    """The guard can fail: a lang module importing the runtime is reported."""
    fake = tmp_path / "triton_dsl" / "lang"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from ..runtime import freeze\n")
    deps = _imports("triton_dsl.lang.bad", fake / "bad.py", False)
    assert "triton_dsl.runtime" in deps and RANK[_layer("triton_dsl.runtime")] > RANK["lang"]
