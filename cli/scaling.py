"""`clso scaling …`: the size sweep as DVC experiments (a tool, not a DVC stage). `queue` queues one
experiment per size of scaling.yaml; `dvc queue start` runs them; `table` reads the finished ones back
through DVC's Python API and writes the table, the plot and the report section."""

import functools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import typer
import yaml

from clso import ClsoError
from clso.io import write_csv_atomic, write_json_atomic, write_text_atomic
from stages.common import app, one_line_errors

scaling = typer.Typer(no_args_is_help=True, help="The size sweep: one DVC experiment per model size of "
                                                 "scaling.yaml, and the table of how the verdict moves.")
app.add_typer(scaling, name="scaling")

PLAN_OPTION = typer.Option("scaling.yaml", "--plan", help="the sizes and what every size sets")
PARAMS_OPTION = typer.Option("params.yaml", "--params", help="the params each size starts from")
TARGET = "compare"  # the stage each experiment runs to (and every stage before it)
CSV, PNG = Path("plots/scaling.csv"), Path("plots/scaling.png")
SECTION, SUMMARY = Path("metrics/scaling.md"), Path("metrics/scaling.json")


def dvc_errors(fn):
    """DVC's own exceptions (not a repository, a lock held, a bad revision) as one-line errors."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from dvc.exceptions import DvcException
        from scmrepo.exceptions import SCMError

        try:
            return fn(*args, **kwargs)
        except (DvcException, SCMError) as e:
            raise ClsoError(f"dvc: {str(e).splitlines()[0] if str(e) else type(e).__name__}; run from the "
                            "repository root of a DVC project") from None

    return run


def _yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClsoError(f"{path}: file not found; run from the repository root or pass its path") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ClsoError(f"{path}: cannot be read as YAML ({str(e).splitlines()[0]}); fix the file") from None


def _plan(plan: Path, params: Path):
    """The plan, each size's params checked as `dvc exp run -S` will write them: DVC's own override
    writer on a copy of params.yaml, then the stages' own checks on the result."""
    from dvc.exceptions import DvcException
    from dvc.utils.hydra import apply_overrides

    from clso.params import load_params
    from cli.sizes import PlanError, parse_plan

    try:
        the_plan = parse_plan(_yaml(plan), _yaml(params))
    except PlanError as e:
        raise PlanError(f"{plan}: {e}") from None
    with tempfile.TemporaryDirectory() as scratch:
        for size in the_plan.sizes:
            copy = Path(scratch) / "params.yaml"
            shutil.copyfile(params, copy)
            try:
                apply_overrides(copy, size.assignments())
                load_params(copy)
            except (ClsoError, DvcException) as e:
                reason = str(e).removeprefix(f"{copy}: ")
                raise PlanError(f"{plan}: {size.name}: as `dvc exp run -S` writes it, {reason}") from None
    return the_plan


