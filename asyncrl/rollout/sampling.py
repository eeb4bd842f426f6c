"""The sampling distribution: temperature, top-k and top-p as pure functions on logits.

Owns the one definition of "the distribution a token was sampled from". The behaviour log-prob
the engine reports for a token is the log-softmax of the logits after temperature, top-k and top-p
(in that order, as in Hugging Face and vLLM), so that importance weights against it are exact.
Anything that must reproduce a behaviour log-prob (tests, other engines) goes through
`sampling_log_probs`. Filtering is done in float32 whatever the model dtype.

Never touches models, devices or global RNG state: randomness comes only from the generator passed
in, so a seeded generator reproduces a sample.
"""

from __future__ import annotations

from typing import Protocol

import torch


class SamplingKnobs(Protocol):
    """What the filters read; `asyncrl.rollout.engine.SamplingParams` is one."""

    temperature: float
    top_k: int
    top_p: float


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0.0:
        raise ValueError(f"temperature={temperature}: must be > 0; use top_k=1 for greedy decoding")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits per row (ties broken by torch.topk); k=0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches p; the top token always stays."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # A token is dropped when the tokens ranked above it already hold mass p; comparing the
    # shifted cumsum (not cum - prob) keeps the top token exactly, whatever the rounding.
    drop = torch.zeros_like(cum, dtype=torch.bool)
    drop[..., 1:] = cum[..., :-1] >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)


def sampling_log_probs(logits: torch.Tensor, params: SamplingKnobs) -> torch.Tensor:
    """Log-probabilities over the vocabulary of the distribution `sample_tokens` draws from."""
    logits = apply_temperature(logits.float(), params.temperature)
    logits = top_p_filter(top_k_filter(logits, params.top_k), params.top_p)
    return torch.log_softmax(logits, dim=-1)


def sample_tokens(
    logits: torch.Tensor, params: SamplingKnobs, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of `logits` [B, V]; return (tokens [B], behaviour log-probs [B])."""
    log_probs = sampling_log_probs(logits, params)
    tokens = torch.multinomial(log_probs.exp(), 1, generator=generator)
    return tokens.squeeze(-1), log_probs.gather(-1, tokens).squeeze(-1)
