"""The examples of the README and docs/: their python imports what exists and calls it as it can be called,
and every flag their command lines pass to a script of this repository is one the script takes."""

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("train.py", "train_toy.py", "sample.py", "experiment.py", "export.py", "probe.py")
SUBCOMMANDS = ("export.py",)  # its flags are its subcommands' (export.py diffusers --raw)


def blocks(language):
    """(page name, first line, code) of every ```language block of the pages."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(rf"```{language}\n(.*?)```", text, re.S):
            found.append((page.name, text[:match.start()].count("\n") + 2, match.group(1)))
    return found


def imported(tree):
    """{name: object} of the block's import statements, imported with importlib."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module = importlib.import_module(alias.name)
                names[alias.asname or alias.name.split(".")[0]] = module if alias.asname else \
                    importlib.import_module(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):  # a submodule not yet imported
                    importlib.import_module(f"{node.module}.{alias.name}")
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


def resolve(node, names):
    """The object a call's function expression names through the imports, or None (e.g. a local's method)."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = resolve(node.value, names)
        if base is not None:
            assert hasattr(base, node.attr), f"{ast.unparse(node.value)} has no {node.attr}"
            return getattr(base, node.attr)
    return None


@pytest.mark.parametrize("page, line, code", blocks("python"), ids=lambda v: str(v)[:30])
def test_python_examples_import_and_call_what_exists(page, line, code):
    tree = ast.parse(code, filename=f"{page}:{line}")
    names = imported(tree)
    assert names, f"{page}:{line}: a python example without its imports"
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        fn = resolve(call.func, names)
        if fn is None:
            continue
        keywords = {k.arg: None for k in call.keywords if k.arg is not None}
        try:
            inspect.signature(fn).bind_partial(*[None] * len(call.args), **keywords)
        except TypeError as e:
            pytest.fail(f"{page}:{line}: {ast.unparse(call)} does not fit {fn.__qualname__}: {e}")


def commands():
    """(page, line, command, flags) of each command line of a ```bash block that runs a script of ours;
    command: the script, or the script and its subcommand."""
    found = []
    for page, first, code in blocks("bash"):
        for i, text in enumerate(code.splitlines()):
            words = text.split("#")[0].split()
            script = next((w for w in words if w in SCRIPTS), None)
            if script is not None:
                rest = words[words.index(script) + 1:]
                command = (script, rest[0]) if script in SUBCOMMANDS else (script,)
                flags = [w.split("=")[0] for w in rest if w.startswith("--")]
                found.append((page, first + i, command, flags))
    return found


@pytest.fixture(scope="module")
def helps():
    """{command: its --help text}, each from a fresh process as a user runs it."""
    return {command: subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout
            for command in sorted({c[2] for c in commands()})}


def test_the_command_lines_of_the_docs_pass_flags_their_scripts_take(helps):
    assert len(commands()) > 20  # the pages hold the commands this test is about
    unknown = [f"{page}:{line}: {' '.join(command)} {flag}" for page, line, command, flags in commands()
               for flag in flags if not re.search(rf"{re.escape(flag)}\b", helps[command])]
    assert not unknown, unknown
