"""The PNG: per-layer speed-up over eager channels_last (grouped bars, one per peer) and
end-to-end images/s per variant. Only measured figures are drawn; a missing bar is a peer
that did not run or failed (the JSON says why)."""

from __future__ import annotations


def plot(report: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    layers = (report.get("layers") or {}).get("rows") or []
    e2e = [r for r in (report.get("e2e") or {}).get("rows") or [] if "images_s" in r]
    blocks = (report.get("blocks") or {}).get("rows") or []
    panels = [p for p, has in (("layers", layers), ("blocks", blocks), ("e2e", e2e)) if has]
    if not panels:
        return None
    heights = {"layers": 4.5, "blocks": 3.0, "e2e": 0.35 * len(e2e) + 1.5}
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(10, 0.55 * len(layers) + 3),
                                                       sum(heights[p] for p in panels) + 1),
                             gridspec_kw={"height_ratios": [heights[p] for p in panels]}, squeeze=False)
    cfg = report["config"]
    title = (f"{cfg['model']}  batch {cfg['batch']}  {cfg['dtype']}  {cfg['resolution']}px  on "
             f"{report['env'].get('gpu') or 'CPU (no GPU figures)'}")
    fig.suptitle(title, fontsize=11)

    def bars(ax, rows, key_name, peers):
        peers = [p for p in peers if p != "eager_cl"]
        width = 0.8 / max(1, len(peers))
        xs = range(len(rows))
        for j, p in enumerate(peers):
            vals = [r["results"].get(p, {}).get("speedup_vs_eager_cl") or float("nan") for r in rows]
            ax.bar([x + (j - (len(peers) - 1) / 2) * width for x in xs], vals, width, label=p)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")   # ratios: 2x faster and 2x slower are the same distance from 1
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xticks(list(xs))
        ax.set_xticklabels([key_name(r) for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speed-up vs eager_cl")
        ax.legend(fontsize=7, ncol=min(4, len(peers)) or 1)

    for ax, p in zip(axes[:, 0], panels):
        if p == "layers":
            bars(ax, layers, lambda r: f"{r['name']} x{r['multiplicity']}", report["layers"]["peers"])
            ax.set_title(f"per layer (conv + BN + epilogue): {report['layers'].get('timing', '')}", fontsize=9)
        elif p == "blocks":
            bars(ax, blocks, lambda r: r["block"], report["blocks"]["variants"])
            ax.set_title("per block", fontsize=9)
        else:
            names = [r["variant"] for r in e2e]
            vals = [r["images_s"] for r in e2e]
            colors = ["tab:orange" if n.startswith("rf_") else "tab:gray" for n in names]
            ax.barh(names, vals, color=colors)
            for y, v in enumerate(vals):
                ax.text(v, y, f" {v:.0f}", va="center", fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("images/s (end to end)")
            ax.set_title("end to end", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
