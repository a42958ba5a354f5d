"""``softclip extract`` flags reach the job's config (the job itself is replaced by a recorder)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import softclip.extract.job.run
from softclip.pipeline.cli import build_app
from softclip.pipeline.config import read_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "extract" / "configs"


class _Summary:
    def line(self) -> str:
        return "recorded"


@pytest.fixture
def recorded(monkeypatch) -> list:
    """The configs ``softclip extract`` hands to the job (which is replaced by this recorder)."""
    seen = []
    monkeypatch.setattr(softclip.extract.job.run, "run_extraction", lambda cfg: seen.append(cfg) or _Summary())
    return seen


@pytest.mark.parametrize(("config", "flag", "expected"), [
    ("extract-shapes.yaml", [], True), ("extract-shapes.yaml", ["--no-pack"], False),
    ("extract-default.yaml", [], False), ("extract-default.yaml", ["--pack"], True),
])
def test_pack_and_no_pack_override_the_config(tmp_path, recorded, config, flag, expected):
    result = CliRunner().invoke(build_app(), ["extract", "--dataset", str(tmp_path / "data"), "--weights", "w.pth",
                                              "--labelmap", "l.json", "--out", str(tmp_path / "out"),
                                              "--config", str(CONFIGS / config), *flag])
    assert result.exit_code == 0, result.output
    assert [cfg.pack for cfg in recorded] == [expected]


def test_without_config_the_shipped_default_is_read(tmp_path, recorded):
    result = CliRunner().invoke(build_app(), ["extract", "--dataset", str(tmp_path / "data"), "--weights", "w.pth",
                                              "--labelmap", "l.json", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert [cfg.batch_size for cfg in recorded] == [read_yaml(CONFIGS / "extract-default.yaml")["batch_size"]]
