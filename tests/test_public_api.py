"""Public API: each package's ``__all__`` lists its public modules, and each module's ``__all__`` names
exist (style guide rule 10)."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "extract", "train", "eval", "workflows")  # subpackages of softclip
# Every package below them too (extract.detector, extract.job, ...).
ALL_PACKAGES = tuple(".".join(init.parent.relative_to(ROOT).parts) for top in PACKAGES
                     for init in sorted((ROOT / top).rglob("__init__.py")))


def _public_modules(package: str) -> set[str]:
    folder = ROOT.joinpath(*package.split("."))
    modules = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")}
    modules |= {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    return modules


def test_softclip_lists_its_subpackages():
    assert importlib.import_module("softclip").__all__ == sorted(PACKAGES)


@pytest.mark.parametrize("package", ALL_PACKAGES)
def test_package_all_lists_its_public_modules(package):
    assert set(importlib.import_module(f"softclip.{package}").__all__) == _public_modules(package)


@pytest.mark.parametrize("module", [f"softclip.{pkg}.{name}" for pkg in ALL_PACKAGES for name in sorted(_public_modules(pkg))
                                    if f"{pkg}.{name}" not in ALL_PACKAGES])
def test_module_all_names_exist(module):
    imported = importlib.import_module(module)
    names = getattr(imported, "__all__", None)
    assert names, f"{module} has no __all__"
    missing = [n for n in names if not hasattr(imported, n)]
    assert not missing, f"{module}.__all__ names missing objects: {missing}"
