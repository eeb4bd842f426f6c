"""Turns trajectory groups into padded tensors, and recomputes response log-probs with a model.

Prompts are left-padded and responses right-padded so that every response starts in the same
column; position ids skip the padding, matching what the rollout engine saw. Must never import
rollout code.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    input_ids = torch.full((N, P + R), pad_id, dtype=torch.long)
    attention = torch.zeros((N, P + R), dtype=torch.long)
    loss_mask = torch.zeros((N, R))
    behav = torch.zeros((N, R))
    versions = torch.zeros((N, R), dtype=torch.long)
    for i, (g, s) in enumerate(samples):
        p, r = len(g.prompt_tokens), len(s.tokens)
        input_ids[i, P - p : P] = torch.from_numpy(g.prompt_tokens.astype("int64"))
        attention[i, P - p : P + r] = 1
        if r:
            input_ids[i, P : P + r] = torch.from_numpy(s.tokens.astype("int64"))
            loss_mask[i, :r] = 1.0
            behav[i, :r] = torch.from_numpy(s.behav_logprobs.copy())
            versions[i, :r] = torch.from_numpy(s.versions.astype("int64"))
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
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


def response_logprobs(model: torch.nn.Module, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [N, R] of the response tokens under `model` at the sampling temperature."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    ).logits
    P = batch.prompt_len
    logits = logits[:, P - 1 : -1, :].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) * batch.loss_mask
