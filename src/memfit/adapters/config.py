"""The config contract every adapter method follows: a validated dataclass with a JSON round trip.

Fields are declared with `memfit.fields.option` (help text, and whether the field gets a command-line flag of
its own; the rest are set with `--set KEY=VALUE`). Values are checked against the field types, so a config read
from a file or built from strings is as safe as one built in Python.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from memfit.errors import ConfigError
from memfit.fields import check_types, option


@dataclass
class AdapterConfig:
    """Fields shared by every method."""

    method: ClassVar[str] = ""
    target_modules: list[str] | str | None = option(
        None, help="modules to adapt: names matched as a suffix of the dotted path ('q_proj' matches "
        "model.layers.0.self_attn.q_proj), a regex matched against the full path, or 'all-linear'; None: the "
        "model's attention query and value projections, found from the model itself")
    modules_to_save: list[str] = option(
        factory=list, help="modules trained fully and saved with the adapter (a new classification head); names "
        "matched as a suffix of the dotted path")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        check_types(self)
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("target_modules is empty: name at least one module, or pass None for defaults.")
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; raise ConfigError naming the field and the fix."""

    def default_targets(self, model: Any) -> list[str] | str | None:
        """Targets used when `target_modules` is None; None falls back to the model's query and value projections.

        Methods that place modules by role rather than by name (DiffFit, Compacter: "block outputs") override
        this; it may inspect `model` (its type, its number of blocks) and raise ConfigError.
        """
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        data = dict(data)
        method = data.pop("method", cls.method)
        if cls.method and method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields {unknown}; valid fields: {sorted(names)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        return cls.from_dict(json.loads(text))


def check_positive(config: AdapterConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ConfigError(f"{type(config).__name__}.{name} must be > 0, got {value}.")


def check_dropout(config: AdapterConfig, name: str = "dropout") -> None:
    value = getattr(config, name)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{type(config).__name__}.{name} must be in [0, 1), got {value}.")
