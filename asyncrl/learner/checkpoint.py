"""Learner checkpoints: model, optimizer, policy version, and where the learner stands with the queue.

The queue has no offsets, only leases: a step's groups stay in the queue, leased, until the
learner acknowledges them. A checkpoint therefore makes acknowledgement wait for it. The
trainer keeps the leases of every step since the last checkpoint unacknowledged, writes the
checkpoint with those lease ids and their group ids in it, and only then acknowledges them. So:

- a learner killed before a checkpoint is durable lost nothing: those leases expire and the
  queue delivers their groups again, to be trained by the resumed learner, whose weights never
  saw them;
- a learner killed after the checkpoint but before (all) its acks resumes by acknowledging the
  recorded leases again, and skips any recorded group that the queue delivers again because
  its lease expired first. No group's training lands in the weights twice (contract 4).

Layout: <out>/checkpoints/step-<version>/ holding meta.json (written last: a directory without
it is incomplete and ignored) and the backend's own files. A checkpoint is written under a
temporary name and renamed whole. Every rank calls save/load (the backend's part is collective);
only rank 0 writes meta.json and renames. Must never import rollout code or talk to the queue.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from asyncrl.learner.distributed import Ranks

META = "meta.json"
PREFIX = "step-"
FORMAT = 1


@dataclass
class CheckpointMeta:
    version: int
    """Policy version the weights are: the next step trains holding it."""
    leases: list[int] = field(default_factory=list)
    """Queue leases of steps included in these weights and not yet acknowledged when saved."""
    group_ids: list[str] = field(default_factory=list)
    """Groups of those leases: trained into these weights, never to be trained again."""
    backend: str = "torch"
    format: int = FORMAT


def checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def _complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under root, or None."""
    found = _complete(root)
    return found[-1] if found else None


def _barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        torch.distributed.barrier()


def save_checkpoint(root: Path, backend, meta: CheckpointMeta, ranks: Ranks, keep: int = 2) -> Path:
    """Write a complete checkpoint of `backend` at meta.version; keep the newest `keep`. Collective."""
    final = root / f"{PREFIX}{meta.version:08d}"
    tmp = root / f".{final.name}.tmp"
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(ranks)
    backend.save(tmp)
    _barrier(ranks)
    if ranks.is_main:
        (tmp / META).write_text(json.dumps(asdict(meta)))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in _complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(ranks)
    return final


def read_meta(path: Path) -> CheckpointMeta:
    try:
        data = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {str(path)!r} has no readable {META} ({exc}); it is incomplete, remove it") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} has format {data.get('format')!r}, this asyncrl reads format {FORMAT}")
    return CheckpointMeta(**data)


def load_checkpoint(path: Path, backend, backend_name: str) -> CheckpointMeta:
    """Restore `backend` from the checkpoint at path; returns its meta. Collective."""
    meta = read_meta(path)
    if meta.backend != backend_name:
        raise ValueError(
            f"checkpoint {str(path)!r} was written by learner.backend={meta.backend!r}, "
            f"but this learner runs {backend_name!r}; resume with learner.backend={meta.backend}"
        )
    backend.load(path)
    return meta
