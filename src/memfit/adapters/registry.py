"""The registry of methods: an explicit list of method files, each exposing `METHOD`.

Adding a method is one file in this package plus one line in `BUILTIN`; importing a method file registers
nothing (no import side effects), and nothing here knows a method's internals. `register_method` adds a method
from outside the package (a plugin, a test).
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from memfit.adapters.config import AdapterConfig
from memfit.adapters.method import Method
from memfit.errors import ConfigError

BUILTIN = (
    "lora",
    "mos",
    "increlora",
    "adalora",
    "difffit",
    "compacter",
    "rps",
    "full",
)
_EXTRA: dict[str, Method] = {}


@cache
def _builtin() -> dict[str, Method]:
    # Imported on first use: the method files import the generic modules, which import this one.
    found = {}
    for module in BUILTIN:
        method = importlib.import_module(f"memfit.adapters.{module}").METHOD
        found[method.name] = method
    return found


def methods() -> dict[str, Method]:
    """Every registered method by name, built-in ones first, in registration order."""
    return {**_builtin(), **_EXTRA}


def register_method(method: Method) -> Method:
    """Register a method defined outside memfit (its name must not shadow a built-in one)."""
    if method.name in _builtin():
        raise ConfigError(f"method {method.name!r} is built in; register yours under another name.")
    _EXTRA[method.name] = method
    return method


def get_method(name: str) -> Method:
    found = methods()
    if name not in found:
        raise ConfigError(f"unknown adapter method {name!r}; choose one of {sorted(found)}.")
    return found[name]


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild any registered config from its `to_dict()` form (the `method` key picks the class)."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError("adapter config has no 'method' field; it was not written by memfit.")
    return get_method(data["method"]).config_cls.from_dict(data)
