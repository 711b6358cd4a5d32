"""Markdown tables from a report JSON, for the README (so quoted figures are copied by code,
never by hand).

    python -m benchmarks.markdown benchmarks/results/H100-80GB-HBM3_resnet50_b256_bf16.json
    python -m benchmarks.markdown FILE.json --sections e2e
"""

from __future__ import annotations

import argparse
import json


def _f(v, spec: str) -> str:
    return "–" if v is None or v == "nan" else format(v, spec)


def e2e(rep: dict) -> str:
    lines = ["| variant | median ms | images/s | vs eager channels_last | host ms / call | rel. error | setup s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rep["e2e"]["rows"]:
        if "median_ms" not in r:
            lines.append(f"| {r['variant']} | error: {r.get('error', '?')} | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['median_ms']:.2f} | {r['images_s']:.0f} | "
                     f"{_f(r.get('speedup_vs_eager_cl'), '.2f')}× | {_f(r.get('host_ms'), '.2f')} | "
                     f"{_f(r.get('rel_err'), '.1e')} | {_f(r.get('setup_s'), '.1f')} |")
    return "\n".join(lines)


def layers(rep: dict) -> str:
    sec = rep["layers"]
    peers = [p for p in sec["peers"] if p != "eager_nchw" and p != "rf_torch"]
    rf = [p for p in peers if p.startswith("rf_")]
    # convs with a prologue (pre-activation models) are also timed without it: its cost
    bare = [p for p in rf if any("without_pre_us" in r["results"].get(p, {}) for r in sec["rows"])]
    head = (["layer", "shape", "epilogue", "×"] + [f"{p} µs" for p in peers]
            + [f"{p} without prologue µs" for p in bare] + ["best rf vs eager_cl", "best rf vs folded"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in sec["rows"]:
        res = r["results"]
        us = {p: res.get(p, {}).get("median_us") for p in peers}
        best = min((us[p] for p in rf if us[p]), default=None)
        cells = [r["name"], r["label"], r["epilogue"], str(r["multiplicity"])]
        cells += [_f(us[p], ".0f") for p in peers]
        cells += [_f(res.get(p, {}).get("without_pre_us"), ".0f") for p in bare]
        cells += [f"{us['eager_cl'] / best:.2f}×" if best and us.get("eager_cl") else "–",
                  f"{us['folded_compile'] / best:.2f}×" if best and us.get("folded_compile") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    tot = sec.get("weighted_total_ms", {})
    lines.append("| **sum × count (ms)** | | | | " + " | ".join(_f(tot.get(p), ".2f") for p in peers)
                 + " |" * len(bare) + " | | |")
    return "\n".join(lines)


def blocks(rep: dict) -> str:
    sec = rep["blocks"]
    vs = sec["variants"]
    lines = ["| block | input | " + " | ".join(f"{v} ms" for v in vs) + " |",
             "|---|---|" + "---:|" * len(vs)]
    for r in sec["rows"]:
        cells = []
        for v in vs:
            res = r["results"].get(v, {})
            cells.append(f"{res['median_ms']:.3f} ({res.get('speedup_vs_eager_cl', 0):.2f}×)"
                         if "median_ms" in res else "–")
        lines.append(f"| {r['block']} | {'×'.join(map(str, r['in_shape']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json")
    p.add_argument("--sections", nargs="+", default=["e2e", "layers", "blocks"])
    a = p.parse_args(argv)
    rep = json.load(open(a.json))
    for s in a.sections:
        if rep.get(s):
            print({"e2e": e2e, "layers": layers, "blocks": blocks}[s](rep) + "\n")


if __name__ == "__main__":
    main()
