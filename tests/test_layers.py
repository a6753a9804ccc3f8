"""The packages are layered (clso.LAYERS): no module imports from a layer above its own."""

from pathlib import Path

import clso
from stages.closure import imported_modules
from tests.conftest import REPO


def layer_of(module: str) -> int | None:
    """The layer of a project module: that of its longest prefix in clso.LAYERS; None outside the project."""
    best = None
    for i, names in enumerate(clso.LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > len(best[1]):
                    best = (i, name)
    return None if best is None else best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def upward_imports(root: Path = REPO) -> list[str]:
    """'importer -> imported' for every import that reaches a higher layer."""
    found = []
    for top in ("clso", "stages", "cli"):
        for path in sorted((root / top).rglob("*.py")):
            own = layer_of(module_name(path))
            assert own is not None, f"{path}: in no layer of clso.LAYERS"
            for imported in imported_modules(root, path):
                layer = layer_of(imported)
                if layer is not None and layer > own:
                    found.append(f"{module_name(path)} -> {imported}")
    return sorted(set(found))


def test_no_module_imports_from_a_layer_above_its_own():
    found = upward_imports()
    assert not found, "imports that run back up clso.LAYERS:\n" + "\n".join(found)


def test_every_package_and_top_level_module_has_a_layer():
    for path in (REPO / "clso").iterdir():
        if path.suffix == ".py" or (path / "__init__.py").is_file():
            assert layer_of(module_name(path if path.suffix else path / "__init__.py")) is not None, path


def test_an_import_that_runs_back_up_is_caught(monkeypatch):
    # the search under the model: CrystallineGPT2 importing the GA would be an upward import
    monkeypatch.setattr(clso, "LAYERS", (("clso",), ("clso.search",), ("clso.model",), ("stages",), ("cli",)))
    found = upward_imports()
    assert any(line.startswith("clso.search.") and "-> clso.model" in line for line in found), found
