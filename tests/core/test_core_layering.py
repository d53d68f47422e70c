"""The layers import only what the design allows: each concept has one home, and nothing below the
CLI reaches up into it. Read from the source (every ``import`` statement of every library module)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("core", "convert", "pipeline", "model", "train", "eval", "tools")
# what each layer may import from lresnet (besides itself)
ALLOWED = {
    "core": set(),
    "convert": {"core"},
    "pipeline": {"core", "convert"},
    "model": {"core"},
    "eval": {"core", "convert", "pipeline", "model"},
    "train": {"core", "convert", "pipeline", "model", "eval"},
    "tools": set(LAYERS),
}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) for every lresnet import in a file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lresnet."):
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("lresnet.")]
    return found


def _library_files():
    for layer in LAYERS:
        for path in sorted((ROOT / layer).glob("*.py")):
            yield layer, path


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_the_layers_below_it(layer):
    wrong = []
    for own, path in _library_files():
        if own != layer:
            continue
        for module, _, line in _imports(path):
            target = module.split(".")[1]
            if target != layer and target not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_errors_come_from_core_only():
    for _, path in _library_files():
        for module, names, line in _imports(path):
            if "InputError" in names:
                assert module == "lresnet.core.errors" or module == "lresnet.core", \
                    f"{path.relative_to(ROOT)}:{line} takes InputError from {module}"


def test_core_has_no_third_party_imports_at_module_level():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path in sorted((ROOT / "core").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only: core.device imports torch inside its functions
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                top = name.split(".")[0]
                assert top in stdlib or top == "lresnet" or isinstance(node, ast.If), \
                    f"{path.name} imports {name} at load time"


@pytest.mark.parametrize("module, absent", [
    ("lresnet.model", ("simplejpeg", "lresnet.convert", "lresnet.pipeline", "lresnet.tools")),
    ("lresnet.core", ("torch", "numpy", "simplejpeg")),
    ("lresnet.convert", ("torch", "lresnet.tools")),
    ("lresnet.tools.cli", ("torch",)),  # the CLI starts without the training stack
])
def test_importing_a_layer_loads_nothing_it_does_not_need(module, absent):
    code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import {module} loaded {out.strip()}"
