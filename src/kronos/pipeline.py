"""The complete pipeline: data -> tokenizer -> predictor -> prediction -> evaluation -> backtest.

``KronosPipeline(config)`` has one method per step, each usable alone from Python; ``run()`` chains them as
``finetune/train_complete_pipeline.py`` and ``kronos pipeline`` do. Under ``torchrun`` the training stages are
distributed, the data step shares its symbol chunks among the ranks, and prediction, evaluation and backtest run on
rank 0 between barriers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kronos import io as kio
from kronos import runlock
from kronos.config import Config
from kronos.data.schema import VALUE_COLUMNS
from kronos.data.sources import DataProcessorFactory
from kronos.data.store import SPLITS, dataset_exists, load_split, refuse_official_pickles
from kronos.errors import CheckpointError, ConfigError, DataError, InputError, KronosError
from kronos.evaluate.anchors import EvalPeriods, eval_periods, in_period, split_dates
from kronos.evaluate.backtest import run_backtests
from kronos.evaluate.calibration import calibrate_on_validation
from kronos.evaluate.metrics import save_metrics
from kronos.evaluate.plots import plot_forecast, plot_forecast_vs_actual, plot_ic_over_time, plot_training_curves
from kronos.evaluate.records import ic_by_date
from kronos.evaluate.report import build_report
from kronos.evaluate.rolling import SplitForecasts, forecast_split, pass_settings
from kronos.evaluate.signals import signals_from_records
from kronos.inference import KronosPredictor
from kronos.inference.bands import Calibration, apply_calibration, calibration_path, quantile_column
from kronos.inference.generate import SamplingConfig
from kronos.inference.outcomes import BandOutcomes, outcomes_path, target_times
from kronos.inference.predictor import DataFrameForecast
from kronos.io import resolve_folder
from kronos.model import Kronos, KronosTokenizer
from kronos.model.hub import data_cutoff
from kronos.paths import path_in, safe_filename
from kronos.runlock import run_locks
from kronos.runs import CONFIG_NAME, enter_run, has_checkpoint, mark_latest, pick_run_id, remove_if_empty, runs_root
from kronos.timeutil import resolve_calendar
from kronos.train import train_predictor, train_tokenizer
from kronos.train.distributed import data_shard, is_main_process, on_main, process_group, wait_for_main

log = logging.getLogger(__name__)


def barrier() -> None:
    """Every rank waits here for rank-0-only work (a wait that a long rank-0 step cannot time out); no-op without
    a process group (see :mod:`kronos.train.distributed`)."""
    wait_for_main()


@dataclass
class PipelineResult:
    """What a pipeline run left on disk (paths) and its headline numbers.

    ``run_id`` names the run that wrote it (also in ``metrics.json``), so results of different runs in one folder
    are detectable; ``status`` is ``running`` from the start of a run until it finishes (``finished``).
    """

    run_id: str = ""
    status: str = ""
    dataset_path: str = ""
    tokenizer_path: str = ""
    predictor_path: str = ""
    results_dir: str = ""
    forecast_file: str = ""
    metrics_file: str = ""
    stale_forecast_file: str = ""  # forecasts of symbols whose data ends before the dataset's last bar
    report_file: str = ""
    report_headline: dict = field(default_factory=dict)
    calibration_file: str = ""
    backtest_dir: str = ""
    plots: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    backtest_summary: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # parts skipped or adapted (e.g. too few symbols), one line each
    model_in_use: str = "finetuned"  # or "zero_shot": the starting model, kept because finetuning did not help
    model_selection: dict = field(default_factory=dict)  # why (model_selection.json)


class KronosPipeline:
    """Runs each step of the official fine-tuning pipeline over one :class:`Config`.

    Steps: :meth:`process_data`, :meth:`train_tokenizer`, :meth:`train_predictor`, :meth:`predict`,
    :meth:`evaluate`, :meth:`backtest`; :meth:`run` chains the named :data:`STEPS`.
    """

    def __init__(self, config: Config, resume: bool = False) -> None:
        self.config = config
        self.resume = resume
        self.result = PipelineResult(dataset_path=config.dataset_path, results_dir=config.backtest_dir)
        self._predictor = None
        self._finetuned = None
        self._starting = None
        self._frame: pd.DataFrame | None = None
        self._records: pd.DataFrame | None = None
        self._test: SplitForecasts | None = None  # the one rolling pass over the test split
        self._adaptive: dict[str, Any] = {}  # model -> its calibration adapted to the realised outcomes
        self._periods: EvalPeriods | None = None
        # evaluate/backtest commands on a finished run: reuse its saved test pass and forecast records (same settings)
        self.reuse_forecasts = False
        self._skipped: dict[str, str] = {}  # models left out of the report, and why

    # ------------------------------------------------------------------ step 1: data
    def process_data(self) -> dict:
        """Load raw data from ``config.data_source``, clean it, split it and save the dataset, ``data_chunk_symbols``
        symbols at a time; under ``torchrun`` every rank takes its share of the chunks (call it on every rank)."""
        processor = DataProcessorFactory.create_processor(self.config.data_source, self.config)
        return processor.run_pipeline(data_shard())

    def require_dataset(self) -> None:
        if not dataset_exists(self.config.dataset_path):
            refuse_official_pickles(self.config.dataset_path)
            raise DataError(
                f"no processed dataset at '{self.config.dataset_path}'; run the data step first "
                "(drop --skip-data-process, or `kronos data --config-path ...`)"
            )

    # ------------------------------------------------------------------ steps 2-3: training
    def train_tokenizer(self) -> dict:
        self.require_dataset()
        return train_tokenizer(self.config, resume=self.resume)

    def train_predictor(self) -> dict:
        self.require_dataset()
        self.require_checkpoint(self.config.finetuned_tokenizer, "tokenizer", "--skip-tokenizer")
        return train_predictor(self.config, resume=self.resume)

    @staticmethod
    def require_checkpoint(path: str, what: str, flag: str) -> None:
        folder = resolve_folder(path)  # falls back to <path>.prev when a swap was interrupted
        if folder is None or not (folder / "config.json").is_file():
            raise CheckpointError(
                f"no finetuned {what} checkpoint at '{path}'; train it first (drop {flag}) "
                f"or set finetuned_{what}_path to an existing checkpoint folder"
            )

    # ------------------------------------------------------------------ models for inference
    def load_predictor(self):
        """KronosPredictor over the run's model in use (cached on the pipeline): the finetuned pair, or the starting
        pair when the run's model selection kept it (``keep_better``; see :meth:`model_selection`)."""
        if self._predictor is None:
            if self.model_in_use() == "zero_shot":
                self._predictor = self.starting_predictor()
            else:
                self._predictor = self.finetuned_predictor()
        return self._predictor

    def finetuned_predictor(self):
        """KronosPredictor over the run's finetuned tokenizer and predictor."""
        if self._finetuned is None:
            self.require_checkpoint(self.config.finetuned_tokenizer, "tokenizer", "--skip-tokenizer")
            self.require_checkpoint(self.config.finetuned_predictor, "predictor", "--skip-predictor")
            tokenizer = KronosTokenizer.from_pretrained(self.config.finetuned_tokenizer)
            model = Kronos.from_pretrained(self.config.finetuned_predictor)
            device = None if self.config.device == "auto" else self.config.device
            self._finetuned = KronosPredictor(
                model, tokenizer, device=device, max_context=self.config.max_context, clip=self.config.clip
            )
        return self._finetuned

    def starting_predictor(self):
        """KronosPredictor over the configured pretrained pair (the zero-shot starting model), or None when no
        pretrained pair is configured; raises CheckpointError when it is configured but cannot be loaded."""
        cfg = self.config
        if not (cfg.pretrained_predictor_path and cfg.pretrained_tokenizer_path):
            return None
        if self._starting is None:
            device = None if cfg.device == "auto" else cfg.device
            self._starting = KronosPredictor.from_pretrained(
                cfg.pretrained_tokenizer_path,
                cfg.pretrained_predictor_path,
                device=device,
                max_context=cfg.max_context,
                clip=cfg.clip,
            )
        return self._starting

    # ------------------------------------------------------------------ which model the run uses
    def selection_path(self) -> Path:
        """``model_selection.json``, beside the finetuned predictor's ``best_model`` (it follows the predictor)."""
        return Path(self.config.finetuned_predictor).parent / "model_selection.json"

    def model_selection(self) -> dict | None:
        return kio.read_json_object(self.selection_path(), "model selection")

    def model_in_use(self) -> str:
        """'finetuned' or 'zero_shot' (the starting model, kept because finetuning did not help on validation)."""
        sel = self.model_selection()
        if sel and sel.get("model_in_use") == "zero_shot" and self.starting_predictor() is not None:
            return "zero_shot"
        return "finetuned"

    def calibration_file(self, model: str) -> Path:
        """Where the validation-fitted calibration of ``model`` ('finetuned' or 'zero_shot') lives."""
        path = calibration_path(self.config.finetuned_predictor)
        return path if model == "finetuned" else path.with_name("zero_shot_calibration.json")

    def full_frame(self) -> pd.DataFrame:
        """All processed rows (train, val and test merged, de-duplicated), sorted by symbol and time."""
        if self._frame is None:
            self.require_dataset()
            parts = [load_split(self.config.dataset_path, s) for s in SPLITS]
            frame = pd.concat(parts, ignore_index=True)
            frame = frame.drop_duplicates(subset=["symbol", "timestamps"], keep="last")
            self._frame = frame.sort_values(["symbol", "timestamps"], kind="stable").reset_index(drop=True)
        return self._frame

    def _predict_chunks(self, calibration=None) -> Iterator[DataFrameForecast]:
        """``predict_df`` at every symbol's last bar with the config's sampling (and a calibration), chunk by chunk
        (:meth:`KronosPredictor.iter_predict_df`: every input is checked before this returns)."""
        cfg = self.config
        frame = self.full_frame()  # the dataset is checked before the checkpoints
        sampling = SamplingConfig.from_config(cfg)
        return self.load_predictor().iter_predict_df(
            frame,
            pred_len=cfg.predict_window,
            lookback=cfg.lookback_window,
            quantiles=cfg.quantiles,
            calendar=resolve_calendar(cfg.trading_calendar, cfg.data_source),
            sampling=sampling,
            batch_size=max(1, cfg.backtest_batch_size // max(1, sampling.sample_count)),
            calibration=calibration,
        )

    # ------------------------------------------------------------------ step 4: prediction
    def predict(self) -> pd.DataFrame:
        """Forecast the ``predict_window`` bars after every symbol's latest ``lookback_window`` bars (records in the
        one schema of :meth:`KronosPredictor.predict_df`; ``anchor`` is the last bar the forecast saw).

        Symbols whose data ends before the dataset's last bar (suspended, delisted, left the pool) are not
        "latest": their forecasts go to ``forecast_stale.parquet/.csv`` instead of ``forecast_latest``, with a log
        line. The files are written chunk by chunk as the forecasts come (one Parquet row group per chunk; each
        file appears whole, when complete); only one chunk's contexts and sample paths are held at a time.
        """
        cfg = self.config
        self.require_dataset()
        calibration = self.adaptive_calibration()  # validation fit, adapted to every outcome realised so far
        newest = self.full_frame()["timestamps"].max()
        out_dir = Path(cfg.backtest_dir)
        latest, stale = _TableStream(out_dir / "forecast_latest"), _TableStream(out_dir / "forecast_stale")
        kept: list[pd.DataFrame] = []
        first_stale: pd.DataFrame | None = None
        stale_symbols = 0
        try:
            try:
                offset = 0
                for chunk in self._predict_chunks(calibration=calibration):
                    records = chunk.records  # row labels as in the whole records frame
                    records.index = pd.RangeIndex(offset, offset + len(records))
                    offset += len(records)
                    extra = [
                        c
                        for c in (
                            *(f"{quantile_column(q)}_raw" for q in cfg.quantiles),
                            "p_up",
                            "p_up_raw",
                            "p_up_calibrated",
                        )  # fmt: skip
                        if c in records.columns
                    ]
                    columns = ["symbol", "anchor", "step", "timestamps", *VALUE_COLUMNS]
                    columns += [*(quantile_column(q, c) for c in VALUE_COLUMNS for q in cfg.quantiles), *extra]
                    fresh = records["anchor"] >= newest
                    rows, old = records.loc[fresh, columns], records.loc[~fresh, columns]
                    latest.append(rows)
                    kept.append(rows)
                    if len(old):
                        stale.append(old)
                        first_stale = old if first_stale is None else first_stale
                        stale_symbols += old["symbol"].nunique()
            except InputError as exc:
                raise DataError(f"dataset '{cfg.dataset_path}': {exc}") from None
            if first_stale is not None:
                self.result.stale_forecast_file = str(stale.commit())
                log.warning(
                    "%d symbol(s) end before the dataset's last bar %s (e.g. %s as of %s): their forecasts are in "
                    "%s, not in forecast_latest",
                    stale_symbols,
                    newest,
                    first_stale["symbol"].iloc[0],
                    first_stale["anchor"].iloc[0],
                    self.result.stale_forecast_file,
                )
            forecasts = pd.concat(kept, ignore_index=False) if len(kept) > 1 else kept[0]
            self.result.forecast_file = str(latest.commit(empty=forecasts))
        finally:
            latest.discard()
            stale.discard()
        log.info(
            "forecasts for %d symbols as of %s written to %s",
            forecasts["symbol"].nunique(),
            newest,
            self.result.forecast_file,
        )
        return forecasts

    def plot_forecasts(self, forecasts: pd.DataFrame) -> list[str]:
        """Candlestick figures of the first ``plot_n_symbols`` symbols' forecasts (band: the outer quantiles) beside
        their recent history, in ``plots/`` of the results folder."""
        cfg = self.config
        frame = self.full_frame()
        lo, hi = min(cfg.quantiles), max(cfg.quantiles)
        out = []
        for symbol in sorted(forecasts["symbol"].unique())[: cfg.plot_n_symbols]:
            rows = forecasts[forecasts["symbol"] == symbol].set_index("timestamps")
            history = frame[frame["symbol"] == symbol].iloc[-cfg.lookback_window :]
            band = None
            if lo < hi:
                band = tuple(
                    rows[[quantile_column(q, c) for c in VALUE_COLUMNS]].set_axis(list(VALUE_COLUMNS), axis=1)
                    for q in (lo, hi)
                )
            path = path_in(Path(cfg.backtest_dir) / "plots", f"forecast_{safe_filename(symbol)}.png")
            plot_forecast(
                history.set_index("timestamps")[list(VALUE_COLUMNS)],
                rows[list(VALUE_COLUMNS)],
                band,
                None,
                f"{symbol}: {cfg.predict_window}-bar forecast as of {rows['anchor'].iloc[0]} (band q{lo:g}-q{hi:g})",
                path,
                prob_up=next((rows[c].to_numpy() for c in ("p_up_calibrated", "p_up") if c in rows.columns), None),
            )
            out.append(str(path))
        self.result.plots.extend(out)
        return out

    def _predict_step(self) -> None:
        self.plot_forecasts(self.predict())

    # ------------------------------------------------------------------ step 5: evaluation
    def eval_periods(self) -> EvalPeriods:
        """Evaluation and backtest anchor periods: only the test split (see :mod:`kronos.evaluate.anchors`)."""
        if self._periods is None:  # computed (and logged) once per pipeline
            self.require_dataset()
            self._periods = eval_periods(self.config)
        return self._periods

    def test_forecasts(self, models: dict | None = None) -> SplitForecasts:
        """The one rolling pass over the test split (:func:`kronos.evaluate.rolling.forecast_split`): every
        model's sample paths at the test anchors (targets after the last validation bar, anchors in the test
        period), once per ``eval_seeds``. The report, ``metrics.json``, the forecast records and the backtest
        signals all read it. ``models``: default every model the run scores (:meth:`_models`)."""
        if self._test is not None and (models is None or set(models) <= set(self._test.paths)):
            return self._test
        cfg = self.config
        periods = self.eval_periods()
        bounds = split_dates(cfg.dataset_path)
        saved = Path(cfg.backtest_dir) / TEST_PASS
        if self.reuse_forecasts and saved.is_dir():
            differ = self._saved_pass_differs()
            if differ:
                log.info("the run's saved test pass %s was made with other settings (%s): forecasting again", saved,
                         ", ".join(differ))  # fmt: skip
            else:
                passed = SplitForecasts.load(saved)
                if models is not None and not set(models) <= set(passed.paths):
                    log.info("the run's saved test pass %s lacks %s: forecasting again", saved,
                             sorted(set(models) - set(passed.paths)))  # fmt: skip
                else:
                    log.info("reusing the run's test pass %s (%d forecasts of %s): no new forecasts", saved,
                             len(passed.anchors), ", ".join(passed.paths))  # fmt: skip
                    self._test = passed
                    return passed
        elif self.reuse_forecasts:
            log.info("run %s has no saved test pass (%s; it ran without the evaluate step): forecasting the test "
                     "split now", cfg.run_id or "?", saved)  # fmt: skip
        models = models if models is not None else self._models()
        frame = self.full_frame()
        log.info(
            "test pass: %s at up to %s anchor dates of %s .. %s",
            ", ".join(models),
            cfg.eval_max_anchors or "all",
            periods.test[0],
            periods.test[1],
        )
        self._test = forecast_split(
            cfg,
            frame,
            "test",
            periods.last_val if periods.last_val is not None else bounds["val_end"],
            bounds["test_end"],
            models,
            list(cfg.eval.seeds),
            period=periods.test,
        )
        if is_main_process():
            self._test.save(saved)  # `kronos evaluate` and `kronos backtest` reuse it
        return self._test

    def _saved_pass_differs(self) -> list[str]:
        """The settings (anchors, sampling) in which the run's saved test pass differs from this config's; every
        setting when it has no readable ``pass.json`` (read before any array is loaded)."""
        wanted = pass_settings(self.config, "test", self.eval_periods().test)
        meta = kio.read_json_object(Path(self.config.backtest_dir) / TEST_PASS / "pass.json", "forecast pass") or {}
        made_with = meta.get("settings") or {}
        return sorted(k for k in wanted if made_with.get(k) != wanted[k])

    def forecast_records(self) -> pd.DataFrame:
        """The model in use's forecast records at the test anchors (the first seed of the test pass, with its
        calibrated bands when it has a calibration); on a finished run the saved pass is reused
        (:meth:`test_forecasts`)."""
        if self._records is not None:
            return self._records
        cfg = self.config
        saved = Path(cfg.backtest_dir) / "forecast_records.parquet"
        if self.reuse_forecasts and self._test is None and saved.is_file():
            if not self._saved_pass_differs():
                log.info("reusing the run's forecast records %s (from its saved test pass): no model needed", saved)
                self._records = pd.read_parquet(saved)
                return self._records
        in_use = self.model_in_use()
        passed = self.test_forecasts(None if self._test is not None else {in_use: self.load_predictor()})
        records = passed.first(in_use).records
        cal = self.adaptive_calibration(in_use)
        self._records = apply_calibration(records, cal) if cal is not None else records
        return self._records

    def evaluate(self) -> dict:
        """The walk-forward report on the test pass; ``metrics.json`` is its headline for the model in use (the
        numbers the console, report.json/report.md and pipeline_result.json show), beside the baselines."""
        cfg = self.config
        report = self.report()
        headline = report["headline"]
        in_use = headline.get("model_in_use") or next(
            (n for n, s in report["forecasters"].items() if s.get("kind") == "model"), None
        )
        metrics: dict[str, Any] = {
            "model": in_use,
            **(headline.get(in_use) or {}),
            "baselines": {n: headline[n] for n, s in report["forecasters"].items() if s.get("kind") == "baseline"},
            "anchors": report["anchors"],
            "report": report["files"]["json"],
        }
        if report["anchors"]["n_symbols"] < 2:  # thin data: say so instead of a bare NaN
            metrics["ic_note"] = self._note(
                "IC and RankIC not computed: they need >= 2 symbols forecast on the same anchor date; the test "
                f"forecasts cover {report['anchors']['n_symbols']} symbol(s)"
            )
        out_dir = Path(cfg.backtest_dir)
        self.result.metrics_file = str(out_dir / "metrics.json")
        save_metrics({**metrics, "run_id": self.result.run_id}, self.result.metrics_file)
        if in_use is not None:
            records = self.forecast_records()
            kio.write_table(records, out_dir / "forecast_records")
            self._evaluation_figures(records)
        self.result.metrics = metrics
        return metrics

    # ------------------------------------------------------------------ step 6: backtest
    def backtest(self) -> dict:
        """Top-k backtest of the forecast signals (last/mean/max/min) over ``backtest_time_range``."""
        cfg = self.config
        period = self.eval_periods().backtest  # the dataset and the periods are checked before the checkpoints
        records = self.forecast_records()
        records = records.loc[in_period(records["anchor"], period)]
        if records.empty:
            raise DataError(
                f"no forecasts fall inside the backtest period {period} (backtest_time_range "
                f"{cfg.backtest_time_range}); "
                "set it inside the dataset's time span"
            )
        records = _daily_anchors(records)
        dates = records["anchor"].drop_duplicates().sort_values()
        log.info(
            "backtest trades at the %d test anchor dates inside backtest_time_range %s .. %s (rebalancing on "
            "forecast dates, holding between them; eval_max_anchors %s)",
            len(dates),
            dates.iloc[0].date(),
            dates.iloc[-1].date(),
            cfg.eval_max_anchors or "all",
        )
        adapted = self._backtest_config(int(records["symbol"].nunique()))
        if adapted is None:
            self.result.backtest_summary = {}
            return {}
        cfg = adapted
        signals = {
            kind: signals_from_records(records, kind, scale=cfg.backtest_signal_scale)
            for kind in ("last", "mean", "max", "min")
        }
        out_dir = Path(cfg.backtest_dir) / "backtest"
        if cfg.data_source == "qlib":
            reports = run_backtests(signals, cfg, out_dir=out_dir, engine="qlib", time_range=list(period))
        else:
            frame = self.full_frame()
            close = frame.pivot_table(index="timestamps", columns="symbol", values="close")
            opens = frame.pivot_table(index="timestamps", columns="symbol", values="open")
            # daily bars: the day's first open and last close
            close = close.groupby(close.index.normalize()).last()
            opens = opens.groupby(opens.index.normalize()).first()
            reports = run_backtests(
                signals, cfg, out_dir=out_dir, engine="simple", close=close, open_prices=opens, time_range=list(period)
            )
        self.result.backtest_dir = str(out_dir)
        self.result.plots.extend(str(p) for p in reports.plots)  # the summary counts every PNG written
        self.result.backtest_summary = {k: r.summary for k, r in reports.items()}
        self._note_backtest_span(period, self.result.backtest_summary)
        return self.result.backtest_summary

    def _note_backtest_span(self, period: tuple[pd.Timestamp, pd.Timestamp], summary: dict) -> None:
        """Say (log and pipeline_result.json) which part of backtest_time_range the backtest covered, and why,
        when it is not the whole range (a week of slack at either end)."""
        first: dict = next(iter(summary.values()), {})
        if not first.get("start") or not first.get("end"):
            return
        start, end = pd.Timestamp(first["start"]), pd.Timestamp(first["end"])
        slack = pd.Timedelta(days=7)
        if start <= period[0] + slack and end >= period[1].normalize() - slack:
            return
        cfg = self.config
        self._note(
            f"backtest covers {start.date()} .. {end.date()} ({first.get('n_days')} trading days) of "
            f"backtest_time_range {period[0].date()} .. {period[1].date()}: it trades on the test pass's forecast "
            f"dates (eval_max_anchors {cfg.eval_max_anchors or 'all'}, spread over the test split) and needs each "
            f"forecast's {cfg.predict_window} target bars to be known; set eval_max_anchors 0 to trade every bar"
        )

    def _evaluation_figures(self, records: pd.DataFrame) -> None:
        """Forecast vs realised close (1 bar ahead) for the symbols with the most test anchors, and IC/RankIC per
        anchor date (when there is a cross-section), beside metrics.json."""
        out_dir = Path(self.config.backtest_dir)
        known = records.loc[records["true_close"].notna()]
        symbols = list(known.loc[known["step"] == 1, "symbol"].value_counts().index[:3])
        if symbols:
            path = plot_forecast_vs_actual(
                known,
                symbols,
                out_dir / "forecast_vs_actual.png",
                step=1,
                title="test split: 1-bar-ahead forecast vs realised close",
            )
            self.result.plots.append(str(path))
        ic = ic_by_date(records).dropna(how="all", subset=["ic", "rank_ic"])
        if not ic.empty:
            self.result.plots.append(str(plot_ic_over_time(ic, out_dir / "ic_over_time.png")))

    def _note(self, text: str) -> str:
        """Log a skipped or adapted part of the run and keep it in the result (pipeline_result.json)."""
        log.warning("%s", text)
        self.result.notes.append(text)
        return text

    def _backtest_config(self, n_symbols: int) -> Config | None:
        """The config the top-k backtest can honour with ``n_symbols`` names: None (skipped, with a note) below
        two, else top-k capped at half of them (a 1-name "top-50" is no strategy), with a note."""
        cfg = self.config
        if n_symbols < 2:
            self._note(
                f"backtest skipped: a top-k strategy ranks symbols against each other and the backtest range "
                f"holds {n_symbols} symbol(s); use a dataset with more symbols"
            )
            return None
        hold, drop = cfg.backtest_n_symbol_hold, cfg.backtest_n_symbol_drop
        if hold <= n_symbols // 2:
            return cfg
        new_hold = max(1, n_symbols // 2)
        new_drop = min(drop, new_hold)
        self._note(
            f"backtest adapted to {n_symbols} symbols: holding top {new_hold} (backtest_n_symbol_hold "
            f"{hold}) and dropping {new_drop} (backtest_n_symbol_drop {drop}) per rebalance"
        )
        return copy.deepcopy(cfg).update(
            {"backtest_n_symbol_hold": new_hold, "backtest_n_symbol_drop": new_drop}, source="thin data"
        )

    # ------------------------------------------------------------------ everything
    def run(self, steps: Sequence[str] | None = None) -> PipelineResult:
        """Run ``steps`` (names of :data:`STEPS`, run in that order; default: every step; the CLI's ``--skip-*``
        flags map to them through :func:`steps_from_flags`). Under ``torchrun`` from Python it sets up, and tears
        down, its own process group when none exists. With ``run_folders`` (the default) the run writes under its
        own run folder (see :mod:`kronos.runs`)."""
        chosen = check_steps(steps)
        with process_group(self.config):
            run_id = self.enter_run_folder(
                skip_tokenizer="tokenizer" not in chosen, skip_predictor="predictor" not in chosen
            )
            try:
                return self._locked_run(chosen)
            except BaseException:
                if run_id and is_main_process():  # a run that stopped before writing anything leaves no folder
                    remove_if_empty(self._runs_root, run_id)
                raise

    def enter_run_folder(self, skip_tokenizer: bool = False, skip_predictor: bool = False) -> str | None:
        """Move the config's output paths inside this run's folder (:func:`kronos.runs.enter_run`; rank 0 picks the
        id, every rank gets it). Returns the run id (None with ``run_folders: false``)."""
        cfg = self.config
        if not cfg.run_folders:
            return None
        root = runs_root(cfg.save_path, cfg.backtest_result_path)
        run_id = on_main(lambda: pick_run_id(root, cfg.run_id, self.resume))  # rank 0 picks, every rank gets it
        skipped = [stage for stage, skip in (("tokenizer", skip_tokenizer), ("predictor", skip_predictor)) if skip]
        self.config = enter_run(cfg, root, run_id, skipped)
        self._runs_root = root
        self.result.results_dir = self.config.backtest_dir
        return run_id

    def _locked_run(self, steps: list[str]) -> PipelineResult:
        """Run the steps; one run per output folder at a time (see :mod:`kronos.runlock`). Rank 0 takes the locks
        while the other ranks wait: a refusal (another run holds the folders) ends every rank at once."""
        cfg = self.config
        with contextlib.ExitStack() as held:

            def claim() -> None:
                whole = [cfg.dataset_path] if "data" in steps else []
                held.enter_context(run_locks([cfg.save_path, cfg.backtest_dir], whole=whole))
                self.heal_outputs()

            on_main(claim)
            return self._run(steps)

    def heal_outputs(self) -> list[Path]:
        """Move back the folders of this config (dataset, checkpoints, results) that a killed writer of an older
        version left missing beside a complete ``<name>.prev`` (logged; :func:`kronos.io.heal_folder`). Rank 0
        only; the folders healed."""
        cfg = self.config
        healed = []
        for path in (cfg.dataset_path, cfg.finetuned_tokenizer, cfg.finetuned_predictor):
            target = Path(path).expanduser() if path else None
            if target is not None and not target.is_dir() and kio.heal_folder(target) == target:
                healed.append(target)
        for root in (cfg.save_path, cfg.backtest_dir):
            if root:
                healed += runlock.heal_interrupted_swaps(root)
        return healed

    def _run(self, steps: list[str]) -> PipelineResult:
        cfg = self.config
        timings = self.result.seconds
        # name -> (what it runs, rank 0 only)
        table: dict[str, tuple[Callable[[], Any], bool]] = {
            "data": (self.process_data, False),  # every rank streams its share of the symbol chunks
            "tokenizer": (self._tokenizer_step, False),
            "predictor": (self._predictor_step, False),
            "calibrate": (self._calibrate_step, True),
            "predict": (self._predict_step, True),
            "evaluate": (self.evaluate, True),
            "backtest": (self.backtest, True),
        }
        if "data" not in steps:
            self.require_dataset()
        on_main(lambda: self._announce(steps))  # the other ranks wait: a failure on rank 0 ends every rank at once
        for name in STEPS:
            if name not in steps:
                if name in ("tokenizer", "predictor"):  # a skipped stage needs its checkpoint
                    self.require_checkpoint(getattr(cfg, f"finetuned_{name}"), name, f"--skip-{name}")
                continue
            fn, main_only = table[name]
            t0 = time.time()
            if main_only:  # rank 0 runs it while the others wait; a failure there ends every rank at once
                on_main(functools.partial(self._main_step, name, fn))
            else:
                log.info("==== %s ====", name)
                fn()
                barrier()
            timings[name] = round(time.time() - t0, 2)
        self.result.tokenizer_path = cfg.finetuned_tokenizer
        self.result.predictor_path = cfg.finetuned_predictor
        if has_checkpoint(cfg.finetuned_predictor):
            try:
                self.result.model_in_use = self.model_in_use()
            except (KronosError, OSError):
                self.result.model_in_use = "finetuned"
            self.result.model_selection = self.model_selection() or {}
        if is_main_process():
            self.result.status = "finished"
            kio.write_json(Path(cfg.backtest_dir) / "pipeline_result.json", self.result)
            if getattr(self, "_runs_root", None) is not None and cfg.run_id:
                mark_latest(self._runs_root, cfg.run_id)  # runs/latest: the newest finished run
        return self.result

    def _announce(self, steps: list[str]) -> None:
        """Rank 0, before the steps: the run's config inside its outputs, its result marked 'running', and where it
        reads and writes."""
        cfg = self.config
        cfg.save(Path(cfg.save_path) / CONFIG_NAME)  # inside the outputs, never beside them
        # a run killed later leaves status 'running' under its own id: its results are never taken for finished
        self.result.run_id, self.result.status = cfg.run_id or runlock.RUN_ID, "running"
        kio.write_json(Path(cfg.backtest_dir) / "pipeline_result.json", self.result)
        if cfg.run_id:
            log.info("run %s: outputs under %s", cfg.run_id, Path(cfg.save_path).parent)
        log.info(
            "where this run reads and writes: dataset %s; tokenizer %s (%s); predictor %s (%s); results %s",
            cfg.dataset_path,
            cfg.finetuned_tokenizer,
            "trained now" if "tokenizer" in steps else "reused",
            cfg.finetuned_predictor,
            "trained now" if "predictor" in steps else "reused",
            cfg.backtest_dir,
        )

    @staticmethod
    def _main_step(name: str, fn: Callable[[], Any]) -> None:
        log.info("==== %s ====", name)
        fn()

    def _tokenizer_step(self) -> None:
        self.train_tokenizer()
        self._plot_curves(self.config.tokenizer_dir, "tokenizer training")

    def _predictor_step(self) -> None:
        self.train_predictor()
        self._plot_curves(self.config.predictor_dir, "predictor training")

    # ------------------------------------------------------------------ calibration and the walk-forward report
    def calibrate(self) -> dict:
        """Fit the band/P(up) calibration of every model on validation anchors (the finetuned model's
        ``calibration.json`` beside best_model; the starting model's ``zero_shot_calibration.json`` beside it), then
        pick the run's model in use (:meth:`select_model`). Returns {model: calibration dict}."""
        cfg = self.config
        models = self._models()  # the checkpoints are checked before the dataset
        frame, bounds = self.full_frame(), split_dates(cfg.dataset_path)
        out = {}
        for name, predictor in models.items():
            path = self.calibration_file(name)
            log.info("calibrating the %s model on validation anchors", name.replace("_", "-"))
            out[name] = calibrate_on_validation(cfg, predictor, frame, bounds, out_path=path).to_dict()
            if name == "finetuned":
                self.result.calibration_file = str(path)
        self.select_model(out)
        return out

    def _models(self) -> dict:
        """The models a run scores: the finetuned one, and the starting (zero-shot) one when configured and
        loadable (a starting model that cannot be loaded is logged and left out)."""
        models = {"finetuned": self.finetuned_predictor()}
        try:
            start = self.starting_predictor()
        except (KronosError, OSError) as exc:
            self._skipped["zero_shot"] = f"pretrained model not loadable: {exc}"
            log.warning("zero-shot model left out: %s", exc)
            start = None
        if start is not None:
            models["zero_shot"] = start
        return models

    def select_model(self, calibrations: dict) -> dict:
        """Keep the finetuned model only if it beat the starting model on validation; write model_selection.json.

        Both are scored on the same validation anchors (never test data): CRPS / last close of their calibrated
        bands when both have them, else of their raw sample paths. The predictor stage's causal validation loss of
        the start and of the finetuned best model is recorded beside it. With ``keep_better`` (the default) a
        finetuned model that is not better is not used: forecasts, calibration, report and service use the start.
        """
        cfg = self.config
        summary_file = Path(cfg.predictor_dir) / "summary.json"
        losses = {}
        if summary_file.is_file():
            summary = kio.read_json(summary_file)
            losses = {"zero_shot": summary.get("start_val_loss"), "finetuned": summary.get("best_val_loss")}
        val = {
            name: {**(c.get("validation") or {}), "causal_val_loss": losses.get(name)}
            for name, c in calibrations.items()
        }
        selection: dict[str, Any] = {"model_in_use": "finetuned", "keep_better": cfg.keep_better, "validation": val}
        if not val:
            selection["reason"] = "no validation comparison (calibration skipped): the finetuned model is used"
        elif "zero_shot" not in val:
            selection["reason"] = "no starting model to compare with (pretrained paths empty or not loadable)"
        else:
            key = (
                "crps_rel_calibrated"
                if all(v.get("crps_rel_calibrated") is not None for v in val.values())
                else "crps_rel"
            )
            ft, zs = val["finetuned"].get(key), val["zero_shot"].get(key)
            if key == "crps_rel_calibrated" and ft is not None and zs is not None and _tied(ft, zs):
                # calibration can leave two models with the same bands (e.g. both medians shrunk to the last close,
                # the same spread): their raw sample paths decide
                key = "crps_rel"
                ft, zs = val["finetuned"].get(key), val["zero_shot"].get(key)
            selection["criterion"] = f"validation {key} (lower is better)"
            helped = ft is not None and zs is not None and ft < zs and not _tied(ft, zs)
            detail = (
                f"validation {key}: finetuned {_num(ft)} vs starting model {_num(zs)}; causal val loss "
                f"{_num(losses.get('finetuned'))} vs {_num(losses.get('zero_shot'))}"
            )
            if helped:
                selection["reason"] = f"finetuning helped ({detail})"
            elif cfg.keep_better:
                selection["model_in_use"] = "zero_shot"
                selection["reason"] = (
                    f"finetuning did not help ({detail}); keep_better: the run uses the starting model"
                )
                self._note(
                    f"finetuning did not help on validation ({detail}): forecasts, calibration, report and "
                    "service use the starting model (keep_better; set keep_better false to use the finetuned "
                    "one anyway)"
                )
            else:
                selection["reason"] = (
                    f"finetuning did not help ({detail}); keep_better false: the finetuned model is used"
                )
                self._note(
                    f"finetuning did not help on validation ({detail}); keep_better is false, so the run "
                    "uses the finetuned model anyway"
                )
        if selection["model_in_use"] == "zero_shot":
            selection.update(tokenizer=cfg.pretrained_tokenizer_path, predictor=cfg.pretrained_predictor_path)
        else:
            selection.update(tokenizer=cfg.finetuned_tokenizer, predictor=cfg.finetuned_predictor)
        selection["calibration"] = str(self.calibration_file(selection["model_in_use"]))
        kio.write_json(self.selection_path(), selection)
        log.info("model in use: %s (%s)", selection["model_in_use"], selection["reason"])
        self.result.model_in_use = selection["model_in_use"]
        self.result.model_selection = selection
        self._predictor = None  # the next load_predictor follows the selection
        self._adaptive = {}
        return selection

    def _calibrate_step(self) -> None:
        """The pipeline's calibrate step: too few validation anchors leave the bands uncalibrated (logged)."""
        try:
            self.calibrate()
        except InputError as exc:
            self._note(f"calibration skipped (bands stay uncalibrated): {exc}")
            self.select_model({})

    def load_calibration(self, model: str | None = None):
        """The validation-fitted calibration of ``model`` (default: the model in use) when present and fitted for it
        (else None, logged)."""
        cfg = self.config
        model = model or self.model_in_use()
        path = self.calibration_file(model)
        if not path.is_file():
            log.info("no calibration at %s (run `kronos calibrate`): %s bands are reported uncalibrated", path, model)
            return None
        predictor = (
            self.load_predictor()
            if model == self.model_in_use()
            else (self.finetuned_predictor() if model == "finetuned" else self.starting_predictor())
        )
        try:
            cal = Calibration.load(path).check(
                predictor, cfg.lookback_window, cfg.predict_window, source=f"calibration file '{path}'"
            )
        except KronosError as exc:
            log.warning("%s; bands are reported uncalibrated", exc)
            return None
        if model == self.model_in_use():
            self.result.calibration_file = str(path)
        return cal

    def adaptive_calibration(self, model: str | None = None):
        """The model's calibration (default: the model in use) corrected by every outcome realised so far
        (:mod:`kronos.inference.outcomes`): the validation outcomes the calibrate step saved plus the run's test pass
        (forecast now when the run has none), saved back beside the calibration for the service. The correction at
        an anchor reads only outcomes realised on or before it. Static when ``calibration_half_life`` is 0 or the
        calibration has no outcomes file; None without a calibration."""
        cfg = self.config
        model = model or self.model_in_use()
        if model in self._adaptive:
            return self._adaptive[model]
        cal = self.load_calibration(model)
        path = outcomes_path(self.calibration_file(model))
        if cal is None or cfg.calibration_half_life <= 0 or cal.method != "vol_scaled":
            return cal
        if not path.is_file():
            log.info("no realised outcomes at %s (rerun `kronos calibrate`): static %s bands", path, model)
            return cal
        try:
            pool = BandOutcomes.load(path)
            test = self.test_forecasts()
            if model in test.paths:
                fc = test.first(model)
                frame = self.full_frame()
                targets = target_times(frame, test.anchors, cfg.predict_window)
                pool = pool.concat(BandOutcomes.from_forecasts(
                    cal, fc.samples, fc.last_close, fc.true, fc.vol, targets, calendar=frame["timestamps"].unique(),
                    anchors=fc.anchor,
                ))  # fmt: skip
                if is_main_process():
                    pool.save(path)  # every outcome realised so far, for the service
            pool.half_life = float(cfg.calibration_half_life)
            adaptive = cal.with_outcomes(pool)
        except KronosError as exc:
            log.warning("%s: static %s bands", exc, model)
            return cal
        log.info("adaptive %s bands: %d realised outcomes (to %s), half-life %d bars", model, len(pool),
                 pd.Timestamp(pool.target.max()) if len(pool) else "-", cfg.calibration_half_life)  # fmt: skip
        self._adaptive[model] = adaptive
        return adaptive

    def report(self) -> dict:
        """Walk-forward report on the test split: finetuned and zero-shot models (each with its own validation
        calibration) beside the baselines; the model in use and the starting model's data cutoff marked."""
        cfg = self.config
        self.eval_periods()  # the dataset and the periods are checked before the checkpoints
        models = self._models()
        passed = self.test_forecasts(models)
        calibrations = {name: self.adaptive_calibration(name) for name in models}
        cutoff = None
        if "zero_shot" in models or cfg.pretrained_predictor_path:
            end, source = data_cutoff(cfg.pretrained_predictor_path, cfg.pretrained_data_end)
            cutoff = {"data_end": end, "source": source}
        report = build_report(
            cfg,
            self.full_frame(),
            split_dates(cfg.dataset_path),
            passed,
            cfg.backtest_dir,
            calibrations=calibrations,
            skipped=dict(self._skipped),
            in_use=self.model_in_use(),
            starting_cutoff=cutoff,
            selection=self.model_selection(),
        )
        for warning in report.get("warnings", []):
            self._note(warning)
        self.result.report_file = report["files"]["json"]
        self.result.report_headline = report["headline"]
        self.result.plots.extend(report["files"]["plots"])
        log.info("walk-forward report: %s", report["files"]["markdown"])
        return report

    def _plot_curves(self, stage_dir: str, stage: str) -> None:
        if not is_main_process():
            return
        path = Path(stage_dir) / "metrics.jsonl"
        if path.is_file():
            out = Path(stage_dir) / "training_curves.png"
            plot_training_curves(path, out, title=f"{stage}: loss curves")
            self.result.plots.append(str(out))


TEST_PASS = "test_pass"  # the saved test pass, in the results folder

# ---------------------------------------------------------------------- steps
STEPS = ("data", "tokenizer", "predictor", "calibrate", "predict", "evaluate", "backtest")


def check_steps(steps: Sequence[str] | None) -> list[str]:
    """``steps`` as a list of known step names (None: every step); an unknown name is a one-line ConfigError."""
    if steps is None:
        return list(STEPS)
    if isinstance(steps, str):
        steps = [steps]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"unknown pipeline step(s) {unknown}; the steps are {list(STEPS)}")
    return [s for s in STEPS if s in steps]


def steps_from_flags(
    skip_data: bool = False,
    skip_tokenizer: bool = False,
    skip_predictor: bool = False,
    skip_predict: bool = False,
    skip_backtest: bool = False,
) -> list[str]:
    """The steps the CLI's ``--skip-*`` flags leave. ``calibrate`` runs with a newly trained predictor (a reused
    predictor keeps its calibration); ``--skip-predict`` drops forecasting, evaluation and backtest."""
    steps = [] if skip_data else ["data"]
    steps += [] if skip_tokenizer else ["tokenizer"]
    if not skip_predictor:
        steps += ["predictor"] + ([] if skip_predict else ["calibrate"])
    if not skip_predict:
        steps += ["predict", "evaluate"] + ([] if skip_backtest else ["backtest"])
    return steps


# ---------------------------------------------------------------------- helpers
def _tied(a: float, b: float) -> bool:
    """Equal up to floating-point noise (a relative 1e-9): neither model is better."""
    return abs(float(a) - float(b)) <= 1e-9 * max(abs(float(a)), abs(float(b)), 1e-300)


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.5g}"


