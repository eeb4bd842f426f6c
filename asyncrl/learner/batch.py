"""Turns trajectory groups into padded tensors, and recomputes response log-probs with a model.

Prompts are left-padded and responses right-padded so that every response starts in the same
column; position ids skip the padding, matching what the rollout engine saw. Must never import
rollout code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from asyncrl.protocol import TrajectoryGroup


@dataclass
class Batch:
    input_ids: torch.Tensor  # [N, P + R]
    attention_mask: torch.Tensor  # [N, P + R]
    position_ids: torch.Tensor  # [N, P + R]
    response_ids: torch.Tensor  # [N, R]
    loss_mask: torch.Tensor  # [N, R] float, 1 on response tokens
    behav_logprobs: torch.Tensor  # [N, R]
    versions: torch.Tensor  # [N, R] int
    rewards: torch.Tensor  # [G, n]
    prompt_len: int

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


def collate(groups: list[TrajectoryGroup], pad_id: int, device: str = "cpu") -> Batch:
    sizes = {len(g.samples) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"groups of one batch must have the same number of samples, got sizes {sorted(sizes)}")
    samples = [(g, s) for g in groups for s in g.samples]
    P = max(len(g.prompt_tokens) for g in groups)
    R = max(1, max(len(s.tokens) for _, s in samples))
    N = len(samples)
    # Filled in numpy and converted once: per-row torch slice assignments cost more than the
    # forward pass of a small model.
    input_ids = np.full((N, P + R), pad_id, dtype=np.int64)
    attention = np.zeros((N, P + R), dtype=np.int64)
    loss_mask = np.zeros((N, R), dtype=np.float32)
    behav = np.zeros((N, R), dtype=np.float32)
    versions = np.zeros((N, R), dtype=np.int64)
    for i, (g, s) in enumerate(samples):
        p, r = len(g.prompt_tokens), len(s.tokens)
        input_ids[i, P - p : P] = g.prompt_tokens
        attention[i, P - p : P + r] = 1
        if r:
            input_ids[i, P : P + r] = s.tokens
            loss_mask[i, :r] = 1.0
            behav[i, :r] = s.behav_logprobs
            versions[i, :r] = s.versions
    position_ids = np.maximum(attention.cumsum(-1) - 1, 0)
    input_ids, attention, position_ids = (torch.from_numpy(a) for a in (input_ids, attention, position_ids))
    loss_mask, behav, versions = (torch.from_numpy(a) for a in (loss_mask, behav, versions))
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
    return Batch(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        position_ids=position_ids.to(device),
        response_ids=input_ids[:, P:].to(device),
        loss_mask=loss_mask.to(device),
        behav_logprobs=behav.to(device),
        versions=versions.to(device),
        rewards=rewards.to(device),
        prompt_len=P,
    )


def micro_batches(batch: Batch, token_budget: int) -> list[slice]:
    """Row slices of `batch` holding at most `token_budget` padded tokens each (at least one row).

    Slices keep the batch's full width, so every micro-batch has the same response length T
    and the sum of their losses, weighted by `loss_weights`, is exactly the whole batch's loss
    (seq_mean_token_sum_norm divides by T). A budget of 0 means one slice for everything.
    """
    n, width = batch.input_ids.shape
    rows = n if token_budget <= 0 else max(1, token_budget // width)
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def select_rows(batch: Batch, rows: slice) -> Batch:
    """The samples `rows` of a batch (rewards stay whole: advantages are computed before splitting)."""
    return Batch(
        input_ids=batch.input_ids[rows],
        attention_mask=batch.attention_mask[rows],
        position_ids=batch.position_ids[rows],
        response_ids=batch.response_ids[rows],
        loss_mask=batch.loss_mask[rows],
        behav_logprobs=batch.behav_logprobs[rows],
        versions=batch.versions[rows],
        rewards=batch.rewards,
        prompt_len=batch.prompt_len,
    )


def loss_weight(loss_mask: torch.Tensor, total_mask: torch.Tensor, agg: str) -> float:
    """Share of the whole batch's normaliser that a micro-batch holds, under aggregation `agg`.

    policy_loss normalises within the tensors it is given; multiplying a micro-batch's loss by
    this share turns the sum over micro-batches into the loss of the whole batch at once.
    token_mean normalises by counted tokens, the seq_mean_* modes by sequences with a token.
    """
    if agg == "token_mean":
        part, whole = loss_mask.bool().sum(), total_mask.bool().sum()
    else:
        part, whole = loss_mask.bool().any(-1).sum(), total_mask.bool().any(-1).sum()
    return float(part) / max(float(whole), 1.0)


@dataclass
class ResponseForward:
    """What one forward pass says about the response tokens; every tensor is [N, R] and 0 on padding."""

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    """V_t, the value head's estimate of the state in which response token t was chosen."""


def response_forward(
    model: torch.nn.Module,
    batch: Batch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    value_head: Optional[torch.nn.Module] = None,
) -> ResponseForward:
    """Log-probs of the response tokens under `model` at the sampling temperature, with the
    per-token entropy when asked, and with `value_head`'s values of the same positions."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        output_hidden_states=value_head is not None,
    )
    P = batch.prompt_len
    # Position P - 1 + t holds the state in which response token t is chosen: its logits and its value.
    logits = out.logits[:, P - 1 : -1, :].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    token_logprobs = logprobs.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) * batch.loss_mask
    entropy = values = None
    if with_entropy:
        # H = -sum_v p_v log p_v of the tempered distribution the engine sampled from.
        entropy = -(logprobs.exp() * logprobs).sum(-1) * batch.loss_mask
    if value_head is not None:
        hidden = out.hidden_states[-1][:, P - 1 : -1, :]
        values = value_head(hidden).squeeze(-1).float() * batch.loss_mask
    return ResponseForward(token_logprobs, entropy, values)


def response_logprobs(
    model: torch.nn.Module, batch: Batch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log-probs [N, R] of the response tokens, per-token entropy [N, R] or None) under `model`
    at the sampling temperature. Both are 0 on padding."""
    forward = response_forward(model, batch, temperature, with_entropy)
    return forward.logprobs, forward.entropy
