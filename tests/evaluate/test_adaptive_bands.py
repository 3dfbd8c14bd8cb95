"""Bands that hold their coverage when the market changes: vol_scaled's fitted volatility exponent, and the adaptive
correction from realised outcomes (never an outcome after the anchor)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kronos.config import Config
from kronos.errors import CheckpointError, InputError
from kronos.evaluate.calibration import calibration_anchors, fit_calibration
from kronos.inference.bands import apply_calibration, quantile_column
from kronos.inference.outcomes import BandOutcomes, outcomes_path, target_times

P, S = 5, 24
DAYS = pd.bdate_range("2020-01-01", periods=2000)


def _market(n_dates, per_date, sd_of_vol, seed, first=0, power=0.5, level=1.0):
    """Forecasts on business days: realised moves grow like vol^power (not in proportion); the 'model' samples
    are too narrow and scale with vol. ``level`` multiplies every realised move (a calmer or wilder regime)."""
    rng = np.random.default_rng(seed)
    n = n_dates * per_date
    anchor_idx = np.repeat(np.arange(first, first + n_dates) * 3, per_date)
    vol = np.exp(rng.normal(np.log(0.015), sd_of_vol, n))
    true_sd = level * 0.015 * (vol / 0.015) ** power
    h = np.sqrt(np.arange(1, P + 1))
    last = rng.uniform(10, 100, n)
    true = last[:, None] * (1 + rng.normal(size=(n, P)) * true_sd[:, None] * h)
    samples = last[:, None, None] * (1 + rng.normal(size=(n, S, P)) * 0.3 * vol[:, None, None] * h)
    days = DAYS.to_numpy().astype("datetime64[ns]")
    targets = days[anchor_idx[:, None] + np.arange(1, P + 1)[None, :]]
    anchors = days[anchor_idx]
    return samples, last, true, vol, anchors, targets


def _fit(data, levels=(0.5, 0.8)):
    samples, last, true, vol, anchors, _ = data
    return fit_calibration(samples, last, true, anchors, list(levels), 30, "fp", context_vol=vol)


def _coverage(cal, data, lv, adaptive_anchors=None):
    samples, last, true, vol, anchors, _ = data
    lo, hi = cal.quantiles(samples, last, [(1 - lv) / 2, (1 + lv) / 2], vol, anchors=adaptive_anchors)
    return (true >= lo) & (true <= hi)


def _by_tercile(inside, vol):
    t = np.digitize(vol, np.quantile(vol, [1 / 3, 2 / 3]))
    return [float(inside[t == k].mean()) for k in range(3)]


def test_fitted_volatility_exponent_evens_coverage_across_volatility_terciles():
    val, test = _market(60, 20, 0.5, 0), _market(80, 20, 0.5, 1, first=60)
    cal = _fit(val)
    assert cal.params["vol_power"] == pytest.approx(0.5, abs=0.2)  # the truth: moves grow like vol^0.5
    proportional = _fit(val)
    proportional.params = {**proportional.params, "vol_power": 1.0}
    proportional.params.update({k: v for k, v in _refit_power_one(val).items()})
    for lv in (0.5, 0.8):
        fitted = _by_tercile(_coverage(cal, test, lv), test[3])
        assert all(abs(c - lv) < 0.05 for c in fitted), fitted
        old = _by_tercile(_coverage(proportional, test, lv), test[3])
        assert old[0] < lv - 0.05 and old[2] > lv + 0.05, old  # in proportion: too narrow calm, too wide wild


def _refit_power_one(data):
    """vol_scaled's per-level corrections refitted with the exponent held at 1 (the old rule)."""
    from kronos.evaluate import calibration as C

    samples, last, true, vol, _, _ = data
    z = samples / last[:, None, None] - 1
    y = true / last[:, None] - 1
    center = C._center_fit(z, y, vol)
    return {
        f"{lv:g}": list(C._cqr_fit("vol_scaled", z, y, lv, vol, center, 1.0, 1.0)) for lv in (0.5, 0.8, *C.CRPS_LEVELS)
    }


