"""The code a stage runs: the project files `python -m stages.NAME` executes, found statically.

One closure serves two readers. dvc.yaml must list every one of these files in the stage's deps, or
`dvc repro` calls a stale output up to date after a change to code the stage imports (the test of
dvc.yaml checks this). A checkpoint's fingerprint hashes the same files, so a run the old code began
is never resumed by the new one.

The closure follows imports at module level and inside functions, `from pkg import submodule`,
relative imports, and the package __init__.py files each import executes. Files a module reads at
run time cannot be seen that way: RUNTIME_FILES names them.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("clso", "stages")  # the project's packages that stages run: everything else is a dependency
# Non-Python files a project module reads at run time; a stage that runs the module depends on them too.
RUNTIME_FILES = {
    "clso/export/compile.py": ("clso/export/runtime/crystal.c",),  # RUNTIME_SOURCE: build_runtime compiles it
}


def module_file(root: Path, name: str) -> Path | None:
    """The file of project module `name`, as Python's path finder picks it: a package folder with
    __init__.py first, then NAME.py; a folder without __init__.py (the C runtime's
    clso/export/runtime/) is no module file. None for a name outside the project."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _prefixes(name: str) -> list[str]:
    """`import a.b.c` runs a/__init__.py, a/b/__init__.py and a/b/c.py: every prefix."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_modules(root: Path, path: Path) -> frozenset[str]:
    """Every module name an import anywhere in `path` (functions included) may load."""
    stat = path.stat()
    return _imported_modules(root, path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _imported_modules(root: Path, path: Path, _mtime_ns: int, _size: int) -> frozenset[str]:
    # cached per file version: the tests derive every closure many times
    package_parts = list(path.relative_to(root).parts[:-1])  # a/b/__init__.py is package a.b, a/b/c.py is in a.b
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.update(_prefixes(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package_parts[:len(package_parts) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            if not base:
                continue
            names.update(_prefixes(base))
            # `from pkg import name`: name is a submodule when pkg/name.py or pkg/name/ exists
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return frozenset(names)


def import_closure(root: Path, module: str) -> set[str]:
    """Repo-relative paths of the project modules `python -m module` executes."""
    seen: set[Path] = set()
    todo = _prefixes(module)
    while todo:
        f = module_file(root, todo.pop())
        if f is None or f in seen:
            continue
        seen.add(f)
        todo.extend(imported_modules(root, f))
    return {f.relative_to(root).as_posix() for f in seen}


def code_files(module: str, root: Path = ROOT) -> list[str]:
    """Every project file `python -m module` runs or reads as code (RUNTIME_FILES included), sorted."""
    code = import_closure(root, module)
    return sorted(code | {data for f in code for data in RUNTIME_FILES.get(f, ())})
