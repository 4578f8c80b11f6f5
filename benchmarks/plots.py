"""PNG plots (matplotlib, Agg backend): start-up CDFs, the serial breakdown, and PSS against pods."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.axes import Axes  # noqa: E402

COLORS = {"stock": "tab:red", "ours": "tab:blue", "floor": "tab:gray"}
NAMES = {"stock": "stock runc (podsandbox + shim)", "ours": "kuasar-runc (runc-sandboxer)",
         "floor": "raw runc run -d (floor)"}
DPI = 110


def _cdf(ax: Axes, values: Sequence[float], label: str, key: str, style: str = "-") -> None:
    data = sorted(values)
    if not data:
        return
    ys = [(i + 1) / len(data) for i in range(len(data))]
    ax.step(data, ys, where="post", linestyle=style, color=COLORS[key], label=label)


def _finish_cdf(ax: Axes, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("pod start latency (ms)")
    ax.set_ylabel("fraction of pods")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def serial_cdf(results: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in ("stock", "ours"):
        _cdf(ax, results["serial"][label]["total_ms"], NAMES[label], label)
    _cdf(ax, results["floor"]["run_ms"], f"{NAMES['floor']}, in a loop", "floor", "--")
    if results.get("floor_interleaved"):
        _cdf(ax, results["floor_interleaved"]["run_ms"], f"{NAMES['floor']}, between the pods", "floor", ":")
    _finish_cdf(ax, f"Serial pod start ({len(results['serial']['ours']['total_ms'])} pods per path)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def parallel_cdf(results: dict[str, Any], path: Path) -> None:
    sizes = list(results["parallel"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for label in ("stock", "ours"):
            _cdf(ax, results["parallel"][size][label]["latency_ms"], NAMES[label], label)
        rounds = len(results["parallel"][size]["ours"]["wall_ms"])
        _finish_cdf(ax, f"{size} pods at once ({rounds} round{'s' if rounds > 1 else ''} per path)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def pss(results: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in ("stock", "ours"):
        rows = results["memory"][label]
        xs = [r["pods"] for r in rows]
        ax.plot(xs, [r["management"]["pss_kb"] / 1024 for r in rows], "o-", color=COLORS[label],
                label=f"{NAMES[label]}: management")
        ax.plot(xs, [r["containerd"]["pss_kb"] / 1024 for r in rows], ":", color=COLORS[label],
                label=f"containerd itself (during {label} pass)")
    ax.set_title("PSS of the management processes against running pods")
    ax.set_xlabel("running pods")
    ax.set_ylabel("PSS (MB)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def serial_breakdown(summary: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    calls = [("run_pod_ms", "RunPodSandbox", "tab:purple"), ("create_ms", "CreateContainer", "tab:orange"),
             ("start_ms", "StartContainer", "tab:green")]
    labels = ["stock", "ours"]
    for row, label in enumerate(labels):
        left = 0.0
        for key, title, color in calls:
            width = summary["serial"][label][key]["p50"]
            ax.barh(row, width, left=left, color=color, alpha=0.75, edgecolor="black",
                    label=title if row == 0 else None)
            ax.text(left + width / 2, row, f"{width:.0f}", ha="center", va="center", fontsize=8)
            left += width
    ax.set_yticks(range(len(labels)), [NAMES[label] for label in labels], fontsize=8)
    ax.set_xlabel("p50 per CRI call (ms), stacked")
    ax.set_title("Serial start by CRI call")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_all(results: dict[str, Any], summary: dict[str, Any], out: Path) -> list[Path]:
    paths = [out / "serial_cdf.png", out / "parallel_cdf.png", out / "pss.png", out / "serial_breakdown.png"]
    if "serial" not in results:  # the runc section did not run: nothing to plot
        return []
    serial_cdf(results, paths[0])
    parallel_cdf(results, paths[1])
    pss(results, paths[2])
    serial_breakdown(summary, paths[3])
    return paths
