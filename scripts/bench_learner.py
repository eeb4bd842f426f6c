"""Benchmark: training tokens/s of one learner step against a plain PyTorch loop on the same batch.

    .venv/bin/python scripts/bench_learner.py --json runs/bench_learner.json

The learner step (`Learner.step`: collate, advantages, forward, decoupled loss with importance
correction and diagnostics, backward, clip, AdamW) runs on the quickstart model and a batch
shaped like quickstart's (8 groups x 8 samples, 6-token responses). The baseline is the least a
policy-gradient step can do on the same tensors: forward, log-softmax gather, a
REINFORCE-style loss, backward, clip, AdamW. Both use the same threads. Also measured: the
learner with `learner.recompute_prox=true`, which recomputes proximal log-probs in a separate
no-grad forward, and that forward's share of its step time.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asyncrl.config import load_config  # noqa: E402
from asyncrl.learner.batch import collate  # noqa: E402
from asyncrl.learner.trainer import Learner  # noqa: E402
from asyncrl.modeling import build_model  # noqa: E402
from asyncrl.protocol import Sample, TrajectoryGroup, new_group_id  # noqa: E402


def _address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def make_groups(cfg, seed: int = 0) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(seed)
    groups = []
    vocab, n, R = cfg.model.vocab_size, cfg.sampling.n, cfg.sampling.max_new_tokens
    for _ in range(cfg.learner.groups_per_step):
        prompt = rng.integers(3, vocab, size=cfg.task.num_digits + 2).astype(np.int32)
        samples = []
        for _ in range(n):
            k = int(rng.integers(R // 2, R + 1))
            samples.append(
                Sample(
                    tokens=rng.integers(3, vocab, size=k).astype(np.int32),
                    behav_logprobs=(-3.4 + 0.2 * rng.standard_normal(k)).astype(np.float32),
                    versions=np.zeros(k, np.int32),
                    reward=float(rng.integers(0, 2)),
                )
            )
        groups.append(TrajectoryGroup(new_group_id(), prompt, samples))
    return groups


def time_learner(cfg, groups, warmup: int, iters: int) -> tuple[list[float], list[float]]:
    learner = Learner(cfg)
    try:
        for _ in range(warmup):
            learner.step(groups)
        steps, prox = [], []
        for _ in range(iters):
            start = time.perf_counter()
            record = learner.step(groups)
            steps.append(time.perf_counter() - start)
            prox.append(record["prox_s"])
        return steps, prox
    finally:
        learner.close()


def time_plain(cfg, groups, warmup: int, iters: int) -> list[float]:
    torch.manual_seed(cfg.learner.seed)
    model = build_model(cfg.model, cfg.learner.device)
    model.train()
    lc = cfg.learner
    opt = torch.optim.AdamW(model.parameters(), lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay)
    batch = collate(groups, 0, cfg.learner.device)
    adv = (batch.rewards - batch.rewards.mean(1, keepdim=True)).reshape(-1, 1)
    P = batch.prompt_len

    def step() -> None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False).logits
        logprobs = torch.log_softmax(logits[:, P - 1 : -1].float(), -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
        loss = -(adv * logprobs * batch.loss_mask).sum() / batch.loss_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), lc.grad_clip)
        opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_out", default=None, help="Write the results as JSON here.")
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="Alternate the measurements this often; medians are reported.")
    args = parser.parse_args()
    overrides = [f"queue.address={_address()}", f"weights.address={_address()}"]
    cfg = load_config(args.config, overrides)
    recompute_cfg = load_config(args.config, [*overrides, "learner.recompute_prox=true"])
    torch.set_num_threads(cfg.learner.threads)
    groups = make_groups(cfg)
    tokens = collate(groups, 0).num_tokens
    learner_s, plain_s, recompute_s, prox_s = [], [], [], []
    for _ in range(args.rounds):  # interleaved, so that machine noise hits all three alike
        plain_s += time_plain(cfg, groups, args.warmup, args.iters)
        learner_s += time_learner(cfg, groups, args.warmup, args.iters)[0]
        steps, prox = time_learner(recompute_cfg, groups, args.warmup, args.iters)
        recompute_s += steps
        prox_s += prox
    med = statistics.median
    result = {
        "model_params": sum(p.numel() for p in build_model(cfg.model).parameters()),
        "batch": {"groups": len(groups), "samples": sum(len(g.samples) for g in groups), "tokens": tokens},
        "threads": cfg.learner.threads,
        "plain_tokens_per_s": tokens / med(plain_s),
        "learner_tokens_per_s": tokens / med(learner_s),
        "learner_vs_plain": med(plain_s) / med(learner_s),
        "learner_recompute_prox_tokens_per_s": tokens / med(recompute_s),
        "learner_recompute_prox_vs_plain": med(plain_s) / med(recompute_s),
        "prox_recompute_share": sum(prox_s) / sum(recompute_s),
        "step_ms": {"plain": 1e3 * med(plain_s), "learner": 1e3 * med(learner_s), "learner_recompute_prox": 1e3 * med(recompute_s)},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
