"""Plots of `splitclip bench e2e` (matplotlib, Agg backend, PNG): latency by plan per link, and the step-change timeline."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_by_plan(settings: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One panel per link setting: each plan's median latency stacked into edge / transfer / cloud
    (medians of each part, so the stack is close to, not exactly, the median), fastest first; the
    best fixed plan and the planner are marked."""
    plt = _plt()
    n = len(settings)
    rows = max(len(s["rows"]) for s in settings)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 0.22 * rows + 1.6), squeeze=False)
    colors = {"edge": "#4c72b0", "transfer": "#dd8452", "cloud": "#55a868"}
    for ax, s in zip(axes[0], settings, strict=True):
        data = sorted(s["rows"], key=lambda r: r["median_ms"])
        y = list(range(len(data)))
        left = [0.0] * len(data)
        for part in ("edge", "transfer", "cloud"):
            vals = [r[f"{part}_ms"] for r in data]
            ax.barh(y, vals, left=left, color=colors[part], label=part, height=0.75)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.scatter([r["median_ms"] for r in data], y, marker="|", color="black", s=60, zorder=3,
                   label="median (whole)")  # fmt: skip
        labels = []
        for r in data:
            mark = " ◀ planner" if r["plan"] == "auto" else (" ★ best fixed" if r.get("best") else "")
            labels.append(r["plan"] + mark)
        ax.set_yticks(y, labels, fontsize=7)
        for tick, r in zip(ax.get_yticklabels(), data, strict=True):
            if r["plan"] == "auto" or r.get("best"):
                tick.set_fontweight("bold")
        ax.invert_yaxis()
        ax.set_xlabel("latency, ms")
        ax.set_title(f"{s['mbps']:g} Mbit/s up, rtt {s['rtt_ms']:g} ms", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def timeline(frames: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Per frame of the step-change run: latency (log scale), coloured by the plan that answered it,
    and the link rate."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 4.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    plans = list(dict.fromkeys(f["plan"] for f in frames))
    cmap = plt.get_cmap("tab10")
    for j, p in enumerate(plans):
        xs = [i for i, f in enumerate(frames) if f["plan"] == p]
        ax.scatter(xs, [frames[i]["latency_ms"] for i in xs], s=14, color=cmap(j % 10), label=p)
    ax.plot(range(len(frames)), [f["latency_ms"] for f in frames], color="grey", lw=0.6, alpha=0.6)
    ax.set_yscale("log")
    ax.set_ylabel("latency, ms")
    ax.legend(fontsize=7, title="plan in use", title_fontsize=7)
    ax.grid(alpha=0.3)
    ax2.step(range(len(frames)), [f["mbps"] for f in frames], where="post", color="black")
    ax2.set_yscale("log")
    ax2.set_ylabel("Mbit/s up")
    ax2.set_xlabel("frame")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
