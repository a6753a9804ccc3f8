"""dvc.yaml names every project file a stage runs: `dvc repro` must not call a stage up to date
after a change to code it imports (say, the FLOP or energy accounting behind its metrics).

Each stage's `cmd` is `python -m stages.NAME [ARGS]` (a matrix stage's template counts once); the files it runs are the transitive closure of
the project modules (under clso/ and stages/) that stages/NAME.py imports, found statically with
`ast`: imports at module level and inside functions, `from pkg import submodule`, relative
imports, and the package __init__.py files each import executes. Files a module reads at run time
cannot be seen that way; RUNTIME_FILES names them by hand.
"""

from __future__ import annotations

import ast
import copy
import functools
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("clso", "stages")  # the project's top-level packages: everything else is a dependency

# Non-Python files a project module reads at run time (ast cannot derive these). A stage whose
# closure holds the module must list the files too. Keep it small and explicit; the test
# `test_modules_that_locate_files_beside_themselves_are_in_RUNTIME_FILES` catches a new one.
RUNTIME_FILES = {
    # compile.RUNTIME_SOURCE: build_runtime compiles the C runtime from it
    "clso/crystal/compile.py": ("clso/crystal/runtime/crystal.c",),
}

CMD = re.compile(r"^python -m ((?:stages)(?:\.\w+)+)(?: .*)?$")  # arguments (a matrix item's) may follow


# --- the closure ------------------------------------------------------------------------------

def module_file(root: Path, name: str) -> Path | None:
    """The file of project module `name`, as Python's path finder picks it: a package folder with
    __init__.py first, then NAME.py; a folder without __init__.py (the C runtime's clso/crystal/runtime/)
    is no module file. None for a name outside the project."""
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
    # cached per file version: the self-checks below derive every closure many times
    # the package a relative import starts from: a/b/__init__.py is package a.b, a/b/c.py is in a.b
    package_parts = list(path.relative_to(root).parts[:-1])
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
    return names


def import_closure(root: Path, module: str) -> set[str]:
    """Repo-relative paths of the project files `python -m module` executes."""
    seen: set[Path] = set()
    todo = [n for n in _prefixes(module)]
    while todo:
        f = module_file(root, todo.pop())
        if f is None or f in seen:
            continue
        seen.add(f)
        todo.extend(imported_modules(root, f))
    return {f.relative_to(root).as_posix() for f in seen}


def required_files(root: Path, module: str) -> set[str]:
    code = import_closure(root, module)
    return code | {data for f in code for data in RUNTIME_FILES.get(f, ())}


# --- dvc.yaml ---------------------------------------------------------------------------------

def load_stages(root: Path = REPO) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    m = CMD.match(stage["cmd"].strip())
    assert m, f"cmd {stage['cmd']!r} is not `python -m stages.NAME [ARGS]`: this test cannot derive its code"
    return m.group(1)


def _dep_paths(stage: dict) -> list[str]:
    # a dep is a path string, or a one-key mapping {path: options}
    return [(next(iter(d)) if isinstance(d, dict) else d).strip().removeprefix("./").rstrip("/")
            for d in stage.get("deps", [])]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in deps)


def missing_deps(root: Path, stages: dict) -> dict[str, list[str]]:
    """For each stage, the files it runs that its deps do not cover (only stages with some)."""
    out = {}
    for name, stage in stages.items():
        deps = _dep_paths(stage)
        missing = sorted(f for f in required_files(root, stage_module(stage)) if not covered(f, deps))
        if missing:
            out[name] = missing
    return out


def _report(problems: dict[str, list[str]], what: str) -> str:
    return "\n".join(f"stage {name!r} {what}: {', '.join(files)}" for name, files in problems.items())


# --- the checks on this repository ------------------------------------------------------------

def test_every_stage_depends_on_every_project_file_it_runs():
    problems = missing_deps(REPO, load_stages())
    assert not problems, ("dvc.yaml: add these to the stages' deps, or `dvc repro` calls stale outputs "
                          "up to date:\n" + _report(problems, "runs but does not depend on"))


