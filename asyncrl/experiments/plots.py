"""PNG plots of a sweep: reward vs samples, reward vs wall-clock, throughput vs staleness.

Owns drawing only, with matplotlib's file backend (no display needed). Curves are the mean over
seeds of `reward_mean`, smoothed by a moving average over SMOOTH_FRACTION of the steps so that the
trend shows through per-step noise; colour is the staleness bound, line style the correction.
Must never launch runs or compute table numbers (summary.py does).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, on machines without a display

import matplotlib.pyplot as plt  # noqa: E402

from asyncrl.experiments.summary import Row  # noqa: E402
from asyncrl.metrics import read_metrics  # noqa: E402

SMOOTH_FRACTION = 0.05
STYLES = {"tis": "-", "decoupled": "--", "none": ":"}
FIGSIZE = (6.0, 4.0)
DPI = 80  # small files: docs/img keeps these in git


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _curves(out: Path) -> dict[tuple[int, str], tuple[list[float], list[float], list[float]]]:
    """(staleness, correction) -> (cumulative samples, wall seconds, smoothed reward), seed-averaged by step."""
    plan = json.loads((out / "sweep.json").read_text())
    by_point: dict[tuple[int, str], list[list[dict]]] = {}
    for entry in plan["runs"]:
        records = read_metrics(out / "runs" / entry["name"] / "metrics.jsonl")
        if records:
            by_point.setdefault((entry["staleness"], entry["correction"]), []).append(records)
    curves = {}
    for point, seeds in by_point.items():
        n = min(len(r) for r in seeds)
        samples, wall, reward, total = [], [], [], 0.0
        for i in range(n):
            total += sum(r[i].get("samples", 0) for r in seeds) / len(seeds)
            samples.append(total)
            wall.append(sum(r[i].get("wall_s", 0.0) for r in seeds) / len(seeds))
            reward.append(sum(r[i].get("reward_mean", 0.0) for r in seeds) / len(seeds))
        curves[point] = (samples, wall, _smooth(reward, max(1, int(n * SMOOTH_FRACTION))))
    return curves


def _colours(staleness: list[int]) -> dict[int, tuple]:
    cmap = plt.get_cmap("viridis")
    span = max(1, len(staleness) - 1)
    return {k: cmap(0.85 * i / span) for i, k in enumerate(sorted(staleness))}


def _reward_plot(curves, axis: int, xlabel: str, path: Path) -> None:
    colours = _colours([k for k, _ in curves])
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for (k, corr), series in sorted(curves.items()):
        ax.plot(series[axis], series[2], STYLES.get(corr, "-"), color=colours[k], label=f"K={k} {corr}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reward (mean over seeds, smoothed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _throughput_plot(rows: list[Row], path: Path) -> None:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for corr in sorted({r.correction for r in rows}):
        mine = sorted((r for r in rows if r.correction == corr and r.mean["samples_per_s"] is not None), key=lambda r: r.staleness)
        ax.errorbar(
            [r.staleness for r in mine],
            [r.mean["samples_per_s"] for r in mine],
            yerr=[r.spread["samples_per_s"] or 0.0 for r in mine],
            fmt="o" + STYLES.get(corr, "-"),
            capsize=3,
            label=corr,
        )
    ax.set_xlabel("max_staleness K")
    ax.set_ylabel("samples/s (mean ± spread over seeds)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_plots(out: Path, rows: list[Row]) -> list[Path]:
    """reward_vs_samples.png, reward_vs_wall.png and throughput_vs_staleness.png in `out`."""
    curves = _curves(out)
    paths = [out / "reward_vs_samples.png", out / "reward_vs_wall.png", out / "throughput_vs_staleness.png"]
    _reward_plot(curves, 0, "samples trained", paths[0])
    _reward_plot(curves, 1, "learner wall-clock (s)", paths[1])
    _throughput_plot(rows, paths[2])
    return paths
