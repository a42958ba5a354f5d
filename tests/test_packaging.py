"""Installing softclip adds one top-level package, ``softclip``, with the stage folders inside it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "extract", "train", "eval", "workflows")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    """The file names inside a wheel built from a copy of the sources (the checkout stays clean)."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md", "__init__.py", "__main__.py"):
        shutil.copy2(ROOT / name, src / name)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(dist), str(src)], check=True)
    (wheel,) = dist.glob("softclip-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_the_wheel_installs_one_top_level_package(wheel_names):
    top = {n.split("/")[0] for n in wheel_names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"softclip"}


def test_the_wheel_holds_the_stages_and_their_data(wheel_names):
    names = set(wheel_names)
    for module in ("__init__.py", "__main__.py", "pipeline/cli.py", "extract/detector/vinvl.py", "train/losses.py",
                   "eval/evaluate.py", "workflows/runner.py", "pipeline/registry.py",
                   "extract/weights/shapes/model.pth", "extract/weights/shapes/labelmap.json",
                   "extract/configs/extract-default.yaml", "train/configs/shapes-softclip.yaml",
                   "train/model_configs/shapes-rn.json", "workflows/configs/shapes.yaml",
                   "pipeline/datasets/cc3m.yaml"):
        assert f"softclip/{module}" in names, module
    assert not any(n.startswith(("softclip/tests/", "softclip/benchmarks/")) for n in names)
