"""Autoregressive generation on normalised tensors (MODEL_ARCHITECTURE_ANALYSIS.md §6.1, §6.3), with a key/value cache.

The reference path (``use_cache=False``) is the official algorithm: every step recomputes the whole window of the
last ``max_context`` tokens with positions restarting at 0. The cached path computes the same thing incrementally:
while the window only grows, each step embeds one token and attends over cached keys/values (trunk blocks and the
dependency layer); once the window slides, positions restart at 0 for the new window (Q7/Q11), so that window is
recomputed in full. Greedy decoding gives identical tokens on both paths.

Sample paths of one series share their context (``share_prefix``, default): its encoding, the predictor's
keys/values of the context positions and the tokenizer decoder's context states are computed once per series and
copied to the paths (MODEL_ARCHITECTURE_ANALYSIS.md 6.4); same tokens and random draws as per-path recomputation.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kronos.errors import InputError, KronosError
from kronos.inference.sampling import sample_from_logits
from kronos.model.kronos import Kronos, KronosCache
from kronos.model.tokenizer import KronosTokenizer

logger = logging.getLogger(__name__)

# Default memory budget of one generation chunk's key/value cache (rows are split into chunks above it).
DEFAULT_CACHE_BUDGET_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class SamplingConfig:
    """How forecasts are sampled: token drawing (official defaults of ``predict``: T=1.0, top_k=0, top_p=0.9), and
    for the DataFrame-level calls how many paths (``sample_count``) with which ``seed`` (None: the global RNG).

    Every caller that forecasts from a config passes :meth:`from_config` (the ``inference_*`` keys)."""

    T: float = 1.0
    top_k: int = 0
    top_p: float = 0.9
    top_k_then_top_p: bool = False  # Q8 option; default = official (top_k disables top_p)
    sample_count: int = 1
    seed: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> SamplingConfig:
        """The config's ``inference_T``, ``inference_top_k``, ``inference_top_p``, ``inference_sample_count`` and
        ``inference_seed``."""
        seed = getattr(config, "inference_seed", None)
        return cls(
            T=float(config.inference_T),
            top_k=int(config.inference_top_k),
            top_p=float(config.inference_top_p),
            sample_count=int(config.inference_sample_count),
            seed=None if seed is None else int(seed),
        )


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


class Cancelled(KronosError):
    """Generation stopped between two decode steps because its :func:`cancel_when` check said so."""


_cancel = threading.local()


@contextlib.contextmanager
def cancel_when(check: Callable[[], bool]) -> Iterator[None]:
    """Within this block (on this thread), generation calls ``check()`` before each decode step and raises
    :class:`Cancelled` once it returns True: a service stops work whose clients have gone within one step."""
    before = getattr(_cancel, "check", None)
    _cancel.check = check
    try:
        yield
    finally:
        _cancel.check = before


def _stop_if_cancelled() -> None:
    check = getattr(_cancel, "check", None)
    if check is not None and check():
        raise Cancelled("forecast cancelled (its client went away or the service is shutting down)")


@torch.inference_mode()
def generate_tokens(
    model: Kronos,
    s1: torch.Tensor,
    s2: torch.Tensor,
    stamps: torch.Tensor | None,
    pred_len: int,
    max_context: int,
    sampling: SamplingConfig | None = None,
    *,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    verbose: bool = False,
    paths: int = 1,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend token sequences ``s1, s2 [B, T]`` by ``pred_len`` sampled tokens; returns ``[B * paths, T + pred_len]``.

    ``stamps [B, >= T + pred_len - 1, 5]`` are the time features of every step (context then future); the stamp of a
    token is that of its own input step, so the last future stamp is never read (Q9). Only the last ``max_context``
    tokens are fed to the predictor, positions restarting at 0 for each window (Q7).

    Each input row is decoded as ``paths`` independent sample paths (rows series-major). With the cache and
    ``share_prefix`` (the default), the part of a window that is still context (identical for all paths of a series)
    runs through the predictor once per series and its keys/values are copied to the paths; only the generated
    tokens run per path. This gives the same tokens as decoding every path on its own, with the same random draws.
    """
    sampling = sampling or SamplingConfig()
    batch, t0 = s1.shape
    rows = batch * paths
    total = t0 + pred_len
    s1_all = s1.new_empty(rows, total)
    s2_all = s2.new_empty(rows, total)
    s1_all[:, :t0] = s1.repeat_interleave(paths, dim=0) if paths > 1 else s1
    s2_all[:, :t0] = s2.repeat_interleave(paths, dim=0) if paths > 1 else s2
    stamps_rows = stamps.repeat_interleave(paths, dim=0) if stamps is not None and paths > 1 else stamps

    def draw(logits: torch.Tensor) -> torch.Tensor:
        return sample_from_logits(
            logits, sampling.T, sampling.top_k, sampling.top_p, generator, sampling.top_k_then_top_p
        )[:, 0]

    share = use_cache and share_prefix and paths > 1
    capacity = min(max_context, total - 1)
    cache = model.new_cache(rows, capacity, device=s1.device) if use_cache else None
    shared = model.new_cache(batch, min(capacity, t0), device=s1.device) if share else None
    with eval_mode(model):
        for i in _progress(pred_len, verbose, "generating"):
            _stop_if_cancelled()
            n = t0 + i
            a = max(0, n - max_context)
            st = None if stamps_rows is None else stamps_rows[:, a:n]
            if cache is not None:
                if i == 0 or a > 0:  # fresh or slid window: positions restart at 0, recompute it fully
                    cache.length = 0
                    if shared is not None and a < t0:
                        last = _prefill_shared(model, s1, s2, stamps, a, t0, shared, cache, paths)
                        if n > t0:  # the generated part of the window, per path
                            st = None if stamps_rows is None else stamps_rows[:, t0:n]
                            last = model.forward_cached(s1_all[:, t0:n], s2_all[:, t0:n], st, cache)[:, -1]
                    else:
                        last = model.forward_cached(s1_all[:, a:n], s2_all[:, a:n], st, cache)[:, -1]
                else:
                    st = None if stamps_rows is None else stamps_rows[:, n - 1 : n]
                    last = model.forward_cached(s1_all[:, n - 1 : n], s2_all[:, n - 1 : n], st, cache)[:, -1]
                tok1 = draw(model.head(last))
                tok2 = draw(model.decode_s2_cached(last, tok1, cache))
            else:  # reference: the official per-step computation over the whole window
                logits1, context = model.decode_s1(s1_all[:, a:n], s2_all[:, a:n], st)
                tok1 = draw(logits1[:, -1])
                tok2 = draw(model.decode_s2(context, tok1[:, None])[:, -1])
            s1_all[:, n] = tok1
            s2_all[:, n] = tok2
    return s1_all, s2_all


