"""`asyncrl replay`: inspect, export, feed and delete what the Redis mirror stored.

Only argument parsing and printing live here (rich tables, or JSON with --json); the queries are
in queries.py and store.py. Redis, rich and pyarrow are imported inside the commands, so that
`asyncrl --help` works without the optional extras. Must never write to Redis except `rm`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime
from typing import Optional

import click

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def _store(ctx: click.Context):
    from asyncrl.replay.store import ReplayError, ReplayStore

    try:
        return ReplayStore.open(ctx.obj["url"])
    except ReplayError as exc:
        raise click.ClickException(str(exc)) from None


def _run(store, run: Optional[str]) -> str:
    from asyncrl.replay.store import ReplayError

    try:
        return store.resolve_run(run)
    except ReplayError as exc:
        raise click.ClickException(str(exc)) from None


def _console():
    from rich.console import Console

    # A pipe or a test runner has no width; wide enough that ids are never cut.
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)


def _when(ts: Optional[float]) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(title: str, columns: list[str], rows: list[list]):
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[str(v) for v in row])
    return table


def filter_options(fn):
    """The group filters shared by ls, stats, export and feed."""
    opts = [
        click.option("--run", default=None, help="Run name (default: the only stored run)."),
        click.option("--min-version", type=int, default=None, help="Oldest behaviour version."),
        click.option("--max-version", type=int, default=None, help="Newest behaviour version."),
        click.option("--min-staleness", type=int, default=None, help="Least staleness at arrival (dropped groups: at the drop)."),
        click.option("--max-staleness", type=int, default=None, help="Most staleness at arrival (dropped groups: at the drop)."),
        click.option("--min-reward", type=float, default=None, help="Least mean reward of the group."),
        click.option("--max-reward", type=float, default=None, help="Most mean reward of the group."),
        click.option("--task", default=None, help="Only groups of this task."),
        click.option("--engine", default=None, help="Only groups from this engine id."),
        click.option("--status", type=click.Choice(["accepted", "dropped"]), default=None, help="Only accepted or dropped groups."),
        click.option("--reason", default=None, help="Only groups dropped for this reason (e.g. stale)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _filter(kw: dict):
    from asyncrl.replay.queries import Filter

    return Filter(**{k: kw.pop(k) for k in list(kw) if k in Filter.__dataclass_fields__})


def _tokenizer(store, run: str):
    """(tokenizer, None) built from the run's stored config, or (None, why not)."""
    from asyncrl.config import TaskConfig
    from asyncrl.rollout.tasks import build_task

    cfg = store.run_config(run)
    if cfg is None:
        return None, f"run {run!r} has no stored config"
    try:
        task = build_task(TaskConfig.model_validate(cfg.get("task", {})), (cfg.get("model") or {}).get("path"))
    except Exception as exc:  # a stored config from another version or a model path not on this machine
        return None, f"cannot build the run's tokenizer here ({exc})"
    return task.tokenizer, None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="ASYNCRL_REPLAY_URL", default=DEFAULT_URL, show_default=True,
              help="Redis URL (redis://user:pass@host:port/db, rediss:// for TLS); env ASYNCRL_REPLAY_URL.")
@click.pass_context
def replay(ctx: click.Context, url: str) -> None:
    """Inspect what the Redis mirror (replay.redis_url) stored: runs, groups, statistics."""
    ctx.ensure_object(dict)["url"] = url


@replay.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def runs(ctx: click.Context, as_json: bool) -> None:
    """The runs stored, with their size and time span."""
    store = _store(ctx)
    infos = [store.run_info(name) for name in store.runs()]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    rows = [[i["run"], i["groups"], i["events"], _size(i["bytes"]), _when(i["first_ts"]), _when(i["last_ts"]),
             f"{max(0.0, i['last_ts'] - i['first_ts']):.0f} s", i["accepted"], i["dropped"], i["rejected"], i["lost"],
             i["task"]] for i in infos]
    _console().print(_table("runs", ["run", "groups", "events", "size", "first", "last", "span", "accepted", "dropped",
                                     "rejected", "lost", "task"], rows))


