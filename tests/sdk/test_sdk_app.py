"""Defining apps: decorators, annotations and the mistakes they report early."""

from __future__ import annotations

import itertools
import sys
import types
from collections.abc import Callable, Iterator
from typing import ClassVar

import pytest

from trionode.sdk import AppDefinitionError, Counter, EntryKind, LwwRegister, UnorderedMap
from trionode.sdk.app import App

from .probe_app import app as probe


def test_probe_app_is_described() -> None:
    description = probe.describe()
    assert description["name"] == "probe"
    assert description["state"] == {
        "reg": "LwwRegister[str]",
        "count": "Counter",
        "tags": "UnorderedSet[str]",
        "docs": "UnorderedMap[str, Text]",
    }
    entries = {e["name"]: e for e in description["entry_points"]}
    assert entries["setup"]["kind"] == "init"
    assert entries["incr"] == {
        "name": "incr",
        "kind": "method",
        "params": [{"name": "by", "type": "int", "required": False}],
        "returns": "int",
    }
    assert entries["read"]["kind"] == "view"
    assert entries["audit"]["events"] == ["Noted", "Tagged"]
    assert [p["name"] for p in entries["typed"]["params"]] == ["a", "b", "c", "d", "e"]
    assert entries["typed"]["params"][3]["type"] == "dict[str, int] | None"
    on_tagged = probe.entry("on_tagged")
    assert on_tagged is not None
    assert on_tagged.whole_event
    on_noted = probe.entry("on_noted")
    assert on_noted is not None
    assert not on_noted.whole_event
    assert on_noted.kind is EntryKind.HANDLER


@pytest.fixture
def define(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], App]:
    """Define an app from source text in a throwaway module (annotations resolve there)."""

    def run(body: str) -> App:
        module = types.ModuleType(f"_sdk_test_app_{next(_COUNTER)}")
        module.__dict__.update(
            App=App,
            LwwRegister=LwwRegister,
            Counter=Counter,
            UnorderedMap=UnorderedMap,
            ClassVar=ClassVar,
            Iterator=Iterator,
        )
        monkeypatch.setitem(sys.modules, module.__name__, module)
        exec(compile("app = App('t')\n" + body, "<test app>", "exec"), module.__dict__)
        app = module.__dict__["app"]
        assert isinstance(app, App)
        return app

    return run


_COUNTER = itertools.count()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "@app.state\nclass S:\n  reg: LwwRegister[str]\n"
            "  @app.method\n  def m(self, a) -> None: ...\n",
            "parameter `a` needs a type annotation",
        ),
        (
            "@app.state\nclass S:\n  @app.method\n  def m(self, *a: int) -> None: ...\n",
            "must be passable by name",
        ),
        (
            "@app.state\nclass S:\n  @app.method\n  def m(self, a: int, /) -> None: ...\n",
            "must be passable by name",
        ),
        (
            "@app.state\nclass S:\n  @app.method\n  async def m(self) -> None: ...\n",
            "plain function",
        ),
        (
            "@app.state\nclass S:\n  @app.view\n  def m(self) -> Iterator[int]:\n    yield 1\n",
            "plain function",
        ),
        ("@app.state\nclass S:\n  @app.method\n  def m() -> None: ...\n", "must take `self`"),
        (
            "@app.state\nclass S:\n  name: str\n",
            r"S\.name: `str` is not a replicated type: wrap plain values in LwwRegister",
        ),
        (
            "@app.state\nclass S:\n  m: UnorderedMap[str, int]\n",
            r"S\.m: `UnorderedMap\[str, int\]`",
        ),
        ("@app.state\nclass S:\n  x: Missing\n", "cannot resolve its field annotations"),
        (
            "@app.state\nclass S:\n  @app.method\n  def m(self, a: Nope) -> None: ...\n",
            "cannot resolve its type hints",
        ),
        (
            "@app.state\nclass S:\n  __slots__ = ()\n  c: Counter\n",
            "cannot hold its fields",
        ),
        (
            "@app.state\nclass S:\n  count: Counter\n  @app.view\n  def count(self) -> int: ...\n",
            "both a state field and an entry point",
        ),
        (
            "@app.method\ndef loose(self) -> None: ...\n@app.state\nclass S:\n  c: Counter\n",
            "not a member of the @app.state class S",
        ),
        (
            "@app.state\nclass S:\n  @app.method\n  def m(self, a: object) -> None: ...\n",
            "",  # `object` is fine: any JSON value
        ),
    ],
)
def test_definition_errors_surface_at_check(
    define: Callable[[str], App], body: str, message: str
) -> None:
    app = define(body)
    if not message:
        app.check()
        return
    with pytest.raises(AppDefinitionError, match=message):
        app.check()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("@app.state\nclass S: ...\n@app.state\nclass T: ...\n", "already has a state class"),
        (
            "@app.state\nclass S: ...\n@app.method\ndef late(self) -> None: ...\n",
            "must be defined inside the @app.state class",
        ),
        (
            "class S:\n  @app.method\n  @app.view\n  def m(self) -> None: ...\n",
            "both @app.view and @app.method",
        ),
        ("class S:\n  @app.handler\n  def m(self) -> None: ...\n", "takes an event type name"),
        ("class S:\n  @app.method\n  def __dunder__(self) -> None: ...\n", "not a valid entry"),
        (
            "class S:\n  @app.init\n  def a(self) -> None: ...\n"
            "  @app.init\n  def b(self) -> None: ...\n"
            "app.state(S)\n",
            "two @app.init",
        ),
        ("app.method(staticmethod(len))\n", "decorates a plain function"),
        ("app.state(len)\n", "decorates a class"),
    ],
)
def test_definition_errors_surface_while_decorating(
    define: Callable[[str], App], body: str, message: str
) -> None:
    with pytest.raises(AppDefinitionError, match=message):
        define(body)


def test_app_names_and_class_variables(define: Callable[[str], App]) -> None:
    with pytest.raises(AppDefinitionError, match="app name"):
        App("no spaces")
    with pytest.raises(AppDefinitionError, match=r"no @app\.state class"):
        App("empty").check()
    app = define("@app.state\nclass S:\n  LIMIT: ClassVar[int] = 3\n  c: Counter\n")
    assert list(app.fields()) == ["c"]
    app.check()
