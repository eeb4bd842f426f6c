"""PPO with a critic (loss.advantage: gae): the value head trains, clips, checkpoints, stays on the learner,
and the trainer feeds the policy loss exactly the GAE advantages of its values."""

import numpy as np
import pytest
import torch

import asyncrl.learner.trainer as trainer
from asyncrl.config import ConfigError, load_config
from asyncrl.learner.batch import collate, response_forward
from asyncrl.learner.losses import gae_advantages, last_token_rewards, value_loss
from asyncrl.protocol import Sample, TrajectoryGroup, new_group_id
from test_learner import groups_for_training, make_learner

GAE = "loss.advantage=gae"


def published_names(learner) -> list[str]:
    return [name for name, _ in learner.backend.publish_tensors()]


def test_value_loss_falls_over_steps_on_fixed_groups():
    groups = groups_for_training(seed=3)
    learner = make_learner(GAE, "learner.lr=0.01")
    try:
        records = [learner.step(groups) for _ in range(6)]
    finally:
        learner.close()
    losses = [r["value_loss"] for r in records]
    assert losses[-1] < 0.8 * losses[0], losses
    assert records[-1]["explained_variance"] > records[0]["explained_variance"]
    assert {"value_loss", "value_clip_frac", "explained_variance", "value_mean"} <= records[0].keys()


def test_value_clipping_binds_when_values_moved_far_from_the_old_ones():
    groups = groups_for_training(seed=4)
    learner = make_learner(GAE, "learner.lr=0.05")
    try:
        batch = collate(groups, learner.pad_id)
        head = learner.backend.value_head
        old = response_forward(learner.model, batch, value_head=head).values.detach()
        for _ in range(3):
            learner.step(groups)
        moved = response_forward(learner.model, batch, value_head=head).values
        _, returns = gae_advantages(
            last_token_rewards(batch.rewards.reshape(-1), batch.loss_mask), old, batch.loss_mask, 1.0, 0.95
        )
        clipped = value_loss(moved, old, returns, batch.loss_mask, clip=0.01)
        unclipped = value_loss(moved, old, returns, batch.loss_mask, clip=None)
    finally:
        learner.close()
    assert clipped.metrics["value_clip_frac"] > 0
    assert clipped.loss > unclipped.loss


def test_with_one_update_per_batch_the_old_values_are_current_and_clipping_is_inert():
    groups = groups_for_training(seed=5)
    grads, records = [], []
    for clip in ("0.2", "null"):
        learner = make_learner(GAE, f"loss.value_clip={clip}")
        try:
            learner.backend.value_head.bias.data.fill_(0.3)
            records.append(learner.step(groups))
            grads.append([p.grad.clone() for p in learner.backend.value_head.parameters()])
        finally:
            learner.close()
    assert records[0]["value_clip_frac"] == 0.0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_round_trips_the_value_head_and_its_optimizer_state(tmp_path):
    learner = make_learner(GAE, "learner.checkpoint_every=1", out_dir=tmp_path)
    try:
        learner.step(groups_for_training(seed=1))
        learner.step(groups_for_training(seed=2))
        learner.checkpoint()
        head = learner.backend.value_head
        weights = {k: v.clone() for k, v in head.state_dict().items()}
        moments = [learner.backend.optimizer.state[p]["exp_avg"].clone() for p in head.parameters()]
    finally:
        learner.close()
    assert weights["weight"].abs().sum() > 0  # it trained: zero-init would round-trip trivially
    resumed = make_learner(GAE, "learner.checkpoint_every=1", out_dir=tmp_path, resume=True)
    try:
        head = resumed.backend.value_head
        for name, tensor in head.state_dict().items():
            torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)
        for p, moment in zip(head.parameters(), moments):
            torch.testing.assert_close(resumed.backend.optimizer.state[p]["exp_avg"], moment, rtol=0, atol=0)
    finally:
        resumed.close()


def test_resuming_a_checkpoint_without_a_value_head_under_gae_is_refused(tmp_path):
    learner = make_learner("learner.checkpoint_every=1", out_dir=tmp_path)
    try:
        learner.step(groups_for_training(seed=1))
        learner.checkpoint()
    finally:
        learner.close()
    with pytest.raises(ValueError, match="without a value head.*loss.advantage"):
        make_learner(GAE, "learner.checkpoint_every=1", out_dir=tmp_path, resume=True)


