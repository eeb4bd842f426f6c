"""The one entry point, `asyncrl`: run, learner, rollout, queue, config-doc.

Parses arguments (click) and the config, then hands over to the part that does the work. Every
long-running command stops cleanly on SIGINT/SIGTERM. Must never hold logic of its own beyond
wiring.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import click

from asyncrl.config import Config, ConfigError, config_reference, dump_config, load_config


class StopFlag:
    """Set by SIGINT/SIGTERM; long loops poll it and wind down."""

    def __init__(self) -> None:
        self._event = threading.Event()
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, signum, frame) -> None:
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def _load(path: Optional[str], overrides: tuple[str, ...], out: Optional[str] = None) -> Config:
    try:
        cfg = load_config(path, list(overrides))
        if out is not None:
            cfg.out = out
        return cfg
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


config_option = click.option("--config", "config_path", type=click.Path(), default=None, help="YAML config file.")
overrides_arg = click.argument("overrides", nargs=-1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """asyncrl: fully asynchronous, off-policy RL for language models."""
    from asyncrl.allocator import keep_freed_memory

    keep_freed_memory()  # large arrays come and go in every command: reuse their pages (allocator.py)


@main.command()
@click.argument("config_path", type=click.Path())
@overrides_arg
@click.option("--out", default=None, help="Output directory (default runs/<run_name>).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its newest checkpoint (learner.checkpoint_every > 0).")
def run(config_path: str, overrides: tuple[str, ...], out: Optional[str], resume: bool) -> None:
    """Start the queue, one learner and N rollout servers on this machine, under supervision."""
    from asyncrl.supervisor import Supervisor

    cfg = _load(config_path, overrides, out)
    out_dir = Path(cfg.out or f"runs/{cfg.run_name}")
    cfg.out = str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists() and not resume:
        metrics.unlink()  # a new run starts a new record; --out a fresh directory to keep old ones
    dump_config(cfg, out_dir / "config.yaml")
    sys.exit(Supervisor(cfg, out_dir, resume=resume).run())


@main.command()
@config_option
@overrides_arg
@click.option("--out", default=None, help="Output directory: metrics.jsonl, checkpoints/, trained_groups.jsonl.")
@click.option("--queue/--no-queue", "serve_queue", default=True, help="Serve the transfer queue inside this process.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint under <out>/checkpoints.")
def learner(config_path: Optional[str], overrides: tuple[str, ...], out: Optional[str], serve_queue: bool, resume: bool) -> None:
    """Train on groups from the queue and publish weight versions.

    Several ranks (learner.backend=deepspeed): start it under torchrun or the deepspeed launcher;
    rank 0 serves the queue (unless --no-queue), takes batches and publishes weights.
    """
    _setup_logging()
    cfg = _load(config_path, overrides, out)
    stop = StopFlag()
    from asyncrl.learner.distributed import Ranks

    ranks = Ranks.from_env()
    queue_thread = None
    if serve_queue and ranks.is_main:
        queue_thread = threading.Thread(target=_serve_queue, args=(cfg, stop, 10.0), name="queue", daemon=True)
        queue_thread.start()
    from asyncrl.learner.trainer import Learner

    out_dir = Path(cfg.out) if cfg.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Learner(cfg, out_dir, resume=resume)
    try:
        version = trainer.run(stop)
        logging.getLogger("asyncrl.learner").info("stopped at policy version %d", version)
        if queue_thread is not None:
            # The queue closes when training ends and lingers until the rollout servers have
            # heard; weights stay served meanwhile, so no rollout server waits on a dead socket.
            queue_thread.join(timeout=15)
    finally:
        trainer.close()
    if ranks.distributed:
        import os

        import torch.distributed

        # DeepSpeed's ZeRO-3 hooks can abort the interpreter's normal shutdown; leave directly.
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@main.command()
@config_option
@overrides_arg
@click.option("--index", default=0, show_default=True, help="Server index: sets its id and seed.")
def rollout(config_path: Optional[str], overrides: tuple[str, ...], index: int) -> None:
    """Generate trajectory groups with the newest weights and send them to the queue."""
    _setup_logging()
    cfg = _load(config_path, overrides)
    stop = StopFlag()
    from asyncrl.rollout.server import RolloutServer

    server = RolloutServer(cfg, index)
    try:
        sent = server.run(stop)
        logging.getLogger("asyncrl.rollout").info("%s stopped after %d groups; settlement %s", server.engine_id, sent,
                                                  json.dumps(server.settlement()))
    finally:
        server.close()


@main.group()
def queue() -> None:
    """The transfer queue."""


def _serve_queue(cfg: Config, stop, linger_s: float = 0.0) -> None:
    """Serve until `stop()`; with `linger_s`, also stop once the queue is closed and producers have
    gone quiet (1 s without a request, at most linger_s), so that each sees the close and exits."""
    from asyncrl.queue.server import QueueServer, QueueSettings

    settings = QueueSettings(
        max_staleness=cfg.max_staleness,
        groups_per_step=cfg.learner.groups_per_step,
        capacity_groups=cfg.queue.capacity_groups,
        capacity_bytes=cfg.queue.capacity_bytes,
        max_message_bytes=cfg.queue.max_message_bytes,
        vocab_size=cfg.model.vocab_size if cfg.model.path is None else None,
        lease_s=cfg.queue.lease_s,
        ticket_lease_s=cfg.queue.ticket_lease_s,
        seen_capacity=cfg.queue.seen_capacity,
        resend_window_s=cfg.queue.resend_window_s,
        max_batch_groups=cfg.queue.max_batch_groups,
        shm_dir=cfg.queue.shm_dir,
    )
    from asyncrl.security import curve_for

    server = QueueServer(cfg.queue.address, settings, curve=curve_for(cfg.security, "queue"))
    mirror = None
    if cfg.replay.redis_url:
        from asyncrl.replay.process import MirrorProcess

        mirror = MirrorProcess.from_config(cfg, learner_version=lambda: server.learner_version)
        server.observers.append(mirror)
    logging.getLogger("asyncrl.queue").info("serving on %s", server.address)
    closed_at: list[float] = []

    def should_stop() -> bool:
        if stop():
            return True
        if not (linger_s and server.closed):
            return False
        now = time.monotonic()
        closed_at[:1] = closed_at[:1] or [now]
        return now - server.last_request > 1.0 or now - closed_at[0] > linger_s

    try:
        server.serve(should_stop)
    finally:
        logging.getLogger("asyncrl.queue").info("final stats %s", json.dumps(server.snapshot()))
        server.close()
        if mirror is not None:
            # After server.close(), whose shutdown drops are mirrored too; bounded, so that a hung
            # Redis cannot hold up the end of a run (what is not written by then counts as lost).
            logging.getLogger("asyncrl.replay").info("mirror stats %s", json.dumps(mirror.close(timeout_s=3.0)))


@queue.command("serve")
@config_option
@overrides_arg
def queue_serve(config_path: Optional[str], overrides: tuple[str, ...]) -> None:
    """Run the transfer queue server."""
    _setup_logging()
    cfg = _load(config_path, overrides)
    _serve_queue(cfg, StopFlag())


@queue.command("stats")
@config_option
@overrides_arg
@click.option("--json", "as_json", is_flag=True, help="Print raw JSON.")
def queue_stats(config_path: Optional[str], overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the queue's counters."""
    from asyncrl.queue.client import QueueConsumer, QueueTimeout

    cfg = _load(config_path, overrides)
    from asyncrl.security import curve_for

    client = QueueConsumer(cfg.queue.address, name="stats", timeout_s=5.0, retries=0, curve=curve_for(cfg.security, "learner"))
    try:
        stats = client.stats()
    except QueueTimeout as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    def counts(d: dict) -> str:
        return ", ".join(f"{k}: {v}" for k, v in d.items()) or "-"

    table = Table(title=f"transfer queue at {cfg.queue.address}", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value")
    mib = 1 << 20
    table.add_row("depth / leased", f"{stats['depth']} ready, {stats['leased']} leased (capacity {stats.get('capacity_groups', '?')})")
    table.add_row("bytes held", f"{stats['bytes_held'] / mib:.1f} MiB of {stats.get('capacity_bytes', 0) / mib:.0f} MiB")
    table.add_row("accepted", f"{stats['accepted']} ({stats['duplicates']} duplicates, {stats['waits']} told to wait)")
    table.add_row("delivered / acknowledged", f"{stats['delivered']} / {stats['acknowledged']} ({stats['redelivered']} redelivered, "
                  f"{stats.get('already_trained', 0)} resent but already trained)")
    table.add_row("dropped", counts(stats["dropped"]))
    table.add_row("rejected", counts(stats["rejected"]))
    table.add_row("staleness of trained groups", counts(stats["staleness"]))
    balanced = stats.get("balanced")
    table.add_row("accounting", "[green]balanced[/green]" if balanced else "[red]UNBALANCED: accepted != acknowledged + already trained + dropped + held[/red]")
    table.add_row("learner version", str(stats["learner_version"]))
    table.add_row("tickets", f"{stats['tickets_running']} running, {stats.get('tickets_expired', 0)} expired; held {counts(stats.get('tickets_held', {}))}")
    table.add_row("closed", str(stats["closed"]))
    table.add_row("instance", str(stats.get("instance", "?")))
    Console().print(table)


@main.command()
@click.argument("keys_dir", type=click.Path())
@click.option("--force", is_flag=True, help="Replace keys already in KEYS_DIR (every peer then needs the new ones).")
def keys(keys_dir: str, force: bool) -> None:
    """Make CurveZMQ key pairs for the queue, the learner and rollout servers in KEYS_DIR.

    Then run with security.curve=true security.keys_dir=KEYS_DIR; see docs/security.md for which
    files each host needs."""
    from asyncrl.security import SecurityError, create_keys

    try:
        made = create_keys(Path(keys_dir), force=force)
    except SecurityError as exc:
        raise click.ClickException(str(exc)) from None
    for role, public in made.items():
        click.echo(f"{role}: {public} (secret: {public}_secret)")
    click.echo(f"authorized peers: {Path(keys_dir) / 'authorized'}")


@main.command("config-doc")
def config_doc() -> None:
    """Print the config reference (docs/config.md) generated from the config classes."""
    click.echo(config_reference())


from asyncrl.replay.cli import replay  # noqa: E402  (registered last: it adds a subcommand to `main`)

main.add_command(replay)

from asyncrl.experiments.cli import sweep  # noqa: E402

main.add_command(sweep)


if __name__ == "__main__":
    main()
