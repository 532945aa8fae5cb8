"""The layering rules of docs/architecture.md, read from the imports of every module (function-level
imports included): what each part of dsserve may depend on."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# dsserve.<part> -> its folder, as pyproject.toml maps them
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
HTTP_LIBRARIES = ("fastapi", "uvicorn", "starlette", "httpx")

# (importing package, forbidden import prefixes, why)
RULES = [
    ("dsserve.core", ("dsserve.server", "dsserve.bench", "dsserve.plugins", "dsserve.conformance"),
     "the core is hardware-agnostic and knows no HTTP: it depends on no device, server, benchmark or suite"),
    ("dsserve.models", ("dsserve.server", "dsserve.bench", "dsserve.plugins", "dsserve.conformance"),
     "model graphs reach devices through the hooks only, and know no HTTP"),
    ("dsserve.core.reference", ("dsserve.plugins", "dsserve.models", "dsserve.conformance", "dsserve.server",
                                "dsserve.bench"),
     "the reference is the oracle: it imports nothing that it judges"),
    ("dsserve.plugins", ("dsserve.server", "dsserve.bench", "dsserve.conformance"),
     "device plugins serve the core's hooks, not the HTTP layer"),
]
# Only the HTTP server and the HTTP load client may import HTTP libraries.
HTTP_ALLOWED = ("dsserve.server", "dsserve.bench")


def _modules() -> list[tuple[str, Path]]:
    found = []
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            found.append((".".join([package, *(p for p in rel.parts if p != "__init__")]), path))
    return found


def _imports(module: str, path: Path) -> set[str]:
    """Every module `module` imports, absolute, with relative imports resolved."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


MODULES = _modules()


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_part_is_scanned():
    parts = {m.split(".")[1] for m, _ in MODULES if m.count(".")}
    assert {"core", "models", "server", "bench", "plugins", "conformance"} <= parts


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_module_respects_the_layering(module, path):
    imported = _imports(module, path)
    broken = []
    for owner, forbidden, why in RULES:
        if _inside(module, owner):
            broken += [f"{name} ({why})" for name in sorted(imported)
                       if any(_inside(name, f) for f in forbidden)]
    if not any(_inside(module, allowed) for allowed in HTTP_ALLOWED):
        broken += [f"{name} (only dsserve.server and dsserve.bench speak HTTP)" for name in sorted(imported)
                   if name.split(".")[0] in HTTP_LIBRARIES]
    assert not broken, f"{module} imports:\n" + "\n".join(broken)


def test_the_scanner_sees_relative_and_function_level_imports(tmp_path):
    """The rules are only as good as the scan: a relative import two levels up inside a function counts."""
    path = tmp_path / "scheduler.py"
    path.write_text("def f():\n    from ..server.app import create_app\n    import httpx\n")
    assert {"dsserve.server.app", "dsserve.server.app.create_app", "httpx"} <= _imports("dsserve.core.scheduler", path)
