"""`clso scaling …`: the size sweep as DVC experiments (a tool, not a DVC stage). `queue` queues one
experiment per size of scaling.yaml; `dvc queue start` runs them; `table` reads the finished ones back
through DVC's Python API and writes the table, the plot and the report section."""

import subprocess
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


def _yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ClsoError(f"{path}: file not found; run from the repository root or pass its path") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ClsoError(f"{path}: cannot be read as YAML ({str(e).splitlines()[0]}); fix the file") from None


def _plan(plan: Path, params: Path):
    from clso.scaling import PlanError, parse_plan

    try:
        return parse_plan(_yaml(plan), _yaml(params))
    except PlanError as e:
        raise PlanError(f"{plan}: {e}") from None


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


@scaling.command("queue")
@one_line_errors("scaling queue")
def queue(plan: Path = PLAN_OPTION, params: Path = PARAMS_OPTION,
          size: list[str] = typer.Option(None, "--size", help="queue only this size (size-2x128); repeat for more"),
          force: bool = typer.Option(False, "--force", help="replace an experiment of the same name on this commit")
          ) -> None:
    """Queue `dvc exp run --queue compare -S …` once per size of the plan. Each experiment runs in its
    own copy of the repository, so no two share a checkpoint or an output. Then: `dvc queue start`."""
    sizes = _plan(plan, params).sizes
    unknown = sorted(set(size or ()) - {s.name for s in sizes})
    if unknown:
        raise ClsoError(f"--size {unknown[0]}: not in {plan}; valid: {', '.join(s.name for s in sizes)}")
    chosen = [s for s in sizes if not size or s.name in size]
    for s in chosen:
        try:
            _dvc(["exp", "run", "--queue", *(["--force"] if force else []), TARGET, "-n", s.name,
                  *(a for kv in s.assignments() for a in ("-S", kv))])
        except ClsoError as e:
            if "conflicts with existing experiment" in str(e):
                raise ClsoError(f"{s.name}: an experiment of that name exists on this commit; --force replaces it, "
                                "or name the other sizes with --size") from None
            raise ClsoError(f"{s.name}: {e}") from None
        print(f"queued {s.name}: {' '.join(s.assignments())}")
    print(f"{len(chosen)} experiments queued. Run them: dvc queue start (-j 2 for two at once); watch: dvc queue "
          "status; then: clso scaling table")


def finished(sizes) -> tuple[list, dict[str, str]]:
    """The newest experiment of each size's name, through dvc.api.exp_show: (sizes with the rev of
    their finished experiment, {name: why it is not in the table})."""
    import dvc.api
    from dvc.repo import Repo

    names = {s.name for s in sizes}
    with Repo(".") as repo:  # the commits the sweep's finished experiments hang from, and HEAD's queued and
        # running ones, so exp_show reads no other commit
        baselines = [rev for rev, exps in repo.experiments.ls(all_commits=True).items()
                     if any(name in names for name, _ in exps)]
    rows = dvc.api.exp_show(repo=".", revs=["HEAD", *baselines], num=1)
    newest = {}
    for row in rows:  # the newest commit's experiments first
        newest.setdefault(row.get("Experiment"), row)
    done, missing = [], {}
    for s in sizes:
        row = newest.get(s.name)
        if row is None:
            missing[s.name] = "not run (clso scaling queue, then dvc queue start)"
        elif row["State"] != "Success":
            missing[s.name] = f"{str(row['State']).lower()} (dvc queue status; dvc queue logs {s.name})"
        else:
            done.append((s, row["rev"]))
    return done, missing


def _read(path: str, rev: str):
    import dvc.api

    return yaml.safe_load(dvc.api.read(path, repo=".", rev=rev))  # JSON is YAML


@scaling.command("table")
@one_line_errors("scaling table")
def table_(plan: Path = PLAN_OPTION, params: Path = PARAMS_OPTION) -> None:
    """Read every finished experiment of the plan (dvc.api.exp_show, then its compare outputs) and
    write plots/scaling.csv, plots/scaling.png, metrics/scaling.md and metrics/scaling.json: per size, CLSO's ratios to
    AdamW, the contrasts, every search's ratio and the fitted trend."""
    from clso.params import parse_params
    from clso.scaling import columns, differs, fit_trend, model_size, scaling_png, section, size_row, trend_statement

    the_plan = _plan(plan, params)
    done, missing = finished(the_plan.sizes)
    rows = []
    for s, rev in done:
        raw = _read("params.yaml", rev)
        stale = differs(raw, s)
        if stale:
            missing[s.name] = f"ran with {stale}, not the plan's (clso scaling queue --force --size {s.name})"
            continue
        n_params, genes = model_size(parse_params(raw), _read("metrics/detail/prepare.json", rev)["vocab_size"])
        try:
            rows.append(size_row(s, n_params, genes, _read("metrics/compare.json", rev),
                                 _read("metrics/detail/compare.json", rev)))
        except (KeyError, TypeError) as e:
            raise ClsoError(f"{s.name}: its compare outputs lack {e} (made by older code?); run it again: "
                            f"clso scaling queue --force --size {s.name}") from None
    if not rows:
        raise ClsoError(f"no finished experiment of {plan} ({'; '.join(f'{k}: {v}' for k, v in missing.items())})")
    fit = fit_trend(rows)
    write_csv_atomic(CSV, columns(rows), rows)
    scaling_png(rows, fit, PNG)
    write_text_atomic(SECTION, section(rows, missing, fit, the_plan.rule))
    write_json_atomic(SUMMARY, {"rule": the_plan.rule, "sizes": rows, "not_in_table": missing, "fit": fit})
    for name, why in missing.items():
        print(f"{name}: {why}")
    print(f"{len(rows)} sizes → {CSV}, {PNG}, {SECTION}, {SUMMARY}. {trend_statement(fit)}")

