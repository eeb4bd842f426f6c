"""Advantage estimation: how good was each sample (or token) compared with a baseline.

Owns the group estimators that need no critic (GRPO, Dr. GRPO, RLOO, REINFORCE++ with baseline),
generalised advantage estimation (GAE) for a learned value function, and placing a sequence
reward on its last response token. Everything here is pure tensor math run without gradients:
advantages are targets, never something to differentiate through.

Must never do I/O, touch process groups, read config, or mutate its inputs; and it must not
import `asyncrl.learner.losses`, which re-exports these functions for the trainer.
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP_METHODS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")


@torch.no_grad()
def group_advantages(rewards: Tensor, method: str, eps: float = 1e-6) -> Tensor:
    """Advantage of each sample against the other samples of its group.

    rewards: [G, n], one row per group (all n samples of one prompt), one scalar reward per sample.
    Returns [G, n]:
      grpo          (r - mean_group) / (std_group + eps), std unbiased (n - 1)
      dr_grpo       r - mean_group; no std division, which Dr. GRPO shows biases towards
                    groups whose rewards barely vary
      rloo          r - mean of the other n - 1 samples of the group
      reinforce_pp  (r - mean_group) / (std_batch + eps), std unbiased over all G * n centred
                    rewards, so easy and hard prompts keep their relative scale
    A group whose rewards are all equal gets advantage 0 under every method.
    """
    if method not in GROUP_METHODS:
        raise ValueError(f"unknown advantage method {method!r}; choose one of {', '.join(GROUP_METHODS)}")
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must have shape [groups, samples per group], got {tuple(rewards.shape)}; "
            "reshape the flat rewards to one row per group"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    n = rewards.shape[1]
    if method in ("grpo", "rloo") and n < 2:
        raise ValueError(f"{method} compares samples within a group and needs at least 2 per group, got {n}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if method == "grpo":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if method == "dr_grpo":
        return centred
    if method == "rloo":
        # r - (sum - r) / (n - 1) == n / (n - 1) * (r - mean): the leave-one-out baseline is
        # independent of the sample it scores, which keeps the estimator unbiased.
        return centred * (n / (n - 1))
    if centred.numel() < 2:
        raise ValueError("reinforce_pp normalises by the batch std and needs at least 2 samples in the batch, got 1")
    return centred / (centred.std() + eps)


@torch.no_grad()
def gae_advantages(
    rewards: Tensor, values: Tensor, loss_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens; returns (advantages, returns).

    rewards, values, loss_mask: [N, T]. Only tokens with loss_mask set are steps of the episode:
    a masked token is skipped (its reward and value ignored), so the step after a response
    token is the next counted token, and after the last counted token the episode has ended
    (bootstrap value 0). That covers right padding and masked-out spans (e.g. tool output)
    alike. Put a sequence reward on the last counted token (see `last_token_rewards`).

      delta_t = r_t + gamma * V_next - V_t
      A_t     = delta_t + gamma * lam * A_next
      R_t     = A_t + V_t        (the value target)

    Both outputs are 0 on masked tokens.
    """
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    if not (rewards.shape == values.shape == loss_mask.shape) or rewards.dim() != 2:
        raise ValueError(
            "rewards, values and loss_mask must share one [N, T] shape, got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(loss_mask.shape)}"
        )
    mask = loss_mask.bool()
    values = torch.where(mask, values, 0.0)
    rewards = torch.where(mask, rewards.to(values.dtype), 0.0)
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    next_advantage = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        counted = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(counted, advantage, 0.0)
        # A masked token is not a step: carry the later step's value and advantage across it.
        next_advantage = torch.where(counted, advantage, next_advantage)
        next_value = torch.where(counted, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


@torch.no_grad()
def last_token_rewards(rewards: Tensor, loss_mask: Tensor) -> Tensor:
    """Spread per-sequence rewards [N] to per-token rewards [N, T] for GAE and `kl_in_reward`.

    Each reward goes on its sequence's last counted token, where the episode ends; every other
    token gets 0. A sequence with no counted token gets no reward at all.
    """
    mask = loss_mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=1, keepdim=True)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    return torch.where(positions == last, rewards.to(dtype).unsqueeze(1), 0.0)