@replay.command("ls")
@filter_options
@click.option("--limit", type=int, default=50, show_default=True, help="Show the newest this many (0: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def ls_(ctx: click.Context, run: Optional[str], limit: int, as_json: bool, **kw) -> None:
    """Groups, filtered by version, staleness, reward, task, engine or drop reason."""
    from asyncrl.replay.queries import select

    store = _store(ctx)
    run = _run(store, run)
    rows = select(store, run, _filter(kw), limit or None)
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    table = [[r["id"], r["seq"], r["status"] + (f" ({r['reason']})" if r["reason"] else ""), r["version"],
              r["staleness"], f"{r['reward']:.3f}", r["samples"], r["tokens"], r["task"], r["engine"], _when(r["ts"])]
             for r in rows]
    _console().print(_table(f"run {run}: {len(rows)} groups", ["id", "seq", "status", "version", "staleness", "reward",
                                                                  "samples", "tokens", "task", "engine", "arrived"], table))


@replay.command()
@click.argument("group_id")
@click.option("--run", default=None, help="Run name (default: search every run).")
@click.option("--tokens/--no-tokens", default=True, help="Print the per-token table.")
@click.pass_context
def show(ctx: click.Context, group_id: str, run: Optional[str], tokens: bool) -> None:
    """One group: decoded text, per-token log-probs, versions, importance weights where known.

    GROUP_ID may be a unique prefix. The queue never sees the learner's proximal log-probs, so
    importance weights are printed only for groups whose hash holds frame.prox_logprobs.
    """
    import numpy as np

    from asyncrl.replay.store import ArraysNotKept, ReplayError

    store = _store(ctx)
    try:
        run, group_id = store.find_group(group_id, run)
        group, summary, prox = store.load_group(run, group_id)
    except ArraysNotKept as exc:
        _show_summary(exc.summary, run)
        _console().print(f"[yellow]{exc}[/yellow]")
        return
    except ReplayError as exc:
        raise click.ClickException(str(exc)) from None
    tok, why = _tokenizer(store, run)
    decode = tok.decode if tok is not None else (lambda ids: " ".join(str(int(i)) for i in ids))
    con = _console()
    con.print(f"[bold]group {group.group_id}[/bold]  run {run}  {summary.get('status')}"
              + (f" ({summary['reason']})" if summary.get("reason") else ""))
    con.print(f"task {group.task}  engine {group.engine_id}  seed {group.seed}  behaviour version {group.behaviour_version}"
              f"  learner version at arrival {summary.get('learner_version')}  staleness {summary.get('staleness')}")
    if why:
        con.print(f"[yellow]token ids only: {why}[/yellow]")
    con.print(f"prompt: {decode(group.prompt_tokens)!r}   reference: {group.reference!r}", markup=False)
    weights = None
    if prox is not None:
        behav = np.concatenate([s.behav_logprobs for s in group.samples])
        weights = np.exp(np.frombuffer(prox, dtype="<f4") - behav)
    offset = 0
    for i, s in enumerate(group.samples):
        con.print(f"\n[bold]sample {i}[/bold]  reward {s.reward:.4f}  finish {s.finish_reason}  {len(s.tokens)} tokens")
        con.print(f"response: {decode(s.tokens)!r}", markup=False)
        if tokens:
            rows = []
            for j, (t, lp, v) in enumerate(zip(s.tokens, s.behav_logprobs, s.versions)):
                iw = f"{weights[offset + j]:.4f}" if weights is not None else "-"
                text = tok.decode([int(t)]) if tok is not None else ""
                rows.append([j, int(t), repr(text), f"{lp:.4f}", f"{math.exp(lp):.4f}", int(v), iw])
            con.print(_table("", ["pos", "token", "text", "behav_logprob", "prob", "version", "importance weight"], rows))
        offset += len(s.tokens)
    if weights is None:
        con.print("importance weights: unknown (the learner has not reported proximal log-probs for this group)")


def _show_summary(summary: dict, run: str) -> None:
    """What `show` prints of a group mirrored without its arrays."""
    con = _console()
    con.print(f"[bold]group {summary['id']}[/bold]  run {run}  {summary.get('status')}"
              + (f" ({summary['reason']})" if summary.get("reason") else ""))
    con.print(f"task {summary.get('task')}  engine {summary.get('engine')}  behaviour version {summary.get('version')}"
              f"  learner version at arrival {summary.get('learner_version')}  staleness {summary.get('staleness')}")
    con.print(f"{summary.get('samples')} samples, lengths {summary.get('lens')}, mean reward {summary.get('reward')}")


@replay.command()
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def stats(ctx: click.Context, run: Optional[str], as_json: bool, **kw) -> None:
    """Staleness histogram, reward by version, response lengths, drop and reject counts."""
    from asyncrl.replay.queries import run_stats

    store = _store(ctx)
    run = _run(store, run)
    result = run_stats(store, run, _filter(kw))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    con = _console()
    con.print(f"[bold]run {run}[/bold]: {result['groups']} stored groups, {result['mirror_lost']} mirror records lost, "
              f"{result['trimmed']} groups trimmed by retention, {result['arrays_skipped']} mirrored without their arrays")
    hist = result["staleness_at_arrival"]
    peak = max(hist.values(), default=1)
    con.print(_table("staleness at arrival (accepted groups)", ["staleness", "groups", ""],
                     [[k, v, "#" * max(1, round(30 * v / peak))] for k, v in hist.items()]))
    con.print(_table("reward by behaviour version", ["version", "groups", "mean", "min", "max"],
                     [[v, d["groups"], f"{d['mean']:.4f}", f"{d['min']:.4f}", f"{d['max']:.4f}"]
                      for v, d in result["reward_by_version"].items()]))
    ln = result["response_length"]
    con.print(_table("response length (tokens per sample)", list(ln), [[f"{x:.1f}" if isinstance(x, float) else x
                                                                        for x in ln.values()]]))
    con.print(_table("drops (whole run)", ["reason", "groups"], sorted(result["drops"].items())))
    con.print(_table("rejects (whole run)", ["code", "requests"], sorted(result["rejects"].items())))


def _event_line(eid: str, e: dict) -> str:
    ts = float(e.get("ts") or 0)
    if e.get("kind") == "reject":
        return f"{_when(ts)}  reject  {e.get('reason')}: {e.get('detail', '')}"
    reward = float(e.get("reward") or 0)
    reason = f"  ({e['reason']})" if e.get("reason") else ""
    return (f"{_when(ts)}  {e.get('kind'):<6}  {e.get('group')}  v{e.get('version')}  staleness {e.get('staleness')}"
            f"  reward {reward:.3f}  {e.get('samples')}x  {e.get('task')}  {e.get('engine')}{reason}")


@replay.command()
@click.option("--run", default=None, help="Run name (default: the only stored run).")
@click.option("-n", "lines", type=int, default=10, show_default=True, help="Show this many past events first.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events as the run writes them (Ctrl-C stops).")
@click.option("--count", type=int, default=0, help="With -f: stop after this many new events (0: never).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@click.pass_context
def tail(ctx: click.Context, run: Optional[str], lines: int, follow: bool, count: int, as_json: bool) -> None:
    """The run's latest events (accept, drop, reject); -f follows a live run."""
    store = _store(ctx)
    run = _run(store, run)

    def emit(eid: str, e: dict) -> None:
        click.echo(json.dumps({"id": eid, **e}) if as_json else _event_line(eid, e))

    past = list(reversed(store.events(run, count=lines, reverse=True))) if lines > 0 else []
    for eid, e in past:
        emit(eid, e)
    if not follow:
        return
    last = past[-1][0] if past else (store.events(run, count=1, reverse=True) or [("0-0", {})])[0][0]
    seen = 0
    try:
        while not count or seen < count:
            for eid, e in store.follow(run, last, block_ms=1000):
                emit(eid, e)
                last = eid
                seen += 1
                if count and seen >= count:
                    break
    except KeyboardInterrupt:
        pass


@replay.command()
@filter_options
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False), required=True, help="Output file (.jsonl or .parquet).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]), default=None,
              help="Output format (default: from the file name).")
