"""Loss math of the learner: importance correction, the PPO-style policy loss, the value loss.

Owns the formulas, their options (`LossSettings`) and the diagnostics each loss reports.
Must never do I/O, touch process groups, read config files, or mutate its inputs: every
function takes tensors and returns new ones, so the trainer, every backend and the tests share
one definition. Advantage estimators live in `asyncrl.learner.advantages` and are re-exported
here so the trainer has one import.

Three policies meet in an asynchronous step, and every tensor is named for the one it came from:
  behav_logprobs  what the rollout engine sampled with (possibly several versions old, and
                  computed by different kernels than the learner's)
  prox_logprobs   the learner's weights before this update (recomputed, no grad)
  logprobs        the learner's current weights (with grad)
  ref_logprobs    a frozen reference policy for the KL penalty
  loss_mask       [N, T], 1 (or True) on response tokens that count; padding may hold anything

The "decoupled" objective (Hilton et al. 2022, as in AReaL) clips the ratio current/proximal, so
the trust region is centred on weights the learner actually holds, and corrects the remaining
behaviour -> proximal gap by a separate, gradient-free importance weight. See docs/losses.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from asyncrl.learner.advantages import gae_advantages, group_advantages, last_token_rewards

__all__ = [
    "ImportanceWeights", "LossSettings", "PolicyLossInputs", "PolicyLossOutput", "ValueLossOutput",
    "aggregate_loss", "effective_sample_size", "gae_advantages", "geometric_mask", "group_advantages",
    "gspo_log_ratio", "importance_weights", "kl_in_reward", "kl_penalty", "last_token_rewards",
    "masked_is_weights", "masked_mean", "masked_sum", "policy_loss", "sequence_is_weights",
    "truncated_is_weights", "value_loss",
]

OBJECTIVES = ("decoupled", "behaviour")
CORRECTIONS = ("tis", "seq_is", "mis", "geo_mask", "none")
RATIOS = ("token", "gspo")
AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")

# exp() of a larger log-ratio overflows float32 to inf, and inf turns a clipped (zero) gradient
# into nan in backward. Such tokens are far outside any clip range, so clamping changes nothing else.
_MAX_LOG_RATIO = 20.0


@dataclass
class LossSettings:
    """Options of `policy_loss`. The trainer builds it from the `loss` section of the run config."""

    objective: Literal["decoupled", "behaviour"] = "decoupled"
    """'decoupled': ratio current/proximal times a behaviour->proximal IS weight; 'behaviour': plain PPO on behav_logprobs."""
    correction: Literal["tis", "seq_is", "mis", "geo_mask", "none"] = "tis"
    """Behaviour->proximal importance correction (decoupled objective only)."""
    is_cap: float = 2.0
    """Truncation cap of the importance weight for 'tis' and 'seq_is'."""
    is_low: float = 0.5
    """Lower bound of the kept ratio for 'mis' (per token) and 'geo_mask' (per sequence geometric mean)."""
    is_high: float = 2.0
    """Upper bound of the kept ratio for 'mis' and 'geo_mask'."""
    clip_low: float = 0.2
    """PPO ratio clipped below at 1 - clip_low."""
    clip_high: float = 0.2
    """PPO ratio clipped above at 1 + clip_high; larger than clip_low is clip-higher (DAPO)."""
    dual_clip: Optional[float] = None
    """Dual-clip c > 1: a negative-advantage token's loss is at most -c * A. None turns it off."""
    ratio: Literal["token", "gspo"] = "token"
    """'token': one ratio per token; 'gspo': the length-normalised sequence ratio, clipped per sequence."""
    agg: Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """How per-token losses are reduced to one number."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference policy inside the loss (needs ref_logprobs)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator of the penalty and of the 'kl' metric."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (needs entropy)."""


