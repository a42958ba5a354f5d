import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from softclip.pipeline.cli import build_app

runner = CliRunner()
MAX_OPTIONS_PER_COMMAND = 9  # thin CLI: a config path plus a few overrides (style guide, rule 3)


def test_help_lists_the_stages():
    result = runner.invoke(build_app(), ["--help"])
    assert result.exit_code == 0
    for command in ("shapes", "datasets"):
        assert command in result.output


def test_commands_stay_thin():
    app = build_app()
    import typer.main

    def commands(group, prefix="softclip"):  # every command, also those of sub-groups (`detector train`)
        for name, command in group.commands.items():
            yield from commands(command, f"{prefix} {name}") if hasattr(command, "commands") else \
                [(f"{prefix} {name}", command)]

    found = dict(commands(typer.main.get_group(app)))
    assert "softclip detector train" in found
    for name, command in found.items():
        options = [p for p in command.params if p.param_type_name == "option"]
        assert len(options) <= MAX_OPTIONS_PER_COMMAND, f"{name} has {len(options)} options"


def test_shapes_command(tmp_path):
    result = runner.invoke(build_app(), ["shapes", "--out", str(tmp_path), "--n", "30", "--noise", "0.2",
                                         "--seed", "3", "--set", "num_retrieval=4",
                                         "--set", "num_classification_per_class=1", "--set", "partial_noise=0.1"])
    assert result.exit_code == 0, result.output
    assert "30 training pairs" in result.output and "caption noise 0.200" in result.output
    assert "partial noise 0.100" in result.output and "hallucination noise 0.000" in result.output
    assert (tmp_path / "train/00000.tar").is_file() and (tmp_path / "shapes.yaml").is_file()


def test_datasets_command_reports_presence(tmp_path, monkeypatch):
    (tmp_path / "shapes" / "train").mkdir(parents=True)
    (tmp_path / "shapes" / "train" / "00000.tar").write_bytes(b"")
    (tmp_path / "cc12m").mkdir()
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    result = runner.invoke(build_app(), ["datasets"])
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "present" in lines["shapes"] and "missing" in lines["cc3m"] and "empty" in lines["cc12m"]


def test_console_script_reports_user_errors_in_one_line(tmp_path):
    script = Path(sys.executable).parent / "softclip"
    if not script.exists():
        pytest.skip("the softclip console script is not installed in this environment (make setup installs it)")
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_trian: 5\n")
    result = subprocess.run([str(script), "shapes", "--out", str(tmp_path / "o"), "--config", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "num_trian" in result.stderr and str(bad) in result.stderr and "Traceback" not in result.stderr
