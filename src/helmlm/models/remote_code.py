"""The remote code of a helmlm model directory, generated from the package's own sources.

``helmlm export`` (:func:`helmlm.models.hf.write_remote_code`) writes ``modeling_helm.py``, which ``config.json``'s
``auto_map`` names, and beside it one flat file per module that the model classes need (``helmlm_nn_attention.py``
for :mod:`helmlm.nn.attention`, ...). The files are the modules' sources with their helmlm imports rewritten as
relative imports, so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works where only torch,
transformers and safetensors are installed, with neither helmlm nor geoopt (which only training needs). That is
where remote code matters: a directory downloaded from the Hub. The math keeps one source of truth: nothing here is
written by hand, and :func:`remote_code_files` regenerates the bundle from whatever helmlm is installed.

The layout rule of the package (imports point down the stack; docs/architecture.md) is what makes this possible:
the model classes import only ``errors``, ``geometry``, ``nn`` and ``models``, and those import only torch,
transformers and the standard library (PyYAML, which transformers requires, for presets that the remote code never
reads).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # src/helmlm
ENTRY = "modeling_helm"
ROOTS = ("helmlm.models.config", "helmlm.models.modeling")
CLASSES = {"HELMConfig": "helmlm.models.config", "HELMModel": "helmlm.models.modeling",
           "HELMForCausalLM": "helmlm.models.modeling"}


def _source_file(module: str) -> Path | None:
    """The file of helmlm module ``module`` (a package's ``__init__.py``), or ``None`` for a name that is not one
    (an attribute imported from a module)."""
    relative = Path(*module.split(".")[1:])
    for candidate in (PACKAGE_ROOT / relative.with_suffix(".py"), PACKAGE_ROOT / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def flat_name(module: str) -> str:
    """``helmlm.nn.attention`` -> ``helmlm_nn_attention`` (the bundle's file for it, without ``.py``)."""
    return module.replace(".", "_")


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _helmlm_imports(module: str, tree: ast.Module, is_package: bool) -> list[tuple[ast.ImportFrom, str]]:
    """Every ``from helmlm... import`` (or relative import) in ``tree``, at any depth, with its absolute module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "helmlm" for a in node.names):
            raise ValueError(f"{module}: `import helmlm...` cannot be bundled; use `from helmlm... import`")
        if isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, is_package)
            if target.split(".")[0] == "helmlm":
                found.append((node, target))
    return found


def _closure() -> dict[str, Path]:
    """The helmlm modules the model classes need, with their files (every import counts, function-level too)."""
    files, todo = {}, list(ROOTS)
    while todo:
        module = todo.pop()
        if module in files:
            continue
        file = _source_file(module)
        if file is None:
            raise ValueError(f"the remote code needs {module}, which is not a helmlm module file")
        files[module] = file
        tree = ast.parse(file.read_text())
        for node, target in _helmlm_imports(module, tree, file.name == "__init__.py"):
            if any(_source_file(f"{target}.{a.name}") is not None for a in node.names):
                raise ValueError(f"{module}: `from {target} import <module>` cannot be bundled (transformers copies "
                                 "only files named by `from .name import ...`); import names from the module")
            todo.append(target)
    return files


def _rewrite(module: str, file: Path) -> str:
    """The source of ``module`` with each helmlm import made relative to the bundle's flat files."""
    source = file.read_text()
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    edits = []
    for node, target in _helmlm_imports(module, tree, file.name == "__init__.py"):
        names = ", ".join(f"{a.name} as {a.asname}" if a.asname else a.name for a in node.names)
        text = f"from .{flat_name(target)} import {names}"
        edits.append((node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, text))
    for start, col, end, end_col, text in sorted(edits, reverse=True):
        head, tail = lines[start - 1][:col], lines[end - 1][end_col:]
        lines[start - 1:end] = [head + text + tail]
    return "".join(lines)


def remote_code_files(version: str) -> dict[str, str]:
    """File name -> source of the bundle for helmlm ``version``: the entry module and one file per module."""
    files = {}
    for module, file in sorted(_closure().items()):
        header = (f"# Generated by helmlm {version} from {module} ({file.relative_to(PACKAGE_ROOT.parent)}) for a "
                  f"model directory's remote code;\n# edit the package, not this file.\n")
        files[f"{flat_name(module)}.py"] = header + _rewrite(module, file)
    imports = "\n".join(f"from .{flat_name(module)} import {name}" for name, module in CLASSES.items())
    files[f"{ENTRY}.py"] = (
        f'"""The remote code of a helmlm model directory (helmlm {version}): the model classes, generated from '
        "helmlm's sources\n(the helmlm_*.py files beside this one). ``AutoModelForCausalLM.from_pretrained(DIR, "
        "trust_remote_code=True)``\nloads the model with torch and transformers alone; with helmlm installed, "
        '``import helmlm`` loads it without remote code."""\n\n'
        f"{imports}\n\n__all__ = {sorted(CLASSES)!r}\n")
    return files
