"""Simple forecasters scored beside the model on the same anchors (walk-forward report).

- ``last_value``: every future close equals the anchor's close (a point mass).
- ``drift``: the close grows at the mean log-return of the lookback: ``last * exp(mu * h)`` (a point mass).
- ``random_walk``: a driftless log-price random walk with the lookback's log-return volatility ``sigma``; its
  Gaussian band at step h is ``last * exp(+-z * sigma * sqrt(h))``, represented by ``n_samples`` seeded paths so
  every probabilistic metric is computed the same way as for the model; its CRPS is the exact log-normal formula
  (:func:`kronos.evaluate.metrics.crps_lognormal`), not an estimate from the paths. Its point forecast is the median
  (last).
"""

from __future__ import annotations

import numpy as np

from kronos.evaluate.metrics import PathForecasts, context_volatility, crps_lognormal, log_returns, naive_scale

BASELINES = ("last_value", "drift", "random_walk")


def baseline_forecasts(
    context_close: np.ndarray,
    true: np.ndarray,
    symbol: np.ndarray,
    anchor: np.ndarray,
    n_samples: int = 200,
    seed: int = 0,
) -> dict[str, PathForecasts]:
    """The three baselines for N contexts ``[N, L]`` (closes up to and including the anchor) and targets ``[N, P]``."""
    ctx = np.asarray(context_close, dtype=float)
    true = np.asarray(true, dtype=float)
    n, horizon = true.shape
    last = ctx[:, -1]
    scale = naive_scale(ctx)
    steps = np.arange(1, horizon + 1, dtype=float)
    r = log_returns(ctx)
    mu = np.nan_to_num(np.nanmean(r, axis=1)) if r.shape[1] else np.zeros(n)
    sigma = context_volatility(ctx)
    common = dict(
        symbol=np.asarray(symbol), anchor=np.asarray(anchor), last_close=last, scale=scale, true=true, vol=sigma
    )

    flat = np.repeat(last[:, None], horizon, axis=1)
    drift = last[:, None] * np.exp(mu[:, None] * steps[None, :])
    rng = np.random.default_rng(seed)
    shocks = rng.standard_normal((n, int(n_samples), horizon)) * sigma[:, None, None]
    rw = last[:, None, None] * np.exp(np.cumsum(shocks, axis=2))
    return {
        "last_value": PathForecasts("last_value", point=flat, samples=flat[:, None, :], **common),
        "drift": PathForecasts("drift", point=drift, samples=drift[:, None, :], **common),
        "random_walk": PathForecasts(
            "random_walk",
            point=flat,
            samples=rw,
            **common,
            crps=crps_lognormal(
                np.log(last)[:, None], sigma[:, None] * np.sqrt(steps)[None, :], np.nan_to_num(true, nan=1.0)
            ),
        ),
    }


__all__ = ["BASELINES", "baseline_forecasts"]
