"""Autoregressive generation on normalised tensors (spec 5.2), with a key/value cache.

The reference path (``use_cache=False``) is the official algorithm: every step recomputes the whole window of the
last ``max_context`` tokens with positions restarting at 0. The cached path computes the same thing incrementally:
while the window only grows, each step embeds one token and attends over cached keys/values (trunk blocks and the
dependency layer); once the window slides, positions restart at 0 for the new window (Q7/Q11), so that window is
recomputed in full. Greedy decoding gives identical tokens on both paths.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kronos.inference.sampling import sample_from_logits
from kronos.model.kronos import Kronos
from kronos.model.tokenizer import KronosTokenizer

logger = logging.getLogger(__name__)

# Default memory budget of one generation chunk's key/value cache (rows are split into chunks above it).
DEFAULT_CACHE_BUDGET_BYTES = 4 * 1024**3


@dataclass
class SamplingConfig:
    """How tokens are drawn (official defaults of ``predict``: T=1.0, top_k=0, top_p=0.9)."""

    T: float = 1.0
    top_k: int = 0
    top_p: float = 0.9
    top_k_then_top_p: bool = False  # Q8 option; default = official (top_k disables top_p)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Temporarily put modules in eval mode (inference semantics: no dropout, Q2/Q4), restoring their mode after."""
    states = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, state in zip(modules, states):
            m.train(state)


def _progress(n: int, verbose: bool, desc: str):
    return tqdm(range(n), desc=desc, disable=not verbose, leave=False)


