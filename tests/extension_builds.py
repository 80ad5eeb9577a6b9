"""Our C extensions as a checkout updated without `make` leaves them: built from an older
source, taking other arguments. `beside` imports a wrapper again with such a build in
place of the real one, to show that the wrapper passes it over instead of calling it."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def older_build(name: str, **calls: Callable[..., object]) -> types.ModuleType:
    """A module `name` with these functions and no `INTERFACE` (builds before it had one)."""
    built = types.ModuleType(name)
    for call, function in calls.items():
        setattr(built, call, function)
    return built


@contextmanager
def beside(wrapper: types.ModuleType, built: types.ModuleType) -> Iterator[None]:
    """`wrapper` imported again while `built` is the extension module of its name; imported
    again as it was after."""
    package_name, _, attribute = built.__name__.rpartition(".")
    package = sys.modules[package_name]
    before = sys.modules.get(built.__name__), vars(package).get(attribute)
    sys.modules[built.__name__] = built
    setattr(package, attribute, built)
    try:
        importlib.reload(wrapper)
        yield
    finally:
        for table, key, value in (
            (sys.modules, built.__name__, before[0]),
            (vars(package), attribute, before[1]),
        ):
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        importlib.reload(wrapper)
