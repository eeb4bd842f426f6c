"""Specification of the embedded rollout engine and its sampling functions.

Every engine test runs a real tiny model (random-init Qwen2 or Llama, vocab 32). The reference for
a behaviour log-prob is always a plain full forward over prompt + response, without cache or
padding, pushed through the same temperature/top-k/top-p filtering.
"""

from __future__ import annotations

import math

import pytest
import torch

from asyncrl.config import ModelConfig, SamplingConfig
from asyncrl.modeling import build_model
from asyncrl.rollout.engine import Completion, SamplingParams, TorchEngine
from asyncrl.rollout.sampling import (
    apply_temperature,
    sample_tokens,
    sampling_log_probs,
    top_k_filter,
    top_p_filter,
)

EOS, PAD = 1, 0
PROMPTS = [[5, 9, 12, 7, 3, 30, 22, 8, 14], [17, 4], [11, 25, 6, 2, 19]]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_engine(arch: str = "qwen2", seed: int = 0, eos: int = EOS, device: str = "cpu") -> TorchEngine:
    return TorchEngine(build_model(ModelConfig(arch=arch, init_seed=seed)), eos, PAD, device=device)


def seeded(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def full_forward_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(torch.tensor([tokens], device=device)).logits[0].float()


def reference_logprobs(model, prompt: list[int], response: list[int], params: SamplingParams) -> torch.Tensor:
    """Log-probs of `response` under the filtered distribution, from one non-cached, unpadded forward."""
    logits = full_forward_logits(model, prompt + response)[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    log_probs = sampling_log_probs(logits, params)
    return log_probs.gather(-1, torch.tensor(response, device=log_probs.device)[:, None]).squeeze(-1).cpu()


def greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(full_forward_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt) :]


def assert_matches_reference(engine: TorchEngine, prompts, results, params: SamplingParams) -> None:
    for prompt, group in zip(prompts, results):
        for completion in group:
            expected = reference_logprobs(engine.model, prompt, completion.tokens, params)
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=0)


# --- the engine --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_full_forward_logprobs_of_the_filtered_distribution(arch, temperature, device):
    engine = make_engine(arch, device=device)
    params = SamplingParams(n=4, temperature=temperature, top_k=12, top_p=0.9, max_new_tokens=8)
    results = engine.generate(PROMPTS, params, seeded(0, device))
    assert sum(len(c.tokens) for group in results for c in group) > 3 * len(PROMPTS) * params.n
    assert_matches_reference(engine, PROMPTS, results, params)


def test_left_padding_does_not_change_a_short_prompts_completions():
    engine = make_engine()
    short, long = [17, 4], [5, 9, 12, 7, 3, 30, 22, 8, 14]
    greedy = SamplingParams(top_k=1, max_new_tokens=10)
    alone = engine.generate([short], greedy)[0][0]
    batched = engine.generate([long, short], greedy)[1][0]
    assert batched.tokens == alone.tokens

    sampled = SamplingParams(n=8, temperature=0.8, max_new_tokens=10)
    results = engine.generate([long, short], sampled, seeded(3))
    assert_matches_reference(engine, [long, short], results, sampled)


def test_top_k_1_is_greedy_decoding():
    engine = make_engine(eos=-1)  # an id no model samples, so the decode runs its full length
    completion = engine.generate([PROMPTS[0]], SamplingParams(top_k=1, max_new_tokens=12), seeded(0))[0][0]
    assert completion.tokens == greedy_reference(engine.model, PROMPTS[0], 12)
    assert completion.logprobs == [0.0] * 12


def test_top_k_samples_only_the_k_most_likely_tokens():
    engine = make_engine()
    params = SamplingParams(n=64, top_k=3, max_new_tokens=3)
    group = engine.generate([PROMPTS[2]], params, seeded(1))[0]
    seen = set()
    for completion in group:
        logits = full_forward_logits(engine.model, PROMPTS[2] + completion.tokens)
        for step, token in enumerate(completion.tokens):
            top3 = logits[len(PROMPTS[2]) - 1 + step].topk(3).indices.tolist()
            assert token in top3
            seen.add((step, token))
    assert len({token for step, token in seen if step == 0}) == 3