def _dvc(args: list[str]) -> str:
    try:
        run = subprocess.run(["dvc", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise ClsoError("dvc: not found; install the project as the README says and activate its environment") from None
    if run.returncode:
        said = [line.strip() for line in (run.stderr + run.stdout).splitlines() if line.strip()]
        errors = [line.removeprefix("ERROR: ") for line in said if line.startswith("ERROR")]
        raise ClsoError(f"dvc {' '.join(args[:3])} failed: {(errors or said or [f'exit {run.returncode}'])[-1]}")
    return run.stdout


def experiments(names: set[str]) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """The sweep's experiments: ({name: (its newest finished run's full rev, the commit it ran on)},
    {name: queued | running | failed}), over every commit, through dvc.api.exp_show."""
    import dvc.api
    from dvc.repo import Repo

    with Repo(".") as repo:
        done = {sha: (name, baseline) for baseline, exps in repo.experiments.ls(all_commits=True).items()
                for name, sha in exps if name in names}
        queue = repo.experiments.celery_queue
        failed = (result.entry for result in queue.iter_failed())  # a failed task comes with its result
        pending = {entry.baseline_rev for entry in (*queue.iter_queued(), *queue.iter_active(), *failed)
                   if entry.name in names}
        when = {sha: repo.scm.resolve_commit(sha).commit_time for sha in done}
    rows = dvc.api.exp_show(repo=".", revs=sorted({*pending, *(b for _, b in done.values())}), num=1) \
        if done or pending else []
    finished = {}
    for sha in sorted(done, key=when.get):  # the newest run of a name last, so it wins
        name, baseline = done[sha]
        finished[name] = (sha, baseline[:7])
    states = {row["Experiment"]: str(row["State"]).lower() for row in rows
              if row.get("Experiment") in names and row.get("State") in ("Queued", "Running", "Failed")}
    return finished, states


@scaling.command("queue")
@one_line_errors("scaling queue")
@dvc_errors
def queue(plan: Path = PLAN_OPTION, params: Path = PARAMS_OPTION,
          size: list[str] = typer.Option(None, "--size", help="queue only this size (size-2x128); repeat for more"),
          force: bool = typer.Option(False, "--force", help="queue a size that has a finished experiment on this "
                                                            "commit: the new run replaces it when it finishes")
          ) -> None:
    """Queue `dvc exp run --queue compare -S …` once per size of the plan. Each experiment runs in its
    own copy of the repository, so no two share a checkpoint or an output. Then: `dvc queue start`."""
    from dvc.repo import Repo

    sizes = _plan(plan, params).sizes
    unknown = sorted(set(size or ()) - {s.name for s in sizes})
    if unknown:
        raise ClsoError(f"--size {unknown[0]}: not in {plan}; valid: {', '.join(s.name for s in sizes)}")
    chosen = [s for s in sizes if not size or s.name in size]
    finished, states = experiments({s.name for s in chosen})
    with Repo(".") as repo:
        head = repo.scm.get_rev()[:7]
    for s in chosen:  # every refusal before anything is queued
        if states.get(s.name) in ("queued", "running"):
            raise ClsoError(f"{s.name}: already {states[s.name]} (dvc queue status); let it finish or "
                            f"dvc queue kill / remove it first")
        if s.name in finished and finished[s.name][1] == head and not force:
            raise ClsoError(f"{s.name}: finished on this commit already (clso scaling table says whether its params "
                            "still hold); --force runs it again, or choose sizes with --size")
    for s in chosen:
        _dvc(["exp", "run", "--queue", *(["--force"] if force else []), TARGET, "-n", s.name,
              *(a for kv in s.assignments() for a in ("-S", kv))])
        print(f"queued {s.name}: {' '.join(s.assignments())}")
    print(f"{len(chosen)} experiments queued. Run them: dvc queue start (-j 2 for two at once); watch: dvc queue "
          "status; then: clso scaling table")


def _read(path: str, rev: str):
    import dvc.api

    text = dvc.api.read(path, repo=".", rev=rev)
    return json.loads(text) if path.endswith(".json") else yaml.safe_load(text)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def _older_code(rows: list[dict]) -> dict[str, str]:
    """{size: why} for each row that ran on a commit whose code (clso/, stages/, dvc.yaml's stages)
    differs from HEAD's: its figures may not be this code's. Its params are checked apart."""
    head = _git("rev-parse", "--short=7", "HEAD").stdout.strip()
    stages_at = functools.cache(lambda rev: (yaml.safe_load(_git("show", f"{rev}:dvc.yaml").stdout) or {}).get("stages"))
    older = {}
    for r in rows:
        if r["commit"] == head:
            continue
        diff = _git("diff", "--quiet", r["commit"], "HEAD", "--", "clso", "stages").returncode
        if diff not in (0, 1):
            older[r["size"]] = f"ran on commit {r['commit']}, which this repository lacks: its code cannot be checked"
        elif diff or stages_at(r["commit"]) != stages_at("HEAD"):
            older[r["size"]] = (f"ran on commit {r['commit']}, whose clso/, stages/ or dvc.yaml stages differ from "
                                f"HEAD's: its figures may not be this code's (clso scaling queue --force --size {r['size']})")
    return older


def _table_here() -> dict[str, dict]:
    """The rows of the metrics/scaling.json in this checkout, by size."""
    if not SUMMARY.is_file():
        return {}
    try:
        summary = json.loads(SUMMARY.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ClsoError(f"{SUMMARY}: cannot be read ({e}); remove it and run again") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("sizes"), list) or \
            not all(isinstance(r, dict) and "size" in r for r in summary["sizes"]):
        raise ClsoError(f"{SUMMARY}: not a table `clso scaling table` wrote; remove it and run again")
    return {r["size"]: r for r in summary["sizes"]}


@scaling.command("table")
@one_line_errors("scaling table")
@dvc_errors
def table_(plan: Path = PLAN_OPTION, params: Path = PARAMS_OPTION) -> None:
    """Read every finished experiment of the plan (dvc.api.exp_show, then its compare outputs) and
    write plots/scaling.csv, plots/scaling.png, metrics/scaling.md and metrics/scaling.json: per size,
    CLSO's ratios to AdamW, the contrasts, every search's ratio and the fitted trend. A size is left out,
    with the reason, while it is not finished or when it ran with other params than the plan gives now.
    A size with no experiment in this repository keeps its row of the metrics/scaling.json found here
    (a clone has the table, not the experiments) when that row ran on the params the plan gives now."""
    from clso.params import parse_params
    from cli.sizes import applied, columns, differs, digest, fit_trend, model_size, scaling_png, section, \
        size_row, trend_statement

    the_plan = _plan(plan, params)
    finished, states = experiments({s.name for s in the_plan.sizes})
    workspace = _yaml(params)
    before = _table_here()
    rows, missing, carried = [], {}, {}
    for s in the_plan.sizes:
        expected = applied(workspace, s.overrides)
        stale = None
        if s.name in finished:
            rev, commit = finished[s.name]
            ran = _read("params.yaml", rev)
            stale = differs(ran, expected)
        if s.name not in finished or stale:
            old = before.get(s.name)
            here = f"; here it is {states[s.name]}" if s.name in states else ""
            if old is not None and old.get("params_digest") == digest(expected):
                rows.append(old)
                why = f"this repository's run of it has {stale}" if stale else "no finished run of it here"
                carried[s.name] = f"kept from {SUMMARY} (ran on commit {old['commit']}); {why}{here}"
            elif stale:
                missing[s.name] = f"ran with {stale}, not what the plan gives now (clso scaling queue --size {s.name})"
            else:
                missing[s.name] = states.get(s.name, "not run") + " (dvc queue status; clso scaling queue)"
            continue
        try:
            counts = model_size(parse_params(ran), _read("metrics/detail/prepare.json", rev)["vocab_size"])
            rows.append(size_row(s, counts, commit, _read("metrics/compare.json", rev),
                                 _read("metrics/detail/compare.json", rev)) | {"params_digest": digest(expected)})
        except (KeyError, TypeError) as e:
            raise ClsoError(f"{s.name}: its outputs lack {e} (made by older code?); run it again: "
                            f"clso scaling queue --force --size {s.name}") from None
    if not rows:
        raise ClsoError(f"no finished experiment of {plan} ({'; '.join(f'{k}: {v}' for k, v in missing.items())})")
    older = _older_code(rows)
    notes = {name: "; ".join(why for why in (carried.get(name), older.get(name)) if why)
             for name in {**carried, **older}} | missing
    fit = fit_trend(rows)
    write_csv_atomic(CSV, columns(rows), rows)
    scaling_png(rows, fit, PNG)
    write_text_atomic(SECTION, section(rows, notes, len(the_plan.sizes), fit, the_plan.rule))
    write_json_atomic(SUMMARY, {"rule": the_plan.rule, "sizes": rows, "kept": carried, "older_code": older,
                                "not_in_table": missing, "fit": fit})
    for name, why in notes.items():
        print(f"{name}: {why}")
    print(f"{len(rows)} sizes → {CSV}, {PNG}, {SECTION}, {SUMMARY}. {trend_statement(fit)}")
