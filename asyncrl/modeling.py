"""Builds the policy model, identically on the learner and on rollout servers.

A random-init model from `ModelConfig` (seeded, so every process starts from the same version 0)
or a local Hugging Face checkpoint through `from_pretrained`. Never downloads anything.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from asyncrl.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(cfg: ModelConfig, device: str = "cpu") -> torch.nn.Module:
    dtype = DTYPES[cfg.dtype]
    if cfg.path is not None:
        if not os.path.isdir(cfg.path):
            raise FileNotFoundError(
                f"model.path={cfg.path!r} is not a local directory; asyncrl loads weights only from local paths"
            )
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, local_files_only=True)
        return model.to(device)
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    if cfg.arch == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    config._attn_implementation = "eager"
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(cfg.init_seed)
        model = cls(config)
    return model.to(device=device, dtype=dtype)
