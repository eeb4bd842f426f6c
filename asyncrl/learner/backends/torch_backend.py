"""The plain torch backend: one rank, the whole model and an AdamW optimizer in this process.

The reference baseline every other backend must match step for step. With `loss.advantage: gae`
it also owns the value head (see critic.py): in the optimizer and the checkpoint, never in
`module`, so never published. Must never import rollout code or touch the queue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from asyncrl.config import Config
from asyncrl.learner.backends import freeze, unique_tensors
from asyncrl.learner.critic import build_value_head
from asyncrl.modeling import build_model

STATE_FILE = "torch_state.pt"


class TorchBackend:
    def __init__(self, cfg: Config, device: str, with_ref: bool):
        lc = cfg.learner
        self.device = device
        self.grad_clip = lc.grad_clip
        self.module = build_model(cfg.model, device)
        self.module.train()
        self.value_head = build_value_head(self.module, device) if cfg.loss.advantage == "gae" else None
        self.optimizer = torch.optim.AdamW(self._parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay)
        # The reference is version 0: built from the same config and seed as the policy.
        self.ref = freeze(build_model(cfg.model, device)) if with_ref else None

    def _parameters(self) -> list[torch.nn.Parameter]:
        head = list(self.value_head.parameters()) if self.value_head is not None else []
        return list(self.module.parameters()) + head

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self._parameters(), self.grad_clip)
        self.optimizer.step()
        return float(grad_norm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def publish_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(unique_tensors(self.module.state_dict()))

    def save(self, directory: Path) -> None:
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.value_head is not None:
            state["value_head"] = self.value_head.state_dict()
        torch.save(state, directory / STATE_FILE)

    def load(self, directory: Path) -> None:
        path = directory / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"checkpoint {str(directory)!r} has no {STATE_FILE}; was it written by learner.backend=deepspeed? "
                "resume with the backend that wrote it"
            )
        state = torch.load(path, map_location=self.device, weights_only=True)
        has_head = "value_head" in state
        if has_head != (self.value_head is not None):
            written, wanted = ("with", "without") if has_head else ("without", "with")
            raise ValueError(
                f"checkpoint {str(directory)!r} was written {written} a value head, but this learner runs {wanted} one "
                "(loss.advantage=gae has one, the group estimators do not); resume with the loss.advantage that wrote it"
            )
        self.module.load_state_dict(state["model"])
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
