"""The shared message schema: trajectory groups and their samples.

This is where `learner/` and `rollout/` meet. A group is the unit of transfer (architecture
contract 3): every sample of one prompt, with the behaviour log-probs of exactly the distribution
sampled from and the policy version of every token. Arrays are numpy so the queue can move them as
raw frames; this module must never import torch or do I/O.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class Sample:
    """One response to a group's prompt."""

    tokens: np.ndarray
    """Response token ids, int32."""
    behav_logprobs: np.ndarray
    """Log-probability of each response token under the distribution it was sampled from, float32."""
    versions: np.ndarray
    """Policy version of the weights that produced each token, int32. A sample has at least one token."""
    reward: float
    finish_reason: str = "length"

    @property
    def behaviour_version(self) -> int:
        """The oldest version among the sample's tokens (contract 1)."""
        return int(self.versions.min())


@dataclass
class TrajectoryGroup:
    """All n samples of one prompt; GRPO needs them together."""

    group_id: str
    prompt_tokens: np.ndarray
    samples: list[Sample]
    task: str = ""
    engine_id: str = ""
    seed: int = 0
    reference: str = ""
    """Reference answer, kept for inspection."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def behaviour_version(self) -> int:
        return min(s.behaviour_version for s in self.samples)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_tokens) * len(self.samples) + sum(len(s.tokens) for s in self.samples)

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]


def new_group_id() -> str:
    """128 random bits as 32 hex digits (uuid4().hex without the version bits, at a quarter of its cost)."""
    return os.urandom(16).hex()