@click.pass_context
def export(ctx: click.Context, run: Optional[str], out: str, fmt: Optional[str], **kw) -> None:
    """Write the matching groups, one row per sample, as jsonl or parquet."""
    from asyncrl.replay.queries import sample_rows, select
    from asyncrl.replay.store import ArraysNotKept, ReplayError

    fmt = fmt or ("parquet" if out.endswith(".parquet") else "jsonl")
    store = _store(ctx)
    run = _run(store, run)
    tok, _ = _tokenizer(store, run)
    rows, without_arrays = [], 0
    for summary in select(store, run, _filter(kw)):
        try:
            group, full, _ = store.load_group(run, summary["id"])
        except ArraysNotKept:
            without_arrays += 1
            continue
        except ReplayError:
            continue  # trimmed between listing and loading
        rows.extend(sample_rows(group, full, run, tok))
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise click.ClickException("parquet export needs pyarrow: pip install 'asyncrl[parquet]'") from None
        pq.write_table(pa.Table.from_pylist(rows), out)
    else:
        with open(out, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    click.echo(f"wrote {len(rows)} samples of run {run} to {out}"
               + (f"; {without_arrays} groups skipped, mirrored without their arrays (replay.array_mib_per_s)"
                  if without_arrays else ""))


@replay.command("feed")
@filter_options
@click.option("--address", default="tcp://127.0.0.1:5555", show_default=True, help="The learner's queue (queue.address).")
@click.option("--versions", type=click.Choice(["rebase", "keep"]), default="rebase", show_default=True,
              help="rebase: stamp groups with the learner's current version; keep: send as stored, skip future ones.")
@click.option("--new-ids", is_flag=True, help="Give every group a fresh id, so the same groups can be fed again.")
@click.option("--limit", type=int, default=0, help="Feed only the newest this many (0: all).")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for the queue per request.")
@click.pass_context
def feed_(ctx: click.Context, run: Optional[str], address: str, versions: str, new_ids: bool, limit: int,
          timeout: float, **kw) -> None:
    """Push stored groups into a learner through its queue, for offline re-training or debugging."""
    from asyncrl.queue.client import QueueProducer, QueueRequestError, QueueTimeout
    from asyncrl.replay.queries import feed, select

    store = _store(ctx)
    run = _run(store, run)
    summaries = select(store, run, _filter(kw), limit or None)
    producer = QueueProducer(address, "replay-feed", timeout_s=timeout, retries=1)
    started = time.monotonic()
    try:
        result = feed(store, run, summaries, producer, versions=versions, new_ids=new_ids)
    except (QueueTimeout, QueueRequestError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        producer.close()
    click.echo(f"fed {result.sent} groups of run {run} to {address} in {time.monotonic() - started:.1f} s "
               f"({result.duplicates} duplicates, {result.skipped_future} skipped as newer than the learner, "
               f"{result.skipped_no_arrays} skipped as mirrored without their arrays)")


@replay.command()
@click.argument("run")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def rm(ctx: click.Context, run: str, yes: bool) -> None:
    """Delete every key of RUN."""
    store = _store(ctx)
    if run not in store.runs():
        raise click.ClickException(f"run {run!r} is not stored; stored runs: {store.runs()}")
    if not yes:
        click.confirm(f"delete run {run!r} ({store.run_info(run)['groups']} groups)?", abort=True)
    deleted = store.delete_run(run)
    click.echo(f"deleted run {run} ({deleted} keys)")
