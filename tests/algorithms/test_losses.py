"""Losses vs the naive loops on random padded tensors (spec sections 2 and 4.6)."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_ivr.algorithms.losses import (
    AGGREGATIONS,
    aggregate,
    kl_k3,
    mismatch_metrics,
    policy_shaping,
    rl_loss,
    truncated_is_weights,
)
from megatron_ivr.config.schema import AlgorithmConfig, IvrConfig
from tests.algorithms import naive


def random_batch(batch: int, length: int, seed: int, padded_row: bool = True, one_token_row: bool = True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    if padded_row:
        lengths[0] = 0  # a fully padded row
    if one_token_row and batch > 1:
        lengths[1] = 1  # a one-token response
    mask = (torch.arange(length)[None] < lengths[:, None]).float()
    logp = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.3
    rollout = old + torch.randn(batch, length, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(batch, length, generator=g, dtype=torch.float64)
    rectified = torch.rand(batch, generator=g) < 0.3
    return logp, old, ref, rollout, adv, rectified, mask


CASES = list(itertools.product(AGGREGATIONS, [(1, 1), (3, 5), (8, 16)], [True, False], [0.0, 0.04]))


@pytest.mark.parametrize("mode, shape, with_tis, beta", CASES)
def test_rl_loss_matches_naive(mode, shape, with_tis, beta):
    batch, length = shape
    logp, old, ref, rollout, adv, rectified, mask = random_batch(batch, length, seed=batch * 31 + length)
    cfg = AlgorithmConfig(eps_low=0.2, eps_high=0.28, beta=beta, loss_agg=mode, tis_cap=2.0, ivr=IvrConfig(gamma=0.1))
    loss, metrics = rl_loss(logp, old, adv, mask, cfg, rectified=rectified, ref_logp=ref,
                            rollout_logp=rollout if with_tis else None)
    tis = torch.exp(old - rollout).clamp(max=2.0).tolist() if with_tis else None
    per_token = naive.token_losses(logp.tolist(), old.tolist(), adv.tolist(), rectified.tolist(), 0.2, 0.28, 0.1, tis)
    expected = naive.aggregate(per_token, mask.tolist(), mode)
    if beta:
        expected += beta * naive.aggregate(naive.k3(logp.tolist(), ref.tolist()), mask.tolist(), mode)
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    assert metrics["loss/total"] == pytest.approx(expected, abs=1e-10)
    assert torch.isfinite(loss)


def test_per_response_advantages_broadcast():
    logp, old, _, _, adv, _, mask = random_batch(4, 6, seed=5)
    per_response = adv[:, 0]
    a, _ = rl_loss(logp, old, per_response, mask, AlgorithmConfig(tis_cap=None))
    b, _ = rl_loss(logp, old, per_response[:, None].expand_as(logp), mask, AlgorithmConfig(tis_cap=None))
    assert a.item() == b.item()


def test_all_padded_batch_is_zero_not_nan():
    logp, old, _, _, adv, _, _ = random_batch(3, 4, seed=1)
    for mode in AGGREGATIONS:
        loss, _ = rl_loss(logp, old, adv, torch.zeros(3, 4), AlgorithmConfig(loss_agg=mode))
        assert loss.item() == 0.0


def test_zero_advantage_gives_zero_loss_and_gradient():
    logp, old, _, _, _, rectified, mask = random_batch(5, 7, seed=2)
    logp.requires_grad_(True)
    loss, _ = rl_loss(logp, old, torch.zeros(5), mask, AlgorithmConfig(), rectified=rectified)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logp.grad) == 0


def test_global_denominators():
    logp, old, _, _, adv, _, mask = random_batch(4, 5, seed=3)
    local, _ = rl_loss(logp, old, adv, mask, AlgorithmConfig(tis_cap=None))
    doubled, _ = rl_loss(logp, old, adv, mask, AlgorithmConfig(tis_cap=None), num_tokens=2 * mask.sum())
    assert doubled.item() == pytest.approx(local.item() / 2)
    rows = (mask.sum(-1) > 0).sum()
    seq = aggregate(adv, mask, "seq-mean-token-sum", num_sequences=2 * rows)
    assert seq.item() == pytest.approx(aggregate(adv, mask, "seq-mean-token-sum").item() / 2)
    with pytest.raises(ValueError):
        aggregate(adv, mask, "sum")


def test_shaping_gradient_equals_closed_form():
    """d(-f(p) A)/dtheta = -gamma / (p + gamma)^2 * dp/dtheta * A, with p = exp(logp(theta))."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    logits = theta * 1.7
    logp = torch.log_softmax(logits, -1)[:, 3]  # log-prob of one taken token per row
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    gamma = 0.1
    policy_shaping(logp, adv, gamma).sum().backward()
    p = logp.detach().exp()
    dp_dtheta = torch.autograd.functional.jacobian(lambda th: torch.softmax(th * 1.7, -1)[:, 3].sum(), theta.detach())
    expected = -(gamma / (p + gamma) ** 2 * adv)[:, None] * dp_dtheta
    assert torch.allclose(theta.grad, expected, atol=1e-12)


