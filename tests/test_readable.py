"""What a newcomer meets first stays readable: a short README that routes to docs/, links that work,
and a `dvc exp show` of a few dozen metric columns, not hundreds."""

import json
import re

import yaml

from tests.conftest import REPO, expand_stages

MAX_METRIC_COLUMNS = 80
MAX_PAGE_LINES = 250
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def declared_metrics(root=REPO) -> list[str]:
    """Every `metrics:` file of dvc.yaml, its matrix stages expanded by params.yaml's grid."""
    stages = expand_stages(yaml.safe_load((root / "dvc.yaml").read_text())["stages"],
                           yaml.safe_load((root / "params.yaml").read_text()))
    return sorted({next(iter(m)) if isinstance(m, dict) else m for s in stages.values() for m in s.get("metrics", [])})


def flattened(value) -> int:
    """The columns `dvc exp show` makes of a metrics file: one per leaf."""
    return sum(flattened(v) for v in value.values()) if isinstance(value, dict) else 1


def test_the_default_run_declares_at_most_80_metric_columns():
    files = declared_metrics()
    counts = {f: flattened(json.loads((REPO / f).read_text())) for f in files}
    assert sum(counts.values()) <= MAX_METRIC_COLUMNS, counts
    # the committed files are those of a default-shaped run: every search of the grid has its columns
    compare = json.loads((REPO / "metrics/compare.json").read_text())
    grid = yaml.safe_load((REPO / "params.yaml").read_text())["grid"]
    searches = {f"{stage}@{mode}" for stage in ("evolve", "random", "no_surrogate", "fixed_body", "ngopt", "head_only",
                                                 "es", "mezo") for mode in grid[stage]}
    assert set(compare["contestants"]) == searches | {"baseline", "field", "field_no_neurons"}


def test_the_column_count_sees_every_leaf():
    assert flattened({"a": 1, "b": {"c": "x", "d": {"e": True}}, "f": [1, 2]}) == 4


def pages() -> list:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_readme_is_short_with_its_command_and_layout_near_the_top():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_PAGE_LINES
    first_command = next(i for i, line in enumerate(lines) if line.startswith("python3 -m venv"))
    layout = next(i for i, line in enumerate(lines) if line.startswith("├── ") or line.startswith("clso/"))
    assert first_command < 30 and layout < 100, (first_command, layout)


def test_the_readmes_headline_table_is_the_committed_run():
    from clso.report import readme_table

    table = readme_table(json.loads((REPO / "metrics/detail/compare.json").read_text()))
    assert "\n".join(table) in (REPO / "README.md").read_text(encoding="utf-8")


def test_every_docs_page_is_short():
    assert len(pages()) > 5
    for page in pages():
        assert len(page.read_text(encoding="utf-8").splitlines()) <= MAX_PAGE_LINES, page.name


def anchors(page) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def broken_links(files, root=REPO) -> list[str]:
    broken = []
    for page in files:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # https: and the like: not ours to check offline
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
                broken.append(f"{page.relative_to(root)}: {target}")
    return broken


def test_every_relative_link_in_readme_and_docs_resolves():
    assert not broken_links(pages())


def test_a_broken_link_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n[ok](#a-title) [gone](missing.md) [bad anchor](#nowhere) [web](https://x.org)\n")
    assert broken_links([page], root=tmp_path) == ["page.md: missing.md", "page.md: #nowhere"]
