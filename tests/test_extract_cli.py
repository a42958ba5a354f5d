"""``softclip extract`` flags reach the job's config (the job itself is replaced by a recorder)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import softclip.extract.job
from softclip.pipeline.cli import build_app

CONFIGS = Path(__file__).resolve().parents[1] / "extract" / "configs"


@pytest.mark.parametrize(("config", "flag", "expected"), [
    ("extract-shapes.yaml", [], True), ("extract-shapes.yaml", ["--no-pack"], False),
    ("extract-default.yaml", [], False), ("extract-default.yaml", ["--pack"], True),
])
def test_pack_and_no_pack_override_the_config(tmp_path, monkeypatch, config, flag, expected):
    seen = []

    class _Summary:
        def line(self) -> str:
            return "recorded"

    monkeypatch.setattr(softclip.extract.job, "run_extraction", lambda cfg: seen.append(cfg) or _Summary())
    result = CliRunner().invoke(build_app(), ["extract", "--dataset", str(tmp_path / "data"), "--weights", "w.pth",
                                              "--labelmap", "l.json", "--out", str(tmp_path / "out"),
                                              "--config", str(CONFIGS / config), *flag])
    assert result.exit_code == 0, result.output
    assert [cfg.pack for cfg in seen] == [expected]
