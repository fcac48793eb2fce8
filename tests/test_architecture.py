"""The layout rules of docs/architecture.md, checked on the source: imports point down the package stack, every
user-facing error has one base class, no function is longer than a screen, and the CLI starts without torch."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import helmlm.errors

SRC = Path(__file__).resolve().parent.parent / "src" / "helmlm"

# Lowest first. A module may import from its own package and from packages in lower layers only (peers in one
# layer do not import each other). Mirrors docs/architecture.md.
LAYERS = [
    {"errors"},
    {"geometry", "storage"},
    {"nn"},
    {"models"},
    {"config", "compat"},
    {"data", "generation", "convert", "peft", "analysis"},
    {"eval", "serving"},
    {"training"},
    {"cli"},
    {"__main__"},
]
LAYER = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def package_of(module: str) -> str | None:
    """``helmlm.nn.routing`` -> ``nn``; ``helmlm`` itself (the lazy top-level namespace) -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "helmlm" and len(parts) > 1 else None


def source_modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        modules.append((".".join(p for p in rel.parts if p != "__init__"), path))
    return modules


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """Every helmlm module that ``path`` imports, at any depth (function-level imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name.split(".")[0] == "helmlm"]


def test_every_package_has_a_layer():
    packages = {package_of(m) for m, _ in source_modules()} - {None}
    assert packages <= set(LAYER), f"add {sorted(packages - set(LAYER))} to LAYERS and docs/architecture.md"


def test_imports_point_down_the_package_stack():
    """geometry does not import nn, nn does not import models, models imports none of config/data/eval/training,
    and so on up: a package imports only itself and the layers below it."""
    upward = []
    for module, path in source_modules():
        own = package_of(module)
        if own is None:
            continue
        for line, target in imported_modules(path, module):
            other = package_of(target)
            if other is None or other == own:
                continue
            if LAYER[other] >= LAYER[own]:
                upward.append(f"{path.relative_to(SRC.parent)}:{line} ({own}) imports {target} ({other})")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_the_import_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a geometry module importing nn is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from helmlm.nn.routing import MoE\n")
    assert imported_modules(bad, "helmlm.geometry.bad") == [(2, "helmlm.nn.routing")]
    assert LAYER[package_of("helmlm.nn.routing")] > LAYER["geometry"]


def test_user_facing_errors_have_one_base_class_and_one_home():
    """Every exception class of the package is defined in helmlm/errors.py and derives from HelmlmError; the names
    other modules re-export are the same objects."""
    defined_elsewhere = []
    for module, path in source_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")) or b.id == "HelmlmError")
                    for b in node.bases) and module != "helmlm.errors":
                defined_elsewhere.append(f"{module}.{node.name}")
    assert not defined_elsewhere, defined_elsewhere
    classes = [c for _, c in inspect.getmembers(helmlm.errors, inspect.isclass) if c.__module__ == "helmlm.errors"]
    assert len(classes) >= 10 and all(issubclass(c, helmlm.errors.HelmlmError) for c in classes)
    from helmlm.data.sources import DataError
    from helmlm.training.trainer import TrainingError

    assert DataError is helmlm.errors.DataError and TrainingError is helmlm.errors.TrainingError


def test_no_function_is_longer_than_80_lines():
    long = []
    for module, path in source_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.relative_to(SRC.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_the_command_line_starts_without_torch_or_transformers():
    """``helmlm --help`` only parses arguments: importing the CLI and building its parser loads neither library
    (what keeps it under a second: docs/architecture.md)."""
    result = run_python("import sys, helmlm.cli; helmlm.cli.build_parser(); "
                        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("order", ["helmlm first", "transformers first"])
def test_import_helmlm_registers_the_auto_classes(order):
    """Whether transformers is imported before or after helmlm, ``model_type="helm"`` resolves afterwards."""
    imports = "import helmlm; import transformers" if order == "helmlm first" else "import transformers; import helmlm"
    result = run_python(f"{imports}; print(type(transformers.AutoConfig.for_model('helm')).__name__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "HELMConfig"
