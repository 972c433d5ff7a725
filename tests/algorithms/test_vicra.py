"""VICRA (spec section 3): psi, shaped advantages, the paper's appendix C snippet, scores,
diagnostics and image distortions."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from megatron_ivr.algorithms.losses import rl_loss
from megatron_ivr.algorithms.vicra import (
    DISTORTIONS,
    distort_batch,
    grounding_diagnostics,
    kl_scores,
    prob_diff_scores,
    psi,
    shape_advantages,
    token_entropy,
)
from megatron_ivr.config.schema import AlgorithmConfig
from tests.algorithms import naive
from tests.algorithms.test_losses import random_batch


def paper_vicra(advantages, visually_groundeds_probs, response_mask):
    """Appendix C of vicra.txt, verbatim apart from the function wrapper."""
    response_len = response_mask.sum(dim=-1, keepdim=True)
    w = visually_groundeds_probs * response_mask
    w_sum = w.sum(dim=-1, keepdim=True).clamp_min(1e-8)
    pi = 1 + (w - w_sum / response_len)
    advantages = advantages * pi
    return advantages


@pytest.mark.parametrize("batch, length, seed", [(1, 1, 0), (4, 9, 1), (16, 33, 2)])
def test_psi_matches_naive_and_preserves_the_sum(batch, length, seed):
    logp, _, _, _, _, _, mask = random_batch(batch, length, seed, padded_row=batch > 1)
    w = prob_diff_scores(logp, logp - torch.rand_like(logp))
    got = psi(w, mask)
    assert torch.allclose(got, torch.tensor(naive.psi(w.tolist(), mask.tolist()), dtype=got.dtype), atol=1e-12)
    valid_per_row = mask.sum(-1)
    assert torch.allclose((got * mask).sum(-1), valid_per_row.to(got.dtype), atol=1e-9)  # sum = #valid tokens
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_the_papers_snippet(seed):
    logp, _, _, _, _, _, mask = random_batch(6, 12, seed, padded_row=False)
    w = prob_diff_scores(logp, logp - torch.rand_like(logp) * 2)
    adv = torch.randn(6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ours = shape_advantages(adv[:, 0], w, mask)
    theirs = paper_vicra(adv, w, mask)
    valid = mask.bool()  # the snippet leaves padding positions to the loss mask
    assert torch.allclose(ours[valid], theirs[valid], atol=1e-6)


def test_zero_scores_leave_the_loss_unchanged():
    logp, old, _, _, adv, rectified, mask = random_batch(8, 10, seed=7)
    per_response = adv[:, 0]
    shaped = shape_advantages(per_response, torch.zeros_like(logp), mask)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        cfg = AlgorithmConfig(loss_agg=mode, tis_cap=None)
        plain, _ = rl_loss(logp, old, per_response, mask, cfg, rectified=rectified)
        vicra, _ = rl_loss(logp, old, shaped, mask, cfg, rectified=rectified)
        assert vicra.item() == plain.item()


def test_credit_moves_toward_grounded_tokens():
    mask = torch.ones(1, 4)
    w = torch.tensor([[0.6, 0.0, 0.0, 0.2]])
    shaped = shape_advantages(torch.tensor([2.0]), w, mask)
    assert shaped[0].tolist() == pytest.approx([2 * 1.4, 2 * 0.8, 2 * 0.8, 2 * 1.0])
    assert shaped.sum().item() == pytest.approx(2.0 * 4)


def test_kl_scores_match_naive():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    got = kl_scores(a, b, chunk=2)
    for i in range(2):
        for t in range(5):
            p = torch.softmax(a[i, t], -1).tolist()
            q = torch.softmax(b[i, t], -1).tolist()
            expected = sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))
            assert got[i, t].item() == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(kl_scores(a, a), torch.zeros(2, 5), atol=1e-6)


def test_grounding_diagnostics():
    w = torch.tensor([[0.5, 0.1, 0.3, 0.0], [0.25, 0.0, 0.0, 0.9]])
    entropy = torch.tensor([[2.0, 1.0, 4.0, 1.0], [3.0, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    d = grounding_diagnostics(w, entropy, mask, threshold=0.2)
    assert d["vicra/vg_share"] == pytest.approx(3 / 7)  # 0.5, 0.3, 0.25 (0.9 is padding)
    assert d["vicra/vg_entropy"] == pytest.approx(3.0)
    assert d["vicra/other_entropy"] == pytest.approx(3.0 / 4)
    assert d["vicra/entropy_gap"] == pytest.approx(3.0 - 0.75)
    assert token_entropy(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))


def test_distortions():
    image = Image.new("RGB", (56, 28), (200, 100, 50))
    images = [[image], [image, image], []]
    assert distort_batch(images, "discard") == [[], [], []]
    black = distort_batch(images, "blacken")
    assert black[1][1].getextrema() == ((0, 0), (0, 0), (0, 0)) and black[2] == []
    patched = distort_batch(images, "patch_blacken", seed=1, patch_size=14, patch_ratio=0.5)[0][0]
    blocks = [patched.crop((c * 14, r * 14, c * 14 + 14, r * 14 + 14)).getextrema()[0]
              for r in range(2) for c in range(4)]
    assert sum(b == (0, 0) for b in blocks) == 4  # half of the 8 patches, whole patches
    noisy = distort_batch(images, "gaussian_noise", seed=1, noise_std=200.0)[0][0]
    assert noisy.size == image.size and noisy.getextrema()[0] == (0, 255)  # std 200 saturates
    assert distort_batch(images, "gaussian_noise", seed=1)[0][0].tobytes() == noisy.tobytes()  # seeded
    blurred = distort_batch([[Image.new("RGB", (28, 28))]], "gaussian_blur")[0][0]
    assert blurred.size == (28, 28)
    assert set(DISTORTIONS) == {"discard", "blacken", "patch_blacken", "gaussian_noise", "gaussian_blur"}
    with pytest.raises(ValueError):
        distort_batch(images, "invert")
