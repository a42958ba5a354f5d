"""Import lint: the layering rules of CONTRIBUTING.md, checked on the source text.

Data flows pipeline -> extract -> train -> eval, with workflows on top: a package may import only the
packages before it, at module level and inside functions alike. Every import of project code goes through
the installed name, ``softclip.<package>``.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("pipeline", "extract", "train", "eval", "workflows")
# Model and loss code stays free of data-engine, storage and logging back ends.
PURE_MODULES = ("train/losses.py", "train/model.py", "extract/vinvl.py")
PURE_FORBIDDEN = ("ray", "pyarrow", "polars", "fsspec", "webdataset", "tensorboard", "wandb")
MAX_MODULE_LINES = 450
# The layers already split along their seams keep to the ~400 lines of CONTRIBUTING.md.
TARGET_MODULE_LINES, LAYERS_AT_TARGET = 400, ("pipeline", "train", "eval", "workflows")


def imported_modules(source: str) -> list[str]:
    """Every absolute module name that ``source`` imports, anywhere (module level, functions, branches)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def layer_violations(package: str, source: str) -> list[str]:
    """Imports in ``source`` (a module of ``package``) of a later layer, or of project code without
    the ``softclip.`` prefix."""
    allowed = set(LAYERS[: LAYERS.index(package) + 1])
    bad = []
    for name in imported_modules(source):
        parts = name.split(".")
        if parts[0] in LAYERS:
            bad.append(f"{name} (import softclip.{name})")
        elif parts[0] == "softclip" and len(parts) > 1 and parts[1] in LAYERS and parts[1] not in allowed:
            bad.append(f"{name} (a later layer than {package})")
    return bad


def _python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", [p for f in LAYERS for p in _python_files(f)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    package = path.relative_to(ROOT).parts[0]
    bad = layer_violations(package, path.read_text())
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("folder", ("tests", "benchmarks"))
def test_tests_and_benchmarks_use_the_installed_name(folder):
    bad = {str(p.relative_to(ROOT)): [n for n in imported_modules(p.read_text()) if n.split(".")[0] in LAYERS]
           for p in _python_files(folder)}
    assert not {k: v for k, v in bad.items() if v}


def test_the_lint_sees_upward_imports_inside_functions():
    source = "def f():\n    from softclip.train.loop import train\n    import softclip.workflows.cache\n"
    assert layer_violations("extract", source) == [
        "softclip.train.loop (a later layer than extract)", "softclip.workflows.cache (a later layer than extract)"]
    assert layer_violations("workflows", source) == []
    assert layer_violations("eval", "import pipeline.io\n") == ["pipeline.io (import softclip.pipeline.io)"]


@pytest.mark.parametrize("relative", PURE_MODULES)
def test_model_and_loss_modules_import_no_backends(relative):
    bad = [n for n in imported_modules((ROOT / relative).read_text()) if n.split(".")[0] in PURE_FORBIDDEN]
    assert not bad, f"{relative} imports {bad}"


@pytest.mark.parametrize("folder", LAYERS)
def test_modules_stay_small(folder):
    long = {str(p.relative_to(ROOT)): n for p in _python_files(folder)
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


@pytest.mark.parametrize("folder", LAYERS_AT_TARGET)
def test_split_layers_keep_to_the_target_size(folder):
    long = {str(p.relative_to(ROOT)): n for p in _python_files(folder)
            if (n := len(p.read_text().splitlines())) > TARGET_MODULE_LINES}
    assert not long, f"modules over {TARGET_MODULE_LINES} lines: {long}"
