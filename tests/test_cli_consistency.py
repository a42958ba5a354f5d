"""One CLI style for every command (issue 12, gap 6): -h, --version, --set everywhere, help without RST markup."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from softclip.pipeline.cli import build_app


def _commands(group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if hasattr(command, "commands"):  # a group (typer ships its own click: no isinstance checks)
            yield from _commands(command, (*prefix, name))


APP = build_app()
COMMANDS = dict(_commands(typer.main.get_command(APP)))


def test_version_and_short_help():
    runner = CliRunner()
    version = runner.invoke(APP, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("softclip ")
    assert runner.invoke(APP, ["-h"]).exit_code == 0


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_help_has_no_rst_markup_and_h_works(path):
    result = CliRunner().invoke(APP, [*path, "-h"])
    assert result.exit_code == 0, result.output
    assert "``" not in result.output and ":func:" not in result.output, result.output


def test_every_command_with_overrides_takes_them_as_set():
    takes_overrides = {path for path, cmd in COMMANDS.items()
                       if any("override" in (p.help or "").lower() for p in cmd.params)}
    assert {("train",), ("eval",), ("extract",), ("shapes",), ("detect",)} <= takes_overrides
    for path in takes_overrides:
        options = {opt for p in COMMANDS[path].params if p.param_type_name == "option" and not p.hidden
                   for opt in p.opts}
        assert "--set" in options, path


def test_train_takes_set_and_still_reads_the_deprecated_positional_form():
    config = str(Path(__file__).parents[1] / "train" / "configs" / "shapes-clip.yaml")
    new = CliRunner().invoke(APP, ["train", "--config", config, "--set", "optim.nope=1"])
    assert new.exit_code != 0 and "optim.nope" in str(new.exception)
    old = CliRunner().invoke(APP, ["train", "--config", config, "optim.nope=1"])
    assert old.exit_code != 0 and "optim.nope" in str(old.exception)
    assert "deprecated; write --set optim.nope=1" in old.output
