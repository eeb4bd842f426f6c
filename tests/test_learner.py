"""The learner's step: micro-batching that changes nothing, entropy and KL terms, diagnostics."""

import numpy as np
import pytest
import torch

from asyncrl.config import load_config
from asyncrl.learner.trainer import Learner
from asyncrl.protocol import Sample, TrajectoryGroup, new_group_id
from conftest import port_overrides

TINY = ["model.hidden_size=16", "model.intermediate_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1"]


def groups_for_training(count=3, n=4, seed=0, version=0, vocab=32) -> list[TrajectoryGroup]:
    """Groups with prompts and responses of uneven lengths and varied rewards, as a step sees them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        prompt = rng.integers(3, vocab, size=int(rng.integers(2, 6))).astype(np.int32)
        samples = []
        for _ in range(n):
            k = int(rng.integers(1, 7))
            samples.append(
                Sample(
                    tokens=rng.integers(3, vocab, size=k).astype(np.int32),
                    behav_logprobs=(-3.5 + 0.3 * rng.standard_normal(k)).astype(np.float32),
                    versions=np.full(k, version, np.int32),
                    reward=float(rng.integers(0, 2)),
                )
            )
        out.append(TrajectoryGroup(new_group_id(), prompt, samples))
    return out


def make_learner(*overrides, out_dir=None, resume=False) -> Learner:
    cfg = load_config(None, [*TINY, "learner.groups_per_step=3", "sampling.n=4", *port_overrides(), *overrides])
    return Learner(cfg, out_dir, resume=resume)


def gradients_after_step(groups, *overrides) -> dict[str, torch.Tensor]:
    learner = make_learner(*overrides)
    try:
        learner.step(groups)
        return {name: p.grad.clone() for name, p in learner.model.named_parameters()}
    finally:
        learner.close()


def assert_same_gradients(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_accumulate_the_gradient_of_the_whole_batch(agg):
    groups = groups_for_training()
    whole = gradients_after_step(groups, f"loss.agg={agg}")
    # A budget of one row per micro-batch: the most splitting there is.
    split = gradients_after_step(groups, f"loss.agg={agg}", "learner.micro_batch_tokens=1")
    assert_same_gradients(whole, split)


def test_reused_training_forward_gives_the_recomputed_proximal_gradient():
    groups = groups_for_training()
    reused = gradients_after_step(groups)
    recomputed = gradients_after_step(groups, "learner.recompute_prox=true")
    assert_same_gradients(reused, recomputed)


def test_micro_batched_step_reports_the_diagnostics_of_the_whole_batch():
    groups = groups_for_training()
    records = []
    for budget in (0, 1):
        learner = make_learner(f"learner.micro_batch_tokens={budget}", "loss.entropy_coef=0.01")
        try:
            records.append(learner.step(groups))
        finally:
            learner.close()
    whole, split = records
    assert split["micro_batches"] == 12 and whole["micro_batches"] == 1
    for key in ("loss", "is_weight_mean", "is_weight_max", "is_weight_min", "ess", "mismatch_kl", "entropy"):
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key


def test_step_record_holds_every_off_policy_diagnostic():
    learner = make_learner()
    try:
        record = learner.step(groups_for_training(version=0))
    finally:
        learner.close()
    expected = {
        "is_weight_mean", "is_weight_max", "is_weight_min", "is_capped_frac", "is_masked_frac", "ess",
        "mismatch_kl", "clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "staleness_hist",
        "staleness_mean", "staleness_max", "grad_norm", "policy_version",
    }
    assert expected <= record.keys()
    assert record["staleness_hist"] == {"0": 3}
    # behav_logprobs near -3.5 against a random-init model over 32 tokens (log 1/32 = -3.47): off, but not wildly.
    assert 0 < record["mismatch_kl"] < 1 and 0 < record["ess"] <= 1


def test_entropy_bonus_adds_the_entropy_gradient():
    groups = groups_for_training()
    plain = gradients_after_step(groups)
    bonus = gradients_after_step(groups, "loss.entropy_coef=0.5")
    assert any(not torch.allclose(plain[k], bonus[k]) for k in plain)


def test_reference_model_is_the_frozen_initial_policy():
    learner = make_learner("loss.kl_coef=0.1")
    try:
        first = learner.step(groups_for_training(seed=1))
        second = learner.step(groups_for_training(seed=2))
        ref = learner.backend.ref
        assert all(not p.requires_grad for p in ref.parameters())
    finally:
        learner.close()
    # Version 0 is the reference itself; one update later the policy has moved away from it.
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)
    assert second["kl"] > 1e-6


def test_kl_in_reward_penalises_rewards_not_the_loss():
    learner = make_learner("loss.kl_coef=0.1", "loss.kl_in_reward=true", "loss.kl_estimator=k1")
    try:
        learner.step(groups_for_training(seed=1))
        record = learner.step(groups_for_training(seed=2))
    finally:
        learner.close()
    assert learner.loss_settings.kl_coef == 0.0
    assert "kl" not in record
