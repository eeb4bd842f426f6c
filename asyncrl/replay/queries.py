"""What `asyncrl replay` computes from the stored groups: filters, statistics, export rows, feeding.

Pure of presentation (cli.py prints) and of the key layout (store.py reads). `feed` is the one
query that writes anywhere else: it hands stored groups to a learner's queue through the normal
producer path. Must never write to Redis.
"""

from __future__ import annotations

import statistics
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from asyncrl.protocol import TrajectoryGroup
from asyncrl.replay.store import ArraysNotKept, ReplayStore


@dataclass
class Filter:
    """Which stored groups a query sees; None means no bound."""

    min_version: Optional[int] = None
    max_version: Optional[int] = None
    min_staleness: Optional[int] = None
    max_staleness: Optional[int] = None
    min_reward: Optional[float] = None
    max_reward: Optional[float] = None
    task: Optional[str] = None
    engine: Optional[str] = None
    status: Optional[str] = None
    reason: Optional[str] = None

    def keeps(self, s: dict) -> bool:
        if not (_within(s.get("version"), self.min_version, self.max_version)
                and _within(s.get("staleness"), self.min_staleness, self.max_staleness)
                and _within(s.get("reward"), self.min_reward, self.max_reward)):
            return False
        if self.task is not None and s.get("task") != self.task:
            return False
        if self.engine is not None and s.get("engine") != self.engine:
            return False
        if self.status is not None and s.get("status") != self.status:
            return False
        return self.reason is None or s.get("reason") == self.reason


def _within(value, low, high) -> bool:
    """`value` is within the bounds given (None: unbounded); a missing value is within none."""
    if low is None and high is None:
        return True
    return value is not None and (low is None or value >= low) and (high is None or value <= high)


def select(store: ReplayStore, run: str, flt: Filter, limit: Optional[int] = None) -> list[dict]:
    """Summaries of the matching groups in arrival order; with `limit`, the newest `limit` of them."""
    rows = [s for s in store.summaries(run, store.group_ids(run)) if flt.keeps(s)]
    return rows[-limit:] if limit else rows


def _describe(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {
        "count": len(values),
        "mean": statistics.fmean(values),
        "min": ordered[0],
        "p50": ordered[len(ordered) // 2],
        "p90": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))],
        "max": ordered[-1],
    }


def run_stats(store: ReplayStore, run: str, flt: Filter = Filter()) -> dict:
    """Staleness histogram, reward by version and lengths over the stored groups; drop and reject
    counts over the run's whole life (they survive retention)."""
    rows = select(store, run, flt)
    accepted = [r for r in rows if r["status"] == "accepted"]
    staleness = Counter(r["staleness"] for r in accepted if r["staleness"] is not None)
    by_version: dict[int, list[float]] = defaultdict(list)
    for r in accepted:
        by_version[r["version"]].append(r["reward"])
    lengths = [float(n) for r in rows for n in r["lens"]]
    drops, rejects = store.counts(run)
    info = store.run_info(run)
    return {
        "run": run,
        "groups": len(rows),
        "accepted_stored": len(accepted),
        "staleness_at_arrival": {str(k): staleness[k] for k in sorted(staleness)},
        "reward_by_version": {
            str(v): {"groups": len(rs), "mean": statistics.fmean(rs), "min": min(rs), "max": max(rs)}
            for v, rs in sorted(by_version.items())
        },
        "response_length": _describe(lengths),
        "drops": drops,
        "rejects": rejects,
        "mirror_lost": info["lost"],
        "trimmed": info["trimmed"],
        "arrays_skipped": info["arrays_skipped"],
    }


def sample_rows(group: TrajectoryGroup, summary: dict, run: str, tokenizer=None) -> Iterator[dict]:
    """One flat row per sample, the export schema (docs/replay.md)."""
    prompt = [int(t) for t in group.prompt_tokens]
    prompt_text = tokenizer.decode(prompt) if tokenizer is not None else None
    for i, s in enumerate(group.samples):
        tokens = [int(t) for t in s.tokens]
        yield {
            "run": run,
            "group_id": group.group_id,
            "sample": i,
            "status": summary.get("status"),
            "reason": summary.get("reason"),
            "task": group.task,
            "engine": group.engine_id,
            "seed": group.seed,
            "reference": group.reference,
            "behaviour_version": s.behaviour_version,
            "learner_version": summary.get("learner_version"),
            "staleness": summary.get("staleness"),
            "reward": float(s.reward),
            "finish_reason": s.finish_reason,
            "prompt_tokens": prompt,
            "tokens": tokens,
            "behav_logprobs": [float(x) for x in s.behav_logprobs],
            "versions": [int(v) for v in s.versions],
            "prompt_text": prompt_text,
            "response_text": tokenizer.decode(tokens) if tokenizer is not None else None,
            "ts": summary.get("ts"),
        }


def rebase_versions(group: TrajectoryGroup, learner_version: int) -> TrajectoryGroup:
    """Shift every token's version so the group's newest token carries `learner_version`.

    Keeps the spread of versions inside the group (a sample generated across a weight swap stays
    so), clipped at 0; the behaviour log-probs are untouched, so the learner's importance
    correction still sees what really generated the tokens.
    """
    newest = max(int(s.versions.max()) for s in group.samples)
    shift = learner_version - newest
    for s in group.samples:
        s.versions = np.clip(s.versions.astype(np.int64) + shift, 0, None).astype(np.int32)
    return group


@dataclass
class FeedResult:
    sent: int = 0
    duplicates: int = 0
    skipped_future: int = 0
    skipped_no_arrays: int = 0


def feed(store: ReplayStore, run: str, summaries: list[dict], producer, versions: str = "rebase",
         new_ids: bool = False) -> FeedResult:
    """Put stored groups into a queue with `producer` (a QueueProducer), without tickets, in arrival order.

    versions='rebase' stamps each group with the learner's version at the moment it is sent (see
    `rebase_versions`); versions='keep' sends them as stored and skips groups newer than the
    learner, which the queue would reject as future_version.
    """
    if versions not in ("rebase", "keep"):
        raise ValueError(f"versions={versions!r}: use 'rebase' or 'keep'")
    result = FeedResult()
    producer.hello("producer")  # once: each hello starts a new arena for large groups
    for summary in summaries:
        try:
            group, _, _ = store.load_group(run, summary["id"])
        except ArraysNotKept:
            result.skipped_no_arrays += 1
            continue
        learner_version = int(producer.stats()["learner_version"])
        if versions == "rebase":
            rebase_versions(group, learner_version)
        elif max(int(s.versions.max()) for s in group.samples) > learner_version:
            result.skipped_future += 1
            continue
        if new_ids:
            group.group_id = uuid.uuid4().hex
        if producer.put(group, ticketed=False) == "duplicate":
            result.duplicates += 1
        else:
            result.sent += 1
    return result
