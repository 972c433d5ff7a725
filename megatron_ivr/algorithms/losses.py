"""Policy losses as pure functions of per-token tensors (spec sections 2 and 4.6).

Shapes: per-token tensors are ``[B, T]`` over response tokens, right-padded, with a 0/1
``mask``; per-response tensors are ``[B]``. ``rectified`` marks IVR-R1's rectified
responses, trained with policy shaping instead of the clipped ratio.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ivr.config.schema import AlgorithmConfig

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, num_tokens: Optional[float] = None,
              num_sequences: Optional[float] = None) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar.

    - ``token-mean``: sum over valid tokens / number of valid tokens (``Z`` of spec 4.6);
    - ``seq-mean-token-mean``: mean over responses of each response's token mean;
    - ``seq-mean-token-sum``: mean over responses of each response's token sum.

    Rows with no valid token (padding rows) count in neither mean. ``num_tokens`` /
    ``num_sequences`` replace the local denominators (the global ones under data parallel).
    """
    mask = mask.to(values.dtype)
    if mode == "token-mean":
        denominator = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=values.dtype)
        return (values * mask).sum() / denominator.clamp_min(1.0)
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose from {AGGREGATIONS}")
    tokens_per_row = mask.sum(-1)
    valid_rows = tokens_per_row > 0
    row_sums = (values * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        row_values = row_sums / tokens_per_row.clamp_min(1.0)
    else:
        row_values = row_sums
    denominator = valid_rows.sum().to(values.dtype) if num_sequences is None else torch.as_tensor(
        num_sequences, dtype=values.dtype)
    return (row_values * valid_rows).sum() / denominator.clamp_min(1.0)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                      eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)`` per token, and where it clipped."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def policy_shaping(logp: torch.Tensor, advantages: torch.Tensor, gamma: float) -> torch.Tensor:
    """IVR-R1's shaped term for rectified tokens: ``-f(p) * A`` with ``f(p) = p / (p + gamma)``.

    Its gradient is ``-gamma / (p + gamma)^2 * dp/dtheta * A``: low-probability corrective
    tokens get the larger push. No clipping (spec section 4.6).
    """
    p = torch.exp(logp)
    return -(p / (p + gamma)) * advantages


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi_theta || pi_ref) per token: ``exp(ref - logp) - (ref - logp) - 1``."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Detached ``min(exp(logp_old_trainer - logp_rollout_engine), C)`` (spec section 2)."""
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def mismatch_metrics(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """Mean and max ``|logp_old - logp_rollout|`` and the mean token KL(rollout || trainer) (k3),
    read back as floats: the per-token reference that the RL step's summed diagnostics are
    tested against (training/rl.py reduces sums instead, once per step)."""
    valid = mask.bool()
    if not valid.any():
        return {"mismatch/abs_logp_diff_mean": 0.0, "mismatch/abs_logp_diff_max": 0.0, "mismatch/kl": 0.0}
    diff = (old_logp - rollout_logp)[valid]
    kl = torch.exp(diff) - diff - 1.0  # tokens were sampled from the engine: k3 of KL(engine || trainer)
    return {"mismatch/abs_logp_diff_mean": diff.abs().mean().item(),
            "mismatch/abs_logp_diff_max": diff.abs().max().item(), "mismatch/kl": kl.mean().item()}


def rl_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
            cfg: AlgorithmConfig, rectified: Optional[torch.Tensor] = None, ref_logp: Optional[torch.Tensor] = None,
            rollout_logp: Optional[torch.Tensor] = None, num_tokens: Optional[float] = None,
            num_sequences: Optional[float] = None) -> tuple[torch.Tensor, dict]:
    """The whole objective of spec sections 2 and 4.6, to minimize.

    ``L = agg(l) + beta * agg(KL_k3)`` where per token ``l`` is the clipped surrogate (times
    the TIS weight when ``rollout_logp`` is given) for on-policy responses and the policy-
    shaping term for rectified ones. ``advantages`` is ``[B]`` or per token ``[B, T]``
    (VICRA-shaped). ``cfg`` is the run's ``algorithm`` config: ``eps_low``/``eps_high``,
    ``beta``, ``loss_agg``, ``tis_cap`` (None: no TIS) and ``ivr.gamma``.

    Returns the loss and its parts as detached 0-d tensors (``loss/policy``, ``loss/kl`` when
    ``beta > 0``, ``loss/clipped_tokens``, ``loss/total``): nothing is read back to the host
    here, so that a loss function can run once per micro-batch without a device sync.
    """
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    if rectified is None:
        rectified = torch.zeros(logp.shape[0], dtype=torch.bool, device=logp.device)
    rect_tokens = rectified[:, None].expand_as(logp)
    clip_loss, was_clipped = clipped_surrogate(logp, old_logp, advantages, cfg.eps_low, cfg.eps_high)
    if rollout_logp is not None and cfg.tis_cap is not None:
        clip_loss = clip_loss * truncated_is_weights(old_logp, rollout_logp, cfg.tis_cap)
    shaped_loss = policy_shaping(logp, advantages, cfg.ivr.gamma)
    per_token = torch.where(rect_tokens, shaped_loss, clip_loss)
    loss = aggregate(per_token, mask, cfg.loss_agg, num_tokens, num_sequences)
    on_policy_mask = mask * (~rect_tokens).to(mask.dtype)
    metrics = {"loss/policy": loss.detach(),
               "loss/clipped_tokens": (was_clipped.to(mask.dtype) * on_policy_mask).sum().detach()}
    if cfg.beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = aggregate(kl_k3(logp, ref_logp), mask, cfg.loss_agg, num_tokens, num_sequences)
        loss = loss + cfg.beta * kl
        metrics["loss/kl"] = kl.detach()
    metrics["loss/total"] = loss.detach()
    return loss, metrics