def test_every_source_dep_exists_and_every_python_dep_is_run_by_its_stage():
    absent, unused = {}, {}
    for name, stage in load_stages().items():
        run = required_files(REPO, stage_module(stage))
        for dep in _dep_paths(stage):
            if dep.split("/")[0] not in PACKAGES:
                continue  # data/, models/, metrics/...: outputs of earlier stages
            if not (REPO / dep).exists():
                absent.setdefault(name, []).append(dep)
            elif dep.endswith(".py") and dep not in run:
                unused.setdefault(name, []).append(dep)
    assert not absent, "dvc.yaml names files that do not exist:\n" + _report(absent, "lists")
    assert not unused, ("dvc.yaml: these deps are not imported by the stage (stale; they rerun it for "
                        "nothing):\n" + _report(unused, "lists"))


def test_runtime_files_exist_and_are_still_named_by_their_module():
    for module, files in RUNTIME_FILES.items():
        source = (REPO / module).read_text(encoding="utf-8")
        for f in files:
            assert (REPO / f).is_file(), f"RUNTIME_FILES: {f} does not exist"
            assert Path(f).name in source, f"RUNTIME_FILES: {module} no longer names {Path(f).name}; update the map"


def test_modules_that_locate_files_beside_themselves_are_in_RUNTIME_FILES():
    # a module that finds a file from __file__ or package resources reads something ast cannot see
    readers = sorted(p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
                     if re.search(r"__file__|importlib\.resources|pkgutil\.get_data", p.read_text(encoding="utf-8")))
    unmapped = [r for r in readers if r not in RUNTIME_FILES]
    assert not unmapped, f"{unmapped} read files located beside them: add what they read to RUNTIME_FILES"


# --- the checks can fail ----------------------------------------------------------------------

@pytest.mark.parametrize("stage", list(load_stages()))
def test_removing_any_source_dep_is_caught(stage):
    stages = load_stages()
    sources = [d for d in stages[stage]["deps"] if d.split("/")[0] in PACKAGES]
    assert sources
    already = set(missing_deps(REPO, stages).get(stage, []))  # the test above reports these
    for dep in sources:
        fewer = copy.deepcopy(stages)
        fewer[stage]["deps"] = [d for d in fewer[stage]["deps"] if d != dep]
        assert set(missing_deps(REPO, fewer).get(stage, [])) - already == {dep}, \
            f"removing {dep} from {stage} went unnoticed"


def test_a_folder_dep_covers_the_files_below_it():
    stages = copy.deepcopy(load_stages())
    stages["compile"]["deps"] = ["clso/", "stages"]
    assert "compile" not in missing_deps(REPO, stages)
    stages["compile"]["deps"] = ["clso/crystal/runtime"]  # the C runtime's folder covers crystal.c, not its neighbours
    missing = missing_deps(REPO, stages)["compile"]
    assert "clso/context.py" in missing and "clso/crystal/runtime/crystal.c" not in missing


def test_the_closure_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "clso"
    (pkg / "runtime").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    files = {
        "stages/__init__.py": "",
        "stages/run.py": "import os\nfrom stages.helper import go\n",
        "stages/helper.py": "def go():\n    from clso import sub, Thing\n    import clso.deep.leaf\n",
        "clso/__init__.py": "Thing = 1\n",
        "clso/sub.py": "from . import rel\nfrom .runtime import setup\n",
        "clso/rel.py": "",
        "clso/runtime.py": "def setup(): pass\n",
        "clso/crystal/runtime/data.c": "",
        "clso/deep/__init__.py": "from ..unused_name import x\n",
        "clso/deep/leaf.py": "",
        "clso/never.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert import_closure(tmp_path, "stages.run") == {
        "stages/__init__.py", "stages/run.py", "stages/helper.py", "clso/__init__.py", "clso/sub.py",
        "clso/rel.py", "clso/runtime.py", "clso/deep/__init__.py", "clso/deep/leaf.py"}


def test_the_searches_track_every_evolve_param_but_where_the_evaluations_run():
    from dataclasses import fields

    from clso.params import EvolveParams

    placement = {"evolve.workers", "evolve.address"}
    searches = {f"evolve.{f.name}" for f in fields(EvolveParams)} - placement
    stages = load_stages()
    for name in ("evolve", "random", "no_surrogate", "fixed_body"):
        tracked = set(stages[name]["params"])
        assert searches <= tracked and not placement & tracked and "evolve" not in tracked, name
    assert not any(placement & set(stage.get("params", [])) for stage in stages.values())