def test_adaptive_bands_follow_a_calmer_regime_and_static_ones_do_not():
    val = _market(60, 20, 0.3, 2, level=2.0)  # a wild validation year ...
    test = _market(120, 20, 0.3, 3, first=60, level=1.0)  # ... and a calm test year
    cal = _fit(val)
    pool = BandOutcomes.from_forecasts(cal, val[0], val[1], val[2], val[3], val[5])
    pool = pool.concat(BandOutcomes.from_forecasts(cal, test[0], test[1], test[2], test[3], test[5]))
    adaptive = cal.with_outcomes(pool)
    later = test[4] >= np.sort(np.unique(test[4]))[80]  # once the new regime has had 240 bars (4 half-lives)
    for lv in (0.5, 0.8):
        static = _coverage(cal, test, lv)[later].mean()
        adapted = _coverage(adaptive, test, lv, test[4])[later].mean()
        assert static > lv + 0.1  # fitted on the wild year: far too wide now
        assert adapted == pytest.approx(lv, abs=0.03)


def test_no_correction_at_an_anchor_reads_an_outcome_realised_after_it():
    data = _market(40, 10, 0.3, 4)
    cal = _fit(data)
    pool = BandOutcomes.from_forecasts(cal, data[0], data[1], data[2], data[3], data[5])
    queries = np.sort(np.unique(data[4]))[::5]
    vols = np.full(len(queries), 0.015)  # the volatility kernel on: outcomes weigh by time and by volatility
    assert pool.bandwidth > 0 and pool.vol is not None
    before = pool.multipliers(queries, vol=vols)
    for i, t in enumerate(queries):
        later = pool.target > t
        poisoned = BandOutcomes(
            pool.target, {k: np.where(later, v * 50.0 + 7.0, v) for k, v in pool.scores.items()}, pool.bar,
            pool.calendar, pool.fingerprint, pool.half_life, vol=np.where(later, pool.vol * 3, pool.vol),
        )  # fmt: skip
        after = poisoned.multipliers(queries[i : i + 1], vol=vols[:1])
        for key in before:
            assert after[key][0] == before[key][i]  # outcomes after t change nothing at t
    # and the outcomes up to t do matter (the check above can fail)
    t = queries[-1]
    earlier = pool.target <= t
    shifted = BandOutcomes(
        pool.target, {k: np.where(earlier, v * 2.0, v) for k, v in pool.scores.items()}, pool.bar, pool.calendar,
        pool.fingerprint, pool.half_life, vol=pool.vol,
    )  # fmt: skip
    assert shifted.multipliers([t], vol=vols[:1])["0.8"][0] == pytest.approx(2 * before["0.8"][-1])
    # before the first realised outcome the band is the static one
    assert pool.multipliers([pool.target.min() - np.timedelta64(1, "D")])["0.8"][0] == 1.0


def test_a_volatility_no_outcome_came_near_and_a_suspended_symbol_do_not_blow_up_the_band():
    """A forecast whose recent volatility is far from every realised outcome's (a stock just back from suspension, a
    flat context) must not take the largest score ever seen as its multiplier, and the scores of contexts whose closes
    never moved (they divide by ~0) are left out."""
    data = _market(40, 10, 0.3, 6)
    cal = _fit(data)
    pool = BandOutcomes.from_forecasts(cal, data[0], data[1], data[2], data[3], data[5])
    flat = BandOutcomes(
        pool.target, {k: np.where(np.arange(len(v)) == 0, 1e6, v) for k, v in pool.scores.items()}, pool.bar,
        pool.calendar, pool.fingerprint, pool.half_life, vol=np.where(np.arange(len(pool)) == 0, 1e-8, pool.vol),
    )  # fmt: skip
    flat.bandwidth = pool.bandwidth
    t = np.sort(np.unique(data[4]))[-1:]
    for vol in (1e-8, 1e-4, 0.015, 5.0):  # a flat context, far calmer, typical, far wilder than any outcome
        got = flat.multipliers(t, vol=[vol])
        plain = pool.multipliers(t, vol=[0.015])
        for key, value in got.items():
            assert 0.2 < value[0] < 5.0, (vol, key, value)
            assert value[0] <= 2 * max(plain[key][0], 1.0)
    # too few outcomes for the level's quantile to be finite: the static band, not the largest score
    few = BandOutcomes(
        pool.target[:3], {k: v[:3] * 100 for k, v in pool.scores.items()}, pool.bar, pool.calendar, pool.fingerprint,
        pool.half_life, vol=pool.vol[:3],
    )  # fmt: skip
    assert few.multipliers(t, vol=[0.015])["0.8"][0] == 1.0