@dataclass(frozen=True, eq=False)
class PolicyLossInputs:
    logprobs: Tensor
    """[N, T] current policy, with grad."""
    prox_logprobs: Tensor
    """[N, T] learner weights before this update, no grad. Under 'behaviour' it only feeds the mismatch metrics."""
    behav_logprobs: Tensor
    """[N, T] what the rollout engine sampled with."""
    advantages: Tensor
    """[N] per sequence (spread over its tokens) or [N, T] per token."""
    loss_mask: Tensor
    """[N, T] bool or 0/1: response tokens that count."""
    ref_logprobs: Optional[Tensor] = None
    """[N, T] reference policy, needed when kl_coef > 0."""
    entropy: Optional[Tensor] = None
    """[N, T] per-token entropy of the current policy, with grad for the bonus to act."""


@dataclass(frozen=True, eq=False)
class PolicyLossOutput:
    loss: Tensor
    """Scalar to call backward() on."""
    metrics: dict[str, float]


@dataclass(frozen=True, eq=False)
class ValueLossOutput:
    loss: Tensor
    metrics: dict[str, float]


@dataclass(frozen=True, eq=False)
class ImportanceWeights:
    """A behaviour->proximal correction, token by token. All [N, T], no grad."""

    weights: Tensor
    """Multiplies each token's policy loss; 0 on tokens that do not count or were rejected."""
    keep_mask: Tensor
    """bool: loss_mask minus the tokens the correction rejected."""
    capped: Tensor
    """bool: counted tokens whose weight was truncated at the cap."""


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(allowed)}")


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of x where mask is set (bool or 0/1); over everything, or along dim."""
    # Replaced rather than multiplied by 0: padding holding inf or nan stays out of both passes.
    kept = torch.where(mask.bool(), x, 0.0)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of x where mask is set (bool or 0/1); 0 where nothing is set."""
    mask = mask.bool()
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1).to(x.dtype)


def aggregate_loss(per_token: Tensor, loss_mask: Tensor, agg: str) -> Tensor:
    """Reduce an [N, T] per-token loss to a scalar.

      token_mean               sum over all counted tokens / their number
      seq_mean_token_sum       mean over sequences of each sequence's token sum
      seq_mean_token_mean      mean over sequences of each sequence's token mean
      seq_mean_token_sum_norm  mean over sequences of token sum / T (T = loss_mask.shape[1]), Dr. GRPO
    Sequences with no counted token are left out of the mean over sequences, so padding rows in
    a fixed-size micro-batch do not shrink the loss.
    """
    _check_choice("agg", agg, AGGREGATIONS)
    mask = loss_mask.bool()
    if agg == "token_mean":
        return masked_mean(per_token, mask)
    per_sequence = masked_sum(per_token, mask, dim=-1)
    if agg == "seq_mean_token_mean":
        per_sequence = per_sequence / mask.sum(-1).clamp_min(1).to(per_sequence.dtype)
    elif agg == "seq_mean_token_sum_norm":
        per_sequence = per_sequence / mask.shape[-1]
    return masked_mean(per_sequence, mask.any(-1))


