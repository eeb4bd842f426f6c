"""Specification of the vLLM adapter: what it asks vLLM for, and how it reads vLLM's answers.

vLLM is not installed here, so `LLMDouble` and the `*_double` builders stand in for `vllm.LLM`,
`vllm.SamplingParams` and the `RequestOutput`/`CompletionOutput`/`Logprob` objects of vllm 0.32.0
(same attribute names). They are doubles, named as such; the vllm-marked test at the end runs the
real engine where vllm is installed.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from asyncrl.rollout.engine import Completion, SamplingParams
from asyncrl.rollout.engines.base import EngineError
from asyncrl.rollout.engines.vllm import WORKER_EXTENSION, VLLMEngine, parse_request_output
from asyncrl.rollout.engines.vllm_worker import WeightLoaderExtension
from asyncrl.rollout.sampling import sampling_log_probs


def completion_output_double(index, tokens, logprobs, finish_reason):
    steps = [{token: SimpleNamespace(logprob=lp, rank=1, decoded_token=None)} for token, lp in zip(tokens, logprobs)]
    return SimpleNamespace(index=index, token_ids=tokens, logprobs=steps, finish_reason=finish_reason, text="")


def request_output_double(request_id, samples):
    return SimpleNamespace(request_id=request_id, outputs=samples)


class LLMDouble:
    """Records how it was built and what it was asked; answers with two fixed samples per prompt."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.generated = []
        self.rpcs = []
        self.worker_answers = None

    def generate(self, prompts, sampling, use_tqdm=True):
        self.generated.append((prompts, sampling))
        return [
            request_output_double(str(i), [
                completion_output_double(1, [7, 8], [-0.5, -0.25], "length"),
                completion_output_double(0, [9, 2], [-1.0, -0.125], "stop"),
            ])
            for i, _ in enumerate(prompts)
        ]

    def collective_rpc(self, method, args=()):
        self.rpcs.append((method, args))
        return self.worker_answers if self.worker_answers is not None else [args[1]]


def make_engine(**kwargs) -> VLLMEngine:
    return VLLMEngine("/models/tiny", eos_token_id=2, llm_factory=LLMDouble, sampling_factory=SimpleNamespace, **kwargs)


def test_the_llm_is_built_with_processed_logprobs_and_the_asyncrl_worker_extension():
    engine = make_engine(engine_args={"gpu_memory_utilization": 0.5})
    assert engine.llm.kwargs == {"model": "/models/tiny", "logprobs_mode": "processed_logprobs",
                                 "worker_extension_cls": WORKER_EXTENSION, "gpu_memory_utilization": 0.5}


def test_any_other_logprobs_mode_is_refused():
    with pytest.raises(EngineError, match="logprobs_mode='raw_logprobs'"):
        make_engine(engine_args={"logprobs_mode": "raw_logprobs"})


def test_generate_asks_for_the_sampled_tokens_logprob_with_our_sampling_settings():
    engine = make_engine()
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=6, stop_tokens=(3,))
    groups = engine.generate([[1, 2, 3], [4]], params, torch.Generator().manual_seed(0))
    prompts, sampling = engine.llm.generated[-1]
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]
    assert (sampling.n, sampling.temperature, sampling.top_p, sampling.top_k) == (2, 0.7, 0.9, 5)
    assert (sampling.max_tokens, sampling.stop_token_ids, sampling.logprobs) == (6, [3], 0)
    assert isinstance(sampling.seed, int) and sampling.detokenize is False
    assert groups[0] == [Completion([9, 2], [-1.0, -0.125], "stop"), Completion([7, 8], [-0.5, -0.25], "length")]


def test_top_k_zero_means_no_top_k_filter_in_vllm_terms():
    engine = make_engine()
    engine.generate([[1]], SamplingParams(n=2, top_k=0), None)
    assert engine.llm.generated[-1][1].top_k == -1 and engine.llm.generated[-1][1].seed is None


def test_processed_logprobs_are_the_filtered_distribution_the_learner_recomputes():
    # vLLM's processed log-probs: log_softmax after temperature, top-k, top-p; ours must match exactly.
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    params = SamplingParams(temperature=0.8, top_k=3, top_p=0.9)
    expected = sampling_log_probs(logits, params)[0]
    token = 1
    output = request_output_double("r", [completion_output_double(0, [token], [float(expected[token])], "length")])
    (completion,) = parse_request_output(output, n=1)
    assert completion.logprobs == pytest.approx([float(expected[token])])


def test_an_output_without_one_logprob_per_token_is_an_error_naming_logprobs_0():
    sample = completion_output_double(0, [4, 5], [-1.0], "length")
    sample.logprobs = sample.logprobs[:1]
    with pytest.raises(EngineError, match="logprobs=0"):
        parse_request_output(request_output_double("r", [sample]), n=1)


def test_an_aborted_or_short_request_is_an_error():
    with pytest.raises(EngineError, match="abort"):
        parse_request_output(request_output_double("r", [completion_output_double(0, [4], [-1.0], "abort")]), n=1)
    with pytest.raises(EngineError, match="n=2"):
        parse_request_output(request_output_double("r", [completion_output_double(0, [4], [-1.0], "stop")]), n=2)


def test_load_weights_goes_to_every_worker_and_sets_the_version_only_when_all_answer():
    engine = make_engine()
    state = {"model.norm.weight": torch.ones(3)}
    engine.load_weights(state, version=4)
    method, (named, version) = engine.llm.rpcs[-1]
    assert method == "asyncrl_load_weights" and version == 4 and named[0][0] == "model.norm.weight"
    assert engine.version == 4

    engine.llm.worker_answers = [5, 4]  # one worker failed to take version 5
    with pytest.raises(EngineError, match="keeps version 4"):
        engine.load_weights(state, version=5)
    assert engine.version == 4


def test_the_worker_extension_loads_through_the_models_own_load_weights():
    loaded = []

    class ModelDouble(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

        def load_weights(self, weights):
            loaded.extend(weights)

    worker = WeightLoaderExtension()
    worker.model_runner = SimpleNamespace(model=ModelDouble())
    assert worker.asyncrl_load_weights([("w", torch.ones(2))], version=9) == 9
    assert [name for name, _ in loaded] == ["w"]


def test_without_vllm_installed_the_error_says_how_to_install_it():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(EngineError, match=r"asyncrl\[vllm\]"):
            VLLMEngine("/models/tiny", eos_token_id=2)
    else:
        pytest.skip("vllm is installed")


def test_without_a_model_path_the_error_names_model_path():
    with pytest.raises(EngineError, match="model.path"):
        VLLMEngine(None, eos_token_id=2, llm_factory=LLMDouble, sampling_factory=SimpleNamespace)


@pytest.mark.vllm
def test_real_vllm_logprobs_match_a_full_forward_of_the_filtered_distribution(tmp_path):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from asyncrl.config import ModelConfig
    from asyncrl.modeling import build_model

    model = build_model(ModelConfig(max_positions=64))
    model.save_pretrained(tmp_path)
    engine = VLLMEngine(str(tmp_path), eos_token_id=1, engine_args={"dtype": "float32", "max_model_len": 64})
    params = SamplingParams(n=4, temperature=0.8, top_k=10, top_p=0.9, max_new_tokens=8)
    prompt = [5, 9, 12, 7]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for completion in engine.generate([prompt], params, torch.Generator().manual_seed(0))[0]:
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + completion.tokens])).logits[0, len(prompt) - 1 : -1]
        expected = sampling_log_probs(logits, params).gather(-1, torch.tensor(completion.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-3, rtol=0)
