"""The CLI as people read it: help, the default home, tables, stdout vs stderr."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trionode import schemas
from trionode.cli import EXAMPLES, build_parser, main
from trionode.cli_contexts import _render_call, cell, mapping_rows, table


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix} {name}".strip()
                nested = list(_commands(sub, full))
                if nested:
                    yield from nested
                else:
                    yield full, sub


def test_every_command_has_an_example_and_shows_its_defaults() -> None:
    commands = dict(_commands(build_parser()))
    assert {"init", "start", "call", "app install", "context join"} <= set(commands)
    missing = sorted(set(commands) - set(EXAMPLES))
    assert missing == [], f"add an example for {missing} to EXAMPLES in trionode/cli.py"
    for name, parser in commands.items():
        text = parser.format_help()
        assert f"example:\n  {EXAMPLES[name]}" in text, name
        assert "trionode " in EXAMPLES[name], name
    init_help = commands["init"].format_help()
    assert "(default: 2428)" in init_help
    assert "(default: 2528)" in init_help
    assert "(default: 30.0)" in commands["call"].format_help()  # --timeout
    assert "(default: False)" not in init_help  # flags say nothing about a default


def test_every_argument_says_what_it_is() -> None:
    for name, parser in _commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            what = action.option_strings or action.dest
            assert action.help, f"`trionode {name}`: {what} has no help text"
    invite = " ".join(dict(_commands(build_parser()))["context invite"].format_help().split())
    assert "(default: member)" in invite
    assert "(default: 7d)" in invite  # as people write it, not 604800.0


def test_trionode_home_is_the_default_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIONODE_HOME", str(tmp_path / "from-env"))
    assert main(["init", "--no-mdns", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["home"] == str(tmp_path / "from-env")
    assert (tmp_path / "from-env" / "identity.key").is_file()
    # --home still wins.
    assert main(["init", "--no-mdns", "--home", str(tmp_path / "flag")]) == 0
    assert (tmp_path / "flag" / "identity.key").is_file()


@pytest.mark.parametrize("argv", [["start", "--json"], ["demo", "--home", "x"]])
def test_options_that_would_do_nothing_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert "unrecognized arguments" in err[0]


def test_cells_are_plain_text_not_python_reprs() -> None:
    assert cell(["85a", "9f1"]) == "85a, 9f1"
    assert cell([]) == "-"
    assert cell(None) == "-"
    assert cell(True) == "yes"
    assert cell({"emoji": "👍"}) == '{"emoji": "👍"}'
    rows = dict(mapping_rows({"installedAt": 1796521923.3, "name": "kv", "tags": ["a", "b"]}))
    assert rows == {"installedAt": "2026-12-06T01:52:03Z", "name": "kv", "tags": "a, b"}
    text = table([("x", ["a", "b"], None)], ("id", "list", "none"))
    assert text.splitlines()[1].split() == ["x", "a,", "b", "-"]


def test_call_prints_the_result_on_stdout_and_the_delta_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _render_call(
        schemas.CallResult(output={"text": "👍 é"}, delta_id="ab" * 32, root_hash="cd" * 32)
    )
    assert json.loads(out) == {"text": "👍 é"}
    assert "👍 é" in out  # real characters, not \\ud83d escapes
    err = capsys.readouterr().err
    assert err == f"delta {'ab' * 32}\nroot  {'cd' * 32}\n"
