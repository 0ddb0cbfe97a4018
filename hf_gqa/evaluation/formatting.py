"""Formatting of figures and tables in the reports of `compare` and `bench`."""

from __future__ import annotations

import math
from collections.abc import Sequence


def fmt_rate(x: float | None) -> str:
    """Tokens per second, one decimal."""
    return "-" if x is None else f"{x:,.1f}"


def fmt_ratio(x: float | None) -> str:
    """A ratio, three decimals."""
    return "-" if x is None else f"{x:.3f}"


def fmt_bytes(n: float | None) -> str:
    """Bytes in B, KiB, MiB or GiB."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A plain-text (aligned) or markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)), line]
    out += [
        "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    return "\n".join(out)


def fmt_value(x: float | None, stderr: float | None = None) -> str:
    """A score (with its standard error)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    digits = 2 if abs(x) >= 100 else 4
    text = f"{x:,.{digits}f}"
    return text + (f" ± {stderr:.{digits}f}" if stderr is not None else "")


def fmt_delta(x: float | None) -> str:
    """A signed difference."""
    if x is None:
        return "-"
    digits = 2 if abs(x) >= 100 else 4
    return f"{x:+,.{digits}f}"
