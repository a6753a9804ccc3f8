"""Who reads which split: every stage of dvc.yaml runs in-process, in pipeline order, on tiny
params in a scratch copy of the repository, while two independent observers record the splits it
touches. The test split is read once per contestant, in its final scores (clso.data.tokens.final_losses),
after training and selection; the search must not see val or test.

Observers:
  * `TokenData.tokens(split)`, wrapped: the front door every stage uses today;
  * a `sys.audit` hook on the "open" event, which every Python-level file open raises
    (`open`, `io.open`, `os.open`, `Path.read_bytes`, `np.memmap`, `np.fromfile`), and on
    process launches whose arguments name a split file: a reader that bypasses TokenData is
    caught too. The open mode tells reading from writing: `prepare` writes every split
    (mode "wb") and reads none.
An audit hook cannot be removed once added; it is installed once per process and does nothing
unless a test here is recording.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO, copy_checkout, expand_stages

SPLIT_FILE = re.compile(r"(?:^|[/\\])(train|val|test)\.bin$")
SPLIT_IN_COMMAND = re.compile(r"(?:^|[/\\\s=])(train|val|test)\.bin(?:$|[\s;'\"])")


class Recorder:
    def __init__(self):
        self.stage: str | None = None
        self.phase: str | None = None
        self.events: list[tuple[str | None, str | None, str, str, str]] = []  # stage, phase, split, kind, via

    def add(self, split: str, kind: str, via: str) -> None:
        self.events.append((self.stage, self.phase, split, kind, via))

    def splits(self, stage: str, kind: str = "read", via: str | None = None, phase: str | None = None) -> set[str]:
        return {sp for st, ph, sp, k, v in self.events
                if st == stage and k == kind and (via is None or v == via) and (phase is None or ph == phase)}


_ACTIVE: list[Recorder] = []  # the recorder of the test running now, if any
_HOOKED = False


def _split_of(path, pattern=SPLIT_FILE) -> str | None:
    if isinstance(path, int):
        return None  # an fd: the open that made it was seen already
    try:
        m = pattern.search(os.fsdecode(path))
    except TypeError:
        return None
    return m.group(1) if m else None


def _kinds(mode, flags) -> tuple[str, ...]:
    if isinstance(mode, str):  # open() / io.open(): "rb", "wb", "r+b", "a", "x"...
        read, write = "r" in mode or "+" in mode, any(c in mode for c in "wax+")
    else:  # os.open(): flags only
        access = flags & os.O_ACCMODE
        read = access in (os.O_RDONLY, os.O_RDWR)
        write = access in (os.O_WRONLY, os.O_RDWR) or bool(flags & (os.O_CREAT | os.O_TRUNC | os.O_APPEND))
    return (("read",) if read else ()) + (("write",) if write else ())


def _audit(event: str, args) -> None:
    if not _ACTIVE:
        return
    if event == "open":
        split = _split_of(args[0])
        if split:
            for kind in _kinds(args[1], args[2]):
                _ACTIVE[-1].add(split, kind, "open")
    elif event in ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.system"):
        # a child process handed a split file (its own reads are beyond this hook)
        stack = list(args)
        while stack:
            a = stack.pop()
            if isinstance(a, (list, tuple)):
                stack.extend(a)
            elif isinstance(a, (str, bytes, os.PathLike)) and (split := _split_of(a, SPLIT_IN_COMMAND)):
                _ACTIVE[-1].add(split, "read", event)


def _install_hook() -> None:
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True


# --- the pipeline, in dvc.yaml's order ------------------------------------------------------

def _paths(entries) -> list[str]:
    return [(next(iter(e)) if isinstance(e, dict) else e).strip().removeprefix("./").rstrip("/") for e in entries or []]


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


def pipeline_order(stages: dict) -> list[str]:
    """Stages in an order that respects dvc.yaml: a stage runs after every stage whose outs,
    metrics or plots it depends on (ties keep dvc.yaml's order)."""
    outs = {n: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots")) for n, s in stages.items()}
    needs = {n: {m for m in stages if m != n for d in _paths(s.get("deps")) for o in outs[m]
                 if _under(d, o) or _under(o, d)} for n, s in stages.items()}
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and needs[n] <= set(order)]
        assert ready, f"dvc.yaml has a dependency cycle among {set(stages) - set(order)}"
        order.append(ready[0])
    return order


def run_stage(stage_name: str, cmd: str) -> int:
    """Run, in this process, the typer command `python -m stages.NAME [COMMAND] [OPTIONS]` runs;
    returns its exit status."""
    m = re.fullmatch(r"python -m ((?:\w+\.)*(\w+))((?: \S+)*)", cmd.strip())
    assert m, f"stage {stage_name}: cmd {cmd!r} is not `python -m stages.NAME [ARGS]`"
    importlib.import_module(m.group(1))
    from stages.common import app

    args = m.group(3).split()
    commands = {c.name for c in app.registered_commands}
    if not args or args[0].startswith("-"):  # run_alone: the module's own command
        assert m.group(2) in commands, f"stage {stage_name}: no command {m.group(2)!r} registered by {m.group(1)}"
        args = [m.group(2), *args]
    return app(args=[*args, "--params", "params.yaml"], standalone_mode=False) or 0


def test_pipeline_order_follows_deps_and_outs():
    stages = {"c": {"deps": ["a/x.json", "b"]}, "b": {"deps": ["a"], "outs": ["b"]},
              "a": {"metrics": [{"a/x.json": {"cache": False}}], "outs": ["a/y"]}}
    assert pipeline_order(stages) == ["a", "b", "c"]
    with pytest.raises(AssertionError, match="cycle"):
        pipeline_order({"a": {"deps": ["b"], "outs": ["a"]}, "b": {"deps": ["a"], "outs": ["b"]}})


def test_the_audit_hook_tells_reads_from_writes_and_sees_bypasses(tmp_path):
    import numpy as np

    _install_hook()
    rec = Recorder()
    rec.stage = "probe"
    _ACTIVE.append(rec)
    try:
        np.arange(4, dtype=np.uint16).tofile(tmp_path / "test.bin")
        with open(tmp_path / "val.bin", "wb") as f:
            f.write(b"\0\0")
        np.fromfile(tmp_path / "test.bin", dtype=np.uint16)
        np.memmap(tmp_path / "val.bin", dtype=np.uint16, mode="r")
        os.close(os.open(tmp_path / "train.bin", os.O_RDONLY | os.O_CREAT))
        (tmp_path / "other.bin").write_bytes(b"")
        subprocess.run(["cat", tmp_path / "test.bin"], capture_output=True, check=True)
        os.system(f"cat '{tmp_path}/val.bin' > /dev/null")
    finally:
        _ACTIVE.remove(rec)
    assert rec.splits("probe", "write") == {"test", "val", "train"}
    assert rec.splits("probe", "read") == {"test", "val", "train"}
    np.fromfile(tmp_path / "test.bin", dtype=np.uint16)  # not recording: nothing added
    assert {(sp, v) for _, _, sp, k, v in rec.events if v != "open"} == {("test", "subprocess.Popen"),
                                                                          ("val", "os.system")}
    assert len(rec.events) == 8


@pytest.fixture
def scratch_repo(tmp_path, monkeypatch):
    copy_checkout(tmp_path)
    # pure mode too (the dvc pipeline test runs the tiny params' hybrid grid): the frozen-head bound
    params = yaml.safe_load((REPO / "tests/params_tiny.yaml").read_text())
    params["grid"] |= {"evolve": ["pure", "hybrid"], "random": ["pure"], "no_surrogate": ["pure"], "fixed_body": ["hybrid"],
                       "ngopt": ["pure"], "head_only": ["hybrid"], "es": ["pure"], "mezo": ["hybrid"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_test_is_read_only_in_the_final_scores_and_the_search_sees_only_train(scratch_repo, monkeypatch):
    from clso.data.tokens import TokenData
    from clso.search.evolve import Evolution

    stages = expand_stages(yaml.safe_load((scratch_repo / "dvc.yaml").read_text())["stages"],
                           yaml.safe_load((scratch_repo / "params.yaml").read_text()))
    order = pipeline_order(stages)
    searches = [n for n in order if "@" in n]
    assert set(searches) == {"evolve@pure-1337", "evolve@hybrid-1337", "random@pure-1337", "no_surrogate@pure-1337",
                             "fixed_body@hybrid-1337", "ngopt@pure-1337", "head_only@hybrid-1337", "es@pure-1337",
                             "mezo@hybrid-1337"}
    rec = Recorder()

    real_tokens = TokenData.tokens

    @functools.wraps(real_tokens)
    def tokens(self, split, *args, **kwargs):
        rec.add(split, "read", "TokenData.tokens")
        return real_tokens(self, split, *args, **kwargs)

    monkeypatch.setattr(TokenData, "tokens", tokens)

    def phase(name, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            outer, rec.phase = rec.phase, name
            try:
                return fn(*args, **kwargs)
            finally:
                rec.phase = outer
        return run

    # evolve's search is the Evolution (built, then run); the stage's later val score is not part of it
    for method in ("__init__", "run_to_end"):
        assert hasattr(Evolution, method), f"clso.search.evolve.Evolution.{method} is gone: update this test"
        monkeypatch.setattr(Evolution, method, phase("search", getattr(Evolution, method)))
    # the arena's dense trainers: their steps and Adam phases (their curve's val points are measuring)
    from clso.search.zeroth_order import _Run

    for method in ("step", "adam"):
        monkeypatch.setattr(_Run, method, phase("search", getattr(_Run, method)))
    # a contestant's final scores, the one place the test split may be read
    for module in ("stages.baseline", "stages.field", "stages.evolve", "stages.arena"):
        stage_module = importlib.import_module(module)
        monkeypatch.setattr(stage_module, "final_losses", phase("final", stage_module.final_losses))

    _install_hook()
    _ACTIVE.append(rec)
    seconds = {}
    try:
        for name in order:
            rec.stage, start = name, time.perf_counter()
            status = run_stage(name, stages[name]["cmd"])
            if status:  # a ClsoError, printed on stderr as one line
                pytest.fail(f"stage {name} exited with status {status}; its error is on stderr")
            seconds[name] = round(time.perf_counter() - start, 1)
    finally:
        _ACTIVE.remove(rec)
        rec.stage = None
    print(f"stages in order, seconds: {seconds}")
    reads = {n: rec.splits(n) for n in order}
    print(f"splits read: {reads}")

    # the observers agree: the file hook saw every split TokenData.tokens handed out, so a reader
    # that bypasses TokenData would not go unseen either
    for name in order:
        assert rec.splits(name, via="TokenData.tokens") <= rec.splits(name, via="open"), name
    assert any(rec.splits(n, via="open") for n in order), "the audit hook saw no split being read"

    contestants = {"baseline", "field", "field_no_neurons", *searches}
    assert {n for n, r in reads.items() if "test" in r} == contestants, f"who reads the test split: {reads}"
    for name in contestants:  # and only in its final scores
        assert {sp for st, ph, sp, k, v in rec.events if st == name and k == "read" and ph != "final"} <= {"train", "val"}
    assert reads["compare"] == set(), "compare reads the records, never a split"
    assert reads["sweep"] == {"train"}, f"the sweep chooses step sizes on train alone; it reads {reads['sweep']}"
    assert rec.splits("prepare", "write") == {"train", "val", "test"} and reads["prepare"] == set(), \
        "prepare writes every split and reads none"
    writers = {n for n in order if rec.splits(n, "write")}
    assert writers == {"prepare"}, f"only prepare may write a split; writers: {writers}"
    # the surrogate learns from fitness losses on the train batch; a val read there is a leak
    assert reads["surrogate"] == {"train"}, f"surrogate reads {reads['surrogate']}"
    # every search selects on train alone: its val loss and compare's test loss stay held out
    for name in searches:
        search = {sp for st, ph, sp, k, v in rec.events if st == name and ph == "search" and k == "read"}
        assert search <= {"train"}, f"{name}'s search reads {search}"

    # and what pure mode alone reports: the frozen-head bound, in the searches' metrics and the verdict
    import json

    from clso.compare import PPL_TOLERANCE

    compare = json.loads((scratch_repo / "metrics/detail/compare.json").read_text())
    evolve = json.loads((scratch_repo / "metrics/detail/contestants/evolve@pure-1337.json").read_text())
    bound = evolve["details"]["frozen_head_bound"]
    # the bound is the genome searches': the arena's dense trainers train the head, so it does not apply to them
    for name in (n for n in searches if "@pure-" in n and not n.startswith(("es@", "mezo@"))):
        run = json.loads((scratch_repo / f"metrics/detail/contestants/{name}.json").read_text())
        assert run["details"]["frozen_head_bound"] == bound and run["val_loss"] >= bound["val_loss"], name
    assert 0 <= bound["solver_gap"] < 1e-3
    assert compare["frozen_head_bound_val_ppl"] == bound["val_ppl"]
    # the best forward-only run is the pure-mode stage of lowest val loss; the bound applies to genome searches only
    pure_runs = {n: r["val_loss"] for n, r in compare["contestants"].items() if "@pure-" in n}
    best = compare["forward_only"]
    assert best["contestant"] == min(pure_runs, key=pure_runs.get)
    assert best["bound_applies"] == (not best["contestant"].startswith(("es@", "mezo@")))
    headline = compare["contestants"][compare["headline"]["clso"]]
    v, pure = compare["headline"]["verdict"], headline["mode"] == "pure"  # the headline: whichever mode did better
    assert v["bound_ppl"] == (bound["val_ppl"] if pure else None)
    baseline_ppl = compare["contestants"]["baseline"]["val_ppl"]
    assert v["decided_by_frozen_head_bound"] == (pure and bound["val_ppl"] / baseline_ppl > 1 + PPL_TOLERANCE)
    # the stages after the search meter themselves too, charged to neither side
    compile_ = json.loads((scratch_repo / "metrics/detail/compile.json").read_text())
    for cost in (compare["uncharged"]["compare"], compile_["cost"], evolve["uncharged"]["final_scores"], evolve["uncharged"]["checkpoints"]):
        assert cost["energy_wh"] > 0 and cost["method"] in {"estimate", "rapl"}