def test_tiny_top_p_keeps_only_the_top_token():
    engine = make_engine(eos=-1)
    completion = engine.generate([PROMPTS[1]], SamplingParams(top_p=1e-6, max_new_tokens=8), seeded(0))[0][0]
    assert completion.tokens == greedy_reference(engine.model, PROMPTS[1], 8)
    assert completion.logprobs == [0.0] * 8


def _sample_with_a_fresh_token(prompt: list[int]) -> tuple[Completion, int]:
    """A seeded 8-token sample (no stop tokens) and the first index > 0 whose token is new in it."""
    sample = make_engine(eos=-1).generate([prompt], SamplingParams(max_new_tokens=8), seeded(4))[0][0]
    index = next(i for i in range(1, 8) if sample.tokens[i] not in sample.tokens[:i])
    return sample, index


def test_stop_token_ends_the_completion_with_reason_stop():
    # The same seed draws the same tokens until the stop token ends the completion.
    sample, i = _sample_with_a_fresh_token(PROMPTS[0])
    params = SamplingParams(max_new_tokens=8, stop_tokens=(sample.tokens[i],))
    completion = make_engine(eos=-1).generate([PROMPTS[0]], params, seeded(4))[0][0]
    assert completion == Completion(sample.tokens[: i + 1], sample.logprobs[: i + 1], "stop")


def test_eos_token_always_stops_the_completion():
    sample, i = _sample_with_a_fresh_token(PROMPTS[0])
    engine = make_engine(eos=sample.tokens[i])
    completion = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8), seeded(4))[0][0]
    assert (completion.tokens, completion.finish_reason) == (sample.tokens[: i + 1], "stop")


def test_max_new_tokens_ends_the_completion_with_reason_length_and_exactly_that_many_tokens():
    engine = make_engine(eos=-1)
    for completion in engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=5), seeded(0))[0]:
        assert (len(completion.tokens), len(completion.logprobs), completion.finish_reason) == (5, 5, "length")


def test_finished_rows_stop_at_their_own_stop_token_while_others_continue():
    engine = make_engine()
    params = SamplingParams(n=16, max_new_tokens=10, stop_tokens=(2, 3))
    completions = [c for group in engine.generate(PROMPTS, params, seeded(5)) for c in group]
    assert {c.finish_reason for c in completions} == {"stop", "length"}
    for c in completions:
        body = c.tokens[:-1] if c.finish_reason == "stop" else c.tokens
        assert not {EOS, 2, 3} & set(body)
        if c.finish_reason == "stop":
            assert c.tokens[-1] in {EOS, 2, 3}
        else:
            assert len(c.tokens) == 10


def test_n_samples_per_prompt_come_back_grouped_in_prompt_order():
    engine = make_engine()
    params = SamplingParams(n=3, max_new_tokens=6)
    results = engine.generate(PROMPTS, params, seeded(2))
    assert [len(group) for group in results] == [3, 3, 3]
    # A completion attributed to the wrong prompt would not reproduce its log-probs.
    assert_matches_reference(engine, PROMPTS, results, params)


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_reproduces_identical_completions(device):
    engine = make_engine(device=device)
    params = SamplingParams(n=4, temperature=0.9, top_p=0.95, max_new_tokens=8)
    assert engine.generate(PROMPTS, params, seeded(7, device)) == engine.generate(PROMPTS, params, seeded(7, device))


def test_load_weights_changes_outputs_and_version():
    engine = make_engine()
    params = SamplingParams(n=4, max_new_tokens=8)
    before = engine.generate(PROMPTS, params, seeded(0))
    assert engine.version == 0

    engine.load_weights(build_model(ModelConfig(init_seed=1)).state_dict(), version=3)
    after = engine.generate(PROMPTS, params, seeded(0))
    assert engine.version == 3
    assert after != before
    assert_matches_reference(make_engine(seed=1), PROMPTS, after, params)


