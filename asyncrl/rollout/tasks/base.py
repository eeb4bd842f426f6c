"""The task contract: what a rollout server asks of a source of prompts and rewards.

Owns `Prompt` and the `Task` protocol only. A task samples prompts from the random generator it
is handed (so a seed fixes the prompt order) and scores a response with a reward in [0, 1]. It
must never generate, hold model weights, or keep hidden random state of its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from asyncrl.rollout.tasks.tokenizer import Tokenizer


@dataclass
class Prompt:
    """One prompt as the model sees it, with what a correct answer looks like."""

    tokens: list[int]
    """Prompt token ids fed to the model."""
    text: str
    """Human-readable prompt."""
    reference: str
    """Reference answer."""


class Task(Protocol):
    name: str
    tokenizer: Tokenizer

    def sample_prompt(self, rng: random.Random) -> Prompt:
        """Draw one prompt using only `rng`."""
        ...

    def reward(self, prompt: Prompt, response_tokens: list[int]) -> float:
        """Score a response in [0, 1]; `response_tokens` may end with the end-of-sequence token."""
        ...
