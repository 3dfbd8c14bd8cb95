"""Metrics on sample paths (CRPS, PIT, DM, MASE, coverage) and the baselines, on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from kronos.errors import InputError
from kronos.evaluate.baselines import baseline_forecasts
from kronos.evaluate.metrics import (
    PathForecasts,
    check_levels,
    crps_samples,
    diebold_mariano,
    dm_versus,
    naive_scale,
    pit_values,
    score_paths,
)


def test_crps_of_point_mass_is_absolute_error():
    assert crps_samples(np.array([[3.0]]), np.array([5.5]))[0] == pytest.approx(2.5)
    assert crps_samples(np.full((1, 7), 3.0), np.array([1.0]))[0] == pytest.approx(2.0)


def test_crps_matches_the_fair_pairwise_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=9)
    y = 0.3
    # the fair estimator: pairs i != j, mean over S (S - 1) of them
    direct = np.mean(np.abs(x - y)) - 0.5 * np.abs(x[:, None] - x[None, :]).sum() / (9 * 8)
    assert crps_samples(x[None], np.array([y]))[0] == pytest.approx(direct)
    # many N(0,1) samples approach the closed form at y = 0: 2*phi(0) - 1/sqrt(pi) - 0 ... = 0.2337
    big = rng.normal(size=20000)
    closed = 2 * stats.norm.pdf(0.0) - 1 / math.sqrt(math.pi)
    assert crps_samples(big[None], np.array([0.0]))[0] == pytest.approx(closed, abs=0.01)


def test_dm_statistic_on_constructed_pair():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    b = np.zeros(5)
    out = diebold_mariano(a, b, h=1)
    # d = 1..5: mean 3, population variance 2 -> var(mean) 0.4; HLN factor sqrt((5+1-2)/5)
    stat = 3 / math.sqrt(0.4) * math.sqrt(0.8)
    assert out["dm_stat"] == pytest.approx(stat)
    assert out["p_value"] == pytest.approx(2 * stats.t.sf(stat, df=4))
    assert diebold_mariano(b, a)["dm_stat"] == pytest.approx(-stat)
    # with h = 2 the lag-1 autocovariance enters: gamma1 = ((-2)(-1) + (-1)0 + 0*1 + 1*2) / 5 = 0.8
    out2 = diebold_mariano(a, b, h=2)
    stat2 = 3 / math.sqrt((2 + 2 * 0.8) / 5) * math.sqrt((5 + 1 - 4 + 2 / 5) / 5)
    assert out2["dm_stat"] == pytest.approx(stat2)


def test_pit_levels_and_scale():
    assert pit_values(np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([2.0]))[0] == pytest.approx(0.375)
    assert naive_scale(np.array([[1.0, 2.0, 4.0]]))[0] == pytest.approx(1.5)
    with pytest.raises(InputError, match="outside"):
        check_levels([0.8, 1.0])


def _fc(samples, true, last=100.0):
    n, s, p = samples.shape
    return PathForecasts(
        "m",
        symbol=np.array(["A"] * n),
        anchor=np.arange(n),
        last_close=np.full(n, last),
        scale=np.ones(n),
        true=true,
        point=samples.mean(axis=1),
        samples=samples,
    )


def test_score_paths_coverage_mase_direction():
    rng = np.random.default_rng(1)
    n, s, p = 400, 200, 3
    true = 100 + rng.normal(size=(n, p))
    samples = 100 + rng.normal(size=(n, s, p))  # the right distribution: coverage ~ nominal, PIT ~ flat
    res = score_paths(_fc(samples, true), quantiles=[0.1, 0.5, 0.9], levels=[0.5, 0.8])
    o = res["overall"]
    assert o["coverage_0.8"] == pytest.approx(0.8, abs=0.05)
    assert o["coverage_0.5"] == pytest.approx(0.5, abs=0.05)
    assert o["mase"] == pytest.approx(np.mean(np.abs(samples.mean(1) - true)))
    assert len(res["pit"]) == 10 and sum(res["pit"]) == n * p
    assert max(res["pit"]) / min(res["pit"]) < 1.6
    assert len(res["by_step"]["crps"]) == p


def test_perfect_direction_and_dm_against_last_value():
    rng = np.random.default_rng(2)
    n, p = 60, 2
    true = 100 + np.cumsum(rng.normal(size=(n, p)), axis=1)
    good = _fc(true[:, None, :] + 0.01, true)
    assert score_paths(good, [0.5], [0.8])["overall"]["direction_accuracy"] > 0.95
    last = _fc(np.full((n, 1, p), 100.0), true)
    dm = dm_versus(good, last)
    assert dm["dm_stat"] < -3 and dm["p_value"] < 0.01


def test_baselines_shapes_and_values():
    ctx = np.array([[100.0, 101.0, 102.01, 103.0301]])  # +1% per bar
    true = np.array([[104.0, 105.0]])
    b = baseline_forecasts(ctx, true, np.array(["A"]), np.array([0]), n_samples=50)
    assert np.allclose(b["last_value"].point, 103.0301)
    assert np.allclose(b["drift"].point, 103.0301 * 1.01 ** np.array([1, 2]))
    assert b["random_walk"].samples.shape == (1, 50, 2)
    # zero volatility lookback: the random walk collapses onto the last value
    assert b["random_walk"].samples[:, :, 0].std() < 1e-4


def test_fair_crps_is_unbiased_and_the_grid_crps_matches_the_exact_lognormal():
    from scipy.stats import norm

    from kronos.evaluate.metrics import CRPS_GRID, crps_lognormal, crps_samples, quantile_crps

    rng = np.random.default_rng(3)
    mu, sigma = np.log(100.0), 0.05
    y = np.exp(mu + sigma * rng.standard_normal(4000)) * 1.02  # outcomes slightly off the forecast
    exact = crps_lognormal(np.full_like(y, mu), np.full_like(y, sigma), y).mean()
    # 8 paths per forecast: the fair estimator is unbiased, the plain one (S^2) overstates by E|X-X'|/(2S)
    paths = np.exp(mu + sigma * rng.standard_normal((len(y), 8)))
    fair = crps_samples(paths, y).mean()
    x = np.sort(paths, axis=1)
    plain = (np.abs(x - y[:, None]).mean(1) - (2 * np.arange(1, 9) - 9) @ x.T / 64).mean()
    assert abs(fair - exact) / exact < 0.02
    assert plain > exact * 1.04
    # the midpoint quantile grid of calibrated bands: within 1% of the exact value
    q = np.exp(mu + sigma * norm.ppf(np.array(CRPS_GRID)))[:, None] * np.ones((1, len(y)))
    assert abs(quantile_crps(q, y).mean() - exact) / exact < 0.01
    # a point forecast scores the absolute error
    assert crps_samples(np.array([[101.0]]), np.array([100.0]))[0] == pytest.approx(1.0)