def test_load_weights_accepts_a_state_dict_without_the_tied_output_head():
    engine = make_engine()
    new = build_model(ModelConfig(init_seed=1)).state_dict()
    del new["lm_head.weight"]
    engine.load_weights(new, version=1)
    assert torch.equal(engine.model.lm_head.weight, new["model.embed_tokens.weight"])


def test_load_weights_rejects_an_incomplete_or_misshapen_version_and_keeps_the_old_one():
    engine = make_engine()
    params = SamplingParams(n=2, max_new_tokens=6)
    before = engine.generate(PROMPTS, params, seeded(0))
    new = build_model(ModelConfig(init_seed=1)).state_dict()
    incomplete = {k: v for k, v in new.items() if k != "model.norm.weight"}
    with pytest.raises(KeyError, match="model.norm.weight"):
        engine.load_weights(incomplete, version=1)
    misshapen = dict(new, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="model.norm.weight"):
        engine.load_weights(misshapen, version=1)
    assert engine.version == 0
    assert engine.generate(PROMPTS, params, seeded(0)) == before


def test_a_prompt_that_does_not_fit_the_model_positions_is_rejected():
    engine = make_engine()
    with pytest.raises(ValueError, match="60 tokens"):
        engine.generate([[4] * 60], SamplingParams(max_new_tokens=8))


def test_sampling_params_mirror_the_sampling_config():
    cfg = SamplingConfig(n=4, temperature=0.5, top_p=0.9, top_k=7, max_new_tokens=11, stop_tokens=[3, 4])
    assert SamplingParams.from_config(cfg) == SamplingParams(4, 0.5, 0.9, 7, 11, (3, 4))


# --- the pure sampling functions ---------------------------------------------------------------


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_p_filter_keeps_the_smallest_set_whose_mass_reaches_p():
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()
    assert kept(top_p_filter(logits, 0.3)) == {1}
    assert kept(top_p_filter(logits, 0.75)) == {1, 3}
    assert kept(top_p_filter(logits, 0.85)) == {1, 3, 0}
    assert kept(top_p_filter(logits, 0.99)) == {0, 1, 2, 3}
    assert torch.equal(top_p_filter(logits, 0.75)[[1, 3]], logits[[1, 3]])


def test_top_p_filter_always_keeps_the_top_token():
    assert kept(top_p_filter(torch.tensor([0.2, 3.0, 1.0]), 1e-9)) == {1}


def test_top_k_filter_keeps_exactly_the_k_largest():
    assert kept(top_k_filter(torch.tensor([0.1, 2.0, -1.0, 1.5, 0.7]), 2)) == {1, 3}
    assert kept(top_k_filter(torch.tensor([0.1, 2.0, -1.0]), 0)) == {0, 1, 2}


def test_temperature_divides_the_logits():
    logits = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(apply_temperature(logits, 0.5), logits * 2)
    assert apply_temperature(logits, 1.0) is logits
    with pytest.raises(ValueError, match="temperature=0"):
        apply_temperature(logits, 0.0)


def test_filtered_logprobs_sum_to_one_over_the_kept_tokens():
    logits = torch.randn(4, 32, generator=seeded(0))
    log_probs = sampling_log_probs(logits, SamplingParams(temperature=0.7, top_k=10, top_p=0.8))
    for row in log_probs:
        assert 1 <= len(kept(row)) <= 10
        assert math.isclose(row.exp().sum().item(), 1.0, abs_tol=1e-6)


def test_sample_tokens_returns_kept_tokens_with_their_filtered_logprobs():
    logits = torch.randn(256, 32, generator=seeded(1))
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9)
    tokens, logprobs = sample_tokens(logits, params, seeded(2))
    log_probs = sampling_log_probs(logits, params)
    assert torch.isfinite(logprobs).all()
    torch.testing.assert_close(logprobs, log_probs.gather(-1, tokens[:, None]).squeeze(-1))
