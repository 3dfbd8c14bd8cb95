"""Binary Spherical Quantization (BSQ) and its training loss (MODEL_ARCHITECTURE_ANALYSIS.md §2.2, §5.2).

A latent vector is L2-normalised and quantised to the signs of its components, scaled by ``1/sqrt(K)``. The first
``s1_bits`` dimensions form the coarse token, the remaining ``s2_bits`` the fine token; bits are LSB-first within each
half (Q5). Buffer names and kinds match the official checkpoints (``tokenizer.bsq.basis`` etc.).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _entropy(prob: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dim (natural log, +1e-8 inside the log as the official code)."""
    return -(prob * torch.log(prob + 1e-8)).sum(dim=-1)


class BinarySphericalQuantizer(nn.Module):
    """Sign quantiser on the unit sphere with commitment and entropy losses.

    Defaults as the official code: soft entropy, analytical per-sample entropy, l2-normalised codes, inverse
    temperature 1. ``group_size`` only shapes the (metrics-only) buffers: Q12, the official "group" codebook entropy
    is actually per-bit, so the group size has no numerical effect.
    """

    def __init__(
        self,
        embed_dim: int,
        beta: float,
        gamma0: float,
        gamma: float,
        zeta: float,
        group_size: int,
        inv_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.beta = beta
        self.gamma0 = gamma0
        self.gamma = gamma
        self.zeta = zeta
        self.group_size = group_size
        self.inv_temperature = inv_temperature
        # MSB-first bases, persistent buffers used only for logging metrics (never for token ids: Q5).
        self.register_buffer("basis", 2 ** torch.arange(embed_dim - 1, -1, -1, dtype=torch.long))
        self.register_buffer("group_basis", 2 ** torch.arange(group_size - 1, -1, -1, dtype=torch.long))
        codes = torch.arange(2**group_size, dtype=torch.long)
        group_codebook = ((codes[:, None] & self.group_basis) != 0).float() * 2 - 1
        self.register_buffer("group_codebook", group_codebook, persistent=False)

    @property
    def q_scale(self) -> float:
        return 1.0 / (self.embed_dim**0.5)

    def quantize(self, u: torch.Tensor) -> torch.Tensor:
        """Signs of ``u`` (exact zero -> -1) with a straight-through gradient."""
        hard = torch.where(u > 0, 1.0, -1.0).to(u.dtype)
        return u + (hard - u).detach()

    def loss_terms(self, u: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """Commitment, per-sample entropy and codebook entropy (analysis §5.2) for normalised ``u`` and scaled ``q``."""
        commit = self.beta * torch.mean(((q.detach() - u) ** 2).sum(dim=-1))
        p = torch.sigmoid(-4 * u / (self.embed_dim**0.5) * self.inv_temperature)
        prob = torch.stack([p, 1 - p], dim=-1)  # [..., K, 2]
        per_sample = _entropy(prob).sum(dim=-1).mean()
        # Q12: codebook entropy over the per-bit average probabilities (group softmax is discarded officially).
        avg_prob = prob.reshape(-1, self.embed_dim, 2).mean(dim=0)
        codebook = _entropy(avg_prob).sum()
        loss = commit + self.zeta * (self.gamma0 * per_sample - self.gamma * codebook) / self.inv_temperature
        return {"loss": loss, "commit_loss": commit, "per_sample_entropy": per_sample, "codebook_entropy": codebook}

    def forward(self, u: torch.Tensor, compute_loss: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Quantise normalised latents ``u [..., K]``; returns ``(q, bsq_loss, metrics)``.

        Always float32, also inside an autocast region: the entropy loss subtracts two numbers near ``K ln 2``
        (about 13.9 for K=20), which bf16 cannot resolve.
        """
        with torch.autocast(device_type=u.device.type, enabled=False):
            return self._forward(u.float(), compute_loss)

    def _forward(self, u: torch.Tensor, compute_loss: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
        q = self.quantize(u) * self.q_scale
        if not compute_loss:
            return q, u.new_zeros(()), {}
        terms = self.loss_terms(u, q)
        return q, terms["loss"], {k: v.detach() for k, v in terms.items() if k != "loss"}


class BSQuantizer(nn.Module):
    """Normalise, quantise and split into (s1, s2) token ids (LSB-first within each half: Q5)."""

    def __init__(
        self, s1_bits: int, s2_bits: int, beta: float, gamma0: float, gamma: float, zeta: float, group_size: int
    ) -> None:
        super().__init__()
        self.s1_bits = s1_bits
        self.s2_bits = s2_bits
        self.codebook_dim = s1_bits + s2_bits
        self.bsq = BinarySphericalQuantizer(self.codebook_dim, beta, gamma0, gamma, zeta, group_size)

    @staticmethod
    def bits_to_indices(q: torch.Tensor) -> torch.Tensor:
        """Integer id of a (scaled) code: bit k is 1 iff ``q[..., k] >= 0``, weight ``2**k`` (LSB-first, Q5)."""
        bits = (q >= 0).long()
        weights = 2 ** torch.arange(q.shape[-1], dtype=torch.long, device=q.device)
        return (bits * weights).sum(-1)

    def forward(self, z: torch.Tensor, half: bool = False, compute_loss: bool = True):
        """Returns ``(bsq_loss, quantized, indices)``; indices are ``[s1, s2]`` when ``half`` else one id."""
        with torch.autocast(device_type=z.device.type, enabled=False):  # fp32 under any autocast (see bsq.forward)
            u = F.normalize(z.float(), dim=-1)
        q, loss, metrics = self.bsq(u, compute_loss=compute_loss)
        if half:
            indices = [self.bits_to_indices(q[..., : self.s1_bits]), self.bits_to_indices(q[..., self.s1_bits :])]
        else:
            indices = self.bits_to_indices(q)
        self.last_metrics = metrics
        return loss, q, indices
