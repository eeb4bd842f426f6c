"""The plain torch backend: one rank, the whole model and an AdamW optimizer in this process.

The reference baseline every other backend must match step for step. Must never import rollout
code or touch the queue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from asyncrl.config import Config
from asyncrl.learner.backends import freeze, unique_tensors
from asyncrl.modeling import build_model

STATE_FILE = "torch_state.pt"


class TorchBackend:
    def __init__(self, cfg: Config, device: str, with_ref: bool):
        lc = cfg.learner
        self.device = device
        self.grad_clip = lc.grad_clip
        self.module = build_model(cfg.model, device)
        self.module.train()
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay)
        # The reference is version 0: built from the same config and seed as the policy.
        self.ref = freeze(build_model(cfg.model, device)) if with_ref else None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        return float(grad_norm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def publish_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(unique_tensors(self.module.state_dict()))

    def save(self, directory: Path) -> None:
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}, directory / STATE_FILE)

    def load(self, directory: Path) -> None:
        path = directory / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"checkpoint {str(directory)!r} has no {STATE_FILE}; was it written by learner.backend=deepspeed? "
                "resume with the backend that wrote it"
            )
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
