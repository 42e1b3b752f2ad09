"""The import graph of the repository's own modules, read from their source (ast, nothing imported): no
cycles, no module importing another's private (_underscore) name, and no library module importing a
script (a module is a script or a library, never both)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("", "ditnorm", "ditnorm/studies", "diffusion", "fast", "benchmarks", "tests")


def module_name(path):
    """The name a file is imported under: its dotted path for the root's modules and packages, its stem for
    tests/ and benchmarks/ (each puts its own folder on sys.path)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] in ("tests", "benchmarks"):
        return parts[-1]
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def repository_modules():
    """{module name: path} of every Python file of the repository."""
    files = [p for folder in FOLDERS for p in sorted((ROOT / folder).glob("*.py"))]
    return {module_name(p): p for p in files}


def imports(path, modules, name=None):
    """[(imported module, names taken from it, line)] of one file (imported as `name`, by default its place
    in the repository): every import statement, those inside functions too (a late import is still an edge
    of the graph)."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target:
                    found.append((target, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y inside a package: x of the package node.level - 1 up
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:  # from package import module
                    found.append((f"{base}.{alias.name}", [], node.lineno))
                elif base in modules:
                    found.append((base, [alias.name], node.lineno))
    return found


def scripts(modules):
    """The modules that run as scripts: they end in `if __name__ == "__main__":`."""
    return {m for m, p in modules.items() if 'if __name__ == "__main__":' in p.read_text()}


def test_no_module_imports_a_private_name_of_another():
    modules = repository_modules()
    private = [f"{p.relative_to(ROOT)}:{line} takes {', '.join(n for n in names if n.startswith('_'))} "
               f"from {target}"
               for m, p in modules.items() for target, names, line in imports(p, modules)
               if target != m and any(n.startswith("_") for n in names)]
    assert not private, private


def find_cycle(graph):
    """A cycle of {module: [imported modules]} as [m, ..., m], or None."""
    state, path = {}, []

    def visit(m):  # depth first; a module met again while on the path closes a cycle
        state[m] = "open"
        path.append(m)
        for t in graph.get(m, ()):
            if state.get(t) == "open":
                return path[path.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = "done"
        return None

    return next((c for m in graph if m not in state and (c := visit(m))), None)


def test_the_import_graph_has_no_cycle():
    modules = repository_modules()
    graph = {m: sorted({t for t, _, _ in imports(p, modules) if t != m}) for m, p in modules.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_libraries_import_no_script():
    modules = repository_modules()
    runnable = scripts(modules)
    libraries = [m for m, p in modules.items()
                 if m not in runnable and p.parent.name not in ("tests", "benchmarks")]
    wrong = [f"{m} imports the script {t}" for m in libraries for t, _, _ in imports(modules[m], modules)
             if t in runnable]
    assert not wrong, wrong
    assert {"experiment", "export", "probe", "sample", "train", "train_toy"} <= runnable
    assert not {m for m in runnable if m.startswith("ditnorm")}, "a library module runs as a script"


def test_the_walk_sees_a_late_private_import_and_a_cycle(tmp_path):
    """The checker itself: a late import inside a function (how checkpoint <-> diffusers_io hid its cycle)
    is an edge, and a private name taken is seen."""
    (tmp_path / "late.py").write_text("def f():\n    from ditnorm.checkpoint import _first_line\n")
    modules = {"ditnorm.checkpoint": ROOT / "ditnorm" / "checkpoint.py", "late": tmp_path / "late.py"}
    assert imports(tmp_path / "late.py", modules, name="late") == [("ditnorm.checkpoint", ["_first_line"], 2)]
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": []}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_measure_and_report_never_load_the_trainer():
    """experiment.py's measure and report phases, and every report, run without ditnorm.trainer (the
    runner imports it only to train)."""
    import subprocess
    import sys

    code = ("import sys, experiment, ditnorm.studies.toy, ditnorm.studies.paper, ditnorm.studies.mnist; "
            "print(sorted(m for m in sys.modules if m.startswith('ditnorm.')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    assert "ditnorm.trainer" not in loaded.stdout, loaded.stdout


def test_the_notebooks_import_the_library_and_no_study():
    import json

    for notebook in sorted(ROOT.glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert "from ditnorm import" in source, notebook.name
        assert "ditnorm.studies" not in source and "_report" not in source, notebook.name
