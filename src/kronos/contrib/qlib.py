"""Kronos inside Qlib's workflow (``qrun``): a data handler of raw daily bars and a Qlib model.

Needs pyqlib (``pip install 'kronos-kline[qlib]'``). Both classes are named in a ``qrun`` YAML by
``module_path: kronos.contrib.qlib`` (see ``examples/qlib/workflow_config_kronos.yaml``):

- :class:`KronosBarHandler` serves the bars the model reads, as the package's Qlib source reads them
  (:mod:`kronos.data.sources.qlib`): ``$open $high $low $close $volume`` (Qlib's adjusted prices) and ``$amount``
  when every stock of the pool has that field, else mean(OHLC) x volume; no Alpha158 features, no normalisation.
  Its label is Qlib's usual next-day return ``Ref($close, -2)/Ref($close, -1) - 1`` (read by ``SigAnaRecord``
  only; the model never reads labels).
- :class:`KronosModel` (a ``qlib.model.base.ModelFT``): ``fit(dataset)`` finetunes the tokenizer and the
  predictor on the ``train`` segment, picking (and early stopping) on the ``valid`` segment, with this package's
  trainer and :class:`~kronos.config.Config` keys; ``predict(dataset, segment)`` forecasts at every trading day of
  the segment from the bars up to that day and returns one score per ``(datetime, instrument)``.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kronos.config import Config, apply_fast_mode
from kronos.data.processing import add_time_features, clean_kline_frame
from kronos.data.schema import KLINE_COLUMNS, VALUE_COLUMNS
from kronos.data.sources.qlib import import_qlib
from kronos.data.windows import WindowDataset
from kronos.errors import ConfigError, DataError, InputError
from kronos.evaluate.signals import SIGNAL_KINDS, signals_from_records
from kronos.inference import KronosPredictor
from kronos.inference.generate import SamplingConfig
from kronos.runlock import run_locks
from kronos.timeutil import future_timestamps, resolve_calendar
from kronos.train.distributed import deterministic_cpu, process_group
from kronos.train.stages import get_stage
from kronos.train.trainer import Trainer, keep_pretrained_tokenizer

import_qlib()  # one-line DependencyError with the install command when pyqlib is missing

from qlib.data import D  # noqa: E402
from qlib.data.dataset.handler import DataHandlerLP  # noqa: E402
from qlib.model.base import ModelFT  # noqa: E402

logger = logging.getLogger(__name__)

BAR_COLUMNS: tuple[str, ...] = VALUE_COLUMNS  # open high low close volume amount
DEFAULT_LABEL = (["Ref($close, -2)/Ref($close, -1) - 1"], ["LABEL0"])
DERIVED_AMOUNT = "($open + $high + $low + $close) / 4 * $volume"  # kronos.data.schema.derive_amount in Qlib terms
AMOUNT_CHOICES = ("auto", "field", "derived")
SIGNALS = ("return", *SIGNAL_KINDS, "p_up")
DEFAULT_PATIENCE = 2  # early stopping on `valid` when the keys do not set `patience`


# ---------------------------------------------------------------------------------------------- the data handler
def _provider_folder(freq: str) -> Path | None:
    try:
        from qlib.config import C

        return Path(str(C.dpm.get_data_uri(freq))).expanduser()
    except Exception:  # Qlib not initialised or another layout: fall back to the derived amount
        return None


def has_amount_field(instruments: Any, start_time: Any = None, end_time: Any = None, freq: str = "day") -> bool:
    """Whether every stock of ``instruments`` (a pool name, a Qlib instruments config or a list) has ``$amount``."""
    folder = _provider_folder(freq)
    if folder is None:
        return False
    pool = D.instruments(instruments) if isinstance(instruments, str) else instruments
    if isinstance(pool, dict):
        symbols = D.list_instruments(pool, start_time=start_time, end_time=end_time, as_list=True)
    else:
        symbols = list(pool)
    features = folder / "features"
    return bool(symbols) and all((features / str(s).lower() / f"amount.{freq}.bin").is_file() for s in symbols)


def bar_fields(amount: str = "auto", instruments: Any = "csi300", start_time: Any = None, end_time: Any = None,
               freq: str = "day") -> tuple[list[str], list[str]]:  # fmt: skip
    """Qlib expressions and column names of the six bars: ``amount`` ``field`` reads ``$amount``, ``derived`` takes
    mean(OHLC) x volume, ``auto`` the field when every stock of the pool has it (the package's Qlib source rule)."""
    if amount not in AMOUNT_CHOICES:
        raise ConfigError(f"KronosBarHandler amount must be one of {list(AMOUNT_CHOICES)}, got {amount!r}")
    use_field = amount == "field" or (amount == "auto" and has_amount_field(instruments, start_time, end_time, freq))
    fields = ["$open", "$high", "$low", "$close", "$volume", "$amount" if use_field else DERIVED_AMOUNT]
    return fields, list(BAR_COLUMNS)


class KronosBarHandler(DataHandlerLP):
    """Raw daily bars of a Qlib pool for :class:`KronosModel`: feature columns ``open high low close volume amount``
    (no processors: the model normalises each window itself), label ``LABEL0`` (next-day return) for Qlib's
    records. ``amount``: ``auto`` | ``field`` | ``derived`` (see :func:`bar_fields`)."""

    def __init__(
        self,
        instruments: Any = "csi300",
        start_time: Any = None,
        end_time: Any = None,
        freq: str = "day",
        amount: str = "auto",
        label: Any = None,
        infer_processors: list | None = None,
        learn_processors: list | None = None,
        filter_pipe: Any = None,
        inst_processors: Any = None,
        **kwargs: Any,
    ) -> None:
        fields, names = bar_fields(amount, instruments, start_time, end_time, freq)
        data_loader = {
            "class": "QlibDataLoader",
            "kwargs": {
                "config": {"feature": (fields, names), "label": label or DEFAULT_LABEL},
                "filter_pipe": filter_pipe,
                "freq": freq,
                "inst_processors": inst_processors,
            },
        }
        kwargs.pop("fit_start_time", None)  # accepted (configs copied from Alpha158 have them): nothing is fitted
        kwargs.pop("fit_end_time", None)
        super().__init__(
            instruments=instruments,
            start_time=start_time,
            end_time=end_time,
            data_loader=data_loader,
            infer_processors=infer_processors or [],
            learn_processors=learn_processors or [],
            **kwargs,
        )


# ---------------------------------------------------------------------------------------------- dataset helpers
def segment_bounds(dataset: Any, segment: str) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
    """``(start, end)`` of a segment of a Qlib ``DatasetH`` (``None`` = open end)."""
    segments = getattr(dataset, "segments", None)
    if not isinstance(segments, Mapping) or segment not in segments:
        known = list(segments) if isinstance(segments, Mapping) else []
        raise InputError(f"the dataset has no segment '{segment}'; its segments are {known}")
    seg = segments[segment]
    if isinstance(seg, slice):
        seg = (seg.start, seg.stop)
    try:
        start, end = seg
    except (TypeError, ValueError):
        raise InputError(f"segment '{segment}' must be [start, end], got {seg!r}") from None
    return (None if start is None else pd.Timestamp(start)), (None if end is None else pd.Timestamp(end))


def dataset_bars(dataset: Any, end: pd.Timestamp | None = None) -> dict[str, pd.DataFrame]:
    """``{instrument: raw bars}`` (canonical columns) of the dataset's handler from its first day up to ``end``."""
    handler = getattr(dataset, "handler", None)
    if handler is None:
        raise InputError(f"KronosModel needs a Qlib DatasetH with a handler, got {type(dataset).__name__}")
    data = handler.fetch(slice(None, end), col_set="feature", data_key=DataHandlerLP.DK_I)
    if isinstance(data.columns, pd.MultiIndex):
        data.columns = data.columns.get_level_values(-1)
    missing = [c for c in BAR_COLUMNS if c not in data.columns]
    if missing:
        raise InputError(
            f"the dataset's handler has no feature column(s) {missing}; use kronos.contrib.qlib.KronosBarHandler"
        )
    data = data[list(BAR_COLUMNS)].astype("float64")
    levels = list(data.index.names)
    if "datetime" not in levels or "instrument" not in levels:
        raise InputError(f"the handler's index must have levels (datetime, instrument), got {levels}")
    flat = data.reset_index().rename(columns={"datetime": "timestamps"})
    return {
        str(symbol): part[list(KLINE_COLUMNS)].sort_values("timestamps").reset_index(drop=True)
        for symbol, part in flat.groupby("instrument", sort=True)
    }


def clean_bars(frames: Mapping[str, pd.DataFrame], config: Config, spikes: bool) -> dict[str, pd.DataFrame]:
    """Each symbol cleaned as the data step does (missing/impossible bars dropped) with calendar features added.

    ``spikes=False`` turns the price-spike check off: it compares each bar with the bars around it, later ones
    included, so forecasts must not use it (a bar after the forecast date would decide which bars it sees).
    """
    out = {}
    for symbol, raw in frames.items():
        frame, _ = clean_kline_frame(
            raw,
            symbol,
            spike_factor=config.price_spike_factor if spikes else 0.0,
            drop_spikes=config.price_spike_action == "drop",
        )
        if len(frame):
            out[symbol] = add_time_features(frame)
    return out


def _long(frames: Mapping[str, pd.DataFrame], lo: pd.Timestamp | None, hi: pd.Timestamp | None) -> pd.DataFrame:
    parts = []
    for symbol, f in frames.items():
        ts = f["timestamps"]
        keep = np.ones(len(f), bool)
        if lo is not None:
            keep &= (ts >= lo).to_numpy()
        if hi is not None:
            keep &= (ts <= hi).to_numpy()
        if keep.any():
            parts.append(f[keep].assign(symbol=symbol))
    if not parts:
        return pd.DataFrame(columns=["symbol", *KLINE_COLUMNS])
    return pd.concat(parts, ignore_index=True)


def training_windows(
    frames: Mapping[str, pd.DataFrame],
    config: Config,
    train: tuple[pd.Timestamp | None, pd.Timestamp | None],
    valid: tuple[pd.Timestamp | None, pd.Timestamp | None],
) -> tuple[WindowDataset, WindowDataset]:
    """Train and validation windows with the data step's split rules (:func:`kronos.data.processing.split_frames`):
    a training window lies inside ``train``; a validation window's target bars lie inside ``valid`` and after the
    last training bar, its lookback may reach back into training history."""
    kw = WindowDataset.config_options(config)
    train_frame = _long(frames, *train)
    if train_frame.empty:
        raise DataError(f"the dataset has no bars in the train segment {train}")
    first, last = train_frame["timestamps"].min(), train_frame["timestamps"].max()
    train_ds = WindowDataset(train_frame, name="train", target_range=(first, last), **kw)
    val_frame = _long(frames, None, valid[1])
    own = val_frame["timestamps"] > last
    if valid[0] is not None:
        own &= val_frame["timestamps"] >= valid[0]
    if not own.any():
        raise DataError(f"the dataset has no bars in the valid segment {valid} after the last training bar {last}")
    val_first, val_last = val_frame.loc[own, "timestamps"].min(), val_frame.loc[own, "timestamps"].max()
    val_ds = WindowDataset(val_frame, name="val", target_range=(val_first, val_last), **kw)
    logger.info(
        "kronos qlib fit: %d training windows (%s .. %s), %d validation windows (%s .. %s)",
        len(train_ds),
        first.date(),
        last.date(),
        len(val_ds),
        val_first.date(),
        val_last.date(),
    )
    return train_ds, val_ds


# ---------------------------------------------------------------------------------------------- training
def _train_stage(name: str, config: Config, datasets: tuple[WindowDataset, WindowDataset]) -> dict:
    """One stage through the package's :class:`~kronos.train.trainer.Trainer` (as :func:`~kronos.train.run_stage`,
    on windows built here instead of a saved dataset)."""
    stage = get_stage(name, config)
    with process_group(config) as ctx, run_locks([config.save_path]):
        with deterministic_cpu(ctx.device.type == "cpu"):
            trainer = Trainer(stage, config, ctx)
            trainer.setup(datasets=datasets)
            return trainer.fit()


def finetune_pair(config: Config, train_ds: WindowDataset, val_ds: WindowDataset) -> dict[str, dict]:
    """Tokenizer stage (or the pretrained tokenizer kept: ``finetune_tokenizer: false``) then predictor stage,
    starting from ``pretrained_*_path``; checkpoints under ``save_path``. Returns both stages' summaries."""
    datasets = (train_ds, val_ds)
    if config.finetune_tokenizer:
        tokenizer = _train_stage("tokenizer", config, datasets)
    else:
        tokenizer = keep_pretrained_tokenizer(config)
    predictor = _train_stage("predictor", config, datasets)
    return {"tokenizer": tokenizer, "predictor": predictor}


def starter_folder() -> Path:
    """``examples/models/starter`` of this checkout (the default starting pair)."""
    return Path(__file__).resolve().parents[3] / "examples" / "models" / "starter"


def model_config(config: str | os.PathLike | Mapping | None = None, keys: Mapping[str, Any] | None = None,
                 fast: bool = False) -> Config:  # fmt: skip
    """The :class:`Config` of a :class:`KronosModel`: a config file (or mapping), then ``keys`` on top.

    Unset pretrained paths default to the starter pair; an unset ``save_path`` to a new folder under
    ``./outputs/qlib_kronos/``; an unset ``patience`` to :data:`DEFAULT_PATIENCE`. ``fast`` applies
    :func:`~kronos.config.apply_fast_mode` (keys you set are kept).
    """
    if config is None:
        cfg = Config()
    elif isinstance(config, Mapping):
        cfg = Config.from_dict(dict(config), source="KronosModel config")
    else:
        cfg = Config.from_file(config)
    keys = dict(keys or {})
    cfg.update(keys, source="KronosModel kwargs")
    defaults: dict[str, Any] = {}
    for key, sub in (("pretrained_tokenizer_path", "tokenizer"), ("pretrained_predictor_path", "predictor")):
        if not cfg.is_set(key):
            folder = starter_folder() / sub
            if not folder.is_dir():
                raise ConfigError(f"the starter pair is not at '{folder.parent}'; set {key} in the model kwargs")
            defaults[key] = str(folder)
    if not cfg.is_set("save_path"):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        defaults["save_path"] = str(Path("outputs", "qlib_kronos", f"{stamp}-{os.getpid()}").resolve())
    if not cfg.is_set("patience"):
        defaults["patience"] = DEFAULT_PATIENCE
    cfg.update(defaults, source="KronosModel defaults", user=False)
    if fast:
        apply_fast_mode(cfg, explicit={k for k in cfg.keys() if cfg.is_set(k)})
    return cfg


# ---------------------------------------------------------------------------------------------- the model
def _flag(value: Any, name: str) -> bool:
    """A yes/no kwarg; qrun's templated YAML may hand it over as text (``"false"``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off", ""):
        return False
    raise ConfigError(f"KronosModel {name} must be true or false, got {value!r}")


class KronosModel(ModelFT):
    """Kronos as a Qlib model.

    Keyword arguments: any :class:`~kronos.config.Config` key (``lookback_window``, ``predict_window``, ``epochs``,
    ``finetune_mode``, ``inference_sample_count``, ``device``, ...) and

    - ``config``: a config file (JSON/YAML) or mapping read first (the kwargs win);
    - ``fit``: ``false`` skips finetuning (zero-shot: the pretrained pair forecasts);
    - ``fast``: the CLI's ``--fast-mode`` caps (a couple of minutes on a CPU);
    - ``signal``: the score of each (date, instrument): ``return`` (default: forecast close at the horizon / last
      close - 1), ``last``/``mean``/``max``/``min`` (the official ``qlib_test.py`` signals: that statistic of the
      forecast close path minus the last close, divided by ``signal_scale``: ``std`` = the lookback's close std as
      the official script, ``price`` = the last close) or ``p_up`` (share of sample paths ending above the last
      close);
    - ``signal_scale``: ``std`` | ``price`` (default: the ``backtest_signal_scale`` key).

    Finetuned checkpoints go to ``save_path`` (default ``./outputs/qlib_kronos/<time>-<pid>/``). With
    ``keep_better`` (default) the starting pair is kept when the finetuned predictor's validation loss is no better
    than the starting predictor's.
    """

    def __init__(
        self,
        config: str | os.PathLike | Mapping | None = None,
        fit: bool = True,
        fast: bool = False,
        signal: str = "return",
        signal_scale: str | None = None,
        **keys: Any,
    ) -> None:
        self.kronos_config = model_config(config, keys, fast=_flag(fast, "fast"))
        if signal not in SIGNALS:
            raise ConfigError(f"KronosModel signal must be one of {list(SIGNALS)}, got {signal!r}")
        scale = signal_scale or self.kronos_config.backtest_signal_scale
        if scale not in ("std", "price"):
            raise ConfigError(f"KronosModel signal_scale must be 'std' or 'price', got {scale!r}")
        self.do_fit = _flag(fit, "fit")
        self.signal = signal
        self.signal_scale = scale
        self.tokenizer_path = self.kronos_config.pretrained_tokenizer_path
        self.predictor_path = self.kronos_config.pretrained_predictor_path
        self.model_in_use = "pretrained"
        self.fit_summary: dict[str, Any] = {}
        # qlib's recorder pickles the model (params.pkl) without "_" attributes: the checkpoint paths, not the modules
        self._predictor: KronosPredictor | None = None

    # -------------------------------------------------------------------------------------------- training
    def fit(self, dataset: Any, reweighter: Any = None, **kwargs: Any) -> KronosModel:
        """Finetune on the ``train`` segment, choosing the checkpoint (and stopping early) on ``valid``."""
        if reweighter is not None:
            raise InputError("KronosModel does not support a reweighter")
        if not self.do_fit:
            logger.info("kronos qlib: fit skipped (fit: false); forecasting with %s", self.predictor_path)
            return self
        self._finetune(dataset, self.kronos_config)
        return self

    def finetune(self, dataset: Any) -> KronosModel:
        """Continue finetuning from the current pair (the finetuned one after :meth:`fit`) into a new folder."""
        cfg = copy.deepcopy(self.kronos_config)
        cfg.update(
            {
                "pretrained_tokenizer_path": self.tokenizer_path,
                "pretrained_predictor_path": self.predictor_path,
                "save_path": str(Path(cfg.save_path) / f"finetune-{time.strftime('%Y%m%d-%H%M%S')}"),
            },
            source="KronosModel.finetune",
        )
        self._finetune(dataset, cfg)
        return self

    def _finetune(self, dataset: Any, cfg: Config) -> None:
        train = segment_bounds(dataset, "train")
        valid = segment_bounds(dataset, "valid")
        if train[1] is None or valid[1] is None:
            raise InputError("the train and valid segments need end dates")
        frames = clean_bars(dataset_bars(dataset, end=valid[1]), cfg, spikes=True)
        if not frames:
            raise DataError("the dataset's handler served no clean bars for the train and valid segments")
        train_ds, val_ds = training_windows(frames, cfg, train, valid)
        summaries = finetune_pair(cfg, train_ds, val_ds)
        pred = summaries["predictor"]
        start, best = pred.get("start_val_loss"), pred.get("best_val_loss")
        self.fit_summary = {
            "tokenizer": {k: summaries["tokenizer"].get(k) for k in ("best_val_loss", "epochs_run", "stopped_early")},
            "predictor": {
                k: pred.get(k) for k in ("start_val_loss", "best_val_loss", "best_epoch", "epochs_run", "stopped_early")
            },
            "save_path": cfg.save_path,
        }
        keep_start = best is None or (cfg.keep_better and start is not None and not best < start)
        if keep_start:
            self.tokenizer_path = cfg.pretrained_tokenizer_path
            self.predictor_path = cfg.pretrained_predictor_path
            self.model_in_use = "pretrained"
            logger.info(
                "kronos qlib: finetuning did not lower the validation loss (%s -> %s); keeping the starting pair "
                "(keep_better)",
                start,
                best,
            )
        else:
            self.tokenizer_path = cfg.finetuned_tokenizer
            self.predictor_path = cfg.finetuned_predictor
            self.model_in_use = "finetuned"
            logger.info("kronos qlib: finetuned pair in %s (validation loss %s -> %s)", cfg.save_path, start, best)
        self.fit_summary["model_in_use"] = self.model_in_use
        self._predictor = None

    # -------------------------------------------------------------------------------------------- forecasting
    def predictor(self) -> KronosPredictor:
        """The pair in use as a :class:`~kronos.inference.KronosPredictor` (loaded once)."""
        if getattr(self, "_predictor", None) is None:
            device = None if self.kronos_config.device == "auto" else self.kronos_config.device
            self._predictor = KronosPredictor.from_pretrained(
                self.tokenizer_path, self.predictor_path, device=device, max_context=self.kronos_config.max_context
            )
        assert self._predictor is not None
        return self._predictor

    def predict(self, dataset: Any, segment: str | slice = "test") -> pd.Series:
        """One score per (datetime, instrument) over ``segment``: at each trading day, from each stock's last
        ``lookback_window`` bars up to and including that day (nothing later; the forecast dates come from the
        trading calendar), the ``predict_window``-bar forecast summarised by ``signal``."""
        if isinstance(segment, slice):
            start = None if segment.start is None else pd.Timestamp(segment.start)
            end = None if segment.stop is None else pd.Timestamp(segment.stop)
        else:
            start, end = segment_bounds(dataset, segment)
        frames = clean_bars(dataset_bars(dataset, end=end), self.kronos_config, spikes=False)
        return forecast_scores(self.predictor(), frames, self.kronos_config, start, end, self.signal, self.signal_scale)


def _trading_days() -> pd.DatetimeIndex:
    return pd.DatetimeIndex(D.calendar(freq="day"))


def forecast_scores(
    predictor: KronosPredictor,
    frames: Mapping[str, pd.DataFrame],
    config: Config,
    start: pd.Timestamp | None,
    end: pd.Timestamp | None,
    signal: str = "return",
    signal_scale: str = "std",
    calendar: pd.DatetimeIndex | None = None,
) -> pd.Series:
    """Scores of :meth:`KronosModel.predict` (one ``predict_df`` call per trading day, so a forecast depends on
    that day's contexts alone: the same bars always give the same score)."""
    lookback, horizon = config.lookback_window, config.predict_window
    days = _trading_days() if calendar is None else pd.DatetimeIndex(calendar)
    series = {}
    for symbol, f in frames.items():
        series[symbol] = (f["timestamps"].to_numpy(dtype="datetime64[ns]"), f[list(BAR_COLUMNS)].to_numpy(np.float64))
    all_ts = np.unique(np.concatenate([ts for ts, _ in series.values()])) if series else np.array([], "datetime64[ns]")
    dates = pd.DatetimeIndex(all_ts)
    if start is not None:
        dates = dates[dates >= start]
    if end is not None:
        dates = dates[dates <= end]
    sampling = SamplingConfig.from_config(config)
    exchange = resolve_calendar(config.trading_calendar, "qlib")
    out: list[pd.Series] = []
    t0 = time.perf_counter()
    for n, day in enumerate(dates):
        d64 = np.datetime64(day, "ns")
        parts = []
        for symbol, (ts, values) in series.items():
            pos = int(np.searchsorted(ts, d64, side="right")) - 1
            if pos < lookback - 1 or ts[pos] != d64:  # no bar that day (suspended, not a member) or too little history
                continue
            rows = slice(pos + 1 - lookback, pos + 1)
            part = pd.DataFrame(values[rows], columns=list(BAR_COLUMNS))
            part.insert(0, "timestamps", ts[rows])
            part.insert(0, "symbol", symbol)
            parts.append(part)
        if not parts:
            continue
        future = days[days > day][:horizon]
        if len(future) < horizon:
            history = days[days <= day].append(future)
            future = future.append(future_timestamps(history, horizon - len(future), calendar=exchange))
        records = predictor.predict_df(
            pd.concat(parts, ignore_index=True),
            pred_len=horizon,
            lookback=lookback,
            future_timestamps=future,
            sampling=sampling,
            batch_size=max(1, int(config.backtest_batch_size)),
            progress=False,
        )
        out.append(_score(records, signal, signal_scale, horizon))
        if (n + 1) % 50 == 0:
            logger.info("kronos qlib: forecast %d of %d days (%.0f s)", n + 1, len(dates), time.perf_counter() - t0)
    if not out:
        raise DataError(
            f"no stock has {lookback} bars (lookback_window) up to any day of {start} .. {end}; start the handler "
            "earlier or lower lookback_window"
        )
    score = pd.concat(out).sort_index()
    score.name = "score"
    return score


def _score(records: pd.DataFrame, signal: str, scale: str, horizon: int) -> pd.Series:
    if signal == "p_up":
        last = records[records["step"] == horizon]
        score = pd.Series(
            last["p_up"].to_numpy(dtype=float),
            index=pd.MultiIndex.from_arrays(
                [pd.DatetimeIndex(last["anchor"]), last["symbol"].astype(str)], names=["datetime", "instrument"]
            ),
        )
        return score.dropna()
    if signal == "return":
        return signals_from_records(records, "last", scale="price")
    return signals_from_records(records, signal, scale=scale)


__all__ = [
    "DEFAULT_LABEL",
    "KronosBarHandler",
    "KronosModel",
    "SIGNALS",
    "bar_fields",
    "clean_bars",
    "dataset_bars",
    "finetune_pair",
    "forecast_scores",
    "model_config",
    "segment_bounds",
    "training_windows",
]
