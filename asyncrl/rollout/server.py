"""A rollout server: load the newest weights, take admission tickets, generate, hand groups over.

Between generation batches it asks the learner for a newer weight version and swaps it in whole;
it starts only as many groups as the queue's tickets allow (contract 2), and resends each group
until the queue holds it (contract 4). It waits for version 0 from the learner before generating
anything, so it never samples with weights the learner does not have. Must never import learner
code.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable

import numpy as np
import torch

from asyncrl.config import Config
from asyncrl.modeling import build_model
from asyncrl.protocol import Sample, TrajectoryGroup, new_group_id
from asyncrl.queue.client import QueueProducer
from asyncrl.rollout.engine import SamplingParams, TorchEngine
from asyncrl.rollout.tasks import build_task
from asyncrl.weights.receiver import WeightReceiver

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
        model = build_model(cfg.model, rc.device)
        vocab = model.get_input_embeddings().weight.shape[0]
        if tok.vocab_size > vocab:
            raise ValueError(
                f"task {cfg.task.name!r} needs a vocabulary of {tok.vocab_size} tokens but model.vocab_size is {vocab}; "
                f"set model.vocab_size >= {tok.vocab_size}"
            )
        model.eval()
        self.engine = TorchEngine(model, tok.eos_token_id, tok.pad_token_id, rc.device)
        self.engine.version = -1  # nothing verified yet: version 0 must come from the learner
        self.params = SamplingParams.from_config(cfg.sampling)
        self.producer = QueueProducer(cfg.queue.address, self.engine_id, timeout_s=cfg.queue.request_timeout_s)
        self.receiver = WeightReceiver(cfg.weights.address, self.engine_id, timeout_s=cfg.queue.request_timeout_s)
        self.groups_sent = 0

    def refresh_weights(self) -> bool:
        update = self.receiver.poll(self.engine.version)
        if update is None:
            return False
        version, state = update
        self.engine.load_weights(state, version)
        log.info("%s now on version %d", self.engine_id, version)
        return True

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        self.producer.hello("producer")
        while self.engine.version < 0 and not should_stop():
            if not self.refresh_weights():
                time.sleep(0.05)
        pause = 0.002
        while not should_stop():
            self.refresh_weights()
            granted, closed = self.producer.ticket(self.engine.version, self.cfg.rollout.groups_per_batch)
            if closed:
                break
            if granted == 0:
                time.sleep(pause)  # waiting for the learner to move on (the staleness bound)
                pause = min(pause * 1.5, 0.05)
                continue
            pause = 0.002
            for group in self.generate(granted):
                self.producer.put(group)
                self.groups_sent += 1
        return self.groups_sent

    def generate(self, count: int) -> list[TrajectoryGroup]:
        prompts = [self.task.sample_prompt(self.rng) for _ in range(count)]
        version = self.engine.version
        start = time.perf_counter()
        outputs = self.engine.generate([p.tokens for p in prompts], self.params, self.generator)
        gen_s = time.perf_counter() - start
        groups = []
        for prompt, completions in zip(prompts, outputs):
            samples = [
                Sample(
                    tokens=np.asarray(c.tokens, np.int32),
                    behav_logprobs=np.asarray(c.logprobs, np.float32),
                    versions=np.full(len(c.tokens), version, np.int32),
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
                    timings={"generate_s": gen_s / max(1, count)},
                )
            )
        return groups

    def close(self) -> None:
        self.producer.close()
        self.receiver.close()
