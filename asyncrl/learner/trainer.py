"""The learner loop: take a step's batch from the queue, train once, publish, acknowledge.

The step holding version v trains on B groups and produces version v + 1 (contract 1). Proximal
log-probs are recomputed with the weights of version v before the update, so the decoupled loss
can correct behaviour -> proximal by importance weights and clip proximal -> current. The queue
lease is acknowledged only after the optimizer step, so a learner that dies mid-step loses
nothing (contract 4). Must never import rollout code.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch

from asyncrl.config import Config
from asyncrl.learner.batch import collate, response_logprobs
from asyncrl.learner.losses import LossSettings, PolicyLossInputs, group_advantages, policy_loss
from asyncrl.metrics import MetricsWriter
from asyncrl.modeling import build_model
from asyncrl.queue.client import QueueConsumer
from asyncrl.weights.broadcaster import WeightBroadcaster

log = logging.getLogger("asyncrl.learner")


def loss_settings(cfg: Config) -> LossSettings:
    names = {f.name for f in dataclasses.fields(LossSettings)}
    return LossSettings(**{k: v for k, v in cfg.loss.model_dump().items() if k in names})


class Learner:
    def __init__(self, cfg: Config, out_dir: Optional[Path] = None, pad_id: int = 0):
        self.cfg = cfg
        self.pad_id = pad_id
        torch.set_num_threads(cfg.learner.threads)
        torch.manual_seed(cfg.learner.seed)
        self.device = cfg.learner.device
        self.model = build_model(cfg.model, self.device)
        self.model.train()
        lc = cfg.learner
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay)
        self.loss_settings = loss_settings(cfg)
        self.version = 0
        self.metrics = MetricsWriter(out_dir / "metrics.jsonl" if out_dir else None)
        self.consumer = QueueConsumer(cfg.queue.address, name="learner-0", vocab_size=self._vocab_size())
        self.broadcaster = WeightBroadcaster(cfg.weights.address)

    def _vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    def publish(self) -> float:
        # The queue must know the version before any engine can hold it, or their groups look "from the future".
        self.consumer.set_version(self.version)
        return self.broadcaster.publish(self.model, self.version)

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        cfg = self.cfg
        self.consumer.hello("consumer")
        self.publish()
        start = last = time.perf_counter()
        while self.version < cfg.learner.steps and not should_stop():
            wait_start = time.perf_counter()
            lease, groups = self.consumer.get_batch(
                self.version, cfg.learner.groups_per_step, cfg.learner.batch_timeout_s, should_stop
            )
            if lease is None:
                break
            wait_s = time.perf_counter() - wait_start
            record = self.step(groups)
            self.consumer.ack(lease)
            publish_s = self.publish() if self.version % cfg.learner.sync_every == 0 else 0.0
            now = time.perf_counter()
            record.update(
                wait_s=wait_s,
                publish_s=publish_s,
                samples_per_s=record["samples"] / (now - last),
                tokens_per_s=record["tokens"] / (now - last),
                wall_s=now - start,
            )
            last = now
            self.metrics.write(record)
        self.consumer.close_queue()
        return self.version

    def step(self, groups) -> dict:
        """One optimizer step on one batch; advances the policy version by one."""
        cfg = self.cfg
        held = self.version
        batch = collate(groups, self.pad_id, self.device)
        advantages = group_advantages(batch.rewards, cfg.loss.advantage, cfg.loss.adv_eps).reshape(-1)
        temperature = cfg.sampling.temperature
        with torch.no_grad():
            prox = response_logprobs(self.model, batch, temperature)
        logprobs = response_logprobs(self.model, batch, temperature)
        out = policy_loss(
            PolicyLossInputs(
                logprobs=logprobs,
                prox_logprobs=prox,
                behav_logprobs=batch.behav_logprobs,
                advantages=advantages,
                loss_mask=batch.loss_mask,
            ),
            self.loss_settings,
        )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.learner.grad_clip)
        self.optimizer.step()
        self.version += 1
        staleness = [held - g.behaviour_version for g in groups]
        lengths = batch.loss_mask.sum(-1)
        return {
            "step": self.version,
            "policy_version": self.version,
            "reward_mean": float(batch.rewards.mean()),
            "reward_std": float(batch.rewards.std()) if batch.rewards.numel() > 1 else 0.0,
            "staleness_mean": sum(staleness) / len(staleness),
            "staleness_max": max(staleness),
            "staleness_hist": {str(k): v for k, v in sorted(Counter(staleness).items())},
            "response_len_mean": float(lengths.mean()),
            "grad_norm": float(grad_norm),
            "samples": batch.num_samples,
            "tokens": batch.num_tokens,
            **out.metrics,
            "loss": float(out.loss.detach()),
        }

    def close(self) -> None:
        self.metrics.close()
        self.consumer.close()
        self.broadcaster.close()
