"""Tables of a sweep: one row per run (runs.csv) and per (staleness, correction) over seeds
(summary.csv, summary.md).

Owns reducing one run's metrics.jsonl and queue log to numbers, and those to mean ± spread over
seeds with the speedup against K = 0. Definitions, as docs/sweep.md states them:

- final reward: mean `reward_mean` over the last 10% of steps (at least one step);
- reward AUC: mean `reward_mean` over all steps, i.e. the area under the reward-vs-step curve
  divided by the number of steps, in reward units (0..1);
- samples/s, tokens/s: all samples (tokens) trained on / the learner's wall time at its last step;
- spread: the sample standard deviation over seeds (0 with one seed);
- speedup: mean samples/s / mean samples/s of K = 0 with the same correction.

Must never launch runs or draw.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from asyncrl.metrics import read_metrics

RUN_FIELDS = (
    "final_reward", "reward_auc", "samples_per_s", "tokens_per_s", "wall_s", "staleness_mean", "staleness_max",
    "ess_mean", "dropped_stale", "dropped_total",
)
"""The numbers kept per run, in table order."""

FINAL_FRACTION = 0.1


def queue_final_stats(run_dir: Path) -> Optional[dict]:
    """The queue's closing counters: the JSON after 'final stats ' in logs/queue.log, or None."""
    log = run_dir / "logs" / "queue.log"
    if not log.exists():
        return None
    for line in reversed(log.read_text(errors="replace").splitlines()):
        _, sep, payload = line.partition("final stats ")
        if sep:
            try:
                return json.loads(payload)
            except json.JSONDecodeError:
                return None
    return None


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def run_numbers(run_dir: Path) -> Optional[dict]:
    """The RUN_FIELDS of one run; None when it has no metrics."""
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        return None
    tail = records[-max(1, int(len(records) * FINAL_FRACTION)) :]
    wall = records[-1].get("wall_s") or 0.0
    samples = sum(r.get("samples", 0) for r in records)
    tokens = sum(r.get("tokens", 0) for r in records)
    stats = queue_final_stats(run_dir)
    dropped = (stats or {}).get("dropped", {})
    return {
        "steps": len(records),
        "final_reward": _mean([r.get("reward_mean") for r in tail]),
        "reward_auc": _mean([r.get("reward_mean") for r in records]),
        "samples_per_s": samples / wall if wall > 0 else None,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "wall_s": wall,
        "staleness_mean": _mean([r.get("staleness_mean") for r in records]),
        "staleness_max": max((r.get("staleness_max", 0) for r in records), default=0),
        "ess_mean": _mean([r.get("ess") for r in records]),
        "dropped_stale": dropped.get("stale", 0) if stats is not None else None,
        "dropped_total": sum(dropped.values()) if stats is not None else None,
    }


@dataclass
class Row:
    """One (staleness, correction) over its seeds: mean and spread of every RUN_FIELD."""

    staleness: int
    correction: str
    seeds: int
    mean: dict
    spread: dict
    speedup: Optional[float] = None


def _spread(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.stdev(values) if len(values) > 1 else 0.0


def load_runs(out: Path) -> list[dict]:
    """Every run the sweep plan (sweep.json) names that has metrics, with its grid point and numbers."""
    plan_path = out / "sweep.json"
    if not plan_path.exists():
        raise FileNotFoundError(f"{plan_path} does not exist: {out} is not a sweep directory (run `asyncrl sweep` first)")
    plan = json.loads(plan_path.read_text())
    runs = []
    for entry in plan["runs"]:
        numbers = run_numbers(out / "runs" / entry["name"])
        if numbers is not None:
            runs.append({**entry, **numbers})
    return runs


def aggregate(runs: list[dict]) -> list[Row]:
    """Rows ordered by correction, then staleness; speedup against K = 0 of the same correction."""
    points: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        points.setdefault((run["correction"], run["staleness"]), []).append(run)
    rows = []
    for (correction, staleness), group in sorted(points.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        mean = {f: _mean([r[f] for r in group]) for f in RUN_FIELDS}
        mean["staleness_max"] = max(r["staleness_max"] for r in group)
        spread = {f: _spread([r[f] for r in group]) for f in RUN_FIELDS}
        rows.append(Row(staleness, correction, len(group), mean, spread))
    base = {r.correction: r.mean["samples_per_s"] for r in rows if r.staleness == 0}
    for row in rows:
        ref = base.get(row.correction)
        if ref and row.mean["samples_per_s"] is not None:
            row.speedup = row.mean["samples_per_s"] / ref
    return rows


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _pm(row: Row, name: str, digits: int) -> str:
    mean, spread = row.mean[name], row.spread[name]
    if mean is None:
        return "-"
    return _fmt(mean, digits) if not spread else f"{_fmt(mean, digits)} ± {_fmt(spread, digits)}"


def markdown(rows: list[Row]) -> str:
    header = (
        "| correction | K | seeds | final reward | reward AUC | samples/s | speedup vs K=0 | tokens/s | wall s "
        "| staleness mean | staleness max | ESS mean | dropped stale | dropped total |"
    )
    lines = [header, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r.correction} | {r.staleness} | {r.seeds} | {_pm(r, 'final_reward', 3)} | {_pm(r, 'reward_auc', 3)} "
            f"| {_pm(r, 'samples_per_s', 0)} | {_fmt(r.speedup, 2)}× | {_pm(r, 'tokens_per_s', 0)} | {_pm(r, 'wall_s', 1)} "
            f"| {_fmt(r.mean['staleness_mean'], 2)} | {r.mean['staleness_max']} | {_pm(r, 'ess_mean', 3)} "
            f"| {_fmt(r.mean['dropped_stale'], 1)} | {_fmt(r.mean['dropped_total'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(out: Path) -> list[Row]:
    """runs.csv, summary.csv and summary.md in `out` from the runs found there; returns the rows."""
    runs = load_runs(out)
    if not runs:
        raise FileNotFoundError(f"no run under {out / 'runs'} has a metrics.jsonl yet: nothing to summarise")
    run_cols = ["name", "staleness", "correction", "seed", "steps", *RUN_FIELDS]
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=run_cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    rows = aggregate(runs)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["correction", "staleness", "seeds", "speedup", *(f"{n}_{s}" for n in RUN_FIELDS for s in ("mean", "spread"))])
        for r in rows:
            writer.writerow([r.correction, r.staleness, r.seeds, r.speedup, *(v for n in RUN_FIELDS for v in (r.mean[n], r.spread[n]))])
    steps = sorted({r["steps"] for r in runs})
    intro = (
        f"# Sweep summary\n\n{len(runs)} runs, {'/'.join(map(str, steps))} learner steps each. Mean ± sample standard "
        "deviation over seeds; final reward is the mean over the last 10% of steps, reward AUC the mean over all "
        "steps; samples/s is all samples trained / learner wall time. See docs/sweep.md.\n\n"
    )
    (out / "summary.md").write_text(intro + markdown(rows))
    return rows