@torch.inference_mode()
def generate_tokens(
    model: Kronos,
    s1: torch.Tensor,
    s2: torch.Tensor,
    stamps: Optional[torch.Tensor],
    pred_len: int,
    max_context: int,
    sampling: Optional[SamplingConfig] = None,
    *,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    verbose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend token sequences ``s1, s2 [B, T]`` by ``pred_len`` sampled tokens; returns ``[B, T + pred_len]`` each.

    ``stamps [B, >= T + pred_len - 1, 5]`` are the time features of every step (context then future); the stamp of a
    token is that of its own input step, so the last future stamp is never read (Q9). Only the last ``max_context``
    tokens are fed to the predictor, positions restarting at 0 for each window (Q7).
    """
    sampling = sampling or SamplingConfig()
    batch, t0 = s1.shape
    total = t0 + pred_len
    s1_all = s1.new_empty(batch, total)
    s2_all = s2.new_empty(batch, total)
    s1_all[:, :t0] = s1
    s2_all[:, :t0] = s2

    def draw(logits: torch.Tensor) -> torch.Tensor:
        return sample_from_logits(
            logits, sampling.T, sampling.top_k, sampling.top_p, generator, sampling.top_k_then_top_p
        )[:, 0]

    cache = model.new_cache(batch, min(max_context, total - 1), device=s1.device) if use_cache else None
    with eval_mode(model):
        for i in _progress(pred_len, verbose, "generating"):
            n = t0 + i
            a = max(0, n - max_context)
            st = None if stamps is None else stamps[:, a:n]
            if cache is not None:
                if i == 0 or a > 0:  # fresh or slid window: positions restart at 0, recompute it fully
                    cache.length = 0
                    context = model.forward_cached(s1_all[:, a:n], s2_all[:, a:n], st, cache)
                else:
                    st = None if stamps is None else stamps[:, n - 1 : n]
                    context = model.forward_cached(s1_all[:, n - 1 : n], s2_all[:, n - 1 : n], st, cache)
                last = context[:, -1]
                tok1 = draw(model.head(last))
                tok2 = draw(model.decode_s2_cached(last, tok1, cache))
            else:  # reference: the official per-step computation over the whole window
                logits1, context = model.decode_s1(s1_all[:, a:n], s2_all[:, a:n], st)
                tok1 = draw(logits1[:, -1])
                tok2 = draw(model.decode_s2(context, tok1[:, None])[:, -1])
            s1_all[:, n] = tok1
            s2_all[:, n] = tok2
    return s1_all, s2_all


def _cache_bytes_per_row(model: Kronos, capacity: int) -> int:
    per_pos = sum(2 * b.self_attn.d_model for b in model.transformer) + 2 * model.d_model
    return per_pos * capacity * model.norm.weight.element_size()


@torch.inference_mode()
def sample_forecasts(
    tokenizer: KronosTokenizer,
    model: Kronos,
    x: torch.Tensor,
    x_stamp: Optional[torch.Tensor],
    y_stamp: Optional[torch.Tensor],
    pred_len: int,
    max_context: int = 512,
    clip: float = 5.0,
    sample_count: int = 1,
    sampling: Optional[SamplingConfig] = None,
    *,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    verbose: bool = False,
    batch_size: Optional[int] = None,
) -> torch.Tensor:
    """Sample paths for normalised series ``x [N, T, d]``: returns ``[N, sample_count, pred_len, d]`` (normalised).

    Each path is decoded on its own (the last ``min(T + pred_len, max_context)`` tokens, context included: Q11).
    Samples are series-major (spec 5.2). ``batch_size`` caps the series per chunk (default: a cache-memory budget).
    """
    if pred_len < 1:
        raise ValueError("pred_len must be >= 1")
    n_series, t0, _ = x.shape
    device = x.device
    x = torch.clip(x, -clip, clip)
    if x_stamp is not None and y_stamp is not None:
        stamps = torch.cat([x_stamp, y_stamp], dim=1)
    else:
        stamps = None
    if batch_size is None:
        capacity = min(max_context, t0 + pred_len - 1)
        per_series = _cache_bytes_per_row(model, capacity) * sample_count if use_cache else 1
        batch_size = max(1, min(n_series, DEFAULT_CACHE_BUDGET_BYTES // max(per_series, 1)))
    # Q11: decode the last min(T + P, max_context) tokens, context included. (A forecast longer than max_context,
    # which the official code cannot return, is decoded whole.)
    window = max(min(t0 + pred_len, max_context), pred_len)
    outputs = []
    with eval_mode(tokenizer, model):
        for start in range(0, n_series, batch_size):
            sl = slice(start, start + batch_size)
            # Q7: the whole history is encoded, even beyond max_context. Each series is encoded once; its tokens are
            # then replicated series-major for the sample paths.
            s1, s2 = tokenizer.encode(x[sl], half=True)
            s1 = s1.repeat_interleave(sample_count, dim=0)
            s2 = s2.repeat_interleave(sample_count, dim=0)
            st = None if stamps is None else stamps[sl].repeat_interleave(sample_count, dim=0)
            s1_all, s2_all = generate_tokens(
                model, s1, s2, st, pred_len, max_context, sampling,
                use_cache=use_cache, generator=generator, verbose=verbose,
            )  # fmt: skip
            z = tokenizer.decode([s1_all[:, -window:], s2_all[:, -window:]], half=True)
            outputs.append(z[:, -pred_len:].reshape(-1, sample_count, pred_len, z.shape[-1]))
    return torch.cat(outputs, dim=0).to(device)


def auto_regressive_inference(
    tokenizer: KronosTokenizer,
    model: Kronos,
    x: torch.Tensor,
    x_stamp: torch.Tensor,
    y_stamp: torch.Tensor,
    max_context: int,
    pred_len: int,
    clip: float = 5,
    T: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.99,
    sample_count: int = 5,
    verbose: bool = False,
    *,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
) -> np.ndarray:
    """Official-compatible entry point: mean over sample paths, ``[N, pred_len, d]`` float32 numpy, normalised.

    (The official function returns the whole decoded window; its callers keep the last ``pred_len`` steps, which is
    what this returns.)
    """
    samples = sample_forecasts(
        tokenizer, model, x, x_stamp, y_stamp, pred_len, max_context, clip, sample_count,
        SamplingConfig(T=T, top_k=top_k, top_p=top_p), use_cache=use_cache, generator=generator, verbose=verbose,
    )  # fmt: skip
    return mean_over_samples(samples.cpu().numpy())


def mean_over_samples(samples: np.ndarray) -> np.ndarray:
    """Average sample paths ``[N, S, P, d]`` in normalised space, as the official code (numpy, float32; Q11)."""
    return np.mean(np.ascontiguousarray(samples), axis=1)
