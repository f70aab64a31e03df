"""PNG plots of a `fanout bench --sweep` report (matplotlib, Agg backend: no display).

- `<base>-latency.png`: latency p50 / p99 / p99.9 against the swept value, one
  line style per target, log scale;
- `<base>-cpu.png`: server CPU-seconds per million delivered updates against
  the swept value (log scale). Line style: solid = baseline, dashed = fanout.
"""

from __future__ import annotations

from typing import Any


def plot_sweep(report: dict[str, Any], base: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    label = report["sweep"]
    targets = sorted({t for st in steps for t in st["results"]})
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t, style in zip(targets, ("-", "--"), strict=False):
        for q, marker, color in (("p50", "o", "C0"), ("p99", "s", "C1"), ("p999", "^", "C3")):
            xs = [st["value"] for st in steps if t in st["results"]]
            ys = [st["results"][t]["latency_ms"].get(q) for st in steps if t in st["results"]]
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), style, marker=marker, color=color, label=f"{t} {q}"
                )
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("publish-to-receive latency (ms)")
    ax.set_title(f"latency vs {label} ({report['settings']['workload']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(base + "-latency.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t, style in zip(targets, ("-", "--"), strict=False):
        pts = [
            (st["value"], st["results"][t]["cpu"].get("server_s_per_million_updates"))
            for st in steps
            if t in st["results"]
        ]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, marker="o", label=t)
    ax.set_xlabel(label)
    ax.set_yscale("log")
    ax.set_ylabel("server CPU-s per million delivered updates")
    ax.set_title(f"server CPU per delivered update vs {label}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(base + "-cpu.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


__all__ = ["plot_sweep"]
