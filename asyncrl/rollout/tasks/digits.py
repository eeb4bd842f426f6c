"""Built-in verifiable digit tasks that a tiny random-init transformer learns by RL alone on a CPU.

Every prompt is BOS, k random digits and '=' (k = task.num_digits), in the fixed `CharTokenizer`
vocabulary; except `longtail`, whose prompt is a digit, a space, a count and '='. The rewards give
partial credit per correct position so that a random policy already sees a small, non-zero,
varying signal: GRPO learns nothing from a group whose rewards are all equal. A response counts up
to and including its first EOS; anything after an EOS is ignored, since the engine stops there.
This module must never read files or keep random state: prompts come only from the generator
handed in.
"""

from __future__ import annotations

import random
from itertools import accumulate

from asyncrl.rollout.tasks.base import Prompt
from asyncrl.rollout.tasks.tokenizer import CharTokenizer


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    """The response as the engine would have ended it: through its first EOS."""
    for i, tok in enumerate(tokens):
        if tok == eos:
            return list(tokens[: i + 1])
    return list(tokens)


def positional_reward(target: list[int], response: list[int], eos: int) -> float:
    """(positions i < len(target) with response[i] == target[i], + 1 if EOS follows at len(target)) / (len(target) + 1)."""
    response = _until_eos(response, eos)
    k = len(target)
    hits = sum(1 for i in range(min(k, len(response))) if response[i] == target[i])
    ends = 1 if len(response) > k and response[k] == eos else 0
    return (hits + ends) / (k + 1)


class DigitTask:
    """Shared prompt sampling of the digit tasks; subclasses say what the answer is."""

    name = ""

    def __init__(self, num_digits: int) -> None:
        if num_digits < 1:
            raise ValueError(f"task.num_digits = {num_digits}: a digit task needs at least 1 digit")
        self.num_digits = num_digits
        self.tokenizer = CharTokenizer()

    def answer(self, digits: str) -> str:
        raise NotImplementedError

    def sample_prompt(self, rng: random.Random) -> Prompt:
        digits = "".join(str(rng.randrange(10)) for _ in range(self.num_digits))
        text = digits + "="
        tokens = [self.tokenizer.bos_token_id, *self.tokenizer.encode(text)]
        return Prompt(tokens=tokens, text=text, reference=self.answer(digits))

    def reward(self, prompt: Prompt, response_tokens: list[int]) -> float:
        """`positional_reward` of the response against the reference's tokens followed by EOS."""
        target = self.tokenizer.encode(prompt.reference)
        return positional_reward(target, response_tokens, self.tokenizer.eos_token_id)


class RepeatTask(DigitTask):
    """'123=' -> '123' EOS. Reward: (correct digit positions + 1 if EOS right after) / (k + 1)."""

    name = "repeat"

    def answer(self, digits: str) -> str:
        return digits


class ReverseTask(DigitTask):
    """'123=' -> '321' EOS. Reward: (correct digit positions + 1 if EOS right after) / (k + 1)."""

    name = "reverse"

    def answer(self, digits: str) -> str:
        return digits[::-1]


class AddModTask(DigitTask):
    """'123=' -> '6' EOS: the digit sum mod 10. Reward: (1 if the first token is right + 1 if EOS follows it) / 2."""

    name = "add_mod"

    def answer(self, digits: str) -> str:
        return str(sum(int(d) for d in digits) % 10)


class LongTailTask(DigitTask):
    """'7 3=' -> '777' EOS: repeat digit d c times, with c long-tailed. Reward: `positional_reward` against c d's.

    The count c follows a truncated Zipf law, P(c) proportional to c^-ZIPF_EXPONENT over
    1..task.num_digits (here the longest count, not a prompt length): most answers are short, a few are
    as long as task.num_digits. Real reasoning tasks have this shape, and it is where asynchrony pays
    most: a synchronous step waits for its longest sample, since a generation batch ends only when all
    its rows have. Set sampling.max_new_tokens to at least task.num_digits + 1 so the longest answer
    and its EOS fit.
    """

    name = "longtail"
    ZIPF_EXPONENT = 1.2
    """Tail weight of the count law: smaller is a heavier tail. 1.2 gives c = 1 about a third of the time at num_digits 16."""

    def __init__(self, num_digits: int) -> None:
        super().__init__(num_digits)
        # Cumulative weights once, so that sampling costs one random draw and a bisection.
        self.count_cum_weights = list(accumulate(c ** -self.ZIPF_EXPONENT for c in range(1, num_digits + 1)))

    def sample_prompt(self, rng: random.Random) -> Prompt:
        digit = str(rng.randrange(10))
        count = rng.choices(range(1, self.num_digits + 1), cum_weights=self.count_cum_weights)[0]
        text = f"{digit} {count}="
        tokens = [self.tokenizer.bos_token_id, *self.tokenizer.encode(text)]
        return Prompt(tokens=tokens, text=text, reference=digit * count)


DIGIT_TASKS: dict[str, type[DigitTask]] = {t.name: t for t in (RepeatTask, ReverseTask, AddModTask, LongTailTask)}
