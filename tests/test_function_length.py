"""Short functions: none over MAX_LINES in clso/, stages/ or cli/ (the C runtime is exempt)."""

import ast

from tests.conftest import REPO

MAX_LINES = 60


def long_functions(root=REPO, limit: int = MAX_LINES) -> list[str]:
    found = []
    for top in ("clso", "stages", "cli"):
        for path in sorted((root / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {lines} lines")
    return found


def test_no_function_is_longer_than_60_lines():
    found = long_functions()
    assert not found, f"split these functions (at most {MAX_LINES} lines each):\n" + "\n".join(found)


def test_the_compare_stage_reads_calls_and_writes_in_at_most_120_lines():
    assert len((REPO / "stages/compare.py").read_text(encoding="utf-8").splitlines()) <= 120


def test_a_long_function_is_caught(tmp_path):
    (tmp_path / "clso").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "clso" / "long.py").write_text(f"def long():\n{body}\n")
    assert long_functions(tmp_path) == [f"clso/long.py:1 long: {MAX_LINES + 1} lines"]
