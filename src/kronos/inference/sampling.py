"""Token sampling: temperature, top-k, top-p (nucleus), as the official ``sample_from_logits``
(MODEL_ARCHITECTURE_ANALYSIS.md §6.1, quirk Q8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def top_k_top_p_filtering(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, top_k_then_top_p: bool = False
) -> torch.Tensor:
    """Copy of ``logits [B, V]`` with the filtered-out tokens set to -inf.

    Q8: with ``top_k > 0`` only top-k filtering happens (ties with the k-th largest logit are kept) and ``top_p`` is
    ignored, unless ``top_k_then_top_p`` asks for top-k followed by top-p. Top-p keeps the smallest prefix of the
    sorted distribution whose mass reaches ``top_p`` (including the token that crosses it; the top token always).
    """
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
        if not top_k_then_top_p:
            return logits  # Q8
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove_sorted = torch.zeros_like(cum, dtype=torch.bool)
        remove_sorted[..., 1:] = cum[..., :-1] > top_p
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    top_k_then_top_p: bool = False,
) -> torch.Tensor:
    """Draw one token id per row of ``logits [B, V]``; returns ``[B, 1]`` int64.

    Always a multinomial draw (greedy decoding is ``top_k=1``: one surviving token, chosen deterministically).
    ``generator`` makes the draw reproducible without touching the global RNG.
    """
    logits = logits / temperature
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filtering(logits, top_k, top_p, top_k_then_top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
