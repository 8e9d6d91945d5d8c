"""Every command's --help shows its text as written: bracketed words survive, flags carry no
type placeholder, and options say only what the command has."""

from __future__ import annotations

import re

import pytest
import typer

from bncheck.cli import app

COMMAND = typer.main.get_command(app)
NAMES = sorted(COMMAND.commands)


def _texts(cmd) -> list[str]:
    return [cmd.help or "", *(getattr(p, "help", None) or "" for p in cmd.params)]


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("name", NAMES)
def test_help_keeps_every_bracketed_word(run_cli, name):
    res = run_cli(name, "--help")
    assert res.code == 0, res
    shown = _flat(res.out)
    brackets = {b for t in _texts(COMMAND.commands[name]) for b in re.findall(r"\[[^\]]*\]", t)}
    for b in brackets:
        assert _flat(b) in shown, (name, b)
    assert "<bool>" not in res.out and "<list[str]>" not in res.out


def test_the_known_bracketed_words_are_there(run_cli):
    out = _flat(run_cli("check", "--help").out)
    assert "[tool.bncheck.thresholds]" in out and "bncheck[report]" in out


def test_optimize_rounds_does_not_mention_an_option_it_lacks(run_cli):
    out = run_cli("optimize", "--help").out
    assert "--rounds" in out and "--vs" not in out


def test_a_command_run_builds_only_that_command():
    from bncheck.cli import _click_command, app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert "rules" in names and len(names) == 8
    assert set(_click_command("fold").commands) == {"fold"}
    assert set(_click_command(None).commands) == names  # --help lists them all
    assert set(_click_command("inspec").commands) == names  # a typo gets suggestions
    assert {c.name or c.callback.__name__ for c in app.registered_commands} == names
