"""The learner's ranks: who they are, and how rank 0 hands each step's batch to the others.

Only rank 0 talks to the queue, publishes weights and writes metrics; it broadcasts every step's
groups to all ranks, each of which then trains on its own equal share of the samples. Groups
cross ranks in the queue's own wire format (msgpack header + raw array frames), never pickled
(contract 5). A single process with no launcher environment is rank 0 of 1 and needs no
process group. Must never import rollout code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from asyncrl.protocol import TrajectoryGroup
from asyncrl.queue.codec import GROUP_FRAMES, decode_group, encode_group

_STOP = -1


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "Ranks":
        """Read RANK / WORLD_SIZE / LOCAL_RANK as torchrun and the deepspeed launcher set them."""
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )


def rank_device(device: str, ranks: Ranks) -> str:
    """'cuda' becomes this rank's own GPU; anything else is used as given."""
    return f"cuda:{ranks.local_rank}" if device == "cuda" else device


def _comm_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo moves CPU ones.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_ints(values: list[int], src: int = 0) -> list[int]:
    tensor = torch.tensor(values, dtype=torch.int64, device=_comm_device())
    torch.distributed.broadcast(tensor, src)
    return tensor.tolist()


def broadcast_groups(groups: Optional[list[TrajectoryGroup]], ranks: Ranks) -> Optional[list[TrajectoryGroup]]:
    """Rank 0's groups on every rank; None (stop training) when rank 0 passes None.

    Every rank must call it once per step. Rank 0's argument is used; the others pass None.
    """
    if not ranks.distributed:
        return groups
    if ranks.is_main:
        frames = [] if groups is None else [bytes(f) for g in groups for f in encode_group(g)]
        header = [_STOP if groups is None else len(groups), *(len(f) for f in frames)]
        _broadcast_ints([len(header)])
        _broadcast_ints(header)
    else:
        size = _broadcast_ints([0])[0]
        header = _broadcast_ints([0] * size)
    count, lengths = header[0], header[1:]
    if count == _STOP:
        return None
    payload = torch.empty(sum(lengths), dtype=torch.uint8)
    if ranks.is_main:
        payload = torch.from_numpy(np.frombuffer(b"".join(frames), dtype=np.uint8).copy())
    payload = payload.to(_comm_device())
    torch.distributed.broadcast(payload, 0)
    payload = payload.cpu()
    if ranks.is_main:
        return groups
    raw = payload.numpy().tobytes()
    offsets = np.cumsum([0, *lengths])
    parts = [raw[offsets[i] : offsets[i + 1]] for i in range(len(lengths))]
    per = 1 + GROUP_FRAMES
    return [decode_group(parts[i * per : (i + 1) * per]) for i in range(count)]
