"""Specification of the continuous-batching engine (`rollout.engine: continuous`).

Real tiny models (random-init Qwen2 or Llama, vocab 32), as in test_engine.py, whose reference for a
behaviour log-prob is one plain full forward over prompt + response pushed through the same
filtering. `slots=5` is used where refill matters: it divides neither n nor the row count, so
groups wait for free slots and slots are refilled mid-batch.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from asyncrl.config import Config, ModelConfig
from asyncrl.modeling import build_model
from asyncrl.rollout.engine import SamplingParams, TorchEngine, VersionedCompletion
from asyncrl.rollout.engines import build_engine
from asyncrl.rollout.engines.continuous import ContinuousEngine
from asyncrl.rollout.tasks import build_task
from tests.test_engine import DEVICES, EOS, PAD, PROMPTS, assert_matches_reference, reference_logprobs, seeded


def make_engine(arch="qwen2", seed=0, eos=EOS, device="cpu", **kwargs) -> ContinuousEngine:
    return ContinuousEngine(build_model(ModelConfig(arch=arch, init_seed=seed)), eos, PAD, device=device, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("slots", [0, 5])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_full_forward_logprobs_of_the_filtered_distribution(arch, slots, temperature, device):
    engine = make_engine(arch, device=device, slots=slots)
    params = SamplingParams(n=4, temperature=temperature, top_k=12, top_p=0.9, max_new_tokens=8)
    results = engine.generate(PROMPTS, params, seeded(0, device))
    assert sum(len(c.tokens) for group in results for c in group) > 3 * len(PROMPTS) * params.n
    assert_matches_reference(engine, PROMPTS, results, params)


@pytest.mark.parametrize("slots", [0, 1, 5])
def test_greedy_completions_equal_the_torch_engines_in_prompt_and_sample_order(slots):
    params = SamplingParams(n=3, top_k=1, max_new_tokens=10, stop_tokens=(2, 3))
    expected = TorchEngine(build_model(ModelConfig()), EOS, PAD).generate(PROMPTS, params)
    assert make_engine(slots=slots).generate(PROMPTS, params) == expected


def test_a_finished_samples_slot_is_refilled_at_once():
    # One long and five one-token requests (budgets forced through partials) on two slots: the
    # short ones pass through the second slot while the long one decodes, so the whole call takes
    # as many steps as the long one. A static batch of two rows would take 11 + 1 + 1 = 13.
    engine = make_engine(eos=-1, slots=2)
    params = SamplingParams(n=1, max_new_tokens=12)
    prompts = [[5, 9, 12], [17, 4], [11, 25], [6, 2], [19, 8], [14, 30]]
    partials = [[VersionedCompletion([7] * used, [0.0] * used, [0] * used, "abort")] for used in (1, 11, 11, 11, 11, 11)]
    results = engine.generate_versioned(prompts, params, seeded(0), partials)
    assert [len(group[0].tokens) for group in results] == [12] * 6
    assert engine.stats["steps"] == 11


def test_a_long_tailed_mix_takes_fewer_steps_than_static_batches_of_the_same_size():
    engine = make_engine(slots=8)
    params = SamplingParams(n=4, max_new_tokens=24, stop_tokens=(2, 3, 4, 5))  # P(stop) ~ 5/32 per token
    prompts = [[3 + i, 7, 11 + i] for i in range(8)]
    results = engine.generate(prompts, params, seeded(1))
    lengths = [len(c.tokens) for group in results for c in group]
    static_steps = sum(max(lengths[i : i + 8]) for i in range(0, len(lengths), 8))
    assert max(lengths) > 3 * min(lengths)
    assert engine.stats["steps"] < static_steps
    assert_matches_reference(engine, prompts, results, params)


def test_the_samples_of_a_prompt_share_one_prefill_with_the_same_results():
    params = SamplingParams(n=4, temperature=0.8, max_new_tokens=8)
    # slots=n: both engines admit one prompt's samples at a time, so they draw random numbers in the same order
    shared, unshared = make_engine(slots=4), make_engine(slots=4, share_prefill=False)
    a, b = shared.generate(PROMPTS, params, seeded(3)), unshared.generate(PROMPTS, params, seeded(3))
    assert [[c.tokens for c in group] for group in a] == [[c.tokens for c in group] for group in b]
    for group_a, group_b in zip(a, b):
        for ca, cb in zip(group_a, group_b):
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5, rtol=0)
    prompt_tokens = sum(len(p) for p in PROMPTS)
    assert (shared.stats["prefill_tokens"], unshared.stats["prefill_tokens"]) == (prompt_tokens, 4 * prompt_tokens)


def test_stop_tokens_end_samples_with_reason_stop_and_others_run_to_max_new_tokens():
    engine = make_engine(slots=5)
    params = SamplingParams(n=16, max_new_tokens=10, stop_tokens=(2, 3))
    completions = [c for group in engine.generate(PROMPTS, params, seeded(5)) for c in group]
    assert {c.finish_reason for c in completions} == {"stop", "length"}
    for c in completions:
        body = c.tokens[:-1] if c.finish_reason == "stop" else c.tokens
        assert not {EOS, 2, 3} & set(body)
        assert c.tokens[-1] in {EOS, 2, 3} if c.finish_reason == "stop" else len(c.tokens) == 10


def test_same_seed_reproduces_identical_completions():
    engine = make_engine(slots=5)
    params = SamplingParams(n=4, temperature=0.9, top_p=0.95, max_new_tokens=8)
    assert engine.generate(PROMPTS, params, seeded(7)) == engine.generate(PROMPTS, params, seeded(7))


def test_load_weights_between_calls_changes_outputs_and_version():
    engine = make_engine(slots=5)
    params = SamplingParams(n=4, max_new_tokens=8)
    before = engine.generate(PROMPTS, params, seeded(0))
    engine.load_weights(build_model(ModelConfig(init_seed=1)).state_dict(), version=3)
    after = engine.generate(PROMPTS, params, seeded(0))
    assert engine.version == 3 and after != before
    assert_matches_reference(make_engine(seed=1), PROMPTS, after, params)


def test_an_interrupted_call_continues_under_new_weights_with_each_token_tagged_by_its_version():
    engine = make_engine(eos=-1, slots=5)
    params = SamplingParams(n=2, max_new_tokens=8)
    asked = iter([False, False, True])
    first = engine.generate_versioned(PROMPTS, params, seeded(0), interrupt=lambda: next(asked))
    assert {c.finish_reason for group in first for c in group} == {"abort"}
    engine.load_weights(build_model(ModelConfig(init_seed=1)).state_dict(), version=1)
    final = engine.generate_versioned(PROMPTS, params, seeded(0), first)
    old, new = build_model(ModelConfig(init_seed=0)), build_model(ModelConfig(init_seed=1))
    for prompt, group, group_first in zip(PROMPTS, final, first):
        for c, c_first in zip(group, group_first):
            assert c.finish_reason == "length" and c.versions == [0] * len(c_first.tokens) + [1] * (8 - len(c_first.tokens))
            by_version = {v: reference_logprobs(m, prompt, c.tokens, params) for v, m in ((0, old), (1, new))}
            expected = torch.stack([by_version[v][i] for i, v in enumerate(c.versions)])
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_rollout_engine_continuous_builds_this_engine_from_the_config():
    cfg = Config.model_validate({"rollout": {"engine": "continuous", "slots": 6}})
    engine = build_engine(cfg, build_task(cfg.task, None).tokenizer)
    assert isinstance(engine, ContinuousEngine) and (engine.slots, engine.version) == (6, -1)


def test_an_architecture_without_a_hand_written_forward_is_refused_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="'gpt2'.*rollout.engine=torch"):
        ContinuousEngine(gpt2, EOS, PAD)


@pytest.mark.slow
def test_compiled_decode_gives_the_same_logprobs():
    engine = make_engine(slots=5, compile=True)
    params = SamplingParams(n=4, temperature=0.7, max_new_tokens=8)
    results = engine.generate(PROMPTS, params, seeded(0))
    assert_matches_reference(engine, PROMPTS, results, params)
