"""Plain-text tables for the console (no dependency; numbers right-aligned)."""

from __future__ import annotations

import math


def fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return format(v, spec)
    return str(v)


def render(headers: list[str], rows: list[list], title: str | None = None) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(vals, first_left=True):
        out = []
        for i, (v, w) in enumerate(zip(vals, widths)):
            out.append(v.ljust(w) if (i == 0 and first_left) else v.rjust(w))
        return "  ".join(out).rstrip()

    text = []
    if title:
        text.append(title)
    text.append(line(headers))
    text.append("  ".join("-" * w for w in widths))
    text += [line(r) for r in cells]
    return "\n".join(text)


def err_cell(res: dict) -> str:
    if "error" in res:
        return "ERROR"
    if "rel_err" not in res:
        return "-"
    e, st = res["rel_err"], res.get("status", "")
    if st == "NaN":
        return "NaN FAIL"
    return f"{fmt(e, '.1e')} {st}" if st != "ok" else fmt(e, ".1e")