def test_outcomes_round_trip_and_refuse_another_calibration(tmp_path):
    data = _market(30, 10, 0.3, 5)
    cal = _fit(data)
    pool = BandOutcomes.from_forecasts(cal, data[0], data[1], data[2], data[3], data[5], calendar=DAYS)
    path = outcomes_path(tmp_path / "calibration.json")
    assert path.name == "calibration_outcomes.parquet"
    pool.save(path)
    back = BandOutcomes.load(path)
    assert len(back) == len(pool) == data[2].size
    assert back.bar == np.timedelta64(1, "D") and back.fingerprint == "fp"
    anchors = np.sort(np.unique(data[4]))
    for k, v in pool.multipliers(anchors).items():
        np.testing.assert_array_equal(back.multipliers(anchors)[k], v)
    assert len(pool.concat(back)) == len(pool)  # adding the same outcomes twice changes nothing
    other = _fit(_market(30, 10, 0.3, 6))
    other.fingerprint = "another model"
    with pytest.raises(CheckpointError, match="another calibration"):
        other.with_outcomes(back)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(CheckpointError, match="bad.parquet"):
        BandOutcomes.load(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="anchor"):  # adaptive bands are never applied blind
        cal.with_outcomes(back).quantiles(data[0], data[1], [0.1, 0.9], data[3])


def test_records_get_the_same_adaptive_bands_as_sample_paths():
    data = _market(30, 10, 0.3, 7)
    samples, last, true, vol, anchors, targets = data
    cal = _fit(data, levels=(0.8,))
    adaptive = cal.with_outcomes(BandOutcomes.from_forecasts(cal, samples, last, true, vol, targets, anchors=anchors))
    assert adaptive.outcomes.anchor is not None  # the per-regime correction is on too
    n = len(last)
    raw = np.quantile(samples, [0.1, 0.5, 0.9], axis=1)  # [3, N, P]
    records = pd.DataFrame({
        "anchor": np.repeat(anchors, P), "step": np.tile(np.arange(1, P + 1), n), "last_close": np.repeat(last, P),
        "context_vol": np.repeat(vol, P),
        **{quantile_column(q): raw[i].ravel() for i, q in enumerate((0.1, 0.5, 0.9))},
    })  # fmt: skip
    out = apply_calibration(records, adaptive)
    lo, hi = adaptive.quantiles(samples, last, [0.1, 0.9], vol, anchors=anchors)
    np.testing.assert_allclose(out[quantile_column(0.1)].to_numpy(), lo.ravel(), rtol=1e-9)
    np.testing.assert_allclose(out[quantile_column(0.9)].to_numpy(), hi.ravel(), rtol=1e-9)
    static = apply_calibration(records, cal)
    assert not np.allclose(static[quantile_column(0.9)], out[quantile_column(0.9)])


def test_calibration_gets_enough_validation_forecasts_when_symbols_are_few():
    ts = pd.bdate_range("2021-01-01", periods=400)
    frame = pd.DataFrame({"symbol": "ONE", "timestamps": ts, "close": np.linspace(10, 20, len(ts))})
    bounds = {"train_end": ts[99], "val_end": ts[399]}
    cfg = Config.from_dict({"lookback_window": 30, "predict_window": 5, "eval_max_anchors": 20})
    anchors = calibration_anchors(cfg, frame, bounds)
    assert len(anchors) > 250  # one series: 20 dates would be 20 forecasts; every date it has (295) instead
    cfg = Config.from_dict(
        {"lookback_window": 30, "predict_window": 5, "eval_max_anchors": 20, "calibration_min_forecasts": 100}
    )
    assert len(calibration_anchors(cfg, frame, bounds)) == 100
    assert target_times(frame, anchors.iloc[:1], 5)[0, 0] == ts[int(anchors["pos"].iloc[0]) + 1]


