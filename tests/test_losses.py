"""Specification of the learner's loss math. Every expected value is worked out by hand in the
comment next to it, never by calling the code under test."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from asyncrl.learner.losses import (
    LossSettings,
    PolicyLossInputs,
    aggregate_loss,
    effective_sample_size,
    geometric_mask,
    gspo_log_ratio,
    kl_in_reward,
    kl_penalty,
    masked_is_weights,
    masked_mean,
    masked_sum,
    policy_loss,
    sequence_is_weights,
    truncated_is_weights,
    value_loss,
)

TOL = dict(atol=1e-5, rtol=0.0)
LN2 = math.log(2.0)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def inputs(ratio, advantages, mask=None, is_ratio=None, **extra):
    """Inputs whose current/proximal ratio (and proximal/behaviour ratio, 1 unless given) are
    the literals passed, token by token; logprobs is a leaf with grad."""
    ratio = t(ratio)
    prox = torch.full_like(ratio, -1.0)
    behav = prox - torch.log(t(is_ratio)) if is_ratio is not None else prox.clone()
    logprobs = (prox + torch.log(ratio)).requires_grad_()
    mask = torch.ones_like(ratio) if mask is None else t(mask)
    return PolicyLossInputs(logprobs, prox, behav, t(advantages), mask, **extra)


def settings_with(**changes):
    return dataclasses.replace(LossSettings(), **changes)


# --- masked helpers and aggregation -----------------------------------------------------------

RAGGED_LOSS = t([[1, 2, 3], [4, 100, 100]])
RAGGED_MASK = t([[1, 1, 1], [1, 0, 0]])


def test_masked_sum_ignores_padding_even_when_it_holds_inf_and_nan():
    x = t([[1, 2, math.inf], [3, math.nan, 4]])
    assert masked_sum(x, t([[1, 1, 0], [1, 0, 1]])).item() == pytest.approx(10.0, abs=1e-6)


def test_masked_mean_along_a_dim_averages_each_row_over_its_own_tokens():
    assert_close(masked_mean(RAGGED_LOSS, RAGGED_MASK, dim=-1), t([2.0, 4.0]), **TOL)


def test_masked_mean_of_nothing_is_zero():
    assert masked_mean(t([1.0, 2.0]), t([0, 0])).item() == 0.0


def test_token_mean_averages_over_all_counted_tokens():
    # (1 + 2 + 3 + 4) / 4
    assert aggregate_loss(RAGGED_LOSS, RAGGED_MASK, "token_mean").item() == pytest.approx(2.5, abs=1e-6)


def test_seq_mean_token_sum_averages_sequence_sums():
    # (6 + 4) / 2
    assert aggregate_loss(RAGGED_LOSS, RAGGED_MASK, "seq_mean_token_sum").item() == pytest.approx(5.0, abs=1e-6)


def test_seq_mean_token_mean_averages_sequence_means():
    # (6/3 + 4/1) / 2
    assert aggregate_loss(RAGGED_LOSS, RAGGED_MASK, "seq_mean_token_mean").item() == pytest.approx(3.0, abs=1e-6)


def test_seq_mean_token_sum_norm_divides_every_sequence_by_the_padded_length():
    # (6/3 + 4/3) / 2 = 1.666667
    got = aggregate_loss(RAGGED_LOSS, RAGGED_MASK, "seq_mean_token_sum_norm").item()
    assert got == pytest.approx(1.666667, abs=1e-5)


def test_sequences_without_counted_tokens_are_left_out_of_the_sequence_mean():
    loss = torch.cat([RAGGED_LOSS, t([[5, 5, 5]])])
    mask = torch.cat([RAGGED_MASK, t([[0, 0, 0]])])
    assert aggregate_loss(loss, mask, "seq_mean_token_sum").item() == pytest.approx(5.0, abs=1e-6)


def test_unknown_aggregation_is_rejected_by_name():
    with pytest.raises(ValueError, match="'sum'.*token_mean"):
        aggregate_loss(RAGGED_LOSS, RAGGED_MASK, "sum")


# --- KL estimators ----------------------------------------------------------------------------


def test_k1_is_the_log_ratio():
    got = kl_penalty(t([LN2, -LN2]), t([0.0, 0.0]), "k1")
    assert_close(got, t([0.693147, -0.693147]), **TOL)


def test_k2_is_half_the_squared_log_ratio():
    # 0.5 * ln(2)^2 = 0.240227 either way round
    got = kl_penalty(t([LN2, -LN2]), t([0.0, 0.0]), "k2")
    assert_close(got, t([0.240227, 0.240227]), **TOL)


def test_k3_is_exp_minus_one_minus_log_of_the_reference_ratio():
    # logp - ref = ln 2:  0.5 + ln 2 - 1 = 0.193147;  logp - ref = -ln 2:  2 - ln 2 - 1 = 0.306853
    got = kl_penalty(t([math.log(0.5), math.log(0.25)]), t([math.log(0.25), math.log(0.5)]), "k3")
    assert_close(got, t([0.193147, 0.306853]), **TOL)


def test_kl_in_reward_subtracts_the_scaled_penalty_on_counted_tokens_only():
    # k1 = ln 0.5 - ln 0.25 = ln 2; 0.1 * ln 2 = 0.0693147; the padded token keeps its reward
    logprobs = torch.full((1, 3), math.log(0.5))
    ref = torch.full((1, 3), math.log(0.25))
    got = kl_in_reward(t([[0, 0, 1]]), logprobs, ref, t([[1, 1, 0]]), coef=0.1)
    assert_close(got, t([[-0.0693147, -0.0693147, 1.0]]), **TOL)


# --- effective sample size --------------------------------------------------------------------


def test_ess_is_squared_weight_sum_over_n_times_sum_of_squared_weights():
    # (1 + 1 + 2 + 0.5)^2 / (4 * (1 + 1 + 4 + 0.25)) = 20.25 / 25
    assert effective_sample_size(t([1, 1, 2, 0.5]), t([1, 1, 1, 1])) == pytest.approx(0.81, abs=1e-6)


def test_ess_ignores_masked_weights():
    assert effective_sample_size(t([1, 1, 2, 0.5, 100]), t([1, 1, 1, 1, 0])) == pytest.approx(0.81, abs=1e-6)


def test_ess_of_equal_weights_is_one():
    assert effective_sample_size(t([0.7, 0.7, 0.7]), t([1, 1, 1])) == pytest.approx(1.0, abs=1e-6)


def test_ess_of_one_token_carrying_all_weight_is_one_over_n():
    assert effective_sample_size(t([0, 0, 3, 0]), t([1, 1, 1, 1])) == pytest.approx(0.25, abs=1e-6)


# --- behaviour -> proximal corrections --------------------------------------------------------


def logprob_pair(ratios):
    """(prox_logprobs, behav_logprobs) whose ratio prox/behav is the literal given per token."""
    behav = torch.full_like(t(ratios), -2.0)
    return behav + torch.log(t(ratios)), behav


def test_tis_truncates_token_weights_at_the_cap():
    prox, behav = logprob_pair([[3.0, 0.5, 50.0]])
    got = truncated_is_weights(prox, behav, t([[1, 1, 0]]), cap=2.0)
    assert_close(got.weights, t([[2.0, 0.5, 0.0]]), **TOL)
    assert got.capped.tolist() == [[True, False, False]]
    assert got.keep_mask.tolist() == [[True, True, False]]


def test_sequence_is_weight_is_the_product_of_token_ratios_truncated_at_the_cap():
    # 1.5 * 1.2 = 1.8 under the cap; 2 * 1.5 = 3 capped at 2
    prox, behav = logprob_pair([[1.5, 1.2], [2.0, 1.5]])
    got = sequence_is_weights(prox, behav, torch.ones(2, 2), cap=2.0)
    assert_close(got.weights, t([[1.8, 1.8], [2.0, 2.0]]), **TOL)
    assert got.capped.tolist() == [[False, False], [True, True]]


def test_sequence_is_weight_ignores_padded_tokens():
    prox, behav = logprob_pair([[1.5, 1.2, 50.0]])
    got = sequence_is_weights(prox, behav, t([[1, 1, 0]]), cap=2.0)
    assert_close(got.weights, t([[1.8, 1.8, 0.0]]), **TOL)


def test_mis_zeroes_tokens_whose_ratio_leaves_the_bounds():
    prox, behav = logprob_pair([[0.4, 1.0, 2.5, 1.9]])
    got = masked_is_weights(prox, behav, torch.ones(1, 4), lo=0.5, hi=2.0)
    assert_close(got.weights, t([[0.0, 1.0, 0.0, 1.9]]), **TOL)
    assert got.keep_mask.tolist() == [[False, True, False, True]]


def test_geo_mask_rejects_whole_sequences_by_the_geometric_mean_ratio():
    # sqrt(2 * 0.5) = 1 kept; sqrt(4 * 2) = 2.83 > 2 rejected; sqrt(0.2 * 1) = 0.447 < 0.5 rejected
    prox, behav = logprob_pair([[2.0, 0.5], [4.0, 2.0], [0.2, 1.0]])
    got = geometric_mask(prox, behav, torch.ones(3, 2), lo=0.5, hi=2.0)
    assert_close(got.weights, t([[1, 1], [0, 0], [0, 0]]), **TOL)
    assert got.keep_mask.tolist() == [[True, True], [False, False], [False, False]]


def test_geo_mask_averages_over_counted_tokens_only():
    prox, behav = logprob_pair([[2.0, 0.5, 1000.0]])
    got = geometric_mask(prox, behav, t([[1, 1, 0]]), lo=0.5, hi=2.0)
    assert_close(got.weights, t([[1.0, 1.0, 0.0]]), **TOL)


def test_importance_weights_carry_no_gradient():
    prox, behav = logprob_pair([[1.5, 0.7]])
    prox.requires_grad_()
    for weights in (
        truncated_is_weights(prox, behav, torch.ones(1, 2), 2.0),
        sequence_is_weights(prox, behav, torch.ones(1, 2), 2.0),
        masked_is_weights(prox, behav, torch.ones(1, 2), 0.5, 2.0),
        geometric_mask(prox, behav, torch.ones(1, 2), 0.5, 2.0),
    ):
        assert not weights.weights.requires_grad


def test_mis_bounds_must_be_ordered():
    prox, behav = logprob_pair([[1.0]])
    with pytest.raises(ValueError, match="is_low=2.0, is_high=0.5"):
        masked_is_weights(prox, behav, torch.ones(1, 1), lo=2.0, hi=0.5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=1, max_size=6), st.floats(1.01, 10))
def test_tis_weights_lie_between_zero_and_the_cap(log_ratios, cap):
    behav = torch.zeros(1, len(log_ratios))
    w = truncated_is_weights(t([log_ratios]), behav, torch.ones_like(behav), cap).weights
    assert bool((w >= 0).all()) and bool((w <= cap * (1 + 1e-6)).all())


# --- policy loss: PPO clipping ----------------------------------------------------------------


def test_positive_advantage_ratio_above_the_range_is_clipped():
    # tokens: min(1.5, 1.2) = 1.2 and 1.1 unclipped -> loss -(1.2 + 1.1) / 2
    out = policy_loss(inputs([[1.5, 1.1]], [[1.0, 1.0]]), LossSettings())
    assert out.loss.item() == pytest.approx(-1.15, abs=1e-5)
    assert out.metrics["clip_frac"] == pytest.approx(0.5)
    assert out.metrics["clip_frac_high"] == pytest.approx(0.5)


def test_negative_advantage_ratio_below_the_range_is_clipped():
    # A = -1, r = 0.5: max(0.5, 0.8) = 0.8
    out = policy_loss(inputs([[0.5]], [[-1.0]]), LossSettings())
    assert out.loss.item() == pytest.approx(0.8, abs=1e-5)
    assert out.metrics["clip_frac_low"] == pytest.approx(1.0)
    assert out.metrics["clip_frac_high"] == 0.0


def test_clipped_tokens_get_no_gradient():
    # token 0 clipped; token 1 unclipped: d/dlogp (-r * A) / 2 = -1.1 / 2
    inp = inputs([[1.5, 1.1]], [[1.0, 1.0]])
    policy_loss(inp, LossSettings()).loss.backward()
    assert_close(inp.logprobs.grad, t([[0.0, -0.55]]), **TOL)


def test_clip_higher_counts_low_and_high_clipping_separately():
    # clip range [0.8, 1.28]: 1.25 (A+) inside, 1.3 (A+) clipped high, 0.75 (A-) clipped low, 0.85 (A-) inside
    # loss = (-1.25 - 1.28 + 0.8 + 0.85) / 4 = -0.22
    inp = inputs([[1.25, 1.3, 0.75, 0.85]], [[1.0, 1.0, -1.0, -1.0]])
    out = policy_loss(inp, settings_with(clip_low=0.2, clip_high=0.28))
    assert out.loss.item() == pytest.approx(-0.22, abs=1e-5)
    assert out.metrics["clip_frac_high"] == pytest.approx(0.25)
    assert out.metrics["clip_frac_low"] == pytest.approx(0.25)
    assert out.metrics["clip_frac"] == pytest.approx(0.5)


def test_dual_clip_bounds_a_negative_advantage_loss_at_c_times_minus_a():
    # A = -1, r = 4: PPO gives max(4, 1.2) = 4, dual clip min(4, 3) = 3
    inp = inputs([[4.0]], [[-1.0]])
    out = policy_loss(inp, settings_with(dual_clip=3.0))
    assert out.loss.item() == pytest.approx(3.0, abs=1e-5)
    assert out.metrics["dual_clip_frac"] == pytest.approx(1.0)
    out.loss.backward()
    assert inp.logprobs.grad.abs().max().item() == 0.0


def test_without_dual_clip_the_same_token_costs_the_full_ratio():
    out = policy_loss(inputs([[4.0]], [[-1.0]]), LossSettings())
    assert out.loss.item() == pytest.approx(4.0, abs=1e-5)
    assert out.metrics["dual_clip_frac"] == 0.0


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip must be > 1.*0.5"):
        policy_loss(inputs([[1.0]], [[-1.0]]), settings_with(dual_clip=0.5))


# --- policy loss: objectives and corrections --------------------------------------------------


@pytest.mark.parametrize("ratio", ["token", "gspo"])
@pytest.mark.parametrize("correction", ["tis", "seq_is", "mis", "geo_mask", "none"])
def test_decoupled_objective_is_plain_ppo_when_behaviour_equals_proximal(correction, ratio):
    def run(objective):
        inp = inputs([[1.5, 0.9, 1.1], [0.7, 1.0, 1.3]], [1.0, -1.0], mask=[[1, 1, 1], [1, 1, 0]])
        out = policy_loss(inp, settings_with(objective=objective, correction=correction, ratio=ratio))
        out.loss.backward()
        return out.loss.detach(), inp.logprobs.grad

    decoupled_loss, decoupled_grad = run("decoupled")
    ppo_loss, ppo_grad = run("behaviour")
    assert_close(decoupled_loss, ppo_loss, **TOL)
    assert_close(decoupled_grad, ppo_grad, **TOL)


def test_decoupled_tis_multiplies_each_token_loss_by_its_truncated_weight():
    # r = 1, A = 1; weights min(3, 2) = 2 and 0.5 -> loss -(2 + 0.5) / 2 = -1.25
    # ESS = 2.5^2 / (2 * (4 + 0.25)) = 0.735294
    out = policy_loss(inputs([[1.0, 1.0]], [[1.0, 1.0]], is_ratio=[[3.0, 0.5]]), LossSettings())
    assert out.loss.item() == pytest.approx(-1.25, abs=1e-5)
    assert out.metrics["is_weight_mean"] == pytest.approx(1.25, abs=1e-5)
    assert out.metrics["is_weight_max"] == pytest.approx(2.0, abs=1e-5)
    assert out.metrics["is_weight_min"] == pytest.approx(0.5, abs=1e-5)
    assert out.metrics["is_capped_frac"] == pytest.approx(0.5)
    assert out.metrics["ess"] == pytest.approx(0.735294, abs=1e-5)


def test_decoupled_clips_against_proximal_and_behaviour_against_behav():
    # current/prox = 1.1, prox/behav = 3, A = 1
    # behaviour: r = 3.3 clipped to 1.2, no weight -> -1.2
    # decoupled: r = 1.1 inside, weight min(3, 2) = 2 -> -2.2
    inp = dict(ratio=[[1.1]], advantages=[[1.0]], is_ratio=[[3.0]])
    behaviour = policy_loss(inputs(**inp), settings_with(objective="behaviour"))
    decoupled = policy_loss(inputs(**inp), settings_with(objective="decoupled"))
    assert behaviour.loss.item() == pytest.approx(-1.2, abs=1e-5)
    assert behaviour.metrics["is_weight_mean"] == pytest.approx(1.0)
    assert decoupled.loss.item() == pytest.approx(-2.2, abs=1e-5)


def test_tokens_rejected_by_mis_count_in_the_mean_with_zero_loss():
    # weights [1, 0] (ratio 3 > 2), r = 1, A = 1 -> (-1 + 0) / 2
    out = policy_loss(inputs([[1.0, 1.0]], [[1.0, 1.0]], is_ratio=[[1.0, 3.0]]), settings_with(correction="mis"))
    assert out.loss.item() == pytest.approx(-0.5, abs=1e-5)
    assert out.metrics["is_masked_frac"] == pytest.approx(0.5)


def test_geo_mask_drops_a_rejected_sequence_from_the_loss():
    # seq 0 geometric mean 1 kept (-1 per token); seq 1 geometric mean 3 rejected (0)
    # seq_mean_token_mean: (-1 + 0) / 2
    inp = inputs([[1.0, 1.0], [1.0, 1.0]], [1.0, 1.0], is_ratio=[[2.0, 0.5], [3.0, 3.0]])
    out = policy_loss(inp, settings_with(correction="geo_mask", agg="seq_mean_token_mean"))
    assert out.loss.item() == pytest.approx(-0.5, abs=1e-5)
    assert out.metrics["is_masked_frac"] == pytest.approx(0.5)


def test_mismatch_kl_is_k3_of_behaviour_against_proximal():
    # prox/behav = 2 on the only token: exp(ln 2) - ln 2 - 1 = 0.306853
    out = policy_loss(inputs([[1.0]], [[0.0]], is_ratio=[[2.0]]), LossSettings())
    assert out.metrics["mismatch_kl"] == pytest.approx(0.306853, abs=1e-5)


def test_per_sequence_advantages_apply_to_every_token_of_their_sequence():
    per_sequence = policy_loss(inputs([[1.5, 1.1], [0.7, 1.0]], [1.0, -1.0]), LossSettings())
    per_token = policy_loss(inputs([[1.5, 1.1], [0.7, 1.0]], [[1.0, 1.0], [-1.0, -1.0]]), LossSettings())
    assert per_sequence.loss.item() == pytest.approx(per_token.loss.item(), abs=1e-6)


@pytest.mark.parametrize(
    "agg, expected",
    # every counted token costs -1 (r = 1, A = 1); lengths 3 and 1 of T = 3
    [("token_mean", -1.0), ("seq_mean_token_sum", -2.0), ("seq_mean_token_mean", -1.0),
     ("seq_mean_token_sum_norm", -0.666667)],
)
def test_policy_loss_reduces_with_the_configured_aggregation(agg, expected):
    out = policy_loss(inputs([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [1.0, 1.0], mask=RAGGED_MASK.tolist()),
                      settings_with(agg=agg))
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)


# --- policy loss: GSPO ------------------------------------------------------------------------


def test_gspo_ratio_is_the_geometric_mean_of_counted_token_ratios():
    # mean(0.1, 0.3) = 0.2 on counted tokens, exp(0.2) = 1.221403; the padded 5.0 is ignored
    logprobs = t([[0.1, 0.3, 5.0]]).requires_grad_()
    log_ratio = gspo_log_ratio(logprobs, torch.zeros(1, 3), t([[1, 1, 0]]))
    assert_close(log_ratio.exp(), t([[1.221403, 1.221403, 1.0]]), **TOL)


def test_gspo_gradient_flows_through_each_token_on_its_own():
    logprobs = t([[0.1, 0.3, 5.0]]).requires_grad_()
    gspo_log_ratio(logprobs, torch.zeros(1, 3), t([[1, 1, 0]])).sum().backward()
    assert_close(logprobs.grad, t([[1.0, 1.0, 0.0]]), **TOL)


def test_gspo_clips_the_whole_sequence_when_its_ratio_leaves_the_range():
    # log-ratios 0.5 and -0.1: sequence ratio exp(0.2) = 1.2214 > 1.2 -> both tokens at 1.2
    ratios = [[math.exp(0.5), math.exp(-0.1)]]
    out = policy_loss(inputs(ratios, [1.0]), settings_with(ratio="gspo"))
    assert out.loss.item() == pytest.approx(-1.2, abs=1e-5)
    assert out.metrics["clip_frac"] == pytest.approx(1.0)


def test_token_ratio_clips_only_the_token_outside_the_range():
    # same tokens per token: exp(0.5) = 1.6487 -> 1.2; exp(-0.1) = 0.904837 kept -> -(1.2 + 0.904837) / 2
    ratios = [[math.exp(0.5), math.exp(-0.1)]]
    out = policy_loss(inputs(ratios, [1.0]), settings_with(ratio="token"))
    assert out.loss.item() == pytest.approx(-1.052419, abs=1e-5)
    assert out.metrics["clip_frac"] == pytest.approx(0.5)


def test_gspo_gradient_is_the_sequence_ratio_times_advantage_over_length():
    # log-ratios 0.1, 0.1: s = exp(0.1) = 1.105171 inside the range; seq_mean_token_mean over 2 tokens
    # d/dlogp_t of -(1/2) * sum_t s * A = -1.105171 / 2 = -0.552585
    inp = inputs([[math.exp(0.1), math.exp(0.1)]], [1.0])
    policy_loss(inp, settings_with(ratio="gspo", agg="seq_mean_token_mean")).loss.backward()
    assert_close(inp.logprobs.grad, t([[-0.552585, -0.552585]]), **TOL)


# --- policy loss: KL penalty and entropy bonus ------------------------------------------------


def test_kl_penalty_is_added_to_the_loss_with_its_coefficient():
    # A = 0 so only the penalty remains: k3 at logp - ref = ln 2 is 0.193147, times 0.1
    inp = inputs([[1.0]], [[0.0]])
    inp = dataclasses.replace(inp, ref_logprobs=inp.prox_logprobs - LN2)
    out = policy_loss(inp, settings_with(kl_coef=0.1, kl_estimator="k3"))
    assert out.loss.item() == pytest.approx(0.0193147, abs=1e-6)
    assert out.metrics["kl"] == pytest.approx(0.193147, abs=1e-5)


def test_kl_coef_without_ref_logprobs_is_an_error():
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logprobs"):
        policy_loss(inputs([[1.0]], [[0.0]]), settings_with(kl_coef=0.1))


def test_entropy_bonus_subtracts_the_scaled_mean_entropy():
    # A = 0; mean entropy over counted tokens (1 + 2) / 2 = 1.5; loss = -0.1 * 1.5
    inp = inputs([[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]], mask=[[1, 1, 0]], entropy=t([[1.0, 2.0, 9.0]]))
    out = policy_loss(inp, settings_with(entropy_coef=0.1))
    assert out.loss.item() == pytest.approx(-0.15, abs=1e-6)
    assert out.metrics["entropy"] == pytest.approx(1.5, abs=1e-6)


def test_entropy_coef_without_entropy_is_an_error():
    with pytest.raises(ValueError, match="entropy_coef=0.01 needs entropy"):
        policy_loss(inputs([[1.0]], [[0.0]]), settings_with(entropy_coef=0.01))


# --- policy loss: learning direction, robustness, contract ------------------------------------


def one_sgd_step(advantage: float):
    torch.manual_seed(0)
    logits = torch.nn.Parameter(torch.randn(2, 3, 5))
    tokens = torch.tensor([[1, 4, 2], [0, 3, 3]])

    def token_logprobs():
        return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    before = token_logprobs().detach()
    inp = PolicyLossInputs(token_logprobs(), before, before, t([advantage, advantage]), torch.ones(2, 3))
    policy_loss(inp, LossSettings()).loss.backward()
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    return before, token_logprobs().detach()


def test_positive_advantage_raises_the_sampled_tokens_logprob_after_one_sgd_step():
    before, after = one_sgd_step(1.0)
    assert bool((after > before).all())


def test_negative_advantage_lowers_the_sampled_tokens_logprob_after_one_sgd_step():
    before, after = one_sgd_step(-1.0)
    assert bool((after < before).all())


def test_padding_holding_inf_and_nan_reaches_neither_loss_nor_gradient():
    inp = inputs([[1.1, 1.0]], [[1.0, math.nan]], mask=[[1, 0]])
    with torch.no_grad():
        inp.logprobs[0, 1] = -math.inf
        inp.prox_logprobs[0, 1] = math.nan
        inp.behav_logprobs[0, 1] = math.inf
    out = policy_loss(inp, settings_with(correction="seq_is", dual_clip=3.0))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1.1, abs=1e-5)
    assert bool(torch.isfinite(inp.logprobs.grad).all())


def test_metrics_are_python_floats_with_the_documented_names():
    inp = inputs([[1.1, 0.9]], [1.0], is_ratio=[[1.2, 0.8]], entropy=t([[0.5, 0.5]]))
    inp = dataclasses.replace(inp, ref_logprobs=inp.prox_logprobs)
    out = policy_loss(inp, LossSettings())
    expected = {"loss", "clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "is_weight_mean",
                "is_weight_max", "is_weight_min", "is_capped_frac", "is_masked_frac", "ess", "mismatch_kl",
                "entropy", "kl"}
    assert set(out.metrics) == expected
    assert all(type(v) is float for v in out.metrics.values())


@pytest.mark.parametrize("field, value", [("objective", "ppo"), ("correction", "ratio"), ("ratio", "seq"),
                                          ("agg", "mean"), ("kl_estimator", "k4")])
def test_unknown_option_is_rejected_naming_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=f"{field}='{value}'"):
        policy_loss(inputs([[1.0]], [[1.0]]), settings_with(**{field: value}))


def test_mismatched_shapes_are_rejected_naming_the_tensor():
    inp = dataclasses.replace(inputs([[1.0, 1.0]], [[1.0, 1.0]]), behav_logprobs=torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"behav_logprobs has shape \(1, 3\)"):
        policy_loss(inp, LossSettings())


def test_policy_loss_does_not_mutate_its_inputs():
    inp = inputs([[1.5, 0.9, 4.0], [0.7, 1.0, 1.3]], [1.0, -1.0], mask=[[1, 1, 1], [1, 1, 0]],
                 is_ratio=[[1.2, 3.0, 0.4], [1.0, 0.9, 7.0]], entropy=t([[0.5, 0.6, 0.7], [0.1, 0.2, 0.3]]))
    inp = dataclasses.replace(inp, ref_logprobs=inp.prox_logprobs - 0.1)
    tensors = [inp.logprobs, inp.prox_logprobs, inp.behav_logprobs, inp.advantages, inp.loss_mask,
               inp.ref_logprobs, inp.entropy]
    copies = [x.detach().clone() for x in tensors]
    for correction in ("tis", "seq_is", "mis", "geo_mask", "none"):
        for ratio in ("token", "gspo"):
            cfg = settings_with(correction=correction, ratio=ratio, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01)
            policy_loss(inp, cfg).loss.backward()
    for original, copy in zip(tensors, copies):
        assert torch.equal(original.detach(), copy)


def test_helpers_do_not_mutate_their_inputs():
    prox, behav = logprob_pair([[1.5, 0.4], [2.0, 1.0]])
    mask, values, returns = t([[1, 1], [1, 0]]), t([[1.5, 0.2], [0.3, 0.4]]), t([[2.0, 0.0], [1.0, 1.0]])
    tensors = [prox, behav, mask, values, returns]
    copies = [x.clone() for x in tensors]
    truncated_is_weights(prox, behav, mask, 2.0)
    sequence_is_weights(prox, behav, mask, 2.0)
    masked_is_weights(prox, behav, mask, 0.5, 2.0)
    geometric_mask(prox, behav, mask, 0.5, 2.0)
    gspo_log_ratio(prox, behav, mask)
    kl_in_reward(returns, prox, behav, mask, 0.1)
    value_loss(values, returns, returns, mask, clip=0.2)
    for original, copy in zip(tensors, copies):
        assert torch.equal(original, copy)


# --- value loss -------------------------------------------------------------------------------


def test_value_loss_is_half_the_squared_error():
    # 0.5 * (1.5 - 2)^2
    out = value_loss(t([[1.5]]), t([[1.0]]), t([[2.0]]), t([[1]]), clip=None)
    assert out.loss.item() == pytest.approx(0.125, abs=1e-6)


def test_value_clipping_takes_the_larger_error_of_the_clipped_value():
    # V_clipped = 1 + clamp(0.5, -0.2, 0.2) = 1.2; 0.5 * max(0.25, 0.64) = 0.32
    values = t([[1.5]]).requires_grad_()
    out = value_loss(values, t([[1.0]]), t([[2.0]]), t([[1]]), clip=0.2)
    assert out.loss.item() == pytest.approx(0.32, abs=1e-6)
    assert out.metrics["value_clip_frac"] == pytest.approx(1.0)
    out.loss.backward()
    assert values.grad.item() == 0.0


def test_value_clipping_is_inactive_when_the_unclipped_error_is_larger():
    # returns 1: unclipped (0.5)^2 = 0.25 > clipped (0.2)^2 = 0.04 -> 0.5 * 0.25
    out = value_loss(t([[1.5]]), t([[1.0]]), t([[1.0]]), t([[1]]), clip=0.2)
    assert out.loss.item() == pytest.approx(0.125, abs=1e-6)
    assert out.metrics["value_clip_frac"] == 0.0


def test_value_loss_ignores_padded_tokens():
    # counted errors 0.5 and 1.0: 0.5 * (0.25 + 1) / 2 = 0.3125
    out = value_loss(t([[1.5, 3.0, 99.0]]), t([[1.5, 3.0, 0.0]]), t([[2.0, 2.0, 0.0]]), t([[1, 1, 0]]), clip=None)
    assert out.loss.item() == pytest.approx(0.3125, abs=1e-6)
