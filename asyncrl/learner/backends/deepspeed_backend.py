"""The DeepSpeed backend: ZeRO stage 1, 2 or 3 across the ranks a launcher started.

Ranks come from torchrun or the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); on CPU they talk over gloo, on GPUs over NCCL. The optimizer is torch's AdamW
handed to DeepSpeed as a client optimizer, so nothing needs a JIT-compiled extension (FusedAdam,
CPUAdam). Gradient accumulation is driven by the trainer, micro-batch by micro-batch, through
`set_gradient_accumulation_boundary`, because the number of micro-batches follows each batch's
size. The frozen reference model is partitioned like the policy under ZeRO-3 and replicated
otherwise (stages 1-2 shard only training state, which a frozen model has none of). Must never
import rollout code or touch the queue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from asyncrl.config import Config
from asyncrl.learner.backends import freeze, unique_tensors
from asyncrl.learner.distributed import Ranks
from asyncrl.modeling import build_model

TAG = "state"


def ds_config(cfg: Config) -> dict:
    lc = cfg.learner
    return {
        # DeepSpeed insists on batch sizes; the trainer feeds micro-batches itself and marks the
        # accumulation boundary, so these only have to be consistent.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": lc.zero_stage},
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


class DeepSpeedBackend:
    def __init__(self, cfg: Config, ranks: Ranks, device: str, with_ref: bool):
        try:
            import deepspeed
        except ImportError as exc:
            raise ImportError(
                "learner.backend=deepspeed needs DeepSpeed: pip install 'asyncrl[deepspeed]' (or set learner.backend=torch)"
            ) from exc
        self._ds = deepspeed
        self.ranks = ranks
        self.stage = cfg.learner.zero_stage
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo", verbose=False)
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        lc = cfg.learner
        model = build_model(cfg.model, device)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay)
        config = ds_config(cfg)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.module = self.engine
        # No critic here: the config refuses loss.advantage=gae with learner.backend=deepspeed.
        self.value_head = None
        self.ref = None
        if with_ref:
            ref = freeze(build_model(cfg.model, device))
            if self.stage == 3:
                ref_config = {k: v for k, v in config.items() if k != "gradient_clipping"}
                ref, _, _, _ = deepspeed.initialize(model=ref, config=ref_config)
            self.ref = ref

    def zero_grad(self) -> None:
        # ZeRO's optimizer wrapper clears gradients itself after each step.
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        module = self.engine.module
        if self.stage < 3:
            return module.state_dict() if self.ranks.is_main else {}
        params = list(module.parameters())
        with self._ds.zero.GatheredParameters(params, modifier_rank=None):
            if not self.ranks.is_main:
                return {}
            # Cloned, because the gathered storage is released when the context exits; once per
            # storage, so that tied tensors stay tied for the broadcaster to send once.
            clones: dict[int, torch.Tensor] = {}
            state = {}
            for name, tensor in module.state_dict().items():
                key = tensor.data_ptr()
                if key not in clones:
                    clones[key] = tensor.detach().clone()
                state[name] = clones[key]
            return state

    def publish_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        module = self.engine.module
        if self.stage < 3:
            if self.ranks.is_main:
                yield from unique_tensors(module.state_dict())
            return
        # One parameter gathered at a time; the broadcaster copies it into its bucket before it
        # asks for the next, so no rank ever holds a second full copy of the model. Tied
        # parameters appear once in named_parameters().
        for name, param in module.named_parameters():
            with self._ds.zero.GatheredParameters([param], modifier_rank=None):
                if self.ranks.is_main:
                    yield name, param.data

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        if not (directory / TAG).is_dir():
            raise FileNotFoundError(
                f"checkpoint {str(directory)!r} has no DeepSpeed state {TAG!r}; was it written by learner.backend=torch? "
                "resume with the backend that wrote it"
            )
        path, _ = self.engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {str(directory)!r}")
