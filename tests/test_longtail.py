"""The `longtail` built-in task: long-tailed answer lengths, partial credit, and an engine whose
cost follows the longest answer of a batch."""

from __future__ import annotations

import random
from collections import Counter

import torch

from asyncrl.config import ModelConfig, TaskConfig
from asyncrl.modeling import build_model
from asyncrl.rollout.engine import SamplingParams, TorchEngine
from asyncrl.rollout.tasks import CharTokenizer, build_task
from asyncrl.rollout.tasks.digits import LongTailTask

TOK = CharTokenizer()
EOS = TOK.eos_token_id


def counts(task: LongTailTask, draws: int = 20000, seed: int = 0) -> Counter:
    rng = random.Random(seed)
    return Counter(len(task.sample_prompt(rng).reference) for _ in range(draws))


def test_longtail_is_a_built_in_task_named_in_the_config():
    assert isinstance(build_task(TaskConfig(name="longtail", num_digits=12)), LongTailTask)


def test_prompt_states_the_digit_and_the_count_and_the_answer_repeats_the_digit():
    prompt = LongTailTask(16).sample_prompt(random.Random(3))
    digit, count = prompt.text.rstrip("=").split(" ")
    assert prompt.reference == digit * int(count)
    assert prompt.tokens == [TOK.bos_token_id, *TOK.encode(prompt.text)]


def test_counts_span_one_to_num_digits_and_nothing_else():
    assert set(counts(LongTailTask(16))) == set(range(1, 17))


def test_count_distribution_is_long_tailed_most_short_some_long():
    c = counts(LongTailTask(16))
    total = sum(c.values())
    assert c[1] / total > 0.3  # the typical answer is short
    assert sum(v for k, v in c.items() if k >= 12) / total > 0.03  # yet long ones keep coming
    mean = sum(k * v for k, v in c.items()) / total
    assert mean < 16 / 3  # far below the longest: a synchronous batch waits mostly for its tail
    assert all(c[k] >= c[k + 4] for k in range(1, 13))  # never rising, up to sampling noise across 4 counts


def test_same_seed_gives_the_same_prompts():
    task = LongTailTask(8)
    a, b = random.Random(7), random.Random(7)
    assert [task.sample_prompt(a).text for _ in range(20)] == [task.sample_prompt(b).text for _ in range(20)]


def test_reward_gives_partial_credit_per_position_and_for_the_stop():
    task = LongTailTask(16)
    prompt = LongTailTask(16).sample_prompt(random.Random(0))
    digit, count = prompt.reference[0], len(prompt.reference)
    exact = TOK.encode(digit * count) + [EOS]
    assert task.reward(prompt, exact) == 1.0
    assert task.reward(prompt, TOK.encode(digit * count)) == count / (count + 1)  # right digits, never stopped
    assert task.reward(prompt, [EOS]) == 0.0
    other = str((int(digit) + 1) % 10)
    assert task.reward(prompt, TOK.encode(other * count) + [EOS]) == 1 / (count + 1)  # only the stop is right


def test_engine_decode_steps_follow_the_longest_sample_of_the_batch():
    """The engine stops when every row has: a batch costs its longest answer, which is why a
    long-tailed length distribution makes synchronous steps wait."""
    model = build_model(ModelConfig(vocab_size=32))
    engine = TorchEngine(model, EOS, TOK.pad_token_id)
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        prompts = [[TOK.bos_token_id, *TOK.encode("7 3=")]]
        # Every token but the digits stops a row, so rows end early and at different lengths.
        stops = tuple(t for t in range(32) if t not in TOK.encode("0123456789"))
        results = engine.generate(prompts, SamplingParams(n=16, max_new_tokens=40, stop_tokens=stops), torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    lengths = [len(c.tokens) for c in results[0]]
    assert max(lengths) < 40
    assert len(forwards) == max(lengths)
