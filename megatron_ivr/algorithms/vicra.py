"""VICRA: visually-grounded credit assignment (spec section 3).

A second pass of the same policy without the image gives, per response token,
``w = pi(o_t | I, q, o_<t) - pi(o_t | q, o_<t)`` (``prob_diff``, probabilities) or the KL
between the two next-token distributions (``kl``). The advantages are reshaped by the
sum-preserving ``psi(w) = 1 + (w - mean_t w)`` over each response's valid tokens.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageFilter

DISTORTIONS = ("discard", "blacken", "patch_blacken", "gaussian_noise", "gaussian_blur")


def prob_diff_scores(logp_image: torch.Tensor, logp_no_image: torch.Tensor) -> torch.Tensor:
    """``w = exp(logp_with_image) - exp(logp_without)`` per token (probabilities, not logs)."""
    return (torch.exp(logp_image) - torch.exp(logp_no_image)).detach()


def kl_scores(logits_image: torch.Tensor, logits_no_image: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per-token ``KL(pi(.|I,q,o_<t) || pi(.|q,o_<t))`` from full ``[B, T, V]`` logits, in chunks of
    ``chunk`` positions so that only one chunk's log-softmax is held at a time."""
    out = torch.empty(logits_image.shape[:2], dtype=torch.float32, device=logits_image.device)
    for start in range(0, logits_image.shape[1], chunk):
        a = torch.log_softmax(logits_image[:, start:start + chunk].float(), -1)
        b = torch.log_softmax(logits_no_image[:, start:start + chunk].float(), -1)
        out[:, start:start + chunk] = (a.exp() * (a - b)).sum(-1)
    return out.detach()


def psi(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``psi(w_t) = 1 + (w_t - mean_t w)`` over valid tokens; 1 on padding and on empty rows.

    Over each response's valid tokens psi sums to the number of valid tokens, so the total
    credit is unchanged and only redistributed.
    """
    mask = mask.to(w.dtype)
    counts = mask.sum(-1, keepdim=True)
    mean = (w * mask).sum(-1, keepdim=True) / counts.clamp_min(1.0)
    return torch.where(mask.bool(), 1.0 + (w - mean), torch.ones_like(w))


def shape_advantages(advantages: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``A^VICRA_{i,t} = A_i * psi(w_{i,t})``; ``advantages`` is ``[B]`` or ``[B, T]``."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages * psi(w, mask)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def grounding_diagnostics(w: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor,
                          threshold: float = 0.2) -> dict:
    """The paper's Figure 2/4 statistics: share of visually-grounded tokens (``w > threshold``),
    the mean entropy of those and of the others, and the gap."""
    valid = mask.bool()
    grounded = valid & (w > threshold)
    other = valid & ~grounded
    total = int(valid.sum())
    vg_entropy = entropy[grounded].mean().item() if grounded.any() else 0.0
    other_entropy = entropy[other].mean().item() if other.any() else 0.0
    return {"vicra/vg_share": grounded.sum().item() / max(total, 1), "vicra/vg_entropy": vg_entropy,
            "vicra/other_entropy": other_entropy, "vicra/entropy_gap": vg_entropy - other_entropy,
            "vicra/w_mean": w[valid].mean().item() if total else 0.0}


def distort_image(image: Image.Image, kind: str, rng: random.Random, patch_size: int = 14,
                  patch_ratio: float = 0.6, noise_std: float = 200.0, blur_radius: float = 5.0) -> Image.Image:
    """One ablation distortion of spec section 3 (``discard`` is handled by dropping images)."""
    if kind == "blacken":
        return Image.new("RGB", image.size, (0, 0, 0))
    if kind == "patch_blacken":
        pixels = np.array(image.convert("RGB"))
        rows, cols = -(-image.height // patch_size), -(-image.width // patch_size)
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        for r, c in rng.sample(cells, round(patch_ratio * len(cells))):
            pixels[r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size] = 0
        return Image.fromarray(pixels)
    if kind == "gaussian_noise":
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        noise = np.random.default_rng(rng.getrandbits(63)).normal(0.0, noise_std, pixels.shape)
        return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    if kind == "gaussian_blur":
        return image.filter(ImageFilter.GaussianBlur(blur_radius))
    raise ValueError(f"unknown distortion {kind!r}; choose from {DISTORTIONS[1:]} (discard drops the images)")


def distort_batch(images: list[list[Image.Image]], kind: str, seed: int = 0, **options) -> list[list[Image.Image]]:
    """The images of a batch for the VICRA second pass: ``discard`` removes them all (the
    prompts are then built without image tokens, so positions are recomputed as for text)."""
    if kind not in DISTORTIONS:
        raise ValueError(f"unknown distortion {kind!r}; choose from {DISTORTIONS}")
    if kind == "discard":
        return [[] for _ in images]
    rng = random.Random(seed)
    return [[distort_image(image, kind, rng, **options) for image in sample] for sample in images]
