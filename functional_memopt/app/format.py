"""Numbers for people: the one byte formatter of the ``memopt`` command."""

from __future__ import annotations

__all__ = ["format_bytes"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: int | None, *, unit: str | None = None, digits: int = 1, suffix: bool = True) -> str:
    """``n`` bytes as text: in ``unit`` ("MiB", ...) or the largest unit under 1024; "-" for None.

    Example:
        >>> format_bytes(3 * 2**20), format_bytes(3 * 2**20, unit="MiB", digits=0), format_bytes(512)
        ('3.0 MiB', '3 MiB', '512 B')
    """
    if n is None:
        return "-"
    if unit is None:
        unit = next((u for i, u in enumerate(_UNITS) if abs(n) < 1024 ** (i + 1)), _UNITS[-1])
    if unit not in _UNITS:
        raise ValueError(f"format_bytes: unit must be one of {_UNITS}, got {unit!r}.")
    value = n / 1024 ** _UNITS.index(unit)
    text = f"{n:,}" if unit == "B" else f"{value:,.{digits}f}"
    return f"{text} {unit}" if suffix else text
