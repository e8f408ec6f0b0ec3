"""How the benchmarks print: a figure with its unit, a table, counts, and the one JSON
object of --json. Every mode's summary is built from these, so a figure looks the same
wherever it is printed."""

from __future__ import annotations

import json
from collections.abc import Callable

MiB = 2**20
GiB = 2**30
P999 = ("p50", "p99", "p999", "max")  # the quantiles of a latency where the stalls matter


def num(value: float | None, digits: int = 2) -> str:
    """A figure without its unit (a table cell), or "-" where there is none."""
    return "-" if value is None else f"{value:.{digits}f}"


def figure(value: float | None, unit: str, digits: int = 2) -> str:
    """A figure with its unit: "1.25 ms", or "- ms" where there is none."""
    return f"{num(value, digits)} {unit}"


def quantiles(
    figures: dict, unit: str, digits: int = 2, keys: tuple[str, ...] = ("p50", "p99", "max")
) -> str:
    """Some figures of a distribution with their unit: "p50 1.00 ms, p99 2.00 ms, max ..."."""
    return ", ".join(f"{key} {figure(figures[key], unit, digits)}" for key in keys)


def table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells (the first is the head) in right-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def count_text(mapping: dict[str, int]) -> str:
    """{code: n} as "code n, code n" (or "none")."""
    return ", ".join(f"{code} {n}" for code, n in sorted(mapping.items())) or "none"


def rounded(value: object, digits: int = 3) -> object:
    """`value` with every float rounded, for JSON output."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def emit(
    result: dict, as_json: bool, summary: Callable[[dict], str], digits: int | None = 3
) -> None:
    """Print a run's result: one JSON object (floats rounded to `digits`, unless None), or
    its summary."""
    if as_json:
        print(json.dumps(result if digits is None else rounded(result, digits)))
    else:
        print(summary(result))
