"""dvc.yaml names every project file a stage runs: `dvc repro` must not call a stage up to date
after a change to code it imports (say, the FLOP or energy accounting behind its metrics).

Each stage's `cmd` is `python -m stages.NAME [ARGS]` (a matrix stage's template counts once); the
files it runs are stages.closure's code_files, the same closure the checkpoints' fingerprints hash.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from stages.closure import PACKAGES, RUNTIME_FILES, code_files, import_closure
from tests.conftest import REPO

CMD = re.compile(r"^python -m ((?:stages)(?:\.\w+)+)(?: .*)?$")  # arguments (a matrix item's) may follow


def required_files(root: Path, module: str) -> set[str]:
    return set(code_files(module, root))


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
    # stages/closure.py locates the repository to read the code itself: the closure it computes
    unmapped = [r for r in readers if r not in RUNTIME_FILES and r != "stages/closure.py"]
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
    stages["compile"]["deps"] = ["clso/export/runtime"]  # the C runtime's folder covers crystal.c, not its neighbours
    missing = missing_deps(REPO, stages)["compile"]
    assert "clso/context.py" in missing and "clso/export/runtime/crystal.c" not in missing


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
        "clso/export/runtime/data.c": "",
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