def _prefill_shared(
    model: Kronos,
    s1: torch.Tensor,
    s2: torch.Tensor,
    stamps: torch.Tensor | None,
    a: int,
    t0: int,
    shared: KronosCache,
    cache: KronosCache,
    paths: int,
) -> torch.Tensor:
    """Run the context part ``[a, t0)`` of a fresh window once per series (``B`` rows) and copy its keys/values into
    every path's rows of ``cache``; returns the last context row per path ``[B * paths, D]``."""
    shared.length = 0
    st = None if stamps is None else stamps[:, a:t0]
    context = model.forward_cached(s1[:, a:t0], s2[:, a:t0], st, shared)
    m = t0 - a
    for src, dst in zip(shared.layers + [shared.dep], cache.layers + [cache.dep]):
        dst.share_prefix(src, m, paths)
    cache.length = m
    return context[:, -1].repeat_interleave(paths, dim=0)


def _cache_bytes_per_row(model: Kronos, capacity: int) -> int:
    per_pos = sum(2 * b.self_attn.d_model for b in model.transformer) + 2 * model.d_model
    return per_pos * capacity * model.norm.weight.element_size()


@torch.inference_mode()
def sample_forecasts(
    tokenizer: KronosTokenizer,
    model: Kronos,
    x: torch.Tensor,
    x_stamp: torch.Tensor | None,
    y_stamp: torch.Tensor | None,
    pred_len: int,
    max_context: int = 512,
    clip: float = 5.0,
    sample_count: int = 1,
    sampling: SamplingConfig | None = None,
    *,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    verbose: bool = False,
    batch_size: int | None = None,
    share_prefix: bool = True,
) -> torch.Tensor:
    """Sample paths for normalised series ``x [N, T, d]``: returns ``[N, sample_count, pred_len, d]`` (normalised).

    Each path is decoded on its own (the last ``min(T + pred_len, max_context)`` tokens, context included: Q11).
    Samples are series-major (analysis §6.1). ``batch_size`` caps the series per chunk (default: a cache-memory budget).

    With the cache, ``share_prefix`` (default) encodes, prefills and decodes the context once per series and shares
    it across the ``sample_count`` paths (see :func:`generate_tokens`): the same numbers as recomputing it per path
    (same random draws for a fixed ``generator``), at a fraction of the cost. ``use_cache=False`` is the reference.
    """
    if pred_len < 1:
        raise InputError(f"pred_len must be >= 1, got {pred_len}")
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
            _stop_if_cancelled()
            s1, s2 = tokenizer.encode(x[sl], half=True)
            st = None if stamps is None else stamps[sl]
            s1_all, s2_all = generate_tokens(
                model, s1, s2, st, pred_len, max_context, sampling, use_cache=use_cache, generator=generator,
                verbose=verbose, paths=sample_count, share_prefix=share_prefix,
            )  # fmt: skip
            start = s1_all.shape[1] - window  # the decoded window starts here; its context part is [start, t0)
            if use_cache and share_prefix and sample_count > 1:
                prefix = [s1[:, start:t0], s2[:, start:t0]]
                z = tokenizer.decode_after_prefix(prefix, [s1_all[:, t0:], s2_all[:, t0:]], sample_count, half=True)
            else:
                z = tokenizer.decode([s1_all[:, start:], s2_all[:, start:]], half=True)
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
    generator: torch.Generator | None = None,
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
