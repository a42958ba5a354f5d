"""Import lint: the layering rules of CONTRIBUTING.md, checked on the source text."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("extract", "train", "eval", "workflows")
# Model and loss code stays free of data-engine, storage and logging back ends.
PURE_MODULES = ("train/losses.py", "train/model.py", "extract/vinvl.py")
PURE_FORBIDDEN = ("ray", "pyarrow", "polars", "fsspec", "webdataset", "tensorboard", "wandb")
MAX_MODULE_LINES = 450


def _module_level_imports(path: Path) -> list[str]:
    """Top-level imported module names (imports inside functions are deliberate lazy imports)."""
    names = []
    for node in ast.parse(path.read_text()).body:
        nodes = [node] + (list(ast.walk(node)) if isinstance(node, (ast.If, ast.Try)) else [])
        for item in nodes:
            if isinstance(item, ast.Import):
                names += [alias.name for alias in item.names]
            elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
                names.append(item.module)
    return names


def _python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", _python_files("pipeline"), ids=lambda p: p.name)
def test_pipeline_does_not_import_stages(path):
    bad = [n for n in _module_level_imports(path) if n.split(".")[0] in STAGES]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad} at module level"


@pytest.mark.parametrize("relative", PURE_MODULES)
def test_model_and_loss_modules_import_no_backends(relative):
    path = ROOT / relative
    if not path.exists():
        pytest.skip(f"{relative} does not exist yet")
    bad = [n for n in _module_level_imports(path) if n.split(".")[0] in PURE_FORBIDDEN]
    assert not bad, f"{relative} imports {bad}"


@pytest.mark.parametrize("folder", ("pipeline",) + STAGES)
def test_modules_stay_small(folder):
    long = {str(p.relative_to(ROOT)): n for p in _python_files(folder)
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
