"""The Qlib engine: pyqlib's TopkDropoutStrategy, driven exactly as the official ``finetune/qlib_test.py``.

``run_qlib_backtest`` runs TopkDropoutStrategy with a daily SimulatorExecutor through ``qlib.backtest.backtest``
and takes the ``risk_analysis`` of the excess return with and without cost. pyqlib is optional and imported on
first use.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from kronos.config import Config
from kronos.data.sources import qlib as qlib_source
from kronos.errors import DataError, DependencyError
from kronos.evaluate.backtest.inputs import (
    check_risk_degree,
    check_strategy,
    clip_range,
    normalize_signal,
    strategy_params,
)
from kronos.evaluate.backtest.report import (
    TRADING_DAYS_PER_YEAR,
    BacktestReport,
    PathLike,
    finish_daily,
    fmt_time,
    summarize,
)

logger = logging.getLogger(__name__)


def _import_qlib() -> SimpleNamespace:
    """pyqlib's backtest pieces, imported on first use (its optional gym dependency prints a notice to
    stderr on import; that notice is swallowed)."""
    try:
        # pyqlib is optional and slow to import: loaded here, on first use, never at module import
        with contextlib.redirect_stderr(io.StringIO()):
            import qlib
            from qlib.backtest import backtest
            from qlib.backtest.executor import SimulatorExecutor
            from qlib.config import REG_CN
            from qlib.contrib.evaluate import risk_analysis
            from qlib.contrib.strategy import TopkDropoutStrategy
            from qlib.data import D
    except ImportError:
        raise DependencyError(
            "the Qlib backtest needs pyqlib: pip install pyqlib (or pass close prices to use the built-in backtest)"
        ) from None
    return SimpleNamespace(
        qlib=qlib,
        backtest=backtest,
        SimulatorExecutor=SimulatorExecutor,
        REG_CN=REG_CN,
        risk_analysis=risk_analysis,
        TopkDropoutStrategy=TopkDropoutStrategy,
        D=D,
    )


def init_qlib(provider_uri: PathLike) -> None:
    """Initialise Qlib once per provider folder (shared with the Qlib data source)."""
    _import_qlib()  # the backtest's own pieces, with its DependencyError
    qlib_source.init_qlib(str(provider_uri))


def run_qlib_backtest(
    signal: pd.Series | pd.DataFrame,
    config: Config,
    provider_uri: PathLike | None = None,
    *,
    time_range: Sequence | None = None,
    risk_degree: float = 0.95,
    limit_threshold: float | None = 0.095,
    deal_price: str | None = None,
) -> BacktestReport:
    """Backtest ``signal`` with Qlib's TopkDropoutStrategy over ``config.backtest_time_range`` (clipped to the
    signal's dates), benchmark ``config.benchmark``, costs, account and fill price (``backtest_deal_price``,
    default the open as the official script) from the config.

    ``$change`` caveat: Qlib's float ``limit_threshold`` compares the provider's ``$change`` field with a ratio,
    but some providers (e.g. the bundled sample data) store ``$change`` in percent, which would flag most bars
    as limit-up/down and block trading. The limit rule is therefore passed as Qlib expressions on the adjusted
    close's bar return, ``$close / Ref($close, 1) - 1 >= limit_threshold`` (and ``<= -limit_threshold``),
    correct whatever unit ``$change`` uses. ``limit_threshold=None`` disables limits (Qlib alone would fall
    back to its CN default of 0.095 on ``$change``).
    """
    check_strategy(config)
    check_risk_degree(risk_degree)
    sig = normalize_signal(signal)
    provider = str(Path(os.path.expanduser(str(provider_uri or config.qlib_data_path))).resolve())
    init_qlib(provider)
    q = _import_qlib()
    D, risk_analysis = q.D, q.risk_analysis

    calendar = pd.DatetimeIndex(D.calendar(freq="day"))
    sig_dates = sig.index.get_level_values("datetime").unique().sort_values()
    after_last = calendar[calendar > sig_dates[-1]]
    # Qlib's last step reads the calendar day after it, so the provider's final day cannot be traded
    last_trade = min(after_last[0] if len(after_last) else calendar[-1], calendar[-2])
    start, end = clip_range(
        time_range if time_range is not None else config.backtest_time_range,
        max(sig_dates[0], calendar[0]),
        last_trade,
        "backtest_time_range",
    )
    days = calendar[(calendar >= start) & (calendar <= end)]
    if len(days) < 2:
        raise DataError(
            f"the Qlib calendar has fewer than 2 trading days between {fmt_time(start)} and "
            f"{fmt_time(end)}; widen 'backtest_time_range'"
        )
    start, end = days[0], days[-1]

    bench = config.benchmark
    bench_px = D.features([bench], ["$close"], start, end, freq="day")
    if bench_px.empty or bench_px["$close"].notna().sum() == 0:
        raise DataError(
            f"benchmark '{bench}' has no data in '{provider}' between {fmt_time(start)} and "
            f"{fmt_time(end)}; set 'backtest_benchmark' to an instrument the provider holds"
        )
    codes = sorted(sig.index.get_level_values("instrument").unique())
    if limit_threshold is None:
        limit: Any = float("inf")  # a float avoids Qlib's CN default on the percent-valued $change
    else:
        thr = float(limit_threshold)
        limit = (f"$close / Ref($close, 1) - 1 >= {thr!r}", f"$close / Ref($close, 1) - 1 <= {-thr!r}")

    strategy = q.TopkDropoutStrategy(
        signal=sig,
        topk=config.backtest_n_symbol_hold,
        n_drop=config.backtest_n_symbol_drop,
        hold_thresh=config.backtest_hold_thresh,
        risk_degree=risk_degree,
    )
    deal_price = deal_price or config.backtest_deal_price
    executor = q.SimulatorExecutor(time_per_step="day", generate_portfolio_metrics=True, verbose=False)
    exchange_kwargs = {
        "freq": "day",
        "codes": codes,
        "limit_threshold": limit,
        "deal_price": deal_price,
        "open_cost": config.backtest_open_cost,
        "close_cost": config.backtest_close_cost,
        "min_cost": config.backtest_min_cost,
    }
    logger.info("Qlib backtest %s..%s on %d instruments, benchmark %s", start.date(), end.date(), len(codes), bench)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Qlib averages empty slices on idle days
        try:
            portfolio, _ = q.backtest(
                start_time=start,
                end_time=end,
                strategy=strategy,
                executor=executor,
                benchmark=bench,
                account=config.backtest_account,
                exchange_kwargs=exchange_kwargs,
            )
        except (KeyError, ValueError, IndexError) as exc:
            raise DataError(
                f"Qlib backtest failed on '{provider}' ({type(exc).__name__}: {exc}); check "
                "that the signal's instruments and dates exist in the provider"
            ) from None
    report, positions = portfolio["1day"]
    daily = pd.DataFrame(
        {
            "return": report["return"].astype(float),
            "cost": report["cost"].astype(float),
            "bench": report["bench"].astype(float),
            "turnover": report["turnover"].astype(float),
            "account": report["account"].astype(float),
        }
    )
    daily = finish_daily(daily)
    summary = summarize(
        daily,
        TRADING_DAYS_PER_YEAR,
        strategy_params(
            config,
            "qlib",
            bench,
            risk_degree,
            limit_threshold=limit_threshold,
            deal_price=deal_price,
            provider_uri=provider,
        ),
    )
    # the headline figures straight from Qlib's own risk_analysis, as the official script prints them
    for name, series in (
        ("excess_return_without_cost", daily["excess_return_without_cost"]),
        ("excess_return_with_cost", daily["excess_return_with_cost"]),
        ("benchmark", daily["bench"]),
    ):
        qlib_risk = risk_analysis(series, freq="day")["risk"]
        for key in ("mean", "std", "annualized_return", "information_ratio", "max_drawdown"):
            summary[f"{name}/{key}"] = float(qlib_risk[key])
    return BacktestReport(daily=daily, summary=summary, holdings=_qlib_holdings(positions, daily.index))


def _qlib_holdings(positions: Any, index: pd.DatetimeIndex) -> pd.DataFrame:
    """Share of the account in each name after each day's close, from Qlib's daily positions."""
    rows = {}
    for t, position in dict(positions).items():
        weights = position.get_stock_weight_dict(only_stock=False)
        rows[pd.Timestamp(t)] = {str(k): float(v) for k, v in weights.items()}
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(index).fillna(0.0)
    frame.index.name = "datetime"
    return frame.loc[:, (frame > 0).any()] if len(frame.columns) else frame
