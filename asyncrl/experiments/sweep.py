"""The staleness sweep: one `asyncrl run` per (max_staleness, correction, seed), one after another.

Owns the grid (which runs, with which overrides), launching each run as a subprocess with its own
output directory `<out>/runs/<name>` and fresh loopback ports, the progress display across runs,
and resuming: a run whose metrics.jsonl holds every step and that has a `done.json` marker is not
repeated. Runs go strictly one at a time, because a sweep measures throughput and two runs
sharing the CPU would each measure the other. Must never read metrics beyond counting steps;
summary.py turns finished runs into tables.

The corrections are named for what they do to off-policy data:

- ``none``: plain PPO against the behaviour log-probs (loss.objective=behaviour): no separate
  correction, though its clipped ratio current/behaviour is an importance ratio of its own.
- ``decoupled``: clip against recomputed proximal log-probs, no importance weight
  behaviour -> proximal (loss.objective=decoupled, loss.correction=none): stale samples are
  trained as if the proximal policy had made them, the really uncorrected one.
- ``tis``: the decoupled objective with truncated importance weights (loss.correction=tis).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from asyncrl.config import ConfigError, load_config
from asyncrl.metrics import read_metrics
from asyncrl.ports import free_port

CORRECTIONS: dict[str, tuple[str, ...]] = {
    "none": ("loss.objective=behaviour",),
    "decoupled": ("loss.objective=decoupled", "loss.correction=none"),
    "tis": ("loss.objective=decoupled", "loss.correction=tis"),
}
"""Correction name -> the config overrides that select it."""

DONE_MARKER = "done.json"
SWEEP_FILE = "sweep.json"


@dataclass(frozen=True)
class RunSpec:
    """One point of the grid. `seed` moves the model's init, the learner's and the rollout's seeds together."""

    staleness: int
    correction: str
    seed: int

    @property
    def name(self) -> str:
        return f"k{self.staleness}-{self.correction}-s{self.seed}"

    def overrides(self) -> list[str]:
        return [
            f"max_staleness={self.staleness}",
            *CORRECTIONS[self.correction],
            f"model.init_seed={self.seed}",
            f"learner.seed={self.seed}",
            f"rollout.seed={1 + 1000 * self.seed}",  # servers use seed + index: keep seeds' servers apart
            f"run_name={self.name}",
        ]


