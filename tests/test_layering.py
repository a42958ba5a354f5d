"""Import lint: the layering rules of CONTRIBUTING.md, checked on the source text.

Data flows pipeline -> extract -> train -> eval, with workflows on top: a package may import only the
packages before it, at module level and inside functions alike. Inside extract, the Ray job
(``extract/job``) uses the detector library (``extract/detector``), never the reverse. Every import of
project code goes through the installed name, ``softclip.<package>``.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("pipeline", "extract", "train", "eval", "workflows")
# Subpackages ordered the same way inside their layer: a later one may import an earlier one.
SUBLAYERS = {"extract": ("detector", "job")}
# Model and loss code stays free of data-engine, storage and logging back ends.
PURE_MODULES = ("train/losses.py", "train/model.py", "extract/detector/vinvl.py")
PURE_FORBIDDEN = ("ray", "pyarrow", "polars", "fsspec", "webdataset", "tensorboard", "wandb")
MAX_MODULE_LINES = 400  # CONTRIBUTING.md: split a module along its seams before it grows past this


def imported_modules(source: str) -> list[str]:
    """Every absolute module name that ``source`` imports, anywhere (module level, functions, branches)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module.split(".")[0] == "softclip" and node.module.count(".") < 2:  # from softclip.x import job
                names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def layer_violations(package: str, source: str) -> list[str]:
    """Imports in ``source`` (a module of ``package``: a layer, or ``layer.sublayer`` such as
    ``extract.detector``) of a later layer or sublayer, or of project code without the ``softclip.`` prefix."""
    layer, _, sub = package.partition(".")
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    order = SUBLAYERS.get(layer, ())
    bad = []
    for name in imported_modules(source):
        parts = name.split(".")
        if parts[0] in LAYERS:
            bad.append(f"{name} (import softclip.{name})")
        elif parts[0] != "softclip" or len(parts) < 2 or parts[1] not in LAYERS:
            continue
        elif parts[1] not in allowed:
            bad.append(f"{name} (a later layer than {layer})")
        elif sub and parts[1] == layer and len(parts) > 2 and parts[2] in order[order.index(sub) + 1:]:
            bad.append(f"{name} (a later part of {layer} than {sub})")
    return bad


def package_of(path: Path) -> str:
    """``layer`` or ``layer.sublayer`` of a source file, e.g. ``extract.detector`` for extract/detector/vinvl.py."""
    parts = path.relative_to(ROOT).parts
    if parts[0] in SUBLAYERS and len(parts) > 2 and parts[1] in SUBLAYERS[parts[0]]:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def _python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", [p for f in LAYERS for p in _python_files(f)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    bad = layer_violations(package_of(path), path.read_text())
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


def test_the_detector_library_never_imports_the_job():
    upward = ("import softclip.extract.job.manifest\n"
              "def f():\n    from softclip.extract.job.run import run_extraction\n    from softclip.extract import job\n")
    assert layer_violations("extract.detector", upward) == [
        "softclip.extract.job.manifest (a later part of extract than detector)",
        "softclip.extract.job.run (a later part of extract than detector)",
        "softclip.extract.job (a later part of extract than detector)"]
    assert layer_violations("extract.job", upward) == []
    assert layer_violations("extract.job", "from softclip.extract.detector.vinvl import format_tags\n") == []
    assert package_of(ROOT / "extract" / "detector" / "vinvl.py") == "extract.detector"
    assert package_of(ROOT / "extract" / "job" / "run.py") == "extract.job"
    assert package_of(ROOT / "extract" / "__init__.py") == "extract"


@pytest.mark.parametrize("relative", PURE_MODULES)
def test_model_and_loss_modules_import_no_backends(relative):
    bad = [n for n in imported_modules((ROOT / relative).read_text()) if n.split(".")[0] in PURE_FORBIDDEN]
    assert not bad, f"{relative} imports {bad}"


@pytest.mark.parametrize("folder", LAYERS)
def test_modules_stay_small(folder):
    long = {str(p.relative_to(ROOT)): n for p in _python_files(folder)
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"

