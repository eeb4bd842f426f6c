"""`asyncrl run`: the queue, one learner and N rollout servers as child processes of one command.

Owns their lifetimes: starts them, shows progress from the learner's metrics.jsonl, stops them
all on Ctrl-C, and when one dies unexpectedly stops the rest and says which child died and how,
with the end of its log. Children run in their own sessions so that a terminal's Ctrl-C reaches
only this process, which then stops them in order; they also die with it (PR_SET_PDEATHSIG).
Must never train or generate itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from asyncrl.config import Config
from asyncrl.metrics import read_metrics

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: children then outlive a SIGKILLed supervisor, as plain processes do


@dataclass
class Child:
    name: str
    args: list[str]
    log_path: Path
    proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "asyncrl.cli", *self.args]
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent
        )
        log.close()

    def describe_exit(self) -> str:
        rc = self.proc.returncode
        if rc is not None and rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        return f"exited with code {rc}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])


class Supervisor:
    def __init__(self, cfg: Config, out_dir: Path, console: Optional[Console] = None):
        self.cfg = cfg
        self.out_dir = out_dir
        self.console = console or Console(stderr=True)
        config_file = str(out_dir / "config.yaml")
        logs = out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.queue = Child("queue", ["queue", "serve", "--config", config_file], logs / "queue.log")
        self.learner = Child(
            "learner", ["learner", "--config", config_file, "--no-queue", "--out", str(out_dir)], logs / "learner.log"
        )
        self.rollouts = [
            Child(f"rollout-{i}", ["rollout", "--config", config_file, "--index", str(i)], logs / f"rollout-{i}.log")
            for i in range(cfg.rollout.num_servers)
        ]
        self.children = [self.queue, self.learner, *self.rollouts]

    def run(self) -> int:
        interrupted = False
        previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            for child in self.children:
                child.start()
            return self._watch()
        except KeyboardInterrupt:
            interrupted = True
            self.console.print("[yellow]interrupted: stopping all children[/yellow]")
            return 130
        finally:
            self._stop_all()
            signal.signal(signal.SIGTERM, previous)
            if interrupted:
                self.console.print(f"stopped; logs in {self.out_dir / 'logs'}")

    def _watch(self) -> int:
        metrics_path = self.out_dir / "metrics.jsonl"
        steps = self.cfg.learner.steps
        live = self.console.is_terminal
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("reward {task.fields[reward]}  staleness {task.fields[staleness]}  {task.fields[speed]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not live,
        )
        last_print = 0.0
        last_record: dict = {}
        with progress:
            bar = progress.add_task("training", total=steps, reward="-", staleness="-", speed="")
            while True:
                records = read_metrics(metrics_path)
                if records:
                    last_record = records[-1]
                    fields = _bar_fields(records)
                    progress.update(bar, completed=last_record.get("step", 0), **fields)
                    if not live and time.monotonic() - last_print > 10:
                        last_print = time.monotonic()
                        print(
                            f"step {last_record.get('step')}/{steps} reward {fields['reward']} "
                            f"staleness {fields['staleness']} {fields['speed']}",
                            flush=True,
                        )
                if self.learner.proc.poll() is not None:
                    return self._learner_done(last_record)
                for child in self.children:
                    # A rollout server exits 0 only when the queue told it the run is over; the
                    # learner may still be shutting down, and its exit decides the outcome.
                    rc = child.proc.poll()
                    if rc is not None and not (child in self.rollouts and rc == 0):
                        return self._child_died(child)
                time.sleep(0.25)

    def _learner_done(self, last_record: dict) -> int:
        if self.learner.proc.returncode != 0:
            return self._child_died(self.learner)
        if last_record:
            self.console.print(
                f"done: {last_record.get('step')} steps, reward_mean {last_record.get('reward_mean', 0):.3f}, "
                f"wall {last_record.get('wall_s', 0):.1f} s; metrics in {self.out_dir / 'metrics.jsonl'}"
            )
        return 0

    def _child_died(self, child: Child) -> int:
        self.console.print(
            f"[red]child {child.name} {child.describe_exit()} unexpectedly; stopping the others.[/red]\n"
            f"  last lines of {child.log_path}:\n{child.log_tail()}",
            markup=True,
            highlight=False,
        )
        return 1

    def _stop_all(self, grace_s: float = 10.0) -> None:
        # Rollouts first (they stop producing), then the learner, then the queue that serves both.
        for group in (self.rollouts, [self.learner], [self.queue]):
            running = [c for c in group if c.proc is not None and c.proc.poll() is None]
            for c in running:
                c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for c in running:
                try:
                    c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()


def _bar_fields(records: list[dict]) -> dict:
    tail = records[-10:]
    reward = sum(r.get("reward_mean", 0.0) for r in tail) / len(tail)
    last = records[-1]
    return {
        "reward": f"{reward:.3f}",
        "staleness": f"{last.get('staleness_mean', 0):.2f}/{last.get('staleness_max', 0)}",
        "speed": f"{last.get('samples_per_s', 0):.0f} samples/s",
    }
