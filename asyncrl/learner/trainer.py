"""The learner loop: take a step's batch from the queue, train once, publish, acknowledge.

The step holding version v trains on B groups and produces version v + 1 (contract 1). The
decoupled loss needs proximal log-probs, those of version v before the update. Each batch gets
exactly one optimizer step, and gradient accumulation over micro-batches leaves the weights
untouched until that step, so the training forward's own log-probs, detached, ARE the proximal
log-probs: no second forward is needed (`learner.recompute_prox` forces one, for comparison).
With `loss.advantage: gae` the same forward also gives the value head's values: detached, they
are the old values from which each micro-batch computes its GAE advantages and returns, and with
grad they feed the value loss, added to the policy loss times `loss.value_coef` (critic.py).

Micro-batches (`learner.micro_batch_tokens`) split the batch by rows; each micro-batch loss is
weighted by its share of the whole batch's normaliser, so the accumulated gradient equals the
one-batch gradient. Across ranks (DeepSpeed), rank 0 alone takes batches from the queue,
publishes weights and writes metrics; it broadcasts each step's groups, and every rank trains
on an equal share of the samples. Queue leases are acknowledged after the optimizer step, or,
when checkpoints are on, after the checkpoint that holds the step (see checkpoint.py), so a
learner that dies loses nothing and trains nothing twice (contract 4). Must never import
rollout code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch

from asyncrl.config import Config
from asyncrl.learner.backends import build_backend
from asyncrl.learner.batch import Batch, collate, loss_weight, micro_batches, response_forward, response_logprobs, select_rows
from asyncrl.learner.checkpoint import CheckpointMeta, checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from asyncrl.learner.critic import explained_variance, whiten
from asyncrl.learner.distributed import Ranks, broadcast_groups, rank_device
from asyncrl.learner.ledger import RecentIds
from asyncrl.learner.losses import (
    LossSettings,
    PolicyLossInputs,
    gae_advantages,
    group_advantages,
    kl_penalty,
    last_token_rewards,
    policy_loss,
    value_loss,
)
from asyncrl.protocol import TrajectoryGroup
from asyncrl.queue.client import queue_metrics

log = logging.getLogger("asyncrl.learner")


def loss_settings(cfg: Config) -> LossSettings:
    names = {f.name for f in dataclasses.fields(LossSettings)}
    settings = LossSettings(**{k: v for k, v in cfg.loss.model_dump().items() if k in names})
    if cfg.loss.kl_in_reward:
        settings.kl_coef = 0.0  # the penalty goes into the rewards instead (see Learner.step)
    return settings


def shard_rows(num_rows: int, ranks: Ranks) -> slice:
    """This rank's contiguous share of the batch's rows; shares differ by at most one row."""
    per, extra = divmod(num_rows, ranks.world_size)
    start = ranks.rank * per + min(ranks.rank, extra)
    return slice(start, start + per + (1 if ranks.rank < extra else 0))


class Learner:
    def __init__(self, cfg: Config, out_dir: Optional[Path] = None, pad_id: int = 0, resume: bool = False):
        self.cfg = cfg
        self.out_dir = out_dir
        self.pad_id = pad_id
        self.ranks = Ranks.from_env()
        torch.set_num_threads(cfg.learner.threads)
        torch.manual_seed(cfg.learner.seed)
        self.device = rank_device(cfg.learner.device, self.ranks)
        self.backend = build_backend(cfg, self.ranks, self.device)
        self.loss_settings = loss_settings(cfg)
        self.version = 0
        # (lease, delivered group ids) of trained steps whose acknowledgement waits for a checkpoint.
        self.pending: list[tuple[int, list[str]]] = []
        # Groups already in the weights whose lease may still come back (expired before its ack).
        self.trained_unacked: set[str] = set()
        # Acknowledged groups a producer may still resend (to a restarted queue): bounded.
        self.acked = RecentIds(cfg.learner.remember_trained)
        self._resume_leases: list[int] = []
        self._last_checkpoint = 0
        if resume:
            self._resume()
        self.consumer = self.broadcaster = None
        self.tracker = None
        self._ledger = None
        if self.ranks.is_main:
            from asyncrl.queue.client import QueueConsumer
            from asyncrl.tracking import build_tracker
            from asyncrl.weights.broadcaster import WeightBroadcaster

            self.tracker = build_tracker(cfg, out_dir)
            from asyncrl.security import curve_for

            curve = curve_for(cfg.security, "learner")
            self.consumer = QueueConsumer(
                cfg.queue.address, name="learner-0", vocab_size=self._vocab_size(), timeout_s=cfg.queue.request_timeout_s, curve=curve,
                shm_views=True,  # a step copies the arrays into its tensors before its lease is acknowledged
            )
            self.consumer.trained_ids = self.trained_ids
            self.broadcaster = WeightBroadcaster.from_config(cfg.weights, curve=curve)
            if out_dir is not None:
                # One line per step: which groups went into which version. Audits contract 4.
                self._ledger = open(out_dir / "trained_groups.jsonl", "a", buffering=1)

    @property
    def model(self) -> torch.nn.Module:
        return self.backend.module

    @property
    def checkpointing(self) -> bool:
        return self.cfg.learner.checkpoint_every > 0 and self.out_dir is not None

    def _vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0]) if self.cfg.learner.backend == "torch" else self.cfg.model.vocab_size

    def _resume(self) -> None:
        if self.out_dir is None:
            raise ValueError("resuming needs the run's output directory (--out), where its checkpoints are")
        path = latest_checkpoint(checkpoint_dir(self.out_dir))
        if path is None:
            log.warning("no checkpoint under %s: starting at policy version 0", checkpoint_dir(self.out_dir))
            return
        meta = load_checkpoint(path, self.backend, self.cfg.learner.backend)
        self.version = self._last_checkpoint = meta.version
        self._resume_leases = list(meta.leases)
        self.trained_unacked = set(meta.group_ids)
        log.info("resumed from %s at policy version %d", path, meta.version)

    def publish(self) -> float:
        tensors = self.backend.publish_tensors()  # collective under ZeRO-3: every rank walks it
        if not self.ranks.is_main:
            for _ in tensors:
                pass
            return 0.0
        # The queue must know the version before any engine can hold it, or their groups look "from the future".
        self.consumer.set_version(self.version)
        return self.broadcaster.publish(tensors, self.version)

    def _next_batch(self, should_stop: Callable[[], bool]) -> Optional[list[TrajectoryGroup]]:
        """Rank 0: the next batch of groups not yet trained, or None to stop."""
        cfg = self.cfg
        while not should_stop():
            lease, groups = self.consumer.get_batch(
                self.version, cfg.learner.groups_per_step, cfg.learner.batch_timeout_s, should_stop
            )
            if lease is None:
                return None
            ids = [g.group_id for g in groups]
            self.pending.append((lease, ids))
            fresh = [g for g in groups if g.group_id not in self.trained_unacked and g.group_id not in self.acked]
            if len(fresh) < len(groups):
                log.info("skipped %d redelivered groups already trained", len(groups) - len(fresh))
            if fresh:
                return fresh
            if not self.checkpointing:
                self._ack_pending()
        return None

    def _ack_pending(self) -> None:
        for lease, ids in self.pending:
            if self.consumer.ack(lease) > 0:
                # Acknowledged: this queue settled them; only a restarted one could be sent them again.
                self.trained_unacked.difference_update(ids)
            self.acked.add(ids)
        self.pending.clear()

    def trained_ids(self) -> list[str]:
        """Every group id trained that a producer may still send again: told to the queue in each hello."""
        pending = (gid for _, ids in self.pending for gid in ids)
        return sorted(self.trained_unacked.union(self.acked, pending))

    def checkpoint(self) -> Path:
        """Save a checkpoint holding every step so far, then acknowledge their leases. Collective."""
        ids = [gid for _, group_ids in self.pending for gid in group_ids]
        meta = CheckpointMeta(
            version=self.version,
            leases=[lease for lease, _ in self.pending],
            group_ids=sorted(set(ids) | self.trained_unacked),
            backend=self.cfg.learner.backend,
        )
        path = save_checkpoint(checkpoint_dir(self.out_dir), self.backend, meta, self.ranks, self.cfg.learner.keep_checkpoints)
        self._last_checkpoint = self.version
        if self.ranks.is_main:
            self.trained_unacked.update(ids)
            self._ack_pending()
        return path

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        cfg = self.cfg
        main = self.ranks.is_main
        if main:
            # With its version: the queue then redelivers at once what a dead predecessor held.
            self.consumer.hello("consumer", self.version)
            for lease in self._resume_leases:
                self.consumer.ack(lease)  # in case the learner died between its checkpoint and the acks
        self.publish()
        start = last = time.perf_counter()
        finished = False
        try:
            while self.version < cfg.learner.steps:
                wait_start = time.perf_counter()
                groups = self._next_batch(should_stop) if main else None
                groups = broadcast_groups(groups, self.ranks)
                if groups is None:
                    break
                wait_s = time.perf_counter() - wait_start
                record = self.step(groups)
                if main:
                    self.trained_unacked.update(g.group_id for g in groups)
                    if self._ledger is not None:
                        self._ledger.write(json.dumps({"version": self.version, "group_ids": [g.group_id for g in groups]}) + "\n")
                checkpoint_s = 0.0
                if self.checkpointing and self.version % cfg.learner.checkpoint_every == 0:
                    t0 = time.perf_counter()
                    self.checkpoint()
                    checkpoint_s = time.perf_counter() - t0
                elif main and not self.checkpointing:
                    self._ack_pending()
                publish_s = self.publish() if self.version % cfg.learner.sync_every == 0 else 0.0
                if main:
                    now = time.perf_counter()
                    record.update(
                        wait_s=wait_s,
                        publish_s=publish_s,
                        checkpoint_s=checkpoint_s,
                        samples_per_s=record["samples"] / (now - last),
                        tokens_per_s=record["tokens"] / (now - last),
                        wall_s=now - start,
                    )
                    if self.version % 10 == 0 or self.version == cfg.learner.steps:
                        # The queue's counters (drops, rejects, depth) every 10 steps: one round trip.
                        record.update(queue_metrics(self.consumer.stats()))
                    last = now
                    self.tracker.write(record)
            finished = True
        finally:
            # Saved on the way out of an error too, so that trained steps are acknowledged now
            # rather than trained again after a lease expiry; but not across ranks, where the
            # others may be stuck in a collective that this rank abandoned.
            if self.checkpointing and self.version > self._last_checkpoint and (finished or not self.ranks.distributed):
                self.checkpoint()
        if main:
            self.consumer.close_queue()
        return self.version

    def _forward_no_grad(self, model: torch.nn.Module, batch: Batch, micros: list[slice]) -> torch.Tensor:
        with torch.no_grad():
            parts = [response_logprobs(model, select_rows(batch, rows), self.cfg.sampling.temperature)[0] for rows in micros]
        return torch.cat(parts)

    def _rewards(self, batch: Batch, micros: list[slice]) -> torch.Tensor:
        """Group rewards, minus kl_coef x each sample's summed KL to the reference when loss.kl_in_reward."""
        lc = self.cfg.loss
        if not (lc.kl_in_reward and self.backend.ref is not None):
            return batch.rewards
        # Over the whole batch on every rank: a group's advantages need all its samples' rewards.
        prox = self._forward_no_grad(self.model, batch, micros)
        ref = self._forward_no_grad(self.backend.ref, batch, micros)
        kl = torch.where(batch.loss_mask.bool(), kl_penalty(prox, ref, lc.kl_estimator), 0.0).sum(-1)
        return batch.rewards - lc.kl_coef * kl.reshape(batch.rewards.shape)

    def step(self, groups: list[TrajectoryGroup]) -> dict:
        """One optimizer step on one batch; advances the policy version by one. Collective."""
        cfg = self.cfg
        ls = self.loss_settings
        held = self.version
        step_start = time.perf_counter()
        batch = collate(groups, self.pad_id, self.device)
        budget = cfg.learner.micro_batch_tokens
        rewards = self._rewards(batch, micro_batches(batch, budget))
        own = shard_rows(batch.num_samples, self.ranks)
        shard = select_rows(batch, own)
        head = self.backend.value_head
        shard_adv = shard_returns = shard_old_values = None
        values_s = 0.0
        micros = self._micro_plan(shard, budget)
        if head is None:
            shard_adv = group_advantages(rewards, cfg.loss.advantage, cfg.loss.adv_eps).reshape(-1)[own]
        else:
            shard_rewards = last_token_rewards(rewards.reshape(-1), batch.loss_mask)[own]
            if cfg.loss.gae_whiten and len(micros) > 1:
                # Whitening needs every old value of the shard before the first loss. Otherwise GAE
                # is per sample, and each micro-batch's training forward gives its own old values.
                t0 = time.perf_counter()
                shard_old_values = self._values_before_update(shard, micros)
                shard_adv, shard_returns = self._gae(shard_rewards, shard_old_values, shard.loss_mask)
                values_s = time.perf_counter() - t0
        with_entropy = ls.entropy_coef > 0
        use_ref = self.backend.ref is not None and ls.kl_coef > 0
        temperature = cfg.sampling.temperature
        # DeepSpeed averages gradients over ranks; scaling by the world size makes that average
        # the gradient of the whole batch's loss.
        scale = self.ranks.world_size
        parts: dict[str, list[torch.Tensor]] = {
            "logprobs": [], "prox": [], "entropy": [], "ref": [], "adv": [], "values": [], "old_values": [], "returns": []
        }
        outputs = []
        prox_s = 0.0
        self.backend.zero_grad()
        for i, (rows, weight_on) in enumerate(micros):
            mb = select_rows(shard, rows)
            ref_lp = None
            if use_ref:
                with torch.no_grad():
                    ref_lp = response_logprobs(self.backend.ref, mb, temperature)[0]
            prox = old_values = None
            if cfg.learner.recompute_prox:
                t0 = time.perf_counter()
                with torch.no_grad():
                    before = response_forward(self.model, mb, temperature, value_head=head)
                prox, old_values = before.logprobs, before.values
                prox_s += time.perf_counter() - t0
            forward = response_forward(self.model, mb, temperature, with_entropy, value_head=head)
            logprobs, entropy = forward.logprobs, forward.entropy
            prox = logprobs.detach() if prox is None else prox
            returns = None
            if shard_adv is not None:
                adv = shard_adv[rows]
                if head is not None:
                    old_values, returns = shard_old_values[rows], shard_returns[rows]
            else:
                # This forward ran with the weights before the update: its values are the old values.
                old_values = forward.values.detach() if old_values is None else old_values
                adv, returns = self._gae(shard_rewards[rows], old_values, mb.loss_mask)
            out = policy_loss(
                PolicyLossInputs(
                    logprobs=logprobs,
                    prox_logprobs=prox,
                    behav_logprobs=mb.behav_logprobs,
                    advantages=adv,
                    loss_mask=mb.loss_mask,
                    ref_logprobs=ref_lp,
                    entropy=entropy,
                ),
                ls,
            )
            loss = out.loss
            if head is not None:
                critic = value_loss(forward.values, old_values, returns, mb.loss_mask, cfg.loss.value_clip, ls.agg)
                loss = loss + cfg.loss.value_coef * critic.loss
            weight = loss_weight(mb.loss_mask, batch.loss_mask, ls.agg) * scale if weight_on else 0.0
            self.backend.backward(loss * weight, last=i == len(micros) - 1)
            if weight_on:
                outputs.append(out)
                parts["logprobs"].append(logprobs.detach())
                parts["prox"].append(prox)
                parts["entropy"].append(entropy.detach() if entropy is not None else None)
                parts["ref"].append(ref_lp)
                parts["adv"].append(adv)
                if head is not None:
                    parts["values"].append(forward.values.detach())
                    parts["old_values"].append(old_values)
                    parts["returns"].append(returns)
        grad_norm = self.backend.step()
        self.version += 1
        if len(outputs) == 1:
            metrics = dict(outputs[0].metrics)
        else:
            metrics = self._shard_metrics(shard, torch.cat(parts["adv"]), parts)
        if head is not None:
            metrics.update(self._critic_metrics(shard, parts))
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
            "grad_norm": grad_norm,
            "samples": batch.num_samples,
            "tokens": batch.num_tokens,
            "micro_batches": len(micros),
            "step_s": time.perf_counter() - step_start,
            "prox_s": prox_s,
            **({"values_s": values_s} if head is not None else {}),
            **metrics,
        }

    def _micro_plan(self, shard: Batch, budget: int) -> list[tuple[slice, bool]]:
        """(rows, counts) per micro-batch. Every rank runs the same number of forward passes,
        because ZeRO-3 gathers parameters collectively in each; a rank with fewer rows repeats
        its first row with weight 0 to keep in step."""
        rows = [(s, True) for s in micro_batches(shard, budget)]
        if not self.ranks.distributed:
            return rows
        count = torch.tensor([len(rows)], dtype=torch.int64, device=_comm_device_of(self.device))
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        return rows + [(slice(0, 1), False)] * (int(count) - len(rows))

    def _shard_metrics(self, shard: Batch, shard_adv: torch.Tensor, parts: dict) -> dict:
        """Diagnostics of the whole shard at once, from the micro-batches' detached tensors:
        max, min and ESS do not average over micro-batches."""

        def cat(name: str) -> Optional[torch.Tensor]:
            return None if not parts[name] or parts[name][0] is None else torch.cat(parts[name])

        with torch.no_grad():
            out = policy_loss(
                PolicyLossInputs(
                    logprobs=cat("logprobs"),
                    prox_logprobs=cat("prox"),
                    behav_logprobs=shard.behav_logprobs,
                    advantages=shard_adv,
                    loss_mask=shard.loss_mask,
                    ref_logprobs=cat("ref"),
                    entropy=cat("entropy"),
                ),
                self.loss_settings,
            )
        return out.metrics

    def _values_before_update(self, shard: Batch, micros: list[tuple[slice, bool]]) -> torch.Tensor:
        """The value head's values of the whole shard under the current weights, without grad."""
        with torch.no_grad():
            parts = [
                response_forward(self.model, select_rows(shard, rows), self.cfg.sampling.temperature, value_head=self.backend.value_head).values
                for rows, counts in micros
                if counts
            ]
        return torch.cat(parts)

    def _gae(self, token_rewards: torch.Tensor, values: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages for the policy loss, returns for the value loss) of the shard."""
        lc = self.cfg.loss
        advantages, returns = gae_advantages(token_rewards, values, loss_mask, lc.gamma, lc.lam)
        if lc.gae_whiten:
            advantages = whiten(advantages, loss_mask, lc.adv_eps)
        return advantages, returns

    def _critic_metrics(self, shard: Batch, parts: dict) -> dict:
        """value_loss and value_clip_frac of the whole shard, and how much of the returns'
        variance the values before the update explained."""
        values, old_values, returns = (torch.cat(parts[k]) for k in ("values", "old_values", "returns"))
        with torch.no_grad():
            critic = value_loss(values, old_values, returns, shard.loss_mask, self.cfg.loss.value_clip, self.loss_settings.agg)
        mask = shard.loss_mask.bool()
        return {
            **critic.metrics,
            "explained_variance": explained_variance(old_values, returns, shard.loss_mask),
            "value_mean": float(old_values[mask].mean()) if mask.any() else 0.0,
        }

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self._ledger is not None:
            self._ledger.close()
        if self.consumer is not None:
            self.consumer.close()
        if self.broadcaster is not None:
            self.broadcaster.close()


def _comm_device_of(device: str) -> torch.device:
    return torch.device(device) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
