"""Weight updates inside an engine: interrupting and resuming generation with exact per-token
versions, pausing that always lets go, and the staleness gate. Real tiny models."""

from __future__ import annotations

import threading

import pytest
import torch

from asyncrl.config import ModelConfig
from asyncrl.modeling import build_model
from asyncrl.rollout.engine import SamplingParams, TorchEngine
from asyncrl.rollout.sampling import sampling_log_probs
from asyncrl.weights.staleness import StalenessGate

EOS, PAD = 1, 0
PROMPTS = [[5, 9, 12, 7], [17, 4], [11, 25, 6, 2, 19]]
PARAMS = SamplingParams(n=3, temperature=1.0, max_new_tokens=10)


def after_steps(count: int):
    """An interrupt that fires after `count` decode steps."""
    calls = []

    def interrupt() -> bool:
        calls.append(1)
        return len(calls) >= count

    return interrupt


@torch.no_grad()
def logprobs_under(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    return sampling_log_probs(logits, PARAMS).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_an_interrupted_generation_resumes_with_exact_per_token_versions():
    engine = TorchEngine(build_model(ModelConfig(init_seed=0)), EOS, PAD)
    old = build_model(ModelConfig(init_seed=0))
    new = build_model(ModelConfig(init_seed=1))
    gen = torch.Generator().manual_seed(0)
    partial = engine.generate_versioned(PROMPTS, PARAMS, gen, interrupt=after_steps(3))
    aborted = [c for group in partial for c in group if c.finish_reason == "abort"]
    assert aborted and all(len(c.tokens) == 3 and c.versions == [0, 0, 0] for c in aborted)

    with engine.paused():
        engine.load_weights(new.state_dict(), version=1)
    done = engine.generate_versioned(PROMPTS, PARAMS, gen, partials=partial)

    resumed = 0
    for prompt, before, after in zip(PROMPTS, partial, done):
        for b, c in zip(before, after):
            assert c.finish_reason in ("stop", "length") and c.tokens[: len(b.tokens)] == b.tokens
            assert len(c.versions) == len(c.tokens) == len(c.logprobs)
            if b.finish_reason != "abort":
                assert c == b  # finished before the update: passed through untouched
                continue
            resumed += 1
            assert c.versions == [0] * 3 + [1] * (len(c.tokens) - 3)
            # each token's behaviour log-prob is that of the weights that sampled it
            want = torch.cat([logprobs_under(old, prompt, c.tokens)[:3], logprobs_under(new, prompt, c.tokens)[3:]])
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=0)
    assert resumed == len(aborted)


def test_generation_without_an_interrupt_tags_every_token_with_the_engine_version():
    engine = TorchEngine(build_model(ModelConfig(init_seed=0)), EOS, PAD)
    engine.version = 4
    out = engine.generate_versioned(PROMPTS, PARAMS, torch.Generator().manual_seed(1))
    assert all(c.versions == [4] * len(c.tokens) and c.finish_reason != "abort" for group in out for c in group)


def test_an_exception_inside_paused_leaves_the_engine_unpaused_and_usable():
    engine = TorchEngine(build_model(ModelConfig(init_seed=0)), EOS, PAD)
    with pytest.raises(KeyError):
        with engine.paused():
            engine.load_weights({"nonsense": torch.zeros(1)}, version=1)
    assert not engine.is_paused and engine.version == 0
    finished = threading.Event()
    worker = threading.Thread(target=lambda: (engine.generate(PROMPTS, PARAMS), finished.set()))
    worker.start()
    worker.join(timeout=30)
    assert finished.is_set()


def test_generation_waits_while_the_engine_is_paused():
    engine = TorchEngine(build_model(ModelConfig(init_seed=0)), EOS, PAD)
    finished = threading.Event()
    with engine.paused():
        worker = threading.Thread(target=lambda: (engine.generate(PROMPTS, PARAMS), finished.set()))
        worker.start()
        assert not finished.wait(0.3)
    worker.join(timeout=30)
    assert finished.is_set()


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_engine_more_than_k_versions_behind_stops_admitting_until_it_catches_up():
    clock = FakeClock()
    gate = StalenessGate(max_lag=2, clock=clock)
    assert gate.admits(engine_version=3, learner_version=5)
    assert not gate.admits(engine_version=3, learner_version=6)
    assert gate.metrics()["weights_lag"] == 3
    clock.now = 1.5
    assert not gate.admits(engine_version=3, learner_version=6)
    clock.now = 2.0
    assert gate.admits(engine_version=6, learner_version=6)
    assert gate.metrics() == {"weights_lag": 0.0, "gate_wait_s": 2.0, "gate_waits": 1.0}


def test_with_k_zero_the_gate_admits_only_the_learners_newest_version():
    gate = StalenessGate(max_lag=0)
    assert not gate.admits(engine_version=4, learner_version=5)
    assert gate.admits(engine_version=5, learner_version=5)
