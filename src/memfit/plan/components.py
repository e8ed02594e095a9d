"""A plan's parts: the predicted components of a run's peak."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Component:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    """The predicted components of a run's peak; `peak_bytes` is their sum at the step's highest point."""

    components: list[Component]
    peak_bytes: int
    device: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "peak_bytes": self.peak_bytes, "notes": self.notes,
                "components": {c.name: c.bytes for c in self.components}}

    def get(self, name: str) -> int:
        return next((c.bytes for c in self.components if c.name == name), 0)
