"""Choosing the rollout engine: `rollout.engine: torch | continuous | vllm | sglang`, built in one place.

`build_engine(cfg, tokenizer)` is the only place that knows which classes exist; the rollout server
calls it and then speaks the interface in `base.py`. vLLM and SGLang are optional extras, imported
only when chosen, so a laptop install never needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncrl.rollout.engines.base import Engine, EngineError

if TYPE_CHECKING:
    from asyncrl.config import Config

__all__ = ["Engine", "EngineError", "build_engine"]


def build_engine(cfg: "Config", tokenizer) -> Engine:
    """The engine `cfg.rollout.engine` names, on version -1 until the learner's version 0 arrives."""
    rc = cfg.rollout
    if rc.engine in ("torch", "continuous"):
        engine = _embedded_engine(cfg, tokenizer)
    elif rc.engine == "sglang":
        from asyncrl.rollout.engines.sglang import SGLangEngine

        engine = SGLangEngine(
            rc.engine_url, tokenizer.eos_token_id, timeout_s=rc.engine_timeout_s,
            weight_update=rc.engine_weight_update, launch=rc.engine_launch,
            start_timeout_s=rc.engine_start_timeout_s, check_version=rc.engine_check_version,
        )
        if rc.engine_weight_update == "distributed":
            engine.connect_weight_group(rc.engine_group_address, rc.engine_group_backend, timeout_s=rc.engine_timeout_s)
    elif rc.engine == "vllm":
        if cfg.weights.update_mode == "interrupt":
            # vllm.LLM.generate runs a batch to the end in this process: there is nothing to abort it with.
            raise EngineError("weights.update_mode=interrupt is not supported with rollout.engine=vllm (the "
                              "in-process LLM cannot abort a running batch); use weights.update_mode=drain")
        from asyncrl.rollout.engines.vllm import VLLMEngine

        engine = VLLMEngine(cfg.model.path, tokenizer.eos_token_id, engine_args=rc.engine_args)
    else:
        raise EngineError(f"rollout.engine={rc.engine!r}; choose torch, continuous, vllm or sglang")
    engine.version = -1  # nothing verified yet: version 0 must come from the learner
    return engine


def _embedded_engine(cfg: "Config", tokenizer) -> Engine:
    from asyncrl.modeling import build_model
    from asyncrl.rollout.engine import TorchEngine

    model = build_model(cfg.model, cfg.rollout.device)
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > vocab:
        raise ValueError(
            f"task {cfg.task.name!r} needs a vocabulary of {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{vocab}; set model.vocab_size >= {tokenizer.vocab_size}"
        )
    model.eval()
    if cfg.rollout.engine == "continuous":
        from asyncrl.rollout.engines.continuous import ContinuousEngine

        return ContinuousEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.rollout.device,
                                slots=cfg.rollout.slots, compile=cfg.rollout.compile)
    return TorchEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.rollout.device)
