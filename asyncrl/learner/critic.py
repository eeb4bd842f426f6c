"""The value model behind `loss.advantage: gae`: a linear value head on the policy's last hidden states.

Design: the critic shares the policy's transformer. The head is one `Linear(hidden, 1)` on the
final (normed) hidden state, the same state the language-model head reads, so one forward pass
gives both the log-probs and the values, and the value loss (times `loss.value_coef`) is trained
jointly with the policy loss through the shared trunk. That is the simplest honest critic: no
second model in memory, no second forward, one optimizer. Its cost is that value gradients also
shape the policy's features; a separate critic model (verl and OpenRLHF's choice) avoids that at
twice the compute and memory, and is what to build when a large model's value loss is seen to
hurt its policy.

The head is learner-only. It lives beside the backend's `module` (the policy), in its optimizer
and its checkpoints, but not in `module` itself, so `publish_tensors` never sees it and engines
receive exactly the policy's weights. It starts at zero, so version 0 predicts value 0 everywhere
and the first advantages are plain discounted returns.

Old values, for value clipping, are the values of the weights before the update, as proximal
log-probs are. With one optimizer step per batch they equal the training forward's values, so
clipping cannot bind at gradient time (`value_clip_frac` is 0); it matters once a batch is
trained by more than one update. Must never import rollout code or touch the queue.
"""

from __future__ import annotations

import torch


def build_value_head(policy: torch.nn.Module, device: str) -> torch.nn.Linear:
    """A zero-initialised Linear(hidden_size, 1) in the policy's dtype, on `device`."""
    hidden = int(policy.config.hidden_size)
    dtype = next(policy.parameters()).dtype
    head = torch.nn.Linear(hidden, 1, device=device, dtype=dtype)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


@torch.no_grad()
def whiten(advantages: torch.Tensor, loss_mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Advantages shifted and scaled to mean 0 and std 1 (unbiased) over counted tokens; 0 elsewhere.

    PPO implementations do this to GAE's advantages: the scale of raw advantages follows the
    reward's, and while the value head is still learning they share its mean, so without it every
    sampled token of a well-rewarded batch would be pushed up alike.
    """
    mask = loss_mask.bool()
    counted = advantages[mask]
    if counted.numel() < 2:
        return torch.where(mask, advantages, 0.0)
    return torch.where(mask, (advantages - counted.mean()) / (counted.std() + eps), 0.0)


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, loss_mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over counted tokens.

    1: the values predict the returns exactly; 0: no better than their mean; below 0: worse.
    NaN when the returns do not vary (nothing to explain).
    """
    mask = loss_mask.bool()
    r, v = returns[mask].double(), values[mask].double()
    if r.numel() < 2:
        return float("nan")
    var_r = r.var(unbiased=False)
    if var_r <= 0:
        return float("nan")
    return float(1.0 - (r - v).var(unbiased=False) / var_r)
