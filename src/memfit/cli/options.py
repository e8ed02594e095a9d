"""Command-line options built from config dataclasses, and `--set KEY=VALUE` values parsed by field type.

Every command that trains takes `TrainConfig`'s fields as flags generated here (name, default and help from the
field), and the method-specific flags from the fields each method config marks with `flag=` — so a new training
knob or a new method needs no edit in the CLI. A typer command is built with a signature assembled from these
parameters.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import typer

from memfit.errors import ConfigError
from memfit.fields import field_types, type_name

_REGEX = re.compile(r"[\\^$*+?()\[\]{}|]")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def flag_name(f: dataclasses.Field) -> str:
    flag = f.metadata.get("flag")
    return flag if isinstance(flag, str) else "--" + f.name.replace("_", "-")


def _cli_type(hint: Any) -> Any:
    """The type typer parses a flag as: the first non-None member of a union; str for mixed unions."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return args[0] if len(args) == 1 else str
    return hint


def field_params(cls: type, *, names: list[str] | None = None, unset: bool = False, panel: str | None = None,
                 help_suffix: Callable[[dataclasses.Field], str] | None = None) -> list[inspect.Parameter]:
    """One keyword parameter per field of `cls` (or of `names`), as typer options with the field's help.

    unset: every default is None ("not given": the config's own default applies), for method options that several
        configs share with different defaults.
    """
    hints = field_types(cls)
    params = []
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        kind = _cli_type(hints[f.name])
        default = None if unset else f.default
        if default is dataclasses.MISSING:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        decls = [flag_name(f)] + ([f.metadata["short"]] if f.metadata.get("short") else [])
        help_text = f.metadata.get("help", "") + (help_suffix(f) if help_suffix else "")
        option = typer.Option(default, *decls, help=help_text, rich_help_panel=panel or f.metadata.get("panel"),
                              show_default=not unset)
        annotation = (kind | None) if default is None and kind is not bool else kind
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=annotation))
    return params


def option_param(name: str, annotation: Any, *decls: str, default: Any = None, **kw: Any) -> inspect.Parameter:
    """A keyword parameter declared as a typer option, for commands whose signature is assembled here."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *decls, **kw))


def build_command(fn: Callable[..., Any], params: list[inspect.Parameter], doc: str) -> Callable[..., Any]:
    """A function typer can register: `params` as its signature, calling `fn(**values)`."""

    def command(**values: Any) -> Any:
        return fn(**values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    command.__name__ = fn.__name__
    return command


def parse_targets(text: str | None) -> list[str] | str | None:
    """'q_proj,v_proj' -> names; 'all-linear' or a regex ('.*attn.*(q|v)_proj') -> the string itself."""
    if text is None:
        return None
    text = text.strip()
    if text == "all-linear" or _REGEX.search(text):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_value(text: str, hint: Any, where: str) -> Any:
    """`text` as a value of type `hint` (a config field's type); `where` names the setting in errors."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    stripped = text.strip()
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and stripped.lower() in ("none", "null"):
            return None
        rest = [a for a in args if a is not type(None)]
        if str in rest and any(typing.get_origin(a) is list for a in rest):  # names or a regex (target_modules)
            return parse_targets(stripped)
        for member in rest:
            try:
                return parse_value(text, member, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {text!r} is not {type_name(hint)}.")
    if hint is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise ConfigError(f"{where}: {text!r} is not a bool; write true or false (yes/no, 1/0).")
    if hint in (int, float):
        try:
            return hint(stripped)
        except ValueError:
            raise ConfigError(f"{where}: {text!r} is not {type_name(hint)}, e.g. "
                              f"{'8' if hint is int else '0.1'}.") from None
    if hint is str:
        return text
    if origin in (list, dict):
        if origin is list and not stripped.startswith("["):
            return [parse_value(item, args[0], where) for item in stripped.split(",") if item.strip()]
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, origin):
            example = '["a", "b"] or a,b' if origin is list else '{"key": 1}'
            raise ConfigError(f"{where}: {text!r} is not {type_name(hint)}; write JSON, e.g. {example}.")
        return value
    raise ConfigError(f"{where}: fields of type {hint} cannot be set from the command line.")


def parse_sets(items: list[str], cls: type) -> dict[str, Any]:
    """['r_eq=2', 'dissociation=false'] -> {'r_eq': 2, 'dissociation': False}, parsed by `cls`'s field types."""
    hints, out = field_types(cls), {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set r_eq=2.")
        if key not in hints:
            raise ConfigError(f"--set {key}: not an option of {cls.__name__}; its options are {sorted(hints)} "
                              "(`memfit methods` describes them).")
        out[key] = parse_value(value, hints[key], f"--set {key}")
    return out
