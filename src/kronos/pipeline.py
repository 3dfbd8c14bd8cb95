"""The complete pipeline: data -> tokenizer -> predictor -> prediction -> evaluation -> backtest.

``KronosPipeline(config)`` has one method per step, each usable alone from Python; ``run()`` chains them as
``finetune/train_complete_pipeline.py`` and ``kronos pipeline`` do. Under ``torchrun`` the training stages are
distributed while data processing, prediction, evaluation and backtest run on rank 0 between barriers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from kronos import io as kio
from kronos.config import Config
from kronos.errors import CheckpointError, DataError, KronosError
from kronos.paths import path_in, safe_filename

log = logging.getLogger(__name__)

PRICE_COLUMNS = ["open", "high", "low", "close", "volume", "amount"]

def _dist():
    """torch.distributed if a process group is up, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_main_process() -> bool:
    d = _dist()
    return d is None or d.get_rank() == 0


def barrier() -> None:
    from kronos.train.distributed import wait_for_main  # a wait that a long rank-0 step cannot time out

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
    report_file: str = ""
    report_headline: dict = field(default_factory=dict)
    calibration_file: str = ""
    backtest_dir: str = ""
    plots: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    backtest_summary: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


class KronosPipeline:
    """Runs each step of the seed's pipeline over one :class:`Config`.

    Steps: :meth:`process_data`, :meth:`train_tokenizer`, :meth:`train_predictor`, :meth:`predict`,
    :meth:`evaluate`, :meth:`backtest`; :meth:`run` chains them with the seed's skip flags.
    """

    def __init__(self, config: Config, resume: bool = False) -> None:
        self.config = config
        self.resume = resume
        self.result = PipelineResult(dataset_path=config.dataset_path, results_dir=config.backtest_dir)
        self._predictor = None
        self._frame: Optional[pd.DataFrame] = None
        self._records: Optional[pd.DataFrame] = None

    # ------------------------------------------------------------------ step 1: data
    def process_data(self) -> dict:
        """Load raw data from ``config.data_source``, clean it, split it and save the dataset."""
        from kronos.data.sources import DataProcessorFactory

        processor = DataProcessorFactory.create_processor(self.config.data_source, self.config)
        return processor.run_pipeline()

    def require_dataset(self) -> None:
        from kronos.data.store import dataset_exists

        if not dataset_exists(self.config.dataset_path):
            raise DataError(
                f"no processed dataset at '{self.config.dataset_path}'; run the data step first "
                "(drop --skip-data-process, or `kronos data --config-path ...`)"
            )

    # ------------------------------------------------------------------ steps 2-3: training
    def train_tokenizer(self) -> dict:
        from kronos.train import train_tokenizer

        self.require_dataset()
        return train_tokenizer(self.config, resume=self.resume)

    def train_predictor(self) -> dict:
        from kronos.train import train_predictor

        self.require_dataset()
        self.require_checkpoint(self.config.finetuned_tokenizer, "tokenizer", "--skip-tokenizer")
        return train_predictor(self.config, resume=self.resume)

    @staticmethod
    def require_checkpoint(path: str, what: str, flag: str) -> None:
        from kronos.io import resolve_folder

        folder = resolve_folder(path)  # falls back to <path>.prev when a swap was interrupted
        if folder is None or not (folder / "config.json").is_file():
            raise CheckpointError(
                f"no finetuned {what} checkpoint at '{path}'; train it first (drop {flag}) "
                f"or set finetuned_{what}_path to an existing checkpoint folder"
            )

    # ------------------------------------------------------------------ models for inference
    def load_predictor(self):
        """KronosPredictor over the finetuned tokenizer and predictor (cached on the pipeline)."""
        if self._predictor is None:
            from kronos.inference import KronosPredictor
            from kronos.model import Kronos, KronosTokenizer

            self.require_checkpoint(self.config.finetuned_tokenizer, "tokenizer", "--skip-tokenizer")
            self.require_checkpoint(self.config.finetuned_predictor, "predictor", "--skip-predictor")
            tokenizer = KronosTokenizer.from_pretrained(self.config.finetuned_tokenizer)
            model = Kronos.from_pretrained(self.config.finetuned_predictor)
            device = None if self.config.device == "auto" else self.config.device
            self._predictor = KronosPredictor(
                model, tokenizer, device=device, max_context=self.config.max_context, clip=self.config.clip
            )
        return self._predictor

    def full_frame(self) -> pd.DataFrame:
        """All processed rows (train, val and test merged, de-duplicated), sorted by symbol and time."""
        if self._frame is None:
            from kronos.data.store import SPLITS, load_split

            self.require_dataset()
            parts = [load_split(self.config.dataset_path, s) for s in SPLITS]
            frame = pd.concat(parts, ignore_index=True)
            frame = frame.drop_duplicates(subset=["symbol", "timestamps"], keep="last")
            self._frame = frame.sort_values(["symbol", "timestamps"], kind="stable").reset_index(drop=True)
        return self._frame

    def _forecast(self, contexts: list[pd.DataFrame], x_ts: list[pd.Series], y_ts: list[pd.Series],
                  desc: str) -> list[tuple[pd.DataFrame, np.ndarray]]:
        """Forecast many series in chunks of ``backtest_batch_size``; returns (mean, samples) per series."""
        from tqdm.auto import tqdm

        cfg = self.config
        predictor = self.load_predictor()
        out: list[tuple[pd.DataFrame, np.ndarray]] = []
        chunk = max(1, cfg.backtest_batch_size // max(1, cfg.inference_sample_count))
        starts = range(0, len(contexts), chunk)
        for k, a in enumerate(tqdm(starts, desc=desc, unit="batch", disable=len(starts) < 2)):
            b = min(a + chunk, len(contexts))
            res = predictor.predict_batch(
                contexts[a:b], x_ts[a:b], y_ts[a:b], pred_len=cfg.predict_window,
                T=cfg.inference_T, top_k=cfg.inference_top_k, top_p=cfg.inference_top_p,
                sample_count=cfg.inference_sample_count, verbose=False,
                seed=cfg.inference_seed + k, return_samples=True,
            )
            out.extend(res)
        return out

    # ------------------------------------------------------------------ step 4: prediction
    def predict(self) -> pd.DataFrame:
        """Forecast the ``predict_window`` bars after every symbol's latest ``lookback_window`` bars."""
        from kronos.evaluate.plots import plot_forecast
        from kronos.timeutil import future_timestamps

        cfg = self.config
        frame = self.full_frame()
        contexts, x_ts, y_ts, symbols = [], [], [], []
        for symbol, g in frame.groupby("symbol", sort=True):
            if len(g) < cfg.lookback_window:
                log.warning("skipping %s: %d bars, fewer than lookback_window=%d", symbol, len(g), cfg.lookback_window)
                continue
            ctx = g.iloc[-cfg.lookback_window:]
            contexts.append(ctx[PRICE_COLUMNS].reset_index(drop=True))
            x_ts.append(ctx["timestamps"].reset_index(drop=True))
            y_ts.append(pd.Series(future_timestamps(ctx["timestamps"], cfg.predict_window)))
            symbols.append(symbol)
        if not symbols:
            raise DataError(f"no symbol in '{cfg.dataset_path}' has lookback_window={cfg.lookback_window} bars to forecast from")
        results = self._forecast(contexts, x_ts, y_ts, desc="forecast latest")
        rows = []
        out_dir = Path(cfg.backtest_dir)
        plot_dir = out_dir / "plots"
        # plot the symbols with the most recent data first (pool members that left the index end earlier)
        recency = sorted(range(len(symbols)), key=lambda k: (-x_ts[k].iloc[-1].value, symbols[k]))
        to_plot = set(recency[: cfg.plot_n_symbols])
        for i, (symbol, (mean, samples)) in enumerate(zip(symbols, results)):
            part = mean.reset_index(drop=False).rename(columns={"index": "timestamps"})
            part.columns = ["timestamps"] + PRICE_COLUMNS
            part.insert(0, "step", np.arange(1, len(part) + 1))
            part.insert(0, "symbol", symbol)
            bands = {}
            for q in cfg.quantiles:
                qv = np.quantile(samples, q, axis=0)  # [pred_len, 6]
                part[f"close_q{q:g}"] = qv[:, 3]
                bands[q] = pd.DataFrame(qv, columns=PRICE_COLUMNS, index=mean.index)
            rows.append(part)
            if i in to_plot:
                lo, hi = min(cfg.quantiles), max(cfg.quantiles)
                history = contexts[i].set_index(pd.DatetimeIndex(x_ts[i]))
                path = path_in(plot_dir, f"forecast_{safe_filename(symbol)}.png")
                plot_forecast(history, mean, (bands[lo], bands[hi]) if lo < hi else None, None,
                              f"{symbol}: {cfg.predict_window}-bar forecast (band q{lo:g}-q{hi:g})", path)
                self.result.plots.append(str(path))
        forecasts = pd.concat(rows, ignore_index=True)
        self.result.forecast_file = str(kio.write_table(forecasts, out_dir / "forecast_latest"))
        log.info("forecasts for %d symbols written to %s", len(symbols), self.result.forecast_file)
        return forecasts

    # ------------------------------------------------------------------ step 5: evaluation
    def forecast_records(self) -> pd.DataFrame:
        """Rolling forecasts at every anchor bar in the test and backtest ranges (one row per anchor and step).

        Each anchor uses only the ``lookback_window`` bars up to it; the actual future close is attached where
        known. Anchors are bars in ``test_time_range`` ∪ ``backtest_time_range``, every ``eval_stride`` bars,
        the latest ``eval_max_anchors`` dates when that is set.
        """
        if self._records is not None:
            return self._records
        cfg = self.config
        frame = self.full_frame()
        lo = min(pd.Timestamp(cfg.test_time_range[0]), pd.Timestamp(cfg.backtest_time_range[0]))
        hi = max(_range_end(cfg.test_time_range[1]), _range_end(cfg.backtest_time_range[1]))
        dates = frame.loc[(frame["timestamps"] >= lo) & (frame["timestamps"] <= hi), "timestamps"]
        anchor_dates = np.sort(dates.unique())[:: max(1, cfg.eval_stride)]
        if cfg.eval_max_anchors > 0:
            anchor_dates = anchor_dates[-cfg.eval_max_anchors:]
        anchor_set = np.unique(pd.DatetimeIndex(anchor_dates).as_unit("ns").asi8)
        contexts, x_ts, y_ts, meta = [], [], [], []
        P, L = cfg.predict_window, cfg.lookback_window
        from kronos.timeutil import future_timestamps

        for symbol, g in frame.groupby("symbol", sort=True):
            ts = pd.DatetimeIndex(g["timestamps"]).as_unit("ns")
            values = g[PRICE_COLUMNS].to_numpy(dtype=np.float64)
            for i in np.flatnonzero(np.isin(ts.asi8, anchor_set)):
                if i + 1 < L:
                    continue
                ctx_ts = ts[i + 1 - L:i + 1]
                fut = ts[i + 1:i + 1 + P]
                if len(fut) < P:
                    fut = fut.append(future_timestamps(ctx_ts if len(fut) == 0 else ctx_ts.append(fut), P - len(fut)))
                true_close = np.full(P, np.nan)
                n_known = min(P, len(ts) - i - 1)
                true_close[:n_known] = values[i + 1:i + 1 + n_known, 3]
                contexts.append(pd.DataFrame(values[i + 1 - L:i + 1], columns=PRICE_COLUMNS))
                x_ts.append(pd.Series(ctx_ts))
                y_ts.append(pd.Series(fut))
                # the predictor's normalisation scale of close over this context (official signal unit)
                close_scale = float(np.std(values[i + 1 - L:i + 1, 3].astype(np.float32))) + 1e-5
                meta.append((symbol, ts[i], values[i, 3], close_scale, true_close))
        if not contexts:
            raise DataError(
                f"no anchor with lookback_window={L} bars of history inside test_time_range {cfg.test_time_range} "
                f"or backtest_time_range {cfg.backtest_time_range}; widen the ranges or shorten lookback_window"
            )
        results = self._forecast(contexts, x_ts, y_ts, desc="rolling forecasts")
        blocks = []
        for (symbol, anchor, last_close, close_scale, true_close), (mean, samples), fut in zip(meta, results, y_ts):
            block = {
                "symbol": symbol,
                "datetime": anchor,
                "step": np.arange(1, P + 1),
                "timestamps": fut.to_numpy(),
                "last_close": last_close,
                "close_scale": close_scale,
                "true_close": true_close,
            }
            for c in PRICE_COLUMNS:
                block[f"pred_{c}"] = mean[c].to_numpy()
            for q in cfg.quantiles:
                block[f"pred_close_q{q:g}"] = np.quantile(samples[:, :, 3], q, axis=0)
            blocks.append(pd.DataFrame(block))
        self._records = pd.concat(blocks, ignore_index=True)
        return self._records

    def evaluate(self) -> dict:
        """MSE/MAE, direction accuracy, IC and RankIC on the test split, beside the naive last-value forecast."""
        from kronos.evaluate.metrics import forecast_metrics, save_metrics

        cfg = self.config
        records = self.forecast_records()
        in_test = (records["datetime"] >= pd.Timestamp(cfg.test_time_range[0])) & (
            records["datetime"] <= _range_end(cfg.test_time_range[1]))
        test_records = records.loc[in_test]
        if test_records.empty:
            test_records = records
        metrics = forecast_metrics(test_records)
        out_dir = Path(cfg.backtest_dir)
        self.result.metrics_file = str(out_dir / "metrics.json")
        save_metrics({**metrics, "run_id": self.result.run_id}, self.result.metrics_file)
        kio.write_table(records, out_dir / "forecast_records")
        self.result.metrics = metrics
        self.report()
        return metrics

    # ------------------------------------------------------------------ step 6: backtest
    def backtest(self) -> dict:
        """Top-k backtest of the forecast signals (last/mean/max/min) over ``backtest_time_range``."""
        from kronos.evaluate.backtest import run_backtests
        from kronos.evaluate.metrics import signals_from_records

        cfg = self.config
        records = self.forecast_records()
        start, end = pd.Timestamp(cfg.backtest_time_range[0]), _range_end(cfg.backtest_time_range[1])
        records = records.loc[(records["datetime"] >= start) & (records["datetime"] <= end)]
        if records.empty:
            raise DataError(
                f"no forecasts fall inside backtest_time_range {cfg.backtest_time_range}; "
                "set it inside the dataset's time span"
            )
        records = _daily_anchors(records)
        signals = {kind: signals_from_records(records, kind, scale=cfg.backtest_signal_scale)
                   for kind in ("last", "mean", "max", "min")}
        out_dir = Path(cfg.backtest_dir) / "backtest"
        if cfg.data_source == "qlib":
            reports = run_backtests(signals, cfg, out_dir=out_dir, engine="qlib")
        else:
            close = self.full_frame().pivot_table(index="timestamps", columns="symbol", values="close")
            close = close.groupby(close.index.normalize()).last()
            reports = run_backtests(signals, cfg, out_dir=out_dir, engine="simple", close=close)
        self.result.backtest_dir = str(out_dir)
        self.result.backtest_summary = {k: r.summary for k, r in reports.items()}
        return self.result.backtest_summary

    # ------------------------------------------------------------------ everything
    def run(self, *args: Any, **kwargs: Any) -> PipelineResult:
        """Every step (see :meth:`_run` for the skip flags); under ``torchrun`` from Python it sets up, and tears
        down, its own process group when none exists."""
        from kronos.train.distributed import process_group

        with process_group(self.config):
            return self._locked_run(*args, **kwargs)

    def _locked_run(self, skip_data: bool = False, skip_tokenizer: bool = False, skip_predictor: bool = False,
                    skip_predict: bool = False, skip_backtest: bool = False) -> PipelineResult:
        """Run the steps; one run per output folder at a time (see :mod:`kronos.runlock`)."""
        from kronos.runlock import is_rank_zero, run_locks

        cfg = self.config
        kwargs = dict(skip_data=skip_data, skip_tokenizer=skip_tokenizer, skip_predictor=skip_predictor,
                      skip_predict=skip_predict, skip_backtest=skip_backtest)
        if not is_rank_zero():
            return self._run(**kwargs)
        with run_locks([cfg.save_path, cfg.backtest_dir], whole=[] if skip_data else [cfg.dataset_path]):
            return self._run(**kwargs)

    def _run(self, skip_data: bool = False, skip_tokenizer: bool = False, skip_predictor: bool = False,
             skip_predict: bool = False, skip_backtest: bool = False) -> PipelineResult:
        cfg = self.config
        timings = self.result.seconds

        def step(name: str, fn: Callable[[], Any], main_only: bool) -> None:
            t0 = time.time()
            if not main_only or is_main_process():
                log.info("==== %s ====", name)
                fn()
            barrier()
            timings[name] = round(time.time() - t0, 2)

        if is_main_process():
            from kronos.runlock import RUN_ID

            cfg.save(Path(cfg.save_path) / "pipeline_config.json")  # inside the outputs, never beside them
            # a run killed later leaves status 'running' under its own id: its results are never taken for finished
            self.result.run_id, self.result.status = RUN_ID, "running"
            kio.write_json(Path(cfg.backtest_dir) / "pipeline_result.json", self.result)
        if skip_data:
            self.require_dataset()
        else:
            step("data", self.process_data, main_only=True)
        if skip_tokenizer:
            self.require_checkpoint(cfg.finetuned_tokenizer, "tokenizer", "--skip-tokenizer")
        else:
            step("tokenizer", self.train_tokenizer, main_only=False)
            self._plot_curves(cfg.tokenizer_dir)
        if skip_predictor:
            self.require_checkpoint(cfg.finetuned_predictor, "predictor", "--skip-predictor")
        else:
            step("predictor", self.train_predictor, main_only=False)
            self._plot_curves(cfg.predictor_dir)
            if not skip_predict:  # skipped with the predictor: a reused predictor keeps its calibration.json
                step("calibrate", self._calibrate_step, main_only=True)
        if not skip_predict:
            step("predict", self.predict, main_only=True)
            step("evaluate", self.evaluate, main_only=True)
            if not skip_backtest:
                step("backtest", self.backtest, main_only=True)
        self.result.tokenizer_path = cfg.finetuned_tokenizer
        self.result.predictor_path = cfg.finetuned_predictor
        if is_main_process():
            self.result.status = "finished"
            kio.write_json(Path(cfg.backtest_dir) / "pipeline_result.json", self.result)
        return self.result

    # ------------------------------------------------------------------ calibration and the walk-forward report
    def calibrate(self) -> dict:
        """Fit the band/P(up) calibration on validation anchors; writes ``calibration.json`` beside best_model."""
        from kronos.evaluate.calibration import calibrate_on_validation, calibration_path
        from kronos.evaluate.report import split_bounds

        cfg = self.config
        path = calibration_path(cfg.finetuned_predictor)
        cal = calibrate_on_validation(cfg, self.load_predictor(), self.full_frame(), split_bounds(cfg.dataset_path),
                                      out_path=path)
        self.result.calibration_file = str(path)
        return cal.to_dict()

    def _calibrate_step(self) -> None:
        """The pipeline's calibrate step: too few validation anchors leave the bands uncalibrated (logged)."""
        from kronos.errors import InputError

        try:
            self.calibrate()
        except InputError as exc:
            log.warning("calibration skipped: %s", exc)

    def load_calibration(self):
        """The finetuned predictor's ``calibration.json`` when present and fitted for it (else None, logged)."""
        from kronos.evaluate.calibration import Calibration, calibration_path

        cfg = self.config
        path = calibration_path(cfg.finetuned_predictor)
        if not path.is_file():
            log.info("no calibration at %s (run `kronos calibrate`): bands are reported uncalibrated", path)
            return None
        try:
            cal = Calibration.load(path).check(self.load_predictor(), cfg.lookback_window, cfg.predict_window,
                                               source=f"calibration file '{path}'")
        except KronosError as exc:
            log.warning("%s; bands are reported uncalibrated", exc)
            return None
        self.result.calibration_file = str(path)
        return cal

    def report(self) -> dict:
        """Walk-forward report on the test split: finetuned (and zero-shot) model beside the baselines."""
        from kronos.evaluate.report import build_report, split_bounds

        cfg = self.config
        models = {"finetuned": self.load_predictor()}
        skipped = {}
        if cfg.pretrained_predictor_path and cfg.pretrained_tokenizer_path:
            from kronos.inference import KronosPredictor

            try:
                device = None if cfg.device == "auto" else cfg.device
                models["zero_shot"] = KronosPredictor.from_pretrained(
                    cfg.pretrained_tokenizer_path, cfg.pretrained_predictor_path, device=device,
                    max_context=cfg.max_context, clip=cfg.clip)
            except (KronosError, OSError) as exc:
                skipped["zero_shot"] = f"pretrained model not loadable: {exc}"
                log.warning("zero-shot model left out of the report: %s", exc)
        report = build_report(cfg, self.full_frame(), split_bounds(cfg.dataset_path), models, cfg.backtest_dir,
                              calibration=self.load_calibration(), skipped=skipped)
        self.result.report_file = report["files"]["json"]
        self.result.report_headline = report["headline"]
        self.result.plots.extend(report["files"]["plots"])
        log.info("walk-forward report: %s", report["files"]["markdown"])
        return report

    def _plot_curves(self, stage_dir: str) -> None:
        if not is_main_process():
            return
        path = Path(stage_dir) / "metrics.jsonl"
        if path.is_file():
            from kronos.evaluate.plots import plot_training_curves

            out = Path(stage_dir) / "training_curves.png"
            plot_training_curves(path, out)
            self.result.plots.append(str(out))


# ---------------------------------------------------------------------- helpers
def _range_end(value: str) -> pd.Timestamp:
    """A range end given as a date includes that whole day."""
    ts = pd.Timestamp(value)
    return ts + pd.Timedelta(days=1) - pd.Timedelta(1, unit="ns") if ts == ts.normalize() else ts


def _daily_anchors(records: pd.DataFrame) -> pd.DataFrame:
    """Keep one anchor per symbol and day (the last), so intraday forecasts drive a daily backtest."""
    day = records["datetime"].dt.normalize()
    last = records.assign(_day=day).groupby(["symbol", "_day"])["datetime"].transform("max")
    out = records.loc[records["datetime"] == last].copy()
    out["datetime"] = out["datetime"].dt.normalize()
    return out


__all__ = ["KronosPipeline", "PipelineResult"]