def test_the_value_head_is_not_published_to_engines():
    critic, plain = make_learner(GAE), make_learner()
    try:
        critic.step(groups_for_training(seed=6))
        assert published_names(critic) == published_names(plain)
        head_shapes = {tuple(p.shape) for p in critic.backend.value_head.parameters()}
        assert not head_shapes & {tuple(t.shape) for _, t in critic.backend.publish_tensors()}
    finally:
        critic.close()
        plain.close()


def test_the_trainer_feeds_the_policy_loss_the_gae_advantages_of_its_values(monkeypatch):
    # One group: sample a has 3 tokens and reward 1, sample b has 2 tokens and reward 0.
    def sample(tokens, reward):
        k = len(tokens)
        return Sample(np.array(tokens, np.int32), np.full(k, -3.4, np.float32), np.zeros(k, np.int32), reward=reward)

    group = TrajectoryGroup(new_group_id(), np.array([5, 6], np.int32), [sample([7, 8, 9], 1.0), sample([10, 11], 0.0)])
    seen = []
    real_policy_loss = trainer.policy_loss

    def recording_policy_loss(inputs, settings):
        seen.append(inputs.advantages.clone())
        return real_policy_loss(inputs, settings)

    monkeypatch.setattr(trainer, "policy_loss", recording_policy_loss)
    learner = make_learner(GAE, "loss.gamma=0.9", "loss.lam=0.8", "loss.gae_whiten=false")
    try:
        learner.backend.value_head.bias.data.fill_(0.5)  # V = 0.5 on every state
        record = learner.step([group])
    finally:
        learner.close()
    # By hand, gamma * lam = 0.72, delta_t = r_t + 0.9 V_next - 0.5:
    #   a: A2 = 1 - 0.5 = 0.5; A1 = -0.05 + 0.72 * 0.5 = 0.31; A0 = -0.05 + 0.72 * 0.31 = 0.1732
    #   b: A1 = 0 - 0.5 = -0.5; A0 = -0.05 + 0.72 * -0.5 = -0.41; its third column is padding
    expected = torch.tensor([[0.1732, 0.31, 0.5], [-0.41, -0.5, 0.0]])
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)
    # Returns are A + V, so the value loss is 0.5 * mean of A^2 over the five tokens.
    assert record["value_loss"] == pytest.approx(0.5 * float(expected.square().sum()) / 5, rel=1e-5)


def test_whitened_advantages_have_mean_zero_and_unit_std_over_response_tokens(monkeypatch):
    seen = []
    real_policy_loss = trainer.policy_loss
    monkeypatch.setattr(trainer, "policy_loss", lambda inputs, settings: seen.append(inputs) or real_policy_loss(inputs, settings))
    learner = make_learner(GAE, "loss.gae_whiten=true")
    try:
        learner.step(groups_for_training(seed=7))
    finally:
        learner.close()
    counted = seen[0].advantages[seen[0].loss_mask.bool()]
    assert float(counted.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(counted.std()) == pytest.approx(1.0, rel=1e-4)
    assert not seen[0].advantages[~seen[0].loss_mask.bool()].any()


def test_micro_batched_gae_step_accumulates_the_gradient_of_the_whole_batch_whitened_or_not():
    groups = groups_for_training(seed=8)
    grads, records = [], []
    for budget, whiten in ((0, "false"), (1, "false"), (0, "true"), (1, "true")):
        learner = make_learner(GAE, f"learner.micro_batch_tokens={budget}", f"loss.gae_whiten={whiten}")
        try:
            learner.backend.value_head.bias.data.fill_(0.3)
            records.append(learner.step(groups))
            params = [*learner.model.parameters(), *learner.backend.value_head.parameters()]
            grads.append([p.grad.clone() for p in params])
        finally:
            learner.close()
    assert records[1]["micro_batches"] > 1
    for whole, split in ((0, 1), (2, 3)):
        for a, b in zip(grads[whole], grads[split]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        for key in ("loss", "value_loss", "explained_variance"):
            assert records[split][key] == pytest.approx(records[whole][key], rel=1e-5, abs=1e-7), key


def test_gae_with_the_deepspeed_backend_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match="loss.advantage=gae.*learner.backend=deepspeed"):
        load_config(None, [GAE, "learner.backend=deepspeed"])
