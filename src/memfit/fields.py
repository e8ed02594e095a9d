"""Config fields that document themselves: help text and command-line flags in the field, types checked.

A config dataclass (`TrainConfig`, every adapter method's config) declares each field with `option(...)`: the
CLI builds its flags from these declarations (one place for a default and its help), `--set KEY=VALUE` parses
values by the field's type, and `check_types` holds a config built from JSON to the same types as one built in
Python.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any

from memfit.errors import ConfigError


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | bool = False, short: str | None = None,
           panel: str | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text. flag: True for `--<field-name>`, or the flag's own name ("--rank");
    short: a one-letter alias ("-r"); panel: the --help section it belongs to."""
    metadata = {"help": help, "flag": flag, "short": short, "panel": panel}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type hints of a dataclass's fields (the configs use postponed annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_name(hint: Any) -> str:
    """A type in words for error messages: 'an int', 'a list of str', 'a bool (true or false)'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"a list of {args[0].__name__}" if args else "a list"
    if origin is dict:
        return f"an object of {args[1].__name__} values" if args else "an object"
    return {bool: "a bool (true or false)", int: "an int", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def conforms(value: Any, hint: Any) -> bool:
    """Whether `value` (as JSON would give it) has type `hint`; ints pass as floats, bools never as numbers."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and conforms(v, args[1]) for k, v in value.items())
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def check_types(config: Any) -> None:
    """Every field of `config` has its declared type (ints given for float fields become floats)."""
    for name, hint in field_types(type(config)).items():
        value = getattr(config, name)
        if not conforms(value, hint):
            raise ConfigError(f"{type(config).__name__}.{name} must be {type_name(hint)}, got {value!r}.")
        if hint is float and isinstance(value, int):
            setattr(config, name, float(value))


def field_help(cls: type, name: str) -> str:
    return next((f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name), "")
