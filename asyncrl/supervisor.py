"""`asyncrl run`: the queue, one learner and N rollout servers as child processes of one command.

Owns their lifetimes: starts them, shows progress from the learner's metrics.jsonl, stops them
all on Ctrl-C or SIGTERM, and restarts a child that crashes (`run.max_restarts` times per child,
after an exponential back-off: restart_backoff_s x 2^(restarts so far), capped at
restart_backoff_max_s; a plain formula, no retry library). A restarted learner always resumes from
its newest checkpoint (`--resume`). Each restart is logged to the console and to
<out>/supervisor.jsonl. A child that fails within `run.min_uptime_s` of its first start (a bad
config) or past its restarts stops the run, and the message says which child died and how, with
the end of its log. Children run in their own sessions so that a terminal's Ctrl-C reaches
only this process, which then stops them in order; they also die with it (PR_SET_PDEATHSIG).
Must never train or generate itself.
"""

from __future__ import annotations

import ctypes
import json
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
    restarts: int = 0
    first_start: float = 0.0
    restart_at: Optional[float] = None
    """When a scheduled restart is due (monotonic seconds); None when none is."""
    restart_args: tuple[str, ...] = ()
    """Arguments added on restarts (the learner's --resume)."""

    def start(self) -> None:
        restart = self.proc is not None
        args = [*self.args, *(a for a in self.restart_args if restart and a not in self.args)]
        if not restart:
            self.first_start = time.monotonic()
        log = open(self.log_path, "a" if restart else "w")
        if restart:
            log.write(f"\n--- restart {self.restarts} ---\n")
            log.flush()
        cmd = [sys.executable, "-m", "asyncrl.cli", *args]
        self.restart_at = None
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
    def __init__(self, cfg: Config, out_dir: Path, console: Optional[Console] = None, resume: bool = False):
        self.cfg = cfg
        self.out_dir = out_dir
        self.console = console or Console(stderr=True)
        config_file = str(out_dir / "config.yaml")
        logs = out_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.queue = Child("queue", ["queue", "serve", "--config", config_file], logs / "queue.log")
        learner_args = ["learner", "--config", config_file, "--no-queue", "--out", str(out_dir), *(["--resume"] if resume else [])]
        self.learner = Child("learner", learner_args, logs / "learner.log", restart_args=("--resume",))
        self.events_path = out_dir / "supervisor.jsonl"
        self.rollouts = [
            Child(f"rollout-{i}", ["rollout", "--config", config_file, "--index", str(i)], logs / f"rollout-{i}.log")
            for i in range(cfg.rollout.num_servers)
        ]
        self.children = [self.queue, self.learner, *self.rollouts]

    def run(self) -> int:
        terminated = []

        def on_sigterm(*_) -> None:
            terminated.append(True)
            raise KeyboardInterrupt()

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        code: Optional[int] = None
        try:
            for child in self.children:
                child.start()
            code = self._watch()
        except KeyboardInterrupt:
            self.console.print("[yellow]interrupted: stopping all children[/yellow]")
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
            try:
                clean = self._stop_all()
            finally:
                signal.signal(signal.SIGTERM, previous)
        if code is None:
            self.console.print(f"stopped; logs in {self.out_dir / 'logs'}")
            # SIGTERM is a requested stop: 0 when every child checkpointed or handed its work back
            # and exited 0. Ctrl-C keeps the shell's 130.
            code = 0 if terminated and clean else 130
        return code

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
                if self.learner.restart_at is None and self.learner.proc.poll() == 0:
                    return self._learner_done(last_record)
                for child in self.children:
                    if child.restart_at is not None:
                        if time.monotonic() >= child.restart_at:
                            child.start()
                        continue
                    # A rollout server exits 0 only when the queue told it the run is over; the
                    # learner may still be shutting down, and its exit decides the outcome.
                    rc = child.proc.poll()
                    if rc is not None and not (child in self.rollouts and rc == 0) and not self._schedule_restart(child):
                        return self._child_died(child)
                time.sleep(0.25)

    def _schedule_restart(self, child: Child) -> bool:
        """Plan a restart of a crashed child after its back-off; False when it must not be restarted."""
        run = self.cfg.run
        rc = child.proc.returncode
        if child.restarts >= run.max_restarts:
            return False
        if rc > 0 and time.monotonic() - child.first_start < run.min_uptime_s:
            return False  # failed at once: a setup error that a restart would only repeat
        delay = min(run.restart_backoff_max_s, run.restart_backoff_s * 2**child.restarts)
        child.restarts += 1
        child.restart_at = time.monotonic() + delay
        self.console.print(
            f"[yellow]child {child.name} {child.describe_exit()}; restarting it in {delay:.1f} s "
            f"(restart {child.restarts} of {run.max_restarts})[/yellow]",
            highlight=False,
        )
        with open(self.events_path, "a") as f:
            f.write(json.dumps({"event": "restart", "child": child.name, "exit": child.describe_exit(),
                                "restart": child.restarts, "delay_s": delay, "time": time.time()}) + "\n")
        return True

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

    def _stop_all(self, grace_s: float = 10.0) -> bool:
        """Stop every child; True when each that was running exited 0 (a clean, requested stop)."""
        clean = True
        # Rollouts first (they stop producing), then the learner, then the queue that serves both.
        for group in (self.rollouts, [self.learner], [self.queue]):
            running = [c for c in group if c.proc is not None and c.proc.poll() is None]
            for c in running:
                c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for c in running:
                try:
                    # Killed by our SIGTERM itself: it was still starting (no handler yet), holding no work.
                    clean &= c.proc.wait(timeout=max(0.1, deadline - time.monotonic())) in (0, -signal.SIGTERM)
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()
                    clean = False
        return clean


def _bar_fields(records: list[dict]) -> dict:
    tail = records[-10:]
    reward = sum(r.get("reward_mean", 0.0) for r in tail) / len(tail)
    last = records[-1]
    return {
        "reward": f"{reward:.3f}",
        "staleness": f"{last.get('staleness_mean', 0):.2f}/{last.get('staleness_max', 0)}",
        "speed": f"{last.get('samples_per_s', 0):.0f} samples/s",
    }