def test_clip_is_asymmetric_and_counted():
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.25, 1.5]], dtype=torch.float64))  # ratios
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    loss, metrics = rl_loss(logp, old, adv, torch.ones(1, 4), AlgorithmConfig(eps_low=0.2, eps_high=0.28, tis_cap=None))
    # positive advantage: the ratio is capped above at 1.28 only (the low side never binds for A > 0)
    assert loss.item() == pytest.approx(-(0.5 + 0.9 + 1.25 + 1.28) / 4)
    assert metrics["loss/clipped_tokens"].item() == 1  # of the 4 (the 1.5 ratio)


def test_kl_k3_and_tis():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.5]])
    assert kl_k3(logp, ref)[0, 0].item() == 0.0
    assert kl_k3(logp, ref)[0, 1].item() == pytest.approx(torch.exp(torch.tensor(0.5)).item() - 1.5)
    weights = truncated_is_weights(torch.tensor([0.0, 0.0]), torch.tensor([-5.0, 0.1]), cap=2.0)
    assert weights.tolist() == pytest.approx([2.0, torch.exp(torch.tensor(-0.1)).item()])
    m = mismatch_metrics(torch.tensor([[0.0, -1.0]]), torch.tensor([[0.5, -1.0]]), torch.tensor([[1.0, 1.0]]))
    assert m["mismatch/abs_logp_diff_max"] == 0.5 and m["mismatch/abs_logp_diff_mean"] == 0.25


def test_kl_requires_reference():
    logp, old, _, _, adv, _, mask = random_batch(2, 3, seed=4)
    with pytest.raises(ValueError, match="ref_logp"):
        rl_loss(logp, old, adv, mask, AlgorithmConfig(beta=0.1))


def test_the_loss_takes_the_algorithm_config_and_tis_switches_off(tmp_path):
    """``rl_loss`` reads the run's ``algorithm`` config itself; ``algorithm.tis_cap: null`` turns the
    truncated importance weight off (the engine's log-probs then change nothing)."""
    from megatron_ivr.config import load_config

    logp, old, ref, rollout, adv, rectified, mask = random_batch(4, 6, seed=11)
    cfg = load_config(None, ["algorithm.eps_high=0.28", "algorithm.ivr.gamma=0.3", "algorithm.tis_cap=null",
                             "algorithm.loss_agg=seq-mean-token-sum"]).algorithm
    off, _ = rl_loss(logp, old, adv, mask, cfg, rectified=rectified, rollout_logp=rollout)
    plain, _ = rl_loss(logp, old, adv, mask, cfg, rectified=rectified)
    assert off.item() == plain.item()
    cfg.tis_cap = 2.0
    on, _ = rl_loss(logp, old, adv, mask, cfg, rectified=rectified, rollout_logp=rollout)
    assert on.item() != plain.item()
    per_token = naive.token_losses(logp.tolist(), old.tolist(), adv.tolist(), rectified.tolist(), 0.2, 0.28, 0.3,
                                   torch.exp(old - rollout).clamp(max=2.0).tolist())
    assert on.item() == pytest.approx(naive.aggregate(per_token, mask.tolist(), "seq-mean-token-sum"), abs=1e-10)


