"""Byte sizes: parse user budgets ("200MB", "1.5GiB", 10**9, "25%") and print them back.

Units follow accelerate's `max_memory` convention: KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB and
the bare letters K/M/G/T are powers of 1024. A share ("25%") is of a total the caller knows (all expert
bytes, all frozen weight bytes), so every budget flag reads the same way.
"""

from __future__ import annotations

import re

from memfit.errors import ConfigError

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*")


def parse_size(size: int | float | str) -> int:
    """Bytes in `size`: an int/float count of bytes or a string such as "200MB", "1.5 GiB", "512M"."""
    if isinstance(size, bool):
        raise ConfigError(f"size must be a number of bytes or a string like '200MB', got {size!r}.")
    if isinstance(size, int | float):
        value = float(size)
    else:
        match = _SIZE.fullmatch(str(size))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ConfigError(
                f"cannot read the size {size!r}; write a number with an optional unit, e.g. '200MB', '1.5GiB', "
                f"'512M' (units: {', '.join(u for u in _UNITS if u)})."
            )
        value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ConfigError(f"size must be positive, got {size!r}.")
    return int(value)


def parse_budget(budget: int | float | str, total: int, what: str) -> int:
    """Bytes in `budget`: a size (see `parse_size`) or a share of `total` such as "25%" (of `what`, for errors)."""
    text = str(budget).strip()
    if not text.endswith("%"):
        return parse_size(budget)
    try:
        share = float(text[:-1]) / 100
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise ConfigError(f"budget {budget!r}: a share of {what} must lie in (0%, 100%], e.g. '25%'.")
    return max(1, int(share * total))


def format_size(nbytes: int | float) -> str:
    """Human-readable decimal size: 123456789 -> '123.5 MB'."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"