@dataclass
class Sweep:
    """A grid over one config, and where it writes."""

    config: str
    out: Path
    staleness: list[int]
    corrections: list[str]
    seeds: int
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [c for c in self.corrections if c not in CORRECTIONS]
        if bad:
            raise ValueError(f"--correction {','.join(bad)} is not a correction; choose from {','.join(CORRECTIONS)}")
        if any(k < 0 for k in self.staleness):
            raise ValueError(f"--staleness {self.staleness}: staleness bounds must be >= 0")
        if self.seeds < 1:
            raise ValueError(f"--seeds {self.seeds}: a sweep needs at least 1 seed")
        # The synchronous baseline is what every speedup is measured against, so it is always run.
        self.staleness = sorted(set(self.staleness) | {0})
        self.corrections = list(dict.fromkeys(self.corrections))

    @property
    def runs(self) -> list[RunSpec]:
        return [RunSpec(k, c, s) for k in self.staleness for c in self.corrections for s in range(self.seeds)]

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "runs" / spec.name

    def run_overrides(self, spec: RunSpec) -> list[str]:
        # The sweep's own keys come last so that they win over the user's overrides.
        return [*self.overrides, *spec.overrides()]

    def steps(self, spec: RunSpec) -> int:
        return self.resolve(spec).learner.steps

    def resolve(self, spec: RunSpec):
        """The run's config, exactly as `asyncrl run` will build it; errors name the run."""
        try:
            return load_config(self.config, self.run_overrides(spec))
        except ConfigError as exc:
            raise ValueError(f"run {spec.name} ({' '.join(spec.overrides())}) has an invalid config: {exc}") from None

    def is_done(self, spec: RunSpec) -> bool:
        """Finished: a done marker, and metrics.jsonl holding every one of the run's steps."""
        run_dir = self.run_dir(spec)
        if not (run_dir / DONE_MARKER).exists():
            return False
        return len(read_metrics(run_dir / "metrics.jsonl")) >= self.steps(spec)

    def write_plan(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        plan = {
            "config": self.config,
            "staleness": self.staleness,
            "corrections": self.corrections,
            "seeds": self.seeds,
            "overrides": self.overrides,
            "runs": [{"name": s.name, "staleness": s.staleness, "correction": s.correction, "seed": s.seed} for s in self.runs],
        }
        (self.out / SWEEP_FILE).write_text(json.dumps(plan, indent=2) + "\n")


@dataclass
class RunResult:
    spec: RunSpec
    returncode: int
    skipped: bool = False
    log: Optional[Path] = None


def launch(sweep: Sweep, spec: RunSpec, on_step: Callable[[int], None] = lambda step: None) -> RunResult:
    """One `asyncrl run` for `spec`, blocking; `on_step` hears the learner's progress as it goes."""
    run_dir = sweep.run_dir(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DONE_MARKER).unlink(missing_ok=True)
    # Fresh ports per run: a previous run's sockets may linger in TIME_WAIT, and another sweep or a
    # test on this machine may use the defaults.
    ports = [f"queue.address=tcp://127.0.0.1:{free_port()}", f"weights.address=tcp://127.0.0.1:{free_port()}"]
    cmd = [sys.executable, "-m", "asyncrl.cli", "run", sweep.config, "--out", str(run_dir), *sweep.run_overrides(spec), *ports]
    log_path = run_dir / "run.log"
    started = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        # Its own session: a terminal's Ctrl-C reaches only the sweep, which then stops the run with
        # one SIGTERM, instead of both racing to stop the run's children.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            while proc.poll() is None:
                records = read_metrics(run_dir / "metrics.jsonl")
                if records:
                    on_step(records[-1].get("step", 0))
                time.sleep(0.5)
        except BaseException:
            # Ctrl-C, SIGTERM or an error here: `asyncrl run` stops its own children on SIGTERM.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    steps = len(read_metrics(run_dir / "metrics.jsonl"))
    if proc.returncode == 0 and steps >= sweep.steps(spec):
        marker = {"name": spec.name, "steps": steps, "started": started, "finished": time.time(), "command": cmd}
        (run_dir / DONE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    on_step(steps)
    return RunResult(spec, proc.returncode, log=log_path)


def run_sweep(sweep: Sweep, console: Optional[Console] = None) -> list[RunResult]:
    """Every run of the grid that is not finished yet, one at a time, with a progress display."""
    console = console or Console(stderr=True)
    for spec in sweep.runs:
        sweep.resolve(spec)  # every config is checked before the first run starts
    sweep.write_plan()
    results: list[RunResult] = []
    live = console.is_terminal
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not live,
    )
    runs = sweep.runs
    with progress:
        overall = progress.add_task("sweep", total=len(runs))
        for spec in runs:
            if sweep.is_done(spec):
                results.append(RunResult(spec, 0, skipped=True))
                progress.advance(overall)
                if not live:
                    console.print(f"{spec.name}: finished before, skipped")
                continue
            steps = sweep.steps(spec)
            bar = progress.add_task(spec.name, total=steps)
            if not live:
                console.print(f"{spec.name}: running {steps} steps")
            result = launch(sweep, spec, on_step=lambda step, bar=bar: progress.update(bar, completed=step))
            progress.remove_task(bar)
            progress.advance(overall)
            results.append(result)
            if result.returncode != 0 or not sweep.is_done(spec):
                console.print(f"[red]{spec.name} failed (exit {result.returncode}); see {result.log}[/red]", highlight=False)
            elif not live:
                console.print(f"{spec.name}: done")
    return results
