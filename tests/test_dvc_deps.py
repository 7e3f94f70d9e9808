"""dvc.yaml deps against the code each stage runs: every project module a stage's flow imports (transitively) is
a dep of that stage, and no project-code dep is one the flow never imports (such a dep only causes needless reruns:
restyling the EM table must not rerun training).

Pure parsing (yaml + ast): nothing of the project is imported. Imports are read wherever they are in a file
(module level, inside functions, under `if TYPE_CHECKING`), so a lazy import counts as a dependency."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tspo_core")
"""The project's own packages; imports of anything else (stdlib, third party) are not deps."""
SIDE_EFFECT_ONLY = {
    "flows.tracking": "W&B logging of a finished stage, called from flows.common.main() after the outputs are "
                      "written; any failure there is a warning, so it cannot change a stage's outputs",
    "flows.subflow": "Prefect bookkeeping: records a stage's flow run as a subflow run of the pipeline task that "
                     "started it; the flow function, and so the stage's outputs, are the same either way",
}
"""Modules left out of the closure, with the reason: what they (and what only they) import is not a stage dep."""
_CMD = re.compile(r"\bpython\s+-m\s+(flows\.\w+)")


def _substitute(value, key: str, item) -> object:
    """`${item}`, `${key}` and `${item.field}` in a `do:` block, as DVC's foreach does (strings only)."""
    if isinstance(value, str):
        def repl(m: re.Match) -> str:
            name = m.group(1)
            if name == "key":
                return str(key)
            if name == "item":
                return str(item)
            if name.startswith("item."):
                v = item
                for part in name.split(".")[1:]:
                    v = v[part]
                return str(v)
            return m.group(0)
        return re.sub(r"\$\{\s*([\w.]+)\s*\}", repl, value)
    if isinstance(value, list):
        return [_substitute(v, key, item) for v in value]
    if isinstance(value, dict):
        return {_substitute(k, key, item): _substitute(v, key, item) for k, v in value.items()}
    return value


def dvc_stages() -> dict[str, dict]:
    """{stage name: definition} with `foreach` stages expanded to `name@key`."""
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    stages: dict[str, dict] = {}
    for name, spec in raw.items():
        if "foreach" not in spec:
            stages[name] = spec
            continue
        items = spec["foreach"]
        pairs = items.items() if isinstance(items, dict) else ((v, v) for v in items)
        for key, item in pairs:
            stages[f"{name}@{key}"] = _substitute(spec["do"], key, item)
    return stages


def module_file(module: str) -> Path | None:
    """`a.b.c` -> a/b/c.py or a/b/c/__init__.py (relative to the repository root); None when neither exists."""
    base = Path(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if (REPO / path).is_file():
            return path
    return None


def _with_parents(module: str) -> list[str]:
    """`a.b.c` -> [a, a.b, a.b.c]: importing a module runs its packages' `__init__.py` first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(module: str) -> set[str]:
    """Project modules `module` imports anywhere in its file (`from pkg import name` counts `pkg.name` when that
    is a submodule), each with its parent packages."""
    path = module_file(module)
    assert path is not None, f"no file for module {module}"
    is_package = path.name == "__init__.py"
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, up level - 1 more
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))
    out = set()
    for name in found:
        if name.split(".")[0] in PACKAGES:
            out.update(m for m in _with_parents(name) if module_file(m))
    return out


def import_closure(module: str) -> set[Path]:
    """Files of `module`, its packages and every project module it reaches through imports (`SIDE_EFFECT_ONLY`
    modules are not followed)."""
    seen: set[str] = set()
    todo = _with_parents(module)
    while todo:
        m = todo.pop()
        if m in seen or m in SIDE_EFFECT_ONLY:
            continue
        seen.add(m)
        todo.extend(imported_modules(m))
    return {module_file(m) for m in seen}


def _dep_paths(spec: dict) -> list[Path]:
    return [Path(next(iter(d)) if isinstance(d, dict) else d) for d in spec.get("deps", [])]


def _covers(dep: Path, file: Path) -> bool:
    return dep == file or dep in file.parents


def _code_stages() -> list[tuple[str, str, dict]]:
    out = []
    for name, spec in dvc_stages().items():
        m = _CMD.search(spec["cmd"])
        assert m, f"stage {name}: cmd {spec['cmd']!r} does not run `python -m flows.<stage>`"
        out.append((name, m.group(1), spec))
    return out


STAGES = _code_stages()


@pytest.mark.parametrize("name,module,spec", STAGES, ids=[s[0] for s in STAGES])
def test_deps_cover_import_closure(name, module, spec):
    deps = _dep_paths(spec)
    closure = import_closure(module)
    uncovered = sorted(str(f) for f in closure if not any(_covers(d, f) for d in deps))
    assert not uncovered, (f"stage {name} ({module}) imports modules that are not in its dvc.yaml deps: "
                           f"{', '.join(uncovered)}")


@pytest.mark.parametrize("name,module,spec", STAGES, ids=[s[0] for s in STAGES])
def test_no_code_dep_outside_import_closure(name, module, spec):
    """A code dep the flow never imports only makes DVC rerun the stage (and everything after it) needlessly."""
    closure = import_closure(module)
    code_deps = [d for d in _dep_paths(spec) if d.parts and d.parts[0] in PACKAGES]
    unused = sorted(str(d) for d in code_deps if not any(_covers(d, f) for f in closure))
    assert not unused, f"stage {name} ({module}) lists code deps it never imports: {', '.join(unused)}"


def test_closure_follows_lazy_and_submodule_imports():
    """The parser itself: a function-level `from tspo_core.x import y` and `from flows import tracking` count."""
    common = imported_modules("flows.common")
    assert {"tspo_core", "tspo_core.config", "tspo_core.io", "flows"} <= common
    assert "flows.tracking" in common  # `from flows import tracking` inside a function: a submodule
    assert Path("tspo_core/__init__.py") in import_closure("flows.data")
