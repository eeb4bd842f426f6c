"""A rollout server: load the newest weights, take admission tickets, generate, hand groups over.

Between generation batches it asks the learner for a newer weight version and swaps it in whole;
it starts only as many groups as the queue's tickets allow (contract 2), and resends each group
until the queue holds it (contract 4). It waits for version 0 from the learner before generating
anything, so it never samples with weights the learner does not have. Must never import learner
code.

Weights download on a background thread (`Prefetcher`); the engine stops only for the swap. With
`weights.update_mode: interrupt` a new version also stops a running generation batch between
decode steps: swap, then the same samples continue, each token tagged with the version that
produced it. An engine more than max_staleness versions behind the learner starts no new groups
until it has caught up (`StalenessGate`).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable

import numpy as np
import torch

from asyncrl.config import Config
from asyncrl.protocol import Sample, TrajectoryGroup, new_group_id
from asyncrl.queue.client import QueueProducer, QueueRequestError
from asyncrl.rollout.engine import SamplingParams, VersionedCompletion
from asyncrl.rollout.engines import build_engine
from asyncrl.rollout.engines.base import close as close_engine
from asyncrl.rollout.tasks import build_task
from asyncrl.security import curve_for
from asyncrl.weights.receiver import Prefetcher, WeightReceiver
from asyncrl.weights.staleness import StalenessGate

log = logging.getLogger("asyncrl.rollout")


class RolloutServer:
    def __init__(self, cfg: Config, index: int = 0):
        self.cfg = cfg
        self.engine_id = f"rollout-{index}"
        rc = cfg.rollout
        torch.set_num_threads(rc.threads)
        self.seed = rc.seed + index
        self.rng = random.Random(self.seed)
        self.generator = torch.Generator(device=rc.device).manual_seed(self.seed)
        self.task = build_task(cfg.task, cfg.model.path)
        tok = self.task.tokenizer
        self.engine = build_engine(cfg, tok)  # on version -1: version 0 must come from the learner
        self.params = SamplingParams.from_config(cfg.sampling)
        curve = curve_for(cfg.security, "rollout")
        self.producer = QueueProducer(cfg.queue.address, self.engine_id, timeout_s=cfg.queue.request_timeout_s, curve=curve,
                                      shm_min_bytes=cfg.queue.shm_min_bytes, arena_bytes=cfg.queue.arena_bytes)
        self.receiver = WeightReceiver(
            cfg.weights.address, self.engine_id, timeout_s=cfg.queue.request_timeout_s, transport=cfg.weights.transport,
            curve=curve,
        )
        self.prefetcher = Prefetcher(self.receiver)
        self.gate = StalenessGate(cfg.max_staleness)
        self.groups_sent = 0
        self.swaps = 0
        self.swap_s = 0.0
        """Seconds the engine could not generate because a version was being swapped in."""

    def refresh_weights(self) -> bool:
        """Swap in a downloaded version if one is staged; never waits for the network."""
        staged = self.prefetcher.take()
        if staged is None:
            return False
        version, state = staged
        start = time.perf_counter()
        with self.engine.paused():
            self.engine.load_weights(state, version)
        self.swap_s += time.perf_counter() - start
        self.swaps += 1
        self.prefetcher.running(version)
        log.info("%s now on version %d", self.engine_id, version)
        return True

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        self.producer.hello("producer")
        while self.engine.version < 0 and not should_stop():
            if not self.refresh_weights():
                self.prefetcher.wait(0.5, should_stop)
        pause = 0.002
        while not should_stop():
            self.refresh_weights()
            if not self.gate.admits(self.engine.version, self.prefetcher.learner_version):
                self.prefetcher.wait(0.05, should_stop)  # behind by more than K: catch up first
                continue
            try:
                granted, closed = self.producer.ticket(self.engine.version, self.cfg.rollout.groups_per_batch)
            except QueueRequestError as exc:
                if exc.code != "future_version":
                    raise
                # The learner went back to a checkpoint (or the queue restarted and has not heard
                # from it yet): follow it rather than generate with weights it no longer has.
                log.warning("%s: %s; waiting for the learner's version", self.engine_id, exc)
                self.prefetcher.wait(0.5, should_stop)
                continue
            if closed:
                break
            if granted == 0:
                self.producer.reconcile()  # hear what settled, and resend to a restarted queue
                time.sleep(pause)  # waiting for the learner to move on (the staleness bound)
                pause = min(pause * 1.5, 0.05)
                continue
            pause = 0.002
            for group in self.generate(granted):
                self._put(group)
        return self.groups_sent

    def settlement(self) -> dict:
        """How the groups this server handed over ended, as of a last look at the queue; for its exit log line."""
        # One short try: at shutdown the queue may be gone, and this must not hold the exit for minutes.
        self.producer.retries, self.producer.timeout_s = 0, min(self.producer.timeout_s, 5.0)
        try:
            self.producer.reconcile(force=True)
        except Exception as exc:  # the queue may already be gone at shutdown; the counts still say what is known
            log.warning("%s: could not ask the queue what became of %d groups: %s", self.engine_id,
                        len(self.producer.unsettled), exc)
        return {"outcomes": dict(sorted(self.producer.outcomes.items())), "unsettled": len(self.producer.unsettled),
                "resent": self.producer.resent}

    def _put(self, group: TrajectoryGroup) -> None:
        while True:
            try:
                self.producer.put(group)
                break
            except QueueRequestError as exc:
                if exc.code != "future_version":
                    raise
                if not self.producer.stats().get("learner_known", True):
                    # A restarted queue that has not yet heard the learner's version: the group is
                    # not from the future, the queue just does not know the present yet.
                    log.warning("%s: the queue has not heard from the learner yet; resending group %s shortly",
                                self.engine_id, group.group_id)
                    time.sleep(0.5)
                    continue
                # Generated by weights of a version the learner lost when it resumed from a checkpoint.
                log.warning("%s: group %s discarded: %s", self.engine_id, group.group_id, exc)
                return
        self.groups_sent += 1

    def generate(self, count: int) -> list[TrajectoryGroup]:
        prompts = [self.task.sample_prompt(self.rng) for _ in range(count)]
        start = time.perf_counter()
        outputs = self._generate_through_updates([p.tokens for p in prompts])
        gen_s = time.perf_counter() - start
        groups = []
        for prompt, completions in zip(prompts, outputs):
            samples = [
                Sample(
                    tokens=np.asarray(c.tokens, np.int32),
                    behav_logprobs=np.asarray(c.logprobs, np.float32),
                    versions=np.asarray(c.versions, np.int32),
                    reward=float(self.task.reward(prompt, c.tokens)),
                    finish_reason=c.finish_reason,
                )
                for c in completions
            ]
            groups.append(
                TrajectoryGroup(
                    group_id=new_group_id(),
                    prompt_tokens=np.asarray(prompt.tokens, np.int32),
                    samples=samples,
                    task=self.task.name,
                    engine_id=self.engine_id,
                    seed=self.seed,
                    reference=prompt.reference,
                    timings={"generate_s": gen_s / max(1, count), **self.weights_metrics()},
                )
            )
        return groups

    def weights_metrics(self) -> dict[str, float]:
        """Staleness-gate lag and waiting, and swap time, cumulative; travels in each group's timings."""
        return {**self.gate.metrics(), "swap_s": self.swap_s, "swaps": float(self.swaps)}

    def _generate_through_updates(self, prompts: list[list[int]]) -> list[list[VersionedCompletion]]:
        """One generation batch; in 'interrupt' mode a staged version stops it for a swap, then it continues."""
        interrupt = self.prefetcher.ready if self.cfg.weights.update_mode == "interrupt" else None
        outputs = self.engine.generate_versioned(prompts, self.params, self.generator, interrupt=interrupt)
        while any(c.finish_reason == "abort" for group in outputs for c in group):
            self.refresh_weights()
            outputs = self.engine.generate_versioned(prompts, self.params, self.generator, outputs, interrupt)
        return outputs

    def close(self) -> None:
        self.producer.close()
        self.prefetcher.close()
        close_engine(self.engine)  # stops an engine server this rollout server launched
