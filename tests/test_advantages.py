"""Specification of the advantage estimators. Every expected value is worked out by hand in the
comment next to it, never by calling the code under test."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from asyncrl.learner.advantages import gae_advantages, group_advantages, last_token_rewards

TOL = dict(atol=1e-5, rtol=0.0)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# --- group estimators -------------------------------------------------------------------------


def test_grpo_divides_by_the_unbiased_group_std():
    # mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = 0.577350; 0.5 / 0.577350 = 0.866025
    assert_close(group_advantages(t([[1, 0, 1, 0]]), "grpo"), t([[0.866025, -0.866025, 0.866025, -0.866025]]), **TOL)


def test_grpo_on_three_successes_and_one_failure():
    # mean 0.75; unbiased var = (3 * 0.0625 + 0.5625) / 3 = 0.25, std 0.5
    assert_close(group_advantages(t([[1, 1, 1, 0]]), "grpo"), t([[0.5, 0.5, 0.5, -1.5]]), **TOL)


def test_grpo_normalises_each_group_on_its_own():
    # group 1 as above; group 2: mean 2, unbiased var (3 * 4 + 36) / 3 = 16, std 4 -> -2/4, 6/4
    got = group_advantages(t([[1, 1, 1, 0], [0, 0, 0, 8]]), "grpo")
    assert_close(got, t([[0.5, 0.5, 0.5, -1.5], [-0.5, -0.5, -0.5, 1.5]]), **TOL)


def test_grpo_gives_zero_to_a_group_whose_rewards_are_all_equal():
    assert_close(group_advantages(t([[2, 2, 2]]), "grpo"), t([[0, 0, 0]]), **TOL)


def test_dr_grpo_subtracts_the_group_mean_only():
    assert_close(group_advantages(t([[1, 1, 1, 0]]), "dr_grpo"), t([[0.25, 0.25, 0.25, -0.75]]), **TOL)


def test_rloo_subtracts_the_mean_of_the_other_samples():
    # 1 - mean(0, 0, 0) = 1; 0 - mean(1, 0, 0) = -1/3
    assert_close(group_advantages(t([[1, 0, 0, 0]]), "rloo"), t([[1.0, -0.333333, -0.333333, -0.333333]]), **TOL)


def test_reinforce_pp_normalises_group_centred_rewards_by_the_batch_std():
    # centred [[0.5, -0.5], [0, 0]]; unbiased batch var = 0.5 / 3, std 0.408248; 0.5 / 0.408248 = 1.224745
    got = group_advantages(t([[1, 0], [1, 1]]), "reinforce_pp")
    assert_close(got, t([[1.224745, -1.224745], [0.0, 0.0]]), **TOL)


def test_integer_rewards_are_treated_as_floats():
    got = group_advantages(torch.tensor([[1, 1, 1, 0]]), "grpo")
    assert got.dtype == torch.get_default_dtype()
    assert_close(got, t([[0.5, 0.5, 0.5, -1.5]]), **TOL)


def test_unknown_method_is_rejected_by_name():
    with pytest.raises(ValueError, match="'gae'.*grpo"):
        group_advantages(t([[1, 0]]), "gae")


def test_grpo_needs_two_samples_per_group():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(t([[1], [0]]), "grpo")


def test_flat_rewards_are_rejected_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"\[groups, samples per group\]"):
        group_advantages(t([1, 0, 1, 0]), "grpo")


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 4), min_size=3, max_size=3), min_size=1, max_size=4),
    st.sampled_from(["grpo", "dr_grpo", "rloo"]),
)
def test_group_advantages_sum_to_zero_within_each_group(rows, method):
    adv = group_advantages(t(rows), method)
    assert_close(adv.sum(dim=1), torch.zeros(len(rows)), atol=1e-4, rtol=0.0)


# --- GAE --------------------------------------------------------------------------------------


def test_gae_on_a_three_step_episode():
    # gamma 0.9, lam 0.8, rewards [0, 0, 1], values [0.5, 0.6, 0.7]
    # t2: delta = 1 - 0.7 = 0.3                      A2 = 0.3
    # t1: delta = 0.9 * 0.7 - 0.6 = 0.03             A1 = 0.03 + 0.72 * 0.3 = 0.246
    # t0: delta = 0.9 * 0.6 - 0.5 = 0.04             A0 = 0.04 + 0.72 * 0.246 = 0.21712
    adv, ret = gae_advantages(t([[0, 0, 1]]), t([[0.5, 0.6, 0.7]]), torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert_close(adv, t([[0.21712, 0.246, 0.3]]), **TOL)
    assert_close(ret, t([[0.71712, 0.846, 1.0]]), **TOL)


def test_gae_with_gamma_and_lam_one_is_monte_carlo_return_minus_value():
    adv, ret = gae_advantages(t([[0, 0, 1]]), t([[0.5, 0.6, 0.7]]), torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert_close(adv, t([[0.5, 0.4, 0.3]]), **TOL)
    assert_close(ret, t([[1.0, 1.0, 1.0]]), **TOL)


def test_gae_with_lam_zero_is_the_one_step_td_error():
    # 0 + 0.9 * 0.6 - 0.5 = 0.04; 0 + 0.9 * 0.7 - 0.6 = 0.03; 1 - 0.7 = 0.3
    adv, _ = gae_advantages(t([[0, 0, 1]]), t([[0.5, 0.6, 0.7]]), torch.ones(1, 3), gamma=0.9, lam=0.0)
    assert_close(adv, t([[0.04, 0.03, 0.3]]), **TOL)


def test_gae_ends_the_episode_at_the_last_counted_token():
    # The padded token's reward 5 and value 9 are ignored: A1 = 1 - 0.6, A0 = 0.6 - 0.5 + 0.4
    adv, ret = gae_advantages(t([[0, 1, 5]]), t([[0.5, 0.6, 9]]), t([[1, 1, 0]]), gamma=1.0, lam=1.0)
    assert_close(adv, t([[0.5, 0.4, 0.0]]), **TOL)
    assert_close(ret, t([[1.0, 1.0, 0.0]]), **TOL)


def test_gae_skips_a_masked_span_inside_the_response():
    # Token 1 is not a step, so token 2 follows token 0. gamma 0.9, lam 0.8:
    # t2: A = 1 - 0.7 = 0.3;  t0: delta = 0.9 * 0.7 - 0.5 = 0.13, A = 0.13 + 0.72 * 0.3 = 0.346
    adv, ret = gae_advantages(t([[0, 7, 1]]), t([[0.5, 9, 0.7]]), t([[1, 0, 1]]), gamma=0.9, lam=0.8)
    assert_close(adv, t([[0.346, 0.0, 0.3]]), **TOL)
    assert_close(ret, t([[0.846, 0.0, 1.0]]), **TOL)


def test_gae_rejects_a_discount_outside_zero_one():
    with pytest.raises(ValueError, match="gamma=1.5"):
        gae_advantages(t([[0, 1]]), t([[0, 0]]), torch.ones(1, 2), gamma=1.5, lam=0.9)


def test_last_token_rewards_puts_each_reward_on_its_last_counted_token():
    mask = t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    got = last_token_rewards(t([2, 3, 4]), mask)
    assert_close(got, t([[0, 2, 0], [0, 0, 3], [0, 0, 0]]), **TOL)


def test_advantage_functions_do_not_mutate_their_inputs():
    rewards, values, mask = t([[0, 7, 1]]), t([[0.5, 9, 0.7]]), t([[1, 0, 1]])
    group = t([[1, 0, 1, 0]])
    copies = [x.clone() for x in (rewards, values, mask, group)]
    gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    last_token_rewards(t([1.0]), mask)
    for method in ("grpo", "dr_grpo", "rloo", "reinforce_pp"):
        group_advantages(group, method)
    for original, copy in zip((rewards, values, mask, group), copies):
        assert torch.equal(original, copy)
