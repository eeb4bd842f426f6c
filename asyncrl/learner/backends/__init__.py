"""Training backends: where the policy's parameters, gradients and optimizer state live.

A backend owns the model (and the frozen reference model, when the KL penalty needs one) on one
rank, and offers the few operations the trainer needs: forward through `module`, accumulate
`backward`, `step`, gather the complete weights for publication, and save/load its state. The
trainer never knows whether parameters are whole (torch) or ZeRO shards (deepspeed). Must never
import rollout code, talk to the queue, or decide what to train on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Protocol

import torch

from asyncrl.config import Config
from asyncrl.learner.distributed import Ranks


class Backend(Protocol):
    module: torch.nn.Module
    """Call it like the HF model: forward with grad on this rank's micro-batches."""
    ref: Optional[torch.nn.Module]
    """Frozen reference policy (version 0), or None when no KL penalty is configured."""
    value_head: Optional[torch.nn.Module]
    """The critic's value head (loss.advantage=gae), trained and checkpointed but never published; else None."""

    def zero_grad(self) -> None: ...
    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate gradients of `loss`; `last` marks the step's final micro-batch."""
    def step(self) -> float:
        """Clip gradients, update the parameters; returns the gradient norm before clipping."""
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Complete weights on rank 0 ({} elsewhere). Collective: every rank must call it."""
    def publish_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs of the complete weights, each storage once, yielded on rank 0.

        Collective: every rank must walk it to the end. A tensor is only valid until the next one
        is asked for (ZeRO-3 gathers one parameter at a time), so no rank holds a second full copy.
        """
    def save(self, directory: Path) -> None:
        """Model and optimizer state into `directory`. Collective."""
    def load(self, directory: Path) -> None:
        """Restore what `save` wrote. Collective."""


def unique_tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs with each storage once: a tied output head is the embedding, sent once."""
    seen, out = set(), []
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out.append((name, tensor))
    return out


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_backend(cfg: Config, ranks: Ranks, device: str) -> Backend:
    with_ref = cfg.loss.kl_coef > 0
    if cfg.learner.backend == "deepspeed":
        from asyncrl.learner.backends.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(cfg, ranks, device, with_ref)
    if ranks.distributed:
        raise ValueError(
            f"learner.backend='torch' trains on one rank, but WORLD_SIZE={ranks.world_size}; "
            "set learner.backend=deepspeed to train on several ranks"
        )
    from asyncrl.learner.backends.torch_backend import TorchBackend

    return TorchBackend(cfg, device, with_ref)