def _regime_shift(factor_end, seed=10, n_val=50, n_test=100, per_date=15):
    """Validation, then a test stretch whose calm forecasts (below validation's lower volatility tercile) realise
    moves that grow steadily larger (to ``factor_end`` x): a calm market drifting toward a break."""
    val = _market(n_val, per_date, 0.5, seed)
    test = list(_market(n_test, per_date, 0.5, seed + 1, first=n_val))
    cal = _fit(val)
    calm = test[3] < cal.params["vol_cuts"][0]
    grow = np.where(calm, np.linspace(1.0, factor_end, n_test).repeat(per_date), 1.0)
    test[2] = test[1][:, None] * (1 + (test[2] / test[1][:, None] - 1) * grow[:, None])
    return cal, val, test


def _pool(cal, val, test, anchors=True):
    return BandOutcomes.from_forecasts(cal, *val[:4], val[5], anchors=val[4] if anchors else None).concat(
        BandOutcomes.from_forecasts(cal, *test[:4], test[5], anchors=test[4] if anchors else None)
    )


def test_each_volatility_regime_gets_its_coverage_back_when_one_drifts():
    cal, val, test = _regime_shift(1.6)
    cuts = cal.params["vol_cuts"]
    assert len(cuts) == 2 and 0 < cuts[0] < cuts[1]  # validation's terciles of the contexts' volatility
    regime = np.digitize(test[3], cuts)
    kernel_only = cal.with_outcomes(_pool(cal, val, test, anchors=False))  # outcomes that do not know their anchors
    both = cal.with_outcomes(_pool(cal, val, test))
    for lv in (0.5, 0.8):
        before = _coverage(kernel_only, test, lv, test[4])
        after = _coverage(both, test, lv, test[4])
        assert before[regime == 0].mean() < lv - 0.04  # the kernel trails a regime that keeps drifting
        for k in range(3):
            assert after[regime == k].mean() == pytest.approx(lv, abs=0.025), (lv, k)
    # a market that does not drift: the regime correction leaves the bands as the kernel has them (within noise)
    cal, val, test = _regime_shift(1.0, seed=20)
    regime = np.digitize(test[3], cal.params["vol_cuts"])
    still = cal.with_outcomes(_pool(cal, val, test))
    for lv in (0.5, 0.8):
        inside = _coverage(still, test, lv, test[4])
        assert all(inside[regime == k].mean() == pytest.approx(lv, abs=0.025) for k in range(3))


def test_the_regime_correction_at_an_anchor_reads_no_outcome_realised_after_it():
    cal, val, test = _regime_shift(2.0, n_val=30, n_test=60, per_date=10)
    pool = _pool(cal, val, test)
    cuts = cal.params["vol_cuts"]
    queries = np.sort(np.unique(test[4]))[5::11]
    vols = np.array([cuts[0] * 0.8, np.mean(cuts), cuts[1] * 1.2] * len(queries))[: len(queries)]
    before = pool.multipliers(queries, vol=vols, regimes=cuts)
    factors = pool.regime_factors(queries, vols, cuts, ["0.8"])["0.8"]
    assert factors.max() > 1.05  # the calm regime was widened by what it realised (the check below can fail)
    for i, t in enumerate(queries):
        later = pool.target > t
        poisoned = BandOutcomes(
            pool.target, {k: np.where(later, v * 50.0 + 7.0, v) for k, v in pool.scores.items()}, pool.bar,
            pool.calendar, pool.fingerprint, pool.half_life, vol=np.where(later, pool.vol * 3, pool.vol),
            anchor=np.where(later, pool.anchor + np.timedelta64(3, "D"), pool.anchor),
        )  # fmt: skip
        after = poisoned.multipliers(queries[i : i + 1], vol=vols[i : i + 1], regimes=cuts)
        for key in before:
            assert after[key][0] == before[key][i], (t, key)  # outcomes after t change nothing at t
    # before the first realised outcome: no correction at all
    first = pool.target.min() - np.timedelta64(1, "D")
    assert pool.regime_factors(np.array([first]), vols[:1], cuts, ["0.8"])["0.8"][0] == 1.0


