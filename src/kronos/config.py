"""One typed configuration object for every step of the pipeline.

``Config()`` carries the official fine-tuning script's flat keys and defaults (``finetune/config.py`` of the
seed) plus this project's own keys. A JSON or YAML file may override any subset of them; unknown keys and
wrong types are rejected with a message that names the key and suggests the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import difflib
import functools
import json
import logging
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from kronos import io as kio
from kronos.errors import ConfigError
from kronos.paths import safe_filename

logger = logging.getLogger(__name__)

# Benchmarks the official config picks for the usual Qlib instrument pools.
BENCHMARKS = {
    "csi300": "SH000300",
    "csi500": "SH000905",
    "csi800": "SH000906",
    "csi1000": "SH000852",
}


# Keys holding file-system paths (resolved relative to a config file's folder); the HUB_KEYS may also be hub ids.
PATH_KEYS = (
    "qlib_data_path",
    "dataset_path",
    "csv_data_path",
    "sina_cache_dir",
    "ccxt_cache_dir",
    "save_path",
    "backtest_result_path",
    "pretrained_tokenizer_path",
    "pretrained_predictor_path",
    "finetuned_tokenizer_path",
    "finetuned_predictor_path",
)
HUB_KEYS = ("pretrained_tokenizer_path", "pretrained_predictor_path")


@dataclass
class Config:
    """All settings of data processing, training, prediction and backtest.

    Derived paths (``finetuned_tokenizer_path``, ``finetuned_predictor_path``, ``backtest_benchmark``) follow
    ``save_path``/folder names/``instrument`` unless set explicitly (a non-empty value).
    """

    # ---- data & features (seed) ----
    qlib_data_path: str = "~/.qlib/qlib_data/cn_data"
    instrument: str = "csi300"
    dataset_begin_time: str = "2011-01-01"
    dataset_end_time: str = "2025-06-05"
    lookback_window: int = 90
    predict_window: int = 10
    max_context: int = 512
    feature_list: list = field(default_factory=lambda: ["open", "high", "low", "close", "vol", "amt"])
    time_feature_list: list = field(default_factory=lambda: ["minute", "hour", "weekday", "day", "month"])
    train_time_range: list = field(default_factory=lambda: ["2011-01-01", "2022-12-31"])
    val_time_range: list = field(default_factory=lambda: ["2022-09-01", "2024-06-30"])
    test_time_range: list = field(default_factory=lambda: ["2024-04-01", "2025-06-05"])
    backtest_time_range: list = field(default_factory=lambda: ["2024-07-01", "2025-06-05"])
    dataset_path: str = "./data/processed_datasets"

    # ---- data sources (ours) ----
    data_source: str = "qlib"  # qlib | sina | csv | ccxt | a registered custom name
    split_ratios: list | None = None  # e.g. [0.7, 0.15, 0.15]; used instead of the time ranges when set
    csv_data_path: str = ""
    csv_symbol_column: str = ""  # long file: column holding the symbol (auto-detected when empty)
    csv_timestamp_column: str = ""  # auto-detected when empty
    # none: prices as in the files | adj_close: scale open/high/low/close by "Adj Close" / "Close" row by row
    # (Yahoo-style exports; a file without an "Adj Close" column is an error)
    adjust: str = "none"
    # a bar whose open/high/low/close is more than this many times (or less than 1/this) the median close of the
    # 21 bars around it is a spike (a vendor error such as 1e12); 0 turns the check off
    price_spike_factor: float = 10.0
    price_spike_action: str = "drop"  # drop | keep (spikes are always counted and logged)
    # the data step reads, cleans and writes this many symbols at a time (peak memory follows the chunk, not the
    # market); under torchrun the ranks share the chunks. The dataset is the same for every chunk size.
    data_chunk_symbols: int = 300
    sina_symbols: list = field(default_factory=lambda: ["sh600000"])
    sina_scale: int = 240  # 5/15/30/60 minutes or 240 (daily)
    sina_datalen: int = 1023
    sina_base_url: str = "https://quotes.sina.cn/cn/api/jsonp_v2.php/=/CN_MarketDataService.getKLineData"
    sina_timeout: float = 10.0
    sina_retries: int = 3
    sina_pause: float = 0.5
    sina_cache_dir: str = ""  # defaults to <dataset_path>/raw_sina
    # crypto exchanges through ccxt (pip install 'kronos[crypto]'); public OHLCV, no API key
    ccxt_exchange: str = "binance"  # any ccxt exchange id (ccxt.exchanges): binance, okx, bybit, kraken, ...
    ccxt_symbols: list = field(default_factory=lambda: ["BTC/USDT"])  # ccxt unified symbols
    ccxt_timeframe: str = "1h"  # one of the exchange's timeframes (1m, 5m, 15m, 1h, 4h, 1d, ...)
    ccxt_since: str = "2024-01-01"  # first bar (UTC, inclusive)
    ccxt_until: str = ""  # end (UTC, exclusive); empty: now (the bar still forming is left out)
    ccxt_limit: int = 0  # bars per request; 0: the exchange's maximum (binance 1000)
    ccxt_api_url: str = ""  # scheme://host[:port][/prefix] replacing the host of every API URL (proxy, test server)
    ccxt_timeout: float = 10.0
    ccxt_retries: int = 3
    ccxt_pause: float = 0.5
    ccxt_cache_dir: str = ""  # defaults to <dataset_path>/raw_ccxt

    # ---- training (seed) ----
    clip: float = 5.0
    epochs: int = 30
    log_interval: int = 100
    batch_size: int = 50
    n_train_iter: int = 2000 * 50
    n_val_iter: int = 400 * 50
    tokenizer_learning_rate: float = 2e-4
    predictor_learning_rate: float = 4e-5
    accumulation_steps: int = 1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_weight_decay: float = 0.1
    seed: int = 100

    # ---- training (ours) ----
    tokenizer_adam_beta2: float = 0.999  # the official tokenizer script uses AdamW's default betas
    tokenizer_grad_clip: float = 2.0
    predictor_grad_clip: float = 3.0
    pct_start: float = 0.03
    div_factor: float = 10.0
    teacher_forcing: bool = True  # False = the released scripts' sampled-sibling s2 conditioning (Q13)
    patience: int = 0  # early stopping after this many epochs without improvement; 0 = off
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = (
        "auto"  # auto (bf16 on GPUs of compute capability >= 8, fp16 older, else fp32) | fp32 | bf16 | fp16
    )
    compile: bool = False
    max_nonfinite_steps: int = 10  # stop after this many non-finite losses/gradients in a row (each step is skipped)
    dist_wait_hours: float = 48.0  # under torchrun, how long other ranks wait for rank-0-only steps (predict, evaluate)
    use_tensorboard: bool = False
    checkpoint_interval: int = 500  # also write checkpoints/last/ every N optimizer steps (0 = epoch ends only)
    cycle_momentum: bool = True  # OneCycleLR cycles Adam beta1 0.95<->0.85 (official, Q14); False keeps adam_beta1

    # ---- finetuning (ours; README "Finetuning the starter") ----
    finetune_tokenizer: bool = True  # false: the run keeps the pretrained tokenizer (copied into the run, not trained)
    finetune_mode: str = "full"  # predictor stage: full | freeze | lora (kronos.train.finetune)
    freeze_layers: int = 2  # freeze: embeddings + this many lowest Transformer blocks stay pretrained
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "w1", "w2", "w3"]
    )
    # after the predictor stage the starting and the finetuned model are scored on validation; when finetuning did
    # not help, the run's forecasts, calibration, report and service use the starting model
    keep_better: bool = True
    pretrained_data_end: str = ""  # last bar the pretrained model saw (its model_card.json's when empty)

    # ---- tracking (seed) ----
    use_comet: bool = False
    comet_config: dict = field(
        default_factory=lambda: {"api_key": "", "project_name": "kronos-finetune", "workspace": ""}
    )
    comet_tag: str = "finetune_demo"
    comet_name: str = "finetune_demo"

    # ---- models & paths (seed) ----
    save_path: str = "./outputs/models"
    tokenizer_save_folder_name: str = "finetune_tokenizer_demo"
    predictor_save_folder_name: str = "finetune_predictor_demo"
    backtest_save_folder_name: str = "finetune_backtest_demo"
    backtest_result_path: str = "./outputs/backtest_results"
    pretrained_tokenizer_path: str = "NeoQuasar/Kronos-Tokenizer-base"
    pretrained_predictor_path: str = "NeoQuasar/Kronos-small"
    finetuned_tokenizer_path: str = ""  # derived from save_path when empty
    finetuned_predictor_path: str = ""  # derived from save_path when empty
    tokenizer_preset: str = "base"  # used when pretrained_tokenizer_path is empty
    predictor_preset: str = "small"  # used when pretrained_predictor_path is empty

    # ---- prediction & backtest (seed) ----
    backtest_n_symbol_hold: int = 50
    backtest_n_symbol_drop: int = 5
    backtest_hold_thresh: int = 5
    inference_T: float = 0.6
    inference_top_p: float = 0.9
    inference_top_k: int = 0
    inference_sample_count: int = 32  # official 5; 32 paths keep q0.1/q0.9 from shrinking inward (README)
    backtest_batch_size: int = 1000
    backtest_benchmark: str = ""  # derived from instrument when empty

    # ---- prediction & evaluation (ours) ----
    quantiles: list = field(default_factory=lambda: [0.1, 0.5, 0.9])
    eval_stride: int = 1  # rolling evaluation/backtest forecasts every N bars
    eval_max_anchors: int = 0  # at most N anchor dates (0 = all), spread over the split: one rule for calibration,
    # the report and the backtest (kronos.evaluate.rolling); --fast-mode caps it
    eval_seeds: list = field(default_factory=list)  # walk-forward report sampling seeds (empty: [inference_seed])
    interval_levels: list = field(default_factory=lambda: [0.5, 0.8])  # central bands scored and calibrated
    calibration_method: str = "vol_scaled"  # band correction (kronos.evaluate.calibration; "auto" = hold-out choice)
    calibration_half_life: int = 60  # bars; adaptive bands: realised outcomes weigh half as much every N bars back
    # (kronos.inference.outcomes; 0 = the static validation fit only)
    calibration_min_forecasts: int = 600  # validation forecasts the calibration fit needs at least (more anchor
    # dates than eval_max_anchors when the symbols are few, as many as the validation split has at most)
    plot_n_symbols: int = 5
    inference_seed: int = 100
    # backtest costs and fills as the official qlib_test.py: buy 0.1%, sell 0.15%, min 5 yuan, fill at the open
    # (its `delay_execution` executor flag is ignored by pyqlib 0.9.x, so it has no counterpart here)
    backtest_open_cost: float = 0.001
    backtest_close_cost: float = 0.0015
    backtest_min_cost: float = 5.0
    backtest_account: float = 100_000_000.0
    backtest_deal_price: str = "open"  # open | close: fill price of both backtest engines
    backtest_signal_scale: str = "std"  # std: forecast change / lookback close std (official) | price: a return
    # Unsafe: let evaluation/backtest anchors target bars on or before the last validation bar (see README).
    allow_eval_overlap: bool = False
    # Future bar dates follow this exchange's trading calendar (exchange_calendars code, e.g. XSHG, XNYS);
    # auto: XSHG for the qlib and sina sources (A-shares), 24/7 for ccxt, business days for csv; none: business
    # days (every day when the history has weekend bars); 24/7: every calendar day.
    trading_calendar: str = "auto"

    # ---- runs (ours) ----
    # Each pipeline run writes under <common parent of save_path and backtest_result_path>/runs/<run_id>/, the
    # seed's layout inside it; runs/latest points at the newest finished run. false: write straight into the
    # seed's folders (every run overwrites the last).
    run_folders: bool = True
    run_id: str = ""  # empty: a new id per pipeline run (its start time); set it to continue or reuse a run

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.save_path, self.tokenizer_save_folder_name)

    @property
    def predictor_dir(self) -> str:
        return os.path.join(self.save_path, self.predictor_save_folder_name)

    @property
    def backtest_dir(self) -> str:
        return os.path.join(self.backtest_result_path, self.backtest_save_folder_name)

    def __getattribute__(self, name: str) -> Any:
        # As the official Config object: an empty derived key reads as its derived value
        # (config.finetuned_tokenizer_path is a path); explicit(key) and to_dict() keep what was set.
        value = object.__getattribute__(self, name)
        if name in _DERIVED_KEYS and value == "":  # one dict lookup for every other attribute
            return object.__getattribute__(self, _DERIVED_KEYS[name])
        return value

    def explicit(self, key: str) -> Any:
        """The value stored for ``key`` ("" for a derived key left to follow ``save_path``/``instrument``)."""
        return self.__dict__[key]

    @property
    def finetuned_tokenizer(self) -> str:
        """Where the finetuned tokenizer's best checkpoint lives (explicit value wins)."""
        return self.explicit("finetuned_tokenizer_path") or os.path.join(
            self.tokenizer_dir, "checkpoints", "best_model"
        )

    @property
    def finetuned_predictor(self) -> str:
        return self.explicit("finetuned_predictor_path") or os.path.join(
            self.predictor_dir, "checkpoints", "best_model"
        )

    @property
    def benchmark(self) -> str:
        return self.explicit("backtest_benchmark") or BENCHMARKS.get(self.instrument.lower(), "SH000300")

    @property
    def window(self) -> int:
        """Rows per training window: lookback + predict + 1."""
        return self.lookback_window + self.predict_window + 1

    # ------------------------------------------------------------------ views: the keys one component reads
    @property
    def eval(self) -> EvalSettings:
        """The evaluation keys (``eval_*``, quantiles, levels, windows) as one read-only value."""
        return EvalSettings(
            lookback=self.lookback_window,
            horizon=self.predict_window,
            stride=self.eval_stride,
            max_anchors=self.eval_max_anchors,
            seeds=tuple(self.eval_seeds or [self.inference_seed]),
            quantiles=tuple(float(q) for q in self.quantiles),
            levels=tuple(float(v) for v in self.interval_levels or [0.5, 0.8]),
            calibration_method=self.calibration_method,
            allow_overlap=self.allow_eval_overlap,
            half_life=self.calibration_half_life,
            min_calibration_forecasts=self.calibration_min_forecasts,
        )

    @property
    def backtest(self) -> BacktestSettings:
        """The top-k backtest keys (``backtest_*``) as one read-only value."""
        return BacktestSettings(
            n_symbol_hold=self.backtest_n_symbol_hold,
            n_symbol_drop=self.backtest_n_symbol_drop,
            hold_thresh=self.backtest_hold_thresh,
            open_cost=self.backtest_open_cost,
            close_cost=self.backtest_close_cost,
            min_cost=self.backtest_min_cost,
            account=self.backtest_account,
            deal_price=self.backtest_deal_price,
            signal_scale=self.backtest_signal_scale,
            benchmark=self.benchmark,
            time_range=tuple(self.backtest_time_range),
        )

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Coerce every key to its type, then check it against :data:`RULES` and :data:`CROSS_RULES`."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, self.__dict__[f.name], _field_type(f)))
        for key, rules in RULES.items():
            value = getattr(self, key)
            for rule in rules:
                if not rule.check(value):
                    raise ConfigError(f"config key '{key}' {rule.message}, got {value!r}")
        for cross in CROSS_RULES:
            if not cross.check(self):
                raise ConfigError(cross.message(self))

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """All keys as plain values; with ``redact`` (the default) every secret (see :func:`redact`) is ``"***"``.

        Every file, log line and tracker parameter gets the redacted form; only code that talks to the service
        itself (the Comet client) reads the secret from the Config object.
        """
        data = {f.name: copy.deepcopy(self.__dict__[f.name]) for f in dataclasses.fields(self)}  # as set, not derived
        return redact_secrets(data) if redact else data

    def is_set(self, key: str) -> bool:
        """Whether ``key`` was set by the user (config file, ``--set`` or a dict), not left at its default."""
        return key in self.__dict__.get("_user_keys", ())

    def update(self, overrides: dict[str, Any], source: str = "overrides", user: bool = True) -> Config:
        """Apply ``overrides`` in place (validated); returns self. ``user=False`` (fast mode) does not count the
        keys as set by the user (:meth:`is_set`)."""
        if not isinstance(overrides, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(overrides).__name__}")
        valid = set(self.keys())
        fields = {f.name: f for f in dataclasses.fields(self)}
        for key, value in overrides.items():
            if key not in valid:
                close = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=0.5)
                hint = f"; did you mean '{close[0]}'?" if close else "; run `kronos config` to list valid keys"
                raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
            setattr(self, key, _coerce(key, value, _field_type(fields[key]), source))
            if user:
                self.__dict__.setdefault("_user_keys", set()).add(key)
        self.validate()
        return self

    @classmethod
    def from_dict(cls, overrides: dict[str, Any], source: str = "overrides") -> Config:
        return cls().update(overrides, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Config:
        """Defaults overridden by a JSON (``.json``) or YAML (``.yaml``/``.yml``) file.

        Relative paths written in the file are taken relative to the file's folder, so a config works the same
        from any working directory (``finetune/`` or the repo root). Hub ids are left as they are.
        """
        overrides = load_overrides(path)
        base = Path(path).resolve().parent
        for key in PATH_KEYS:
            value = overrides.get(key)
            if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
                candidate = base / value
                looks_local = value.startswith((".", "~")) or candidate.exists() or key not in HUB_KEYS
                if looks_local:
                    overrides[key] = os.path.normpath(str(candidate))
        return cls().update(overrides, source=str(path))

    def effective_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` (redacted) with the derived paths and benchmark resolved."""
        data = self.to_dict(redact=True)
        data["finetuned_tokenizer_path"] = self.finetuned_tokenizer
        data["finetuned_predictor_path"] = self.finetuned_predictor
        data["backtest_benchmark"] = self.benchmark
        return data

    def save(self, path: str | os.PathLike) -> None:
        """Write the effective config (derived paths resolved, secrets redacted) as JSON, atomically."""

        kio.write_json(path, self.effective_dict())


# ---------------------------------------------------------------------- secrets
# a key whose name has one of these words (split at "_", "-" or "."): api_key, hf_token, db_password; not "tokenizer_*"
SECRET_KEY = re.compile(r"(^|[_.-])(api[_-]?key|apikey|token|secret|password|passwd)s?($|[_.-])", re.IGNORECASE)
REDACTED = "***"


# derived keys -> the property that derives them (an empty value follows save_path / instrument)
_DERIVED_KEYS = {
    "finetuned_tokenizer_path": "finetuned_tokenizer",
    "finetuned_predictor_path": "finetuned_predictor",
    "backtest_benchmark": "benchmark",
}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """:attr:`Config.eval`: what rolling evaluation and calibration read (the flat keys stay the file format)."""

    lookback: int
    horizon: int
    stride: int
    max_anchors: int
    seeds: tuple[int, ...]  # eval_seeds, or (inference_seed,)
    quantiles: tuple[float, ...]
    levels: tuple[float, ...]
    calibration_method: str
    allow_overlap: bool
    half_life: int  # calibration_half_life (0: static bands)
    min_calibration_forecasts: int  # calibration_min_forecasts


@dataclasses.dataclass(frozen=True)
class BacktestSettings:
    """:attr:`Config.backtest`: what the top-k backtest reads (the flat ``backtest_*`` keys stay the file format)."""

    n_symbol_hold: int
    n_symbol_drop: int
    hold_thresh: int
    open_cost: float
    close_cost: float
    min_cost: float
    account: float
    deal_price: str
    signal_scale: str
    benchmark: str
    time_range: tuple


def redact_secrets(value: Any) -> Any:
    """A copy of ``value`` where every non-empty value under a key named like a secret is ``"***"``, and so is
    the password of any ``scheme://user:password@host`` URL."""
    if isinstance(value, dict):
        return {
            k: (
                REDACTED if (isinstance(k, str) and SECRET_KEY.search(k) and v not in (None, "")) else redact_secrets(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(v) for v in value)
    if isinstance(value, str) and "@" in value and _URL_PASSWORD.match(value):
        return _URL_PASSWORD.sub(r"\1" + REDACTED + "@", value, count=1)  # http://user:***@proxy
    return value


# a URL's user:password (e.g. ccxt_api_url pointing at an authenticating proxy)
_URL_PASSWORD = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*:)[^/@\s]*@")


# ---------------------------------------------------------------------- validation table
@dataclass(frozen=True)
class Rule:
    """One check of one key's value; ``message`` completes "config key 'K' ..." (the value is appended)."""

    check: Callable[[Any], bool]
    message: str


def _at_least(n: float) -> Rule:
    return Rule(lambda v: v >= n, f"must be >= {n}")


def _above(n: float) -> Rule:
    return Rule(lambda v: v > n, f"must be > {n}")


def _one_of(*choices: Any) -> Rule:
    return Rule(lambda v: v in choices, "must be one of " + ", ".join(map(str, choices)))


def _length(n: int, what: str) -> Rule:
    return Rule(lambda v: len(v) == n, f"must list {n} {what}")


def _date_range(v: list) -> bool:
    # pandas (and kronos.timeutil below) load here, not at module import: `kronos --help` and the parser import
    # this module, and pandas alone costs ~0.4 s of a ~0.1 s start (measured with `python -X importtime`)
    import pandas as pd

    try:
        start, end = (pd.Timestamp(x) for x in v)
    except (TypeError, ValueError):
        return False
    return start <= end


def _plain_name(v: str) -> bool:

    return bool(v) and safe_filename(v) == v


def _calendar_name(v: str) -> bool:
    from kronos.timeutil import resolve_calendar

    try:
        resolve_calendar(v)
    except ConfigError:
        return False
    return True


def _ratios(v: list | None) -> bool:
    if v is None:
        return True
    if not all(_is_number(x) for x in v):
        return False
    r = [float(x) for x in v]
    return len(r) == 3 and all(x >= 0 for x in r) and abs(sum(r) - 1) < 1e-6


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_RANGE = (_length(2, "dates [start, end]"), Rule(_date_range, "must be [start, end] dates with start <= end"))

# Every static check of a key, next to the key's name. Checks that need the data, the machine or the model zoo (a
# column that must exist, a CUDA device that must be present, a preset name of kronos.model) stay where that is known.
RULES: dict[str, tuple[Rule, ...]] = {
    **{
        k: (_at_least(1),)
        for k in (
            "lookback_window",
            "predict_window",
            "max_context",
            "batch_size",
            "epochs",
            "n_train_iter",
            "n_val_iter",
            "accumulation_steps",
            "log_interval",
            "sina_datalen",
            "inference_sample_count",
            "eval_stride",
        )
    },
    **{
        k: (_at_least(0),)
        for k in (
            "checkpoint_interval",
            "patience",
            "num_workers",
            "sina_retries",
            "sina_pause",
            "ccxt_retries",
            "ccxt_pause",
            "ccxt_limit",
            "eval_max_anchors",
            "plot_n_symbols",
            "inference_top_k",
            "backtest_open_cost",
            "backtest_close_cost",
            "backtest_min_cost",
        )
    },
    **{k: (_above(0),) for k in ("clip", "sina_timeout", "ccxt_timeout", "backtest_account")},
    # 0 is allowed: it freezes the weights (tests and sanity checks use it)
    **{
        k: (Rule(lambda v: math.isfinite(v) and 0 <= v <= 1, "must be a finite number in [0, 1] (e.g. 2e-4)"),)
        for k in ("tokenizer_learning_rate", "predictor_learning_rate")
    },
    "feature_list": (_length(6, "features (open, high, low, close, volume, amount)"),),
    "time_feature_list": (_length(5, "features (minute, hour, weekday, day, month)"),),
    "train_time_range": _RANGE,
    "val_time_range": _RANGE,
    "test_time_range": _RANGE,
    "backtest_time_range": _RANGE,
    "split_ratios": (Rule(_ratios, "must be three non-negative numbers summing to 1"),),
    "sina_symbols": (Rule(lambda v: len(v) > 0, 'must list at least one symbol, e.g. ["sh600000"]'),),
    "sina_scale": (_one_of(5, 15, 30, 60, 240),),
    "sina_base_url": (Rule(lambda v: v.startswith(("http://", "https://")), "must be an http(s) URL"),),
    "adjust": (_one_of("none", "adj_close"),),
    "ccxt_exchange": (
        Rule(lambda v: bool(re.fullmatch(r"[a-z0-9_]+", v)), "must be a ccxt exchange id, e.g. binance"),
    ),
    "ccxt_symbols": (
        Rule(
            lambda v: len(v) > 0 and all(isinstance(x, str) and x.strip() for x in v),
            'must list symbols, e.g. ["BTC/USDT"]',
        ),
    ),
    "ccxt_timeframe": (
        Rule(lambda v: bool(re.fullmatch(r"\d+[smhdwMy]", v)), "must be a timeframe such as 1m, 1h or 1d"),
    ),
    "ccxt_since": (Rule(lambda v: _date_range([v, v]), "must be a date or time such as 2024-01-01 (UTC)"),),
    "ccxt_until": (Rule(lambda v: v == "" or _date_range([v, v]), "must be empty (now) or a date such as 2024-06-30"),),
    "ccxt_api_url": (
        Rule(lambda v: v == "" or v.startswith(("http://", "https://")), "must be empty or an http(s) URL"),
    ),
    "device": (Rule(lambda v: bool(_DEVICE.match(v)), "must be auto, cpu, cuda, cuda:N or mps"),),
    "precision": (_one_of("auto", "fp32", "bf16", "fp16"),),
    "inference_top_p": (Rule(lambda v: 0 < v <= 1, "must be in (0, 1]"),),
    "quantiles": (
        Rule(
            lambda v: len(v) > 0 and all(_is_number(q) and 0 < q < 1 for q in v),
            "must list numbers strictly between 0 and 1 (e.g. [0.1, 0.5, 0.9])",
        ),
    ),
    "interval_levels": (
        Rule(
            lambda v: len(v) > 0 and all(_is_number(q) and 0 < q < 1 for q in v),
            "must list central levels strictly between 0 and 1 (e.g. [0.5, 0.8])",
        ),
    ),
    "eval_seeds": (
        Rule(
            lambda v: all(isinstance(x, int) and not isinstance(x, bool) for x in v),
            "must list integer seeds (e.g. [100, 101, 102])",
        ),
    ),
    "inference_T": (Rule(lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0"),),
    "dist_wait_hours": (_above(0),),
    "max_nonfinite_steps": (_at_least(1),),
    "backtest_deal_price": (_one_of("open", "close"),),
    "calibration_method": (
        _one_of("vol_scaled", "cqr_vol", "cqr_additive", "cqr_multiplicative", "spread_scale", "none", "auto"),
    ),
    "price_spike_factor": (Rule(lambda v: v == 0 or (math.isfinite(v) and v > 1), "must be 0 (off) or a number > 1"),),
    "price_spike_action": (_one_of("drop", "keep"),),
    "data_chunk_symbols": (_at_least(1),),
    "calibration_half_life": (_at_least(0),),
    "calibration_min_forecasts": (_at_least(10),),
    # folder names are names, never paths: '../x' would put a stage's outputs outside save_path
    **{
        k: (Rule(_plain_name, "must be one plain folder name (letters, digits, '-', '_', '.'; no '/' or '..')"),)
        for k in ("tokenizer_save_folder_name", "predictor_save_folder_name", "backtest_save_folder_name")
    },
    "finetune_mode": (_one_of("full", "freeze", "lora"),),
    "freeze_layers": (_at_least(0),),
    "lora_rank": (_at_least(1),),
    "lora_alpha": (_above(0),),
    "lora_dropout": (Rule(lambda v: 0 <= v < 1, "must be in [0, 1)"),),
    "lora_target_modules": (
        Rule(
            lambda v: len(v) > 0 and all(isinstance(x, str) and x for x in v),
            'must list Linear layer names, e.g. ["q_proj", "v_proj"]',
        ),
    ),
    "pretrained_data_end": (
        Rule(lambda v: v == "" or _date_range([v, v]), "must be empty or a date such as 2021-12-31"),
    ),
    "backtest_signal_scale": (_one_of("std", "price"),),
    "trading_calendar": (
        Rule(
            _calendar_name,
            "must be auto, none, 24/7 or an exchange_calendars code such as XSHG, XSHE, XHKG, XNYS, XNAS, XLON, XTKS",
        ),
    ),
    "run_id": (
        Rule(
            lambda v: v == "" or (_plain_name(v) and v != "latest"),
            "must be empty (a new run) or one plain folder name such as 2026-12-02_013512",
        ),
    ),
}


@dataclass(frozen=True)
class CrossRule:
    """A check over several keys; ``message(config)`` is the whole one-line error."""

    check: Callable[[Config], bool]
    message: Callable[[Config], str]


CROSS_RULES: tuple[CrossRule, ...] = (
    CrossRule(
        lambda c: c.batch_size % c.accumulation_steps == 0,
        lambda c: (
            f"config key 'batch_size' ({c.batch_size}) must be divisible by 'accumulation_steps' "
            f"({c.accumulation_steps}): each optimizer step splits the batch into that many micro-batches"
        ),
    ),
)


# ---------------------------------------------------------------------- fast mode
# --fast-mode: data -> backtest in under 5 minutes on a loaded 2-core CPU (README "Fast mode"): 2 x 40 optimizer
# steps per stage, and each of the three forecast passes (calibration, rolling evaluation, walk-forward report) on
# the latest 20 anchor dates. Each key is capped (a user's smaller value is kept); for keys where 0 means
# "no limit" (eval_max_anchors) 0 becomes the cap.
FAST_MODE_CAPS: dict[str, int] = {
    "epochs": 2,
    "batch_size": 32,
    "n_train_iter": 32 * 40,
    "n_val_iter": 32 * 20,  # 20 forward-only batches: a validation loss steady enough to pick the best epoch
    "log_interval": 20,
    "inference_sample_count": 16,  # 16 shared-context paths cost ~1.1x one path; 4 gave zero-width bands
    "eval_max_anchors": 20,
    "plot_n_symbols": 3,
}
_ZERO_MEANS_UNLIMITED = ("eval_max_anchors",)
# --fast-mode for a stage trained from scratch (empty pretrained path): the CPU-sized preset and the learning rate
# it trains with (the default presets took about 11 s per optimizer step of batch 32 on a loaded 2-core CPU).
FAST_MODE_SCRATCH: dict[str, dict[str, Any]] = {
    "tokenizer": {"tokenizer_preset": "tiny", "tokenizer_learning_rate": 2e-3},
    "predictor": {"predictor_preset": "tiny", "predictor_learning_rate": 2e-3},
}


def apply_fast_mode(config: Config, explicit: Any | None = None) -> Config:
    """Shrink epochs, batches, models and evaluation so the pipeline finishes in minutes on a CPU.

    Caps :data:`FAST_MODE_CAPS`; a stage with an empty pretrained path gets :data:`FAST_MODE_SCRATCH` (the
    ``tiny`` preset). ``explicit``: the keys the user set (the CLI passes its config file's and ``--set``'s
    keys); fast mode never changes them, so an explicit preset, learning rate or step count wins. ``None``
    (Python callers): presets and learning rates that differ from the defaults count as set. Every change is
    logged as ``key old -> new``.
    """
    if explicit is None:
        default = Config()
        scratch_keys = {k for part in FAST_MODE_SCRATCH.values() for k in part}
        explicit = {k for k in scratch_keys if getattr(config, k) != getattr(default, k)}
    explicit = set(explicit)
    wanted: dict[str, Any] = {}
    for key, cap in FAST_MODE_CAPS.items():
        value = getattr(config, key)
        wanted[key] = cap if key in _ZERO_MEANS_UNLIMITED and value <= 0 else min(value, cap)
    if not config.pretrained_tokenizer_path:
        wanted.update(FAST_MODE_SCRATCH["tokenizer"])
    if not config.pretrained_predictor_path:
        wanted.update(FAST_MODE_SCRATCH["predictor"])
    changes = {k: v for k, v in wanted.items() if k not in explicit and getattr(config, k) != v}
    kept = sorted(k for k, v in wanted.items() if k in explicit and getattr(config, k) != v)
    if changes:
        logger.info(
            "--fast-mode changed: %s", ", ".join(f"{k} {getattr(config, k)!r} -> {v!r}" for k, v in changes.items())
        )
    if kept:
        logger.info("--fast-mode kept your own %s", ", ".join(f"{k}={getattr(config, k)!r}" for k in kept))
    return config.update(changes, source="--fast-mode", user=False)


def load_overrides(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist; pass an existing JSON or YAML file to --config-path")
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file '{p}' is {size:,} bytes; a config file may hold at most {MAX_CONFIG_BYTES:,} bytes"
            )
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file '{p}' cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{p}' is not UTF-8 text") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            data = _plain_dates(yaml.load(text, Loader=_yaml_loader(p)) or {})
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file '{p}' is not valid YAML{where}") from None
    else:
        try:
            data = json.loads(text, object_pairs_hook=lambda pairs: _unique_json_keys(pairs, text, p))
        except json.JSONDecodeError as exc:
            kinds = "" if p.suffix.lower() == ".json" else " (config files are JSON or YAML: .json, .yaml, .yml)"
            raise ConfigError(
                f"config file '{p}' is not valid JSON{kinds}: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold an object of config keys, got {type(data).__name__}")
    return data


MAX_CONFIG_BYTES = 1 << 20


def _unique_json_keys(pairs: list, text: str, path: Path) -> dict:
    """A JSON object's pairs as a dict; a key given twice is a one-line ConfigError naming it and both lines (json
    itself keeps the last value without a word)."""
    seen: set = set()
    for key, _ in pairs:
        if key in seen:
            lines = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(rf'"{re.escape(key)}"\s*:', text)]
            where = f" (lines {lines[0]} and {lines[1]})" if len(lines) >= 2 else ""
            raise ConfigError(
                f"config file '{path}' gives the key '{key}' twice{where}; keep one of them (JSON would silently "
                "use the last)"
            )
        seen.add(key)
    return dict(pairs)


def _yaml_loader(path: Path) -> Any:
    """A safe YAML loader that refuses aliases (``*name``): a few nested aliases expand to billions of nodes."""

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ConfigError(
                    f"config file '{path}' uses the YAML alias *{event.anchor} at line {event.start_mark.line + 1}; "
                    "aliases are not allowed in config files, write the value out"
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            first: dict = {}
            for key_node, _ in node.value:
                key = key_node.value
                if key in first:
                    raise ConfigError(
                        f"config file '{path}' gives the key '{key}' twice (lines {first[key] + 1} and "
                        f"{key_node.start_mark.line + 1}); keep one of them (YAML would silently use the last)"
                    )
                first[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    # unquoted dates stay the strings written (2018-13-45 included: the key's check names it, no ValueError)
    def timestamp_as_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
        return loader.construct_scalar(node)

    NoAliasLoader.add_constructor("tag:yaml.org,2002:timestamp", timestamp_as_text)
    # YAML 1.1 reads 4e-5 (no dot) as a string; read it as the number it is, as JSON does (1e-4 learning rates)
    NoAliasLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
    )
    return NoAliasLoader


def _plain_dates(value: Any) -> Any:
    """YAML reads ``2024-01-31`` as a date: turn dates and datetimes back into the ISO strings the keys expect."""
    if isinstance(value, dict):
        return {k: _plain_dates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_dates(v) for v in value]
    if isinstance(value, _dt.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, _dt.date):
        return value.isoformat()
    return value


# ---------------------------------------------------------------------- type checking helpers
@functools.lru_cache(maxsize=1)
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def _field_type(f: dataclasses.Field) -> Any:
    return _type_hints()[f.name]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _coerce(key: str, value: Any, tp: Any, source: str = "config") -> Any:
    """Return ``value`` converted to ``tp`` where lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], source)
    name = getattr(tp, "__name__", str(tp))
    bad = ConfigError(f"{source}: config key '{key}' must be {_article(name)}, got {type(value).__name__} {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise bad
        return value
    if tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    return value


def _article(name: str) -> str:
    words = {
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "bool": "true or false",
        "list": "a list",
        "dict": "an object",
    }
    return words.get(name, name)