def _kl_from_log_ratio(log_ratio: Tensor, estimator: str) -> Tensor:
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    # expm1 keeps k3 accurate for the tiny log-ratios of nearly equal policies.
    return torch.expm1(-log_ratio) + log_ratio


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy (Schulman's k1/k2/k3).

      k1 = logp - ref                       unbiased, can be negative
      k2 = 0.5 * (logp - ref)^2             biased, low variance
      k3 = exp(ref - logp) - (ref - logp) - 1   unbiased, always >= 0
    As a loss term on on-policy samples k2's gradient is the reverse-KL gradient, k3's the
    forward-KL(ref || policy) gradient, and k1's is zero in expectation: use k1 in the reward.
    """
    return _kl_from_log_ratio(logprobs - ref_logprobs, estimator)


def kl_in_reward(
    token_rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    loss_mask: Tensor,
    coef: float,
    estimator: str = "k1",
) -> Tensor:
    """Token rewards minus coef * KL(policy || ref) on counted tokens (InstructGPT-style penalty).

    Use it before GAE, with the policy's gradient-free log-probs (prox_logprobs, or
    behav_logprobs under the 'behaviour' objective). In the reward the penalty reaches the
    gradient through the score function, where k1 gives the unbiased reverse-KL gradient; use
    LossSettings.kl_coef instead to put the penalty in the loss. Masked tokens keep their reward.
    """
    kl = kl_penalty(logprobs.detach(), ref_logprobs.detach(), estimator)
    return torch.where(loss_mask.bool(), token_rewards - coef * kl, token_rewards)


def _effective_sample_size(weights: Tensor, mask: Tensor) -> Tensor:
    w = torch.where(mask.bool(), weights.detach(), 0.0)
    count = mask.bool().sum().to(w.dtype)
    return w.sum().square() / (count * w.square().sum()).clamp_min(torch.finfo(w.dtype).tiny)


def effective_sample_size(weights: Tensor, mask: Tensor) -> float:
    """Normalised ESS (sum w)^2 / (N * sum w^2) of the weights where mask is set, in [0, 1].

    1 means the weighted batch is worth as much as an unweighted one; 1/N means one token
    carries all the weight. 0 when nothing counts or every weight is 0.
    """
    return float(_effective_sample_size(weights, mask))


def _behav_to_prox_log_ratio(prox_logprobs: Tensor, behav_logprobs: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, prox_logprobs.detach() - behav_logprobs.detach(), 0.0)


def _check_cap(cap: float) -> None:
    if not cap > 0:
        raise ValueError(f"is_cap must be > 0, got {cap}; the usual range is 1.5 to 10")


def _check_bounds(lo: float, hi: float) -> None:
    if not 0 <= lo < hi:
        raise ValueError(f"importance bounds need 0 <= is_low < is_high, got is_low={lo}, is_high={hi}")


def truncated_is_weights(
    prox_logprobs: Tensor, behav_logprobs: Tensor, loss_mask: Tensor, cap: float
) -> ImportanceWeights:
    """Token-level truncated IS (TIS): w_t = min(exp(prox_t - behav_t), cap)."""
    _check_cap(cap)
    mask = loss_mask.bool()
    log_ratio = _behav_to_prox_log_ratio(prox_logprobs, behav_logprobs, mask)
    log_cap = math.log(cap)
    # Truncating in log space: exp of a huge stale log-ratio would overflow before min() saw it.
    weights = torch.where(mask, log_ratio.clamp(max=log_cap).exp(), 0.0)
    return ImportanceWeights(weights=weights, keep_mask=mask, capped=mask & (log_ratio > log_cap))


def sequence_is_weights(
    prox_logprobs: Tensor, behav_logprobs: Tensor, loss_mask: Tensor, cap: float
) -> ImportanceWeights:
    """Sequence-level truncated IS: every token of a sequence gets min(exp(sum_t (prox - behav)), cap).

    Unbiased for sequence-level rewards (before truncation), but the product of many token
    ratios has high variance; the cap trades that variance for bias.
    """
    _check_cap(cap)
    mask = loss_mask.bool()
    seq_log_ratio = _behav_to_prox_log_ratio(prox_logprobs, behav_logprobs, mask).sum(-1, keepdim=True)
    log_cap = math.log(cap)
    weights = torch.where(mask, seq_log_ratio.clamp(max=log_cap).exp(), 0.0)
    return ImportanceWeights(weights=weights, keep_mask=mask, capped=mask & (seq_log_ratio > log_cap))


def masked_is_weights(
    prox_logprobs: Tensor, behav_logprobs: Tensor, loss_mask: Tensor, lo: float, hi: float
) -> ImportanceWeights:
    """Masked IS (IcePop): w_t = exp(prox_t - behav_t) inside [lo, hi], and the token is rejected (w_t = 0) outside.

    Rejecting instead of truncating drops the tokens where engine and learner disagree most
    (numerical mismatch, MoE routing flips), which truncation would still train on at full cap.
    """
    _check_bounds(lo, hi)
    mask = loss_mask.bool()
    ratio = _behav_to_prox_log_ratio(prox_logprobs, behav_logprobs, mask).exp()
    keep = mask & (ratio >= lo) & (ratio <= hi)
    return ImportanceWeights(weights=torch.where(keep, ratio, 0.0), keep_mask=keep, capped=torch.zeros_like(mask))


def geometric_mask(
    prox_logprobs: Tensor, behav_logprobs: Tensor, loss_mask: Tensor, lo: float, hi: float
) -> ImportanceWeights:
    """Sequence rejection by the geometric mean of token ratios, exp(mean_t (prox - behav)).

    A sequence inside [lo, hi] keeps all its tokens at weight 1; outside, it is rejected whole.
    The geometric mean is length-normalised, so long sequences are not rejected merely for
    being long, as a product of ratios would be.
    """
    _check_bounds(lo, hi)
    mask = loss_mask.bool()
    log_ratio = _behav_to_prox_log_ratio(prox_logprobs, behav_logprobs, mask)
    geo_mean = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1).exp()
    keep = mask & (geo_mean >= lo) & (geo_mean <= hi)
    return ImportanceWeights(weights=keep.to(log_ratio.dtype), keep_mask=keep, capped=torch.zeros_like(mask))


def importance_weights(
    prox_logprobs: Tensor, behav_logprobs: Tensor, loss_mask: Tensor, cfg: LossSettings
) -> ImportanceWeights:
    """The correction cfg.correction selects, with its bounds from cfg."""
    _check_choice("correction", cfg.correction, CORRECTIONS)
    if cfg.correction == "tis":
        return truncated_is_weights(prox_logprobs, behav_logprobs, loss_mask, cfg.is_cap)
    if cfg.correction == "seq_is":
        return sequence_is_weights(prox_logprobs, behav_logprobs, loss_mask, cfg.is_cap)
    if cfg.correction == "mis":
        return masked_is_weights(prox_logprobs, behav_logprobs, loss_mask, cfg.is_low, cfg.is_high)
    if cfg.correction == "geo_mask":
        return geometric_mask(prox_logprobs, behav_logprobs, loss_mask, cfg.is_low, cfg.is_high)
    mask = loss_mask.bool()
    return ImportanceWeights(weights=mask.to(prox_logprobs.dtype), keep_mask=mask, capped=torch.zeros_like(mask))


def gspo_log_ratio(logprobs: Tensor, old_logprobs: Tensor, loss_mask: Tensor) -> Tensor:
    """GSPO-token log-ratio: on every counted token the value is the sequence's mean log-ratio
    mean_t (logprobs - old), while the gradient is that token's own d logprobs_t.

    old_logprobs is what the PPO ratio is taken against (prox_logprobs when decoupled,
    behav_logprobs under 'behaviour'). Clipping this value clips whole sequences at once.
    """
    mask = loss_mask.bool()
    token_log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), 0.0)
    seq_log_ratio = masked_mean(token_log_ratio, mask, dim=-1).unsqueeze(-1)
    return torch.where(mask, seq_log_ratio.detach() + logprobs - logprobs.detach(), 0.0)


def _check_settings(cfg: LossSettings) -> None:
    _check_choice("objective", cfg.objective, OBJECTIVES)
    _check_choice("correction", cfg.correction, CORRECTIONS)
    _check_choice("ratio", cfg.ratio, RATIOS)
    _check_choice("agg", cfg.agg, AGGREGATIONS)
    _check_choice("kl_estimator", cfg.kl_estimator, KL_ESTIMATORS)
    if not (0 <= cfg.clip_low < 1 and cfg.clip_high >= 0):
        raise ValueError(
            f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={cfg.clip_low}, clip_high={cfg.clip_high}"
        )
    if cfg.dual_clip is not None and not cfg.dual_clip > 1:
        raise ValueError(
            f"dual_clip must be > 1 (it bounds a negative-advantage token's loss at -dual_clip * A), "
            f"got {cfg.dual_clip}; use None to turn it off"
        )


def _check_inputs(inp: PolicyLossInputs, cfg: LossSettings) -> None:
    shape = inp.logprobs.shape
    named = {
        "prox_logprobs": inp.prox_logprobs,
        "behav_logprobs": inp.behav_logprobs,
        "loss_mask": inp.loss_mask,
        "ref_logprobs": inp.ref_logprobs,
        "entropy": inp.entropy,
    }
    if len(shape) != 2:
        raise ValueError(f"logprobs must have shape [N, T], got {tuple(shape)}")
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but logprobs has {tuple(shape)}")
    if inp.advantages.shape not in (shape, shape[:1]):
        raise ValueError(
            f"advantages must have shape [N] or [N, T] = {tuple(shape)}, got {tuple(inp.advantages.shape)}"
        )
    if cfg.kl_coef and inp.ref_logprobs is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logprobs; pass them or set kl_coef to 0")
    if cfg.entropy_coef and inp.entropy is None:
        raise ValueError(f"entropy_coef={cfg.entropy_coef} needs entropy; pass it or set entropy_coef to 0")


def policy_loss(inp: PolicyLossInputs, cfg: LossSettings) -> PolicyLossOutput:
    """Clipped surrogate policy loss with importance correction, KL penalty and entropy bonus.

    Per counted token, with ratio r = exp(logprobs - old) (old = prox under 'decoupled',
    behav under 'behaviour'; for 'gspo' r is the sequence ratio, see `gspo_log_ratio`),
    IS weight w (1 under 'behaviour') and advantage A:
      pg_t   = max(-r * A, -clip(r, 1 - clip_low, 1 + clip_high) * A)
      pg_t   = min(pg_t, -dual_clip * A)        where A < 0 and dual_clip is set
      loss_t = w * pg_t + kl_coef * KL_t - entropy_coef * entropy_t
    then reduced by cfg.agg over loss_mask. Tokens a correction rejects count in the
    normaliser with loss 0, so rejecting tokens does not reweight the ones that remain.
    cfg is any object with the attributes of `LossSettings`.
    """
    _check_settings(cfg)
    _check_inputs(inp, cfg)
    mask = inp.loss_mask.bool()
    # Padding may hold anything (0, -inf, nan); replaced here, it stays out of both passes.
    logprobs = torch.where(mask, inp.logprobs, 0.0)
    prox_logprobs = torch.where(mask, inp.prox_logprobs.detach(), 0.0)
    behav_logprobs = torch.where(mask, inp.behav_logprobs.detach(), 0.0)
    advantages = inp.advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    advantages = torch.where(mask, advantages.to(logprobs.dtype), 0.0)

    if cfg.objective == "decoupled":
        old_logprobs = prox_logprobs
        correction = importance_weights(prox_logprobs, behav_logprobs, mask, cfg)
    else:
        old_logprobs = behav_logprobs
        correction = ImportanceWeights(weights=mask.to(logprobs.dtype), keep_mask=mask, capped=torch.zeros_like(mask))

    if cfg.ratio == "gspo":
        log_ratio = gspo_log_ratio(logprobs, old_logprobs, mask)
    else:
        log_ratio = logprobs - old_logprobs
    ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    pg_loss = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    if cfg.dual_clip is not None:
        dual_bound = -advantages * cfg.dual_clip
        dual_active = (advantages < 0) & (pg_loss > dual_bound)
        pg_loss = torch.where(dual_active, dual_bound, pg_loss)
    else:
        dual_active = torch.zeros_like(mask)
    per_token = correction.weights * pg_loss

    kl = None
    if inp.ref_logprobs is not None:
        ref_log_ratio = torch.where(mask, logprobs - inp.ref_logprobs.detach(), 0.0)
        kl = _kl_from_log_ratio(ref_log_ratio, cfg.kl_estimator)
        if cfg.kl_coef:
            per_token = per_token + cfg.kl_coef * kl
    entropy = None if inp.entropy is None else torch.where(mask, inp.entropy, 0.0)
    if entropy is not None and cfg.entropy_coef:
        per_token = per_token - cfg.entropy_coef * entropy
    loss = aggregate_loss(per_token, mask, cfg.agg)

    kept = correction.keep_mask
    weights = correction.weights
    any_counted = mask.any()
    stats = {
        "loss": loss.detach(),
        "clip_frac": masked_mean(clip_active.to(weights.dtype), kept),
        "clip_frac_low": masked_mean((clip_active & (ratio < 1)).to(weights.dtype), kept),
        "clip_frac_high": masked_mean((clip_active & (ratio > 1)).to(weights.dtype), kept),
        "dual_clip_frac": masked_mean(dual_active.to(weights.dtype), kept),
        "is_weight_mean": masked_mean(weights, mask),
        "is_weight_max": torch.where(any_counted, torch.where(mask, weights, -math.inf).amax(), 0.0),
        "is_weight_min": torch.where(any_counted, torch.where(mask, weights, math.inf).amin(), 0.0),
        "is_capped_frac": masked_mean(correction.capped.to(weights.dtype), mask),
        "is_masked_frac": masked_mean((mask & ~kept).to(weights.dtype), mask),
        "ess": _effective_sample_size(weights, mask),
        # KL(behaviour || proximal) estimated on the behaviour samples: how off-policy the batch is.
        "mismatch_kl": masked_mean(_kl_from_log_ratio(behav_logprobs - prox_logprobs, "k3"), mask),
    }
    if entropy is not None:
        stats["entropy"] = masked_mean(entropy.detach(), mask)
    if kl is not None:
        stats["kl"] = masked_mean(kl.detach(), mask)
    # One stack and one tolist(): a single device sync for all metrics instead of one per value.
    values = torch.stack([v.detach().to(torch.float64) for v in stats.values()]).tolist()
    return PolicyLossOutput(loss=loss, metrics=dict(zip(stats, values)))


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    loss_mask: Tensor,
    clip: Optional[float],
    agg: str = "token_mean",
) -> ValueLossOutput:
    """PPO value loss, 0.5 * (V - R)^2, optionally clipped around the values before the update.

    With clip set: V_clipped = old + clamp(V - old, -clip, clip) and the loss per token is
    0.5 * max((V - R)^2, (V_clipped - R)^2), which removes the incentive to move V further than
    clip from old in one update. Metrics: value_loss, value_clip_frac (tokens where the clipped
    term was the larger).
    """
    if clip is not None and not clip > 0:
        raise ValueError(f"value clip must be > 0 or None, got {clip}")
    if not (values.shape == old_values.shape == returns.shape == loss_mask.shape):
        raise ValueError(
            "values, old_values, returns and loss_mask must share one shape, got "
            f"{tuple(values.shape)}, {tuple(old_values.shape)}, {tuple(returns.shape)}, {tuple(loss_mask.shape)}"
        )
    mask = loss_mask.bool()
    values = torch.where(mask, values, 0.0)
    old_values = torch.where(mask, old_values.detach(), 0.0)
    returns = torch.where(mask, returns.detach(), 0.0)
    unclipped = (values - returns).square()
    if clip is None:
        per_token, clip_active = unclipped, torch.zeros_like(mask)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (clipped_values - returns).square()
        per_token, clip_active = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = 0.5 * aggregate_loss(per_token, mask, agg)
    stats = torch.stack([loss.detach(), masked_mean(clip_active.to(values.dtype), mask)]).tolist()
    return ValueLossOutput(loss=loss, metrics={"value_loss": stats[0], "value_clip_frac": stats[1]})