def test_outcome_files_keep_the_anchors_and_old_files_without_them_still_work(tmp_path):
    cal, val, test = _regime_shift(2.0, n_val=30, n_test=60, per_date=10)
    pool = _pool(cal, val, test)
    pool.save(tmp_path / "o.parquet")
    back = BandOutcomes.load(tmp_path / "o.parquet")
    np.testing.assert_array_equal(back.anchor, pool.anchor)
    adaptive = cal.with_outcomes(back)
    lo, hi = adaptive.quantiles(test[0], test[1], [0.1, 0.9], test[3], anchors=test[4])
    lo2, hi2 = cal.with_outcomes(pool).quantiles(test[0], test[1], [0.1, 0.9], test[3], anchors=test[4])
    np.testing.assert_allclose(hi, hi2, rtol=1e-12)
    # a file written before outcomes knew their anchors: the kernel correction alone, no error
    old = back.to_frame().drop(columns="anchor")
    legacy = BandOutcomes.from_frame(old, back.bar, back.calendar, back.fingerprint, back.half_life)
    legacy.bandwidth = back.bandwidth
    assert legacy.anchor is None
    kernel = cal.with_outcomes(legacy).quantiles(test[0], test[1], [0.9], test[3], anchors=test[4])[0]
    assert np.isfinite(kernel).all() and not np.allclose(kernel, hi)
    # a broken vol_cuts parameter is refused on load, in one line
    bad = cal.to_dict()
    bad["params"]["vol_cuts"] = [0.02, 0.01]
    with pytest.raises(CheckpointError, match="vol_cuts"):
        type(cal).from_dict(bad, source="calibration file 'x.json'")


def test_levels_scaled_apart_by_their_own_corrections_never_cross():
    """Each central level has its own adaptive factor; where they pull far apart the quantiles are put back in order
    (paths and records alike), so a 50% band never pokes out of the 80% band."""
    samples, last, true, vol, anchors, targets = _market(30, 10, 0.3, 8)
    cal = _fit((samples, last, true, vol, anchors, targets))
    pool = BandOutcomes.from_forecasts(cal, samples, last, true, vol, targets, anchors=anchors)
    pool.scores = {k: v * (4.0 if k == "0.5" else 0.25 if k == "0.8" else 1.0) for k, v in pool.scores.items()}
    adaptive = cal.with_outcomes(pool)
    qs = [0.1, 0.25, 0.5, 0.75, 0.9]
    got = adaptive.quantiles(samples, last, qs, vol, anchors=anchors)
    assert (np.diff(got, axis=0) >= 0).all()
    late = anchors >= np.sort(np.unique(anchors))[-5]
    unsorted = [adaptive.quantiles(samples, last, [q], vol, anchors=anchors)[0] for q in qs]
    assert (unsorted[1][late] < unsorted[0][late]).any()  # the crossing this guards against does happen here
    raw = np.quantile(samples, qs, axis=1)
    n = len(last)
    records = pd.DataFrame({
        "anchor": np.repeat(anchors, P), "step": np.tile(np.arange(1, P + 1), n), "last_close": np.repeat(last, P),
        "context_vol": np.repeat(vol, P), **{quantile_column(q): raw[i].ravel() for i, q in enumerate(qs)},
    })  # fmt: skip
    out = apply_calibration(records, adaptive)
    for i, q in enumerate(qs):
        np.testing.assert_allclose(out[quantile_column(q)].to_numpy(), got[i].ravel(), rtol=1e-9)