class _TableStream:
    """A table written chunk by chunk as ``<stem>.parquet`` and ``<stem>.csv`` (what :func:`kronos.io.write_table`
    writes for the whole frame: the same schema and text): rows go to hidden files beside the targets, which
    :meth:`commit` puts in place atomically; :meth:`discard` removes what was not committed."""

    def __init__(self, stem: Path) -> None:
        self.stem = stem
        self.rows = 0
        tag = f".{stem.name}.tmp-stream-{uuid.uuid4().hex[:12]}"
        self._pq, self._csv = stem.with_name(tag + ".parquet"), stem.with_name(tag + ".csv")
        self._writer: pq.ParquetWriter | None = None
        self._text: Any = None

    def append(self, frame: pd.DataFrame) -> None:
        if not len(frame):
            return
        if self._writer is None:
            self.stem.parent.mkdir(parents=True, exist_ok=True)
            table = pa.Table.from_pandas(frame, preserve_index=False)
            self._writer = pq.ParquetWriter(self._pq, table.schema)
            self._text = open(self._csv, "w", encoding="utf-8", newline="")
        else:
            table = pa.Table.from_pandas(frame, preserve_index=False, schema=self._writer.schema)
        self._writer.write_table(table)
        frame.to_csv(self._text, index=False, header=self.rows == 0)
        self.rows += len(frame)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._text.close()

    def commit(self, empty: pd.DataFrame | None = None) -> Path:
        """Put the files in place; with no rows written, ``empty`` (a frame with the columns) is written whole."""
        if self._writer is None:
            assert empty is not None, "nothing was written"
            return kio.write_table(empty, self.stem)
        self._close()
        target = kio.write_file(self.stem.with_name(self.stem.name + ".parquet"), lambda p: os.replace(self._pq, p))
        kio.write_file(self.stem.with_name(self.stem.name + ".csv"), lambda p: os.replace(self._csv, p))
        self._writer = None
        return target

    def discard(self) -> None:
        self._close()
        self._writer = None
        for path in (self._pq, self._csv):
            path.unlink(missing_ok=True)


def _daily_anchors(records: pd.DataFrame) -> pd.DataFrame:
    """Keep one anchor per symbol and day (the last), so intraday forecasts drive a daily backtest."""
    day = records["anchor"].dt.normalize()
    last = records.assign(_day=day).groupby(["symbol", "_day"])["anchor"].transform("max")
    out = records.loc[records["anchor"] == last].copy()
    out["anchor"] = out["anchor"].dt.normalize()
    return out


__all__ = ["STEPS", "KronosPipeline", "PipelineResult", "check_steps", "steps_from_flags"]
