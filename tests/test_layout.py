"""The package's layout: imports point one way, from the front ends down to the data."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mnist_ann

PACKAGE = Path(mnist_ann.__file__).parent
# lower layers first; a module may import its own layer and those below it
LAYERS = [
    {"errors", "runtime", "fileio", "machine", "kernels"},
    {"data"},
    {"store"},
    {"index"},
    {"classify"},
    {"api", "estimator", "cluster", "model"},
    {"evaluation"},
    {"render"},
    {"serve"},
    {"cli", "__main__", "__init__"},
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "mnist_ann.") and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mnist_ann.")}
    return found


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts).removesuffix(".__init__")
        if module == "mnist_ann":
            continue  # the package's lazy names point anywhere by design
        for imported in imports_of(path):
            if layer_of(imported) > layer_of(module):
                wrong.append(f"{module} imports {imported}")
    assert wrong == []


def test_help_imports_neither_faiss_nor_pyarrow() -> None:
    code = ("import sys\nfrom click.testing import CliRunner\nfrom mnist_ann.cli import main\n"
            "CliRunner().invoke(main, ['--help'])\n"
            "print(sorted({'faiss', 'pyarrow', 'sklearn', 'matplotlib'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
