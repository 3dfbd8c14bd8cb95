"""Backtests: the built-in engine on hand-made prices, and Qlib's TopkDropoutStrategy on the bundled provider."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kronos.config import Config
from kronos.errors import DataError, DependencyError, InputError
from kronos.evaluate import run_backtests, run_qlib_backtest, run_simple_backtest
from kronos.evaluate.backtest import normalize_signal, risk_stats

QLIB_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "qlib_cn"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DAYS = pd.bdate_range("2024-01-01", periods=12)


def _cfg(**kw) -> Config:
    base = dict(
        backtest_n_symbol_hold=1,
        backtest_n_symbol_drop=1,
        backtest_hold_thresh=1,
        backtest_open_cost=0.0,
        backtest_close_cost=0.0,
        backtest_min_cost=0.0,
        backtest_account=1_000_000.0,
        backtest_time_range=[str(DAYS[0].date()), str(DAYS[-1].date())],
        backtest_deal_price="close",
    )  # hand-made close prices only
    base.update(kw)
    return Config(**base)


def _prices() -> pd.DataFrame:
    t = np.arange(len(DAYS))
    return pd.DataFrame({"A": 10 * 1.01**t, "B": np.full(len(t), 20.0), "C": 30 * 0.99**t}, index=DAYS)


def _signal(best_from: dict[str, str] | None = None) -> pd.Series:
    """Scores per day; A is best unless ``best_from`` = {date: symbol} switches the favourite from that date."""
    rows = []
    best = "A"
    for d in DAYS:
        if best_from and str(d.date()) in best_from:
            best = best_from[str(d.date())]
        for sym in "ABC":
            rows.append((d, sym, 3.0 if sym == best else {"A": 2.0, "B": 1.5, "C": 1.0}[sym]))
    s = pd.DataFrame(rows, columns=["datetime", "instrument", "score"]).set_index(["datetime", "instrument"])
    return s["score"]


# ---------------------------------------------------------------------- built-in engine
def test_simple_backtest_rising_top_stock_earns_its_return():
    rep = run_simple_backtest(_signal(), _prices(), _cfg(), risk_degree=1.0)
    d = rep.daily
    # signal of day 0 trades at day 1's close; A then earns 1% a bar; equal-weight benchmark earns ~0
    assert d["return"].iloc[:2].abs().max() < 1e-12
    np.testing.assert_allclose(d["return"].iloc[2:], 0.01, rtol=1e-9)
    np.testing.assert_allclose(d["bench"].iloc[2:], 0.0, atol=1e-12)
    assert (d["excess_return_with_cost"].iloc[2:] > 0.0099).all()
    assert rep.summary["total_return_with_cost"] == pytest.approx(1.01 ** (len(DAYS) - 2) - 1)
    assert rep.summary["excess_return_with_cost/annualized_return"] > 0
    assert rep.summary["n_days"] == len(DAYS) and rep.summary["engine"] == "simple"


def test_simple_backtest_open_cost_is_charged_once():
    rep = run_simple_backtest(_signal(), _prices(), _cfg(backtest_open_cost=0.001), risk_degree=1.0)
    d = rep.daily
    # all cash buys A: value v with v + 0.001 v = cash
    assert d["cost"].iloc[1] == pytest.approx(0.001 / 1.001)
    assert d["cost"].drop(d.index[1]).abs().max() == 0
    assert d["account"].iloc[-1] == pytest.approx(1e6 / 1.001 * 1.01 ** (len(DAYS) - 2))
    free = run_simple_backtest(_signal(), _prices(), _cfg(), risk_degree=1.0)
    assert rep.summary["total_return_with_cost"] < free.summary["total_return_with_cost"]


def test_simple_backtest_rotation_costs_and_hold_threshold():
    sig = _signal({str(DAYS[3].date()): "B"})  # B becomes the favourite on day 3 -> trade on day 4
    cfg = _cfg(backtest_open_cost=0.001, backtest_close_cost=0.002)
    d = run_simple_backtest(sig, _prices(), cfg, risk_degree=1.0).daily
    traded = d.index[d["turnover"] > 0]
    assert list(traded) == [DAYS[1], DAYS[4]]
    # sell A (value V, 0.2%), buy B with the rest (0.1%); previous value = V / 1.01
    assert d["cost"].iloc[4] == pytest.approx((0.002 + 0.998 * 0.001 / 1.001) * 1.01)
    assert d["return"].iloc[5:].abs().max() < 1e-12  # B is flat
    # hold_thresh 5: A (bought day 1) can only be sold on day 6
    held = run_simple_backtest(sig, _prices(), _cfg(backtest_hold_thresh=5), risk_degree=1.0).daily
    assert list(held.index[held["turnover"] > 0]) == [DAYS[1], DAYS[6]]


def test_simple_backtest_signal_formats_and_benchmark_prices():
    prices = _prices()
    bench = pd.Series(100 * 1.002 ** np.arange(len(DAYS)), index=DAYS, name="IDX")
    a = run_simple_backtest(_signal(), prices, _cfg(), benchmark=bench)
    swapped = _signal().swaplevel().sort_index()  # (instrument, datetime), as the official script passes it
    b = run_simple_backtest(swapped, prices, _cfg(), benchmark=bench)
    wide = _signal().unstack("instrument")  # dates x instruments, the official prediction frames
    c = run_simple_backtest(wide, prices, _cfg(), benchmark=bench)
    pd.testing.assert_frame_equal(a.daily, b.daily)
    pd.testing.assert_frame_equal(a.daily, c.daily)
    np.testing.assert_allclose(a.daily["bench"].iloc[1:], 0.002, rtol=1e-9)
    assert a.summary["benchmark"] == "IDX"


def test_simple_backtest_rejects_bad_inputs():
    with pytest.raises(DataError, match="backtest_time_range"):
        run_simple_backtest(_signal(), _prices(), _cfg(backtest_time_range=["2020-01-01", "2020-12-31"]))
    other = _signal().rename(lambda s: "Z" + s if isinstance(s, str) else s, level="instrument")
    with pytest.raises(DataError, match="close-price frame"):
        run_simple_backtest(other, _prices(), _cfg())
    with pytest.raises(InputError, match="MultiIndex"):
        run_simple_backtest(pd.Series([1.0, 2.0]), _prices(), _cfg())


def test_report_save_and_comparison(tmp_path):
    comp = run_backtests(
        {"good": _signal(), "bad": -_signal()}, _cfg(), close=_prices(), out_dir=tmp_path, engine="simple"
    )
    assert comp.table.loc["good", "total_return_with_cost"] > comp.table.loc["bad", "total_return_with_cost"]
    assert dict(comp.items())["good"] is comp["good"] and list(comp) == ["good", "bad"]
    with pytest.raises(InputError, match="close prices"):
        run_backtests({"good": _signal()}, _cfg(), engine="simple")
    for name in (
        "comparison.json",
        "comparison.csv",
        "comparison.png",
        "good/report.json",
        "good/daily.csv",
        "good/cumulative_return.png",
        "bad/report.json",
    ):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "comparison.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "good" / "cumulative_return.png").read_bytes()[:8] == PNG_MAGIC
    summary = json.loads((tmp_path / "good" / "report.json").read_text())  # strict JSON
    assert summary["topk"] == 1 and summary["n_days"] == len(DAYS)
    daily = pd.read_csv(tmp_path / "good" / "daily.csv", index_col=0, parse_dates=True)
    assert list(daily.columns[:6]) == [
        "return",
        "cost",
        "bench",
        "excess_return_without_cost",
        "excess_return_with_cost",
        "turnover",
    ]
    assert not list(tmp_path.rglob(".*tmp*"))  # atomic writes leave no temporaries


# ---------------------------------------------------------------------- Qlib engine
@pytest.fixture(scope="module")
def qlib_setup():
    pytest.importorskip("qlib")
    from kronos.evaluate.backtest import init_qlib

    init_qlib(QLIB_DIR)
    from qlib.data import D

    insts = ["SH600004", "SH600011", "SH600016", "SH600023", "SH600025", "SH600132", "SH600436", "SH600521"]
    close = D.features(insts, ["$close"], "2022-12-01", "2023-04-28")["$close"].unstack(level=0)
    bench = D.features(["SH000300"], ["$close"], "2022-12-01", "2023-04-28")["$close"].droplevel(0)
    # oracle: the signal dated d scores the return earned by a position bought at d+1's close
    oracle = normalize_signal(close.shift(-2) / close.shift(-1) - 1)
    # fills at the close, so the built-in engine (close prices only) can be compared trade for trade
    cfg = Config(
        qlib_data_path=str(QLIB_DIR),
        instrument="csi300",
        backtest_n_symbol_hold=3,
        backtest_n_symbol_drop=1,
        backtest_hold_thresh=1,
        backtest_deal_price="close",
        backtest_time_range=["2023-01-04", "2023-03-31"],
    )
    return {"close": close, "bench": bench, "oracle": oracle, "cfg": cfg}


@pytest.fixture(scope="module")
def qlib_comparison(qlib_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlib_bt")
    s = qlib_setup
    comp = run_backtests({"oracle": s["oracle"], "inverse": -s["oracle"]}, s["cfg"], out_dir=out, engine="qlib")
    return comp, out


@pytest.mark.slow
def test_qlib_oracle_beats_benchmark_and_inverse_loses(qlib_comparison):
    comp, out = qlib_comparison
    good, bad = comp.reports["oracle"], comp.reports["inverse"]
    assert good.summary["engine"] == "qlib" and good.summary["benchmark"] == "SH000300"
    assert good.summary["excess_return_with_cost/annualized_return"] > 0.5
    assert bad.summary["excess_return_with_cost/annualized_return"] < 0
    assert good.summary["start"] == "2023-01-04" and good.summary["end"] == "2023-03-31"
    d = good.daily
    assert list(d.columns[:6]) == [
        "return",
        "cost",
        "bench",
        "excess_return_without_cost",
        "excess_return_with_cost",
        "turnover",
    ]
    # the percent-valued $change must not block trading: the first day invests ~risk_degree of the book
    assert d["turnover"].iloc[0] > 0.9
    assert (d["cost"] > 0).sum() > 0.8 * len(d)
    assert (out / "comparison.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "oracle" / "cumulative_return.png").read_bytes()[:8] == PNG_MAGIC
    table = pd.read_csv(out / "comparison.csv", index_col=0)
    assert set(table.index) == {"oracle", "inverse"}


def test_qlib_summary_uses_risk_analysis_convention(qlib_comparison):
    rep = qlib_comparison[0].reports["oracle"]
    ours = risk_stats(rep.daily["excess_return_with_cost"])
    for key in ("annualized_return", "information_ratio", "max_drawdown"):
        assert rep.summary[f"excess_return_with_cost/{key}"] == pytest.approx(ours[key], rel=1e-9)
    bench = risk_stats(rep.daily["bench"])
    assert rep.summary["benchmark/annualized_return"] == pytest.approx(bench["annualized_return"], rel=1e-9)


def test_simple_engine_reproduces_qlib(qlib_setup, qlib_comparison):
    s = qlib_setup
    q = qlib_comparison[0].reports["oracle"]
    simple = run_simple_backtest(s["oracle"], s["close"], s["cfg"], benchmark=s["bench"])
    assert list(simple.daily.index) == list(q.daily.index)
    np.testing.assert_allclose(simple.daily["bench"], q.daily["bench"], atol=1e-6)
    # same trades; only Qlib's 100-share lots differ
    assert np.corrcoef(simple.daily["return"], q.daily["return"])[0, 1] > 0.999
    assert simple.summary["total_return_with_cost"] == pytest.approx(q.summary["total_return_with_cost"], abs=0.01)
    assert simple.daily["cost"].sum() == pytest.approx(q.daily["cost"].sum(), rel=0.02)


def test_qlib_errors(qlib_setup, monkeypatch, tmp_path):
    s = qlib_setup
    with pytest.raises(DataError, match="Qlib data folder .* has no calendar"):
        run_qlib_backtest(s["oracle"], s["cfg"], provider_uri=tmp_path)
    bad_bench = Config(**{**s["cfg"].to_dict(), "backtest_benchmark": "SH999999"})
    with pytest.raises(DataError, match="SH999999"):
        run_qlib_backtest(s["oracle"], bad_bench)
    for mod in [m for m in sys.modules if m == "qlib" or m.startswith("qlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "qlib", None)  # as if pyqlib were not installed
    with pytest.raises(DependencyError, match="pyqlib"):
        run_qlib_backtest(s["oracle"], s["cfg"])


def test_nan_free_summary_fields(qlib_comparison):
    rep = qlib_comparison[0].reports["oracle"]
    for key in ("excess_return_without_cost/information_ratio", "benchmark_total_return", "mean_turnover"):
        assert math.isfinite(rep.summary[key])


def test_simple_backtest_intraday_bars():
    # two sessions of 5-minute bars: annualisation uses bars per day, times keep their clock
    idx = pd.DatetimeIndex(
        list(pd.date_range("2024-01-02 09:35", periods=6, freq="5min"))
        + list(pd.date_range("2024-01-03 09:35", periods=6, freq="5min"))
    )
    t = np.arange(len(idx))
    prices = pd.DataFrame({"A": 10 * 1.001**t, "B": 10 * 0.999**t}, index=idx)
    sig = normalize_signal(pd.DataFrame({"A": 1.0, "B": 0.0}, index=idx))
    cfg = _cfg(backtest_time_range=["2024-01-01", "2024-01-31"])
    rep = run_simple_backtest(sig, prices, cfg, risk_degree=1.0)
    assert rep.summary["periods_per_year"] == 238 * 6
    assert rep.summary["start"] == "2024-01-02T09:35:00"
    np.testing.assert_allclose(rep.daily["return"].iloc[2:], 0.001, rtol=1e-9)
    shifted = sig.rename(lambda d: d + pd.Timedelta("1min") if isinstance(d, pd.Timestamp) else d, level="datetime")
    with pytest.raises(DataError, match="bar"):
        run_simple_backtest(shifted, prices, cfg)


def test_qlib_backtest_up_to_the_providers_last_day(qlib_setup):
    # signals through the calendar's final day: the range is clipped so Qlib never reads past its calendar
    from qlib.data import D

    insts = ["SH600011", "SH600016", "SH600025", "SH600436"]
    close = D.features(insts, ["$close"], "2024-11-01", "2024-12-31")["$close"].unstack(level=0)
    sig = normalize_signal(close.pct_change(fill_method=None).fillna(0.0))
    cfg = Config(**{**qlib_setup["cfg"].to_dict(), "backtest_time_range": ["2024-12-01", "2025-06-30"]})
    rep = run_qlib_backtest(sig, cfg)
    assert rep.summary["start"] == "2024-12-02" and rep.summary["end"] == "2024-12-30"
    assert rep.summary["n_days"] == len(rep.daily) > 15


def test_simple_backtest_deal_price_open_needs_and_uses_open_prices():
    prices = _prices()
    opens = prices.shift(1).fillna(prices) * 1.002  # opens a little above the previous close
    with pytest.raises(InputError, match="open prices"):
        run_simple_backtest(_signal(), prices, _cfg(backtest_deal_price="open"))
    rep = run_simple_backtest(_signal(), prices, _cfg(backtest_deal_price="open"), open_prices=opens, risk_degree=1.0)
    assert rep.summary["deal_price"] == "open"
    # A bought at day 1's open: the first bar earns open-to-close, then A's close-to-close 1 %
    first = prices["A"].iloc[1] / opens["A"].iloc[1] - 1
    assert rep.daily["return"].iloc[1] == pytest.approx(first, rel=1e-9)
    np.testing.assert_allclose(rep.daily["return"].iloc[2:], 0.01, rtol=1e-9)
    assert (rep.holdings.columns == ["A"]).all() and rep.holdings["A"].iloc[1:].gt(0.99).all()


@pytest.mark.slow
def test_both_engines_agree_on_open_fills(qlib_setup):
    """The official default (fills at the next open) on the bundled provider: Qlib and the built-in engine hold
    the same names every day, their weights agree to 2e-3 and their daily returns to 2e-4 (measured: 4.7e-4 and
    3.2e-5; Qlib trades 100-share lots, the built-in engine fractional shares; limits off in both)."""
    from qlib.data import D

    s = qlib_setup
    cfg = Config(**{**s["cfg"].to_dict(), "backtest_deal_price": "open"})
    insts = list(s["close"].columns)
    opens = D.features(insts, ["$open"], "2022-12-01", "2023-04-28")["$open"].unstack(level=0)
    q = run_qlib_backtest(s["oracle"], cfg, limit_threshold=None)
    simple = run_simple_backtest(s["oracle"], s["close"], cfg, benchmark=s["bench"], open_prices=opens)
    assert q.summary["deal_price"] == simple.summary["deal_price"] == "open"
    assert list(simple.daily.index) == list(q.daily.index)
    held_q = q.holdings.gt(0).apply(lambda r: frozenset(r.index[r]), axis=1)
    held_s = simple.holdings.gt(0).apply(lambda r: frozenset(r.index[r]), axis=1)
    assert list(held_q) == list(held_s)
    weights = q.holdings.reindex(columns=simple.holdings.columns, fill_value=0.0)
    np.testing.assert_allclose(simple.holdings.to_numpy(), weights.to_numpy(), atol=2e-3)
    np.testing.assert_allclose(simple.daily["return"], q.daily["return"], atol=2e-4)
    assert simple.summary["total_return_with_cost"] == pytest.approx(q.summary["total_return_with_cost"], abs=0.01)
    # open fills differ from close fills: the setting is honoured, not ignored
    closes = run_simple_backtest(s["oracle"], s["close"], s["cfg"], benchmark=s["bench"])
    assert not np.allclose(closes.daily["return"], simple.daily["return"], atol=1e-4)
