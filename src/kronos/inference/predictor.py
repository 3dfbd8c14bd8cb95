"""KronosPredictor: K-line DataFrames in, forecasts (mean, sample paths, quantiles) out.

Same constructor, ``predict`` / ``predict_batch`` arguments, defaults and outputs as the official predictor
(MODEL_ARCHITECTURE_ANALYSIS.md §6),
plus keyword-only extras: KV-cached generation (``use_cache``), reproducible sampling (``seed``), access to the
sample paths (``return_samples``) and quantiles, histories of different lengths in one ``predict_batch`` call, and
one-line :class:`kronos.errors.InputError` messages for bad input.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kronos.data.schema import (
    PRICE_COLUMNS,
    TIME_FEATURES,
    VALUE_COLUMNS,
    complete_volume_amount,
    norm_scale,
    time_features,
)
from kronos.errors import InputError, cuda_missing_hint
from kronos.inference.bands import (
    apply_calibration,
    check_quantiles,
    load_calibration,
    prob_up,
    quantile_column,
    recent_volatility,
    sample_quantiles,
)
from kronos.inference.generate import SamplingConfig, mean_over_samples, sample_forecasts
from kronos.inference.prepare import (
    Batch,
    FrameTasks,
    SeriesInputs,
    frame_batches,
    frame_tasks_or_none,
    read_series,
    series_batches,
    to_index,
)
from kronos.model.kronos import Kronos
from kronos.model.tokenizer import KronosTokenizer
from kronos.timeutil import future_timestamps as extend

logger = logging.getLogger(__name__)

MIN_HISTORY = 8  # bars of history a forecast needs at least (its normalisation statistics come from them)

# The official predictor's attribute names for the vocabulary of kronos.data.schema.
PRICE_COLS = list(PRICE_COLUMNS)
VOL_COL = "volume"
AMT_COL = "amount"
FEATURE_COLS = list(VALUE_COLUMNS)
TIME_COLS = list(TIME_FEATURES)

Timestamps: TypeAlias = "pd.Series | pd.DatetimeIndex | Sequence[Any] | np.ndarray"


def _is_real(value: Any) -> bool:
    """A real number that is not a bool (a plain check: typeshed's numbers.Real has no comparison with int)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def calc_time_stamps(timestamps: Timestamps) -> pd.DataFrame:
    """Time features ``[minute, hour, weekday, day, month]`` (Mon=0) of each timestamp (analysis §4.2, §6.1)."""
    return time_features(_to_datetime_index(timestamps, "timestamps"))


def _to_datetime_index(values: Timestamps, name: str) -> pd.DatetimeIndex:
    if isinstance(values, pd.DataFrame):
        raise InputError(f"{name} must be a Series, DatetimeIndex or list of datetimes, not a DataFrame")
    try:
        idx = pd.DatetimeIndex(values)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must hold datetimes (pandas Series, DatetimeIndex or list): {exc}") from None
    if idx.hasnans:
        pos = int(np.flatnonzero(idx.isna())[0])
        raise InputError(f"{name} has a missing timestamp (NaT) at position {pos}")
    return idx


class DeviceName(str):
    """The predictor's device as the official predictor keeps it, a string (``predictor.device == "cpu"``), with
    :class:`torch.device`'s ``type``; torch takes it wherever it takes a device."""

    type: str

    def __new__(cls, device: torch.device) -> DeviceName:
        obj = super().__new__(cls, str(device))
        obj.type = device.type
        return obj


def _check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that exists here; one-line InputError for a missing CUDA/MPS device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device '{device}' was asked for but CUDA is not available here: {cuda_missing_hint()}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"device '{device}' was asked for but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise InputError(f"device '{device}' was asked for but MPS is not available here; use 'cpu' or 'auto'")
    return dev


def _check_increasing(idx: pd.DatetimeIndex, name: str) -> None:
    if len(idx) > 1:
        values = idx.asi8
        bad = np.flatnonzero(values[1:] <= values[:-1])
        if len(bad):
            i = int(bad[0]) + 1
            raise InputError(
                f"{name} must be strictly increasing: position {i} ({idx[i]}) is not after position {i - 1} "
                f"({idx[i - 1]})"
            )


@dataclass
class PreparedContext:
    """One series after the official pre-processing (analysis §6.1)."""

    x: np.ndarray  # [T, 6] normalised and clipped, float32
    x_stamp: np.ndarray  # [T, 5] float32
    y_stamp: np.ndarray  # [P, 5] float32
    mean: np.ndarray  # [6] float32
    std: np.ndarray  # [6] float32
    y_index: pd.Index | None  # None where the caller does not need it (predict_df)
    last_close: float  # close of the last history row, in prices (the reference of P(up))


class KronosPredictor:
    """Forecast K-lines with a Kronos tokenizer + predictor pair (official ``KronosPredictor`` API).

    ``max_context`` is the predictor's window (512 for Kronos-small/base, 2048 for Kronos-mini); ``clip`` bounds the
    normalised inputs. Both models are moved to ``device`` (auto: CUDA, then MPS, then CPU) and used in eval mode.

    ``fast_prepare`` (attribute, default True): ``predict``, ``predict_batch`` and ``predict_df`` check and
    normalise all contexts at once with NumPy (:mod:`kronos.inference.prepare`; bit-identical tensors), turning to
    the per-series :meth:`prepare` only to word the message of a bad input; False: always per series (the former
    path, kept for comparison).
    """

    fast_prepare: bool = True

    def __init__(
        self,
        model: Kronos,
        tokenizer: KronosTokenizer,
        device: str | torch.device | None = None,
        max_context: int = 512,
        clip: float = 5,
        *,
        truncate_history: bool = False,
        keep_amount: bool = False,
    ) -> None:
        """``truncate_history`` (Q7 option): use only the last ``max_context`` bars for statistics and encoding
        instead of the whole history. ``keep_amount`` (Q10 option): when ``volume`` is absent keep a supplied
        ``amount`` column instead of zeroing it. Both default to the official behaviour."""
        if device is None:
            if torch.cuda.is_available():
                device = "cuda:0"
            elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                device = "mps"
            else:
                device = "cpu"
        if int(max_context) < 1:
            raise InputError(f"max_context must be >= 1, got {max_context}")
        if model.s1_bits != tokenizer.s1_bits or model.s2_bits != tokenizer.s2_bits:
            raise InputError(
                f"tokenizer bits ({tokenizer.s1_bits}, {tokenizer.s2_bits}) do not match the predictor's "
                f"({model.s1_bits}, {model.s2_bits}); use the tokenizer the predictor was trained with"
            )
        self.device = DeviceName(_check_device(device))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer.to(self.device).eval()
        self.max_context = int(max_context)
        self.clip = clip
        self.truncate_history = bool(truncate_history)
        self.keep_amount = bool(keep_amount)
        self.price_cols = list(PRICE_COLS)
        self.vol_col = VOL_COL
        self.amt_col = AMT_COL
        self.amt_vol = AMT_COL  # the official predictor's name for the amount column
        self.time_cols = list(TIME_COLS)

    # ------------------------------------------------------------------ pre-processing
    def prepare(
        self, df: pd.DataFrame, x_timestamp: Timestamps, y_timestamp: Timestamps, pred_len: int, where: str = ""
    ) -> PreparedContext:
        """Check one context and normalise it as the official predictor does (analysis §6.1): the model-ready
        arrays and statistics of ``df`` (history), ``x_timestamp`` and ``y_timestamp`` (``pred_len`` forecast bars);
        one-line :class:`~kronos.errors.InputError` (prefixed ``where``) for bad input."""
        if not isinstance(df, pd.DataFrame):
            raise InputError(f"{where}df must be a pandas DataFrame, got {type(df).__name__}")
        if len(df) == 0:
            raise InputError(f"{where}df is empty; give at least {MIN_HISTORY} rows of history")
        if len(df) < MIN_HISTORY:
            raise InputError(
                f"{where}df has only {len(df)} row(s) of history; give at least {MIN_HISTORY} (the forecast is "
                "normalised by the history's mean and std, which a few bars cannot estimate)"
            )
        missing = [c for c in self.price_cols if c not in df.columns]
        if missing:
            raise InputError(f"{where}df is missing price column(s) {missing}; it needs {self.price_cols}")
        present = [c for c in FEATURE_COLS if c in df.columns]
        frame = df[present].copy()
        for name in present:
            if not pd.api.types.is_numeric_dtype(frame[name]) or pd.api.types.is_bool_dtype(frame[name]):
                raise InputError(f"{where}column '{name}' must be numeric, got dtype {frame[name].dtype}")
        # Q10: no volume -> both volume and amount are zero (a supplied amount is overwritten, unless keep_amount).
        complete_volume_amount(frame, keep_amount=self.keep_amount)
        x = frame[FEATURE_COLS].values.astype(np.float32)
        bad = ~np.isfinite(x)
        if bad.any():
            row, col = (int(v[0]) for v in np.nonzero(bad))
            kind = "NaN" if np.isnan(x[row, col]) else "an infinite value"
            raise InputError(
                f"{where}column '{FEATURE_COLS[col]}' has {kind} at row {row} (index {df.index[row]!r}); "
                "fill or drop such rows first"
            )

        x_idx = _to_datetime_index(x_timestamp, f"{where}x_timestamp")
        y_idx = _to_datetime_index(y_timestamp, f"{where}y_timestamp")
        if len(x_idx) != len(df):
            raise InputError(f"{where}len(x_timestamp) = {len(x_idx)} but df has {len(df)} rows; they must match")
        if len(y_idx) != pred_len:
            raise InputError(f"{where}len(y_timestamp) = {len(y_idx)} but pred_len = {pred_len}; they must match")
        _check_increasing(x_idx, f"{where}x_timestamp")
        _check_increasing(y_idx, f"{where}y_timestamp")
        if y_idx[0] <= x_idx[-1]:
            raise InputError(f"{where}y_timestamp must start after the last x_timestamp ({y_idx[0]} <= {x_idx[-1]})")

        if self.truncate_history and len(x) > self.max_context:  # Q7 option: only the predictor's window
            x, x_idx = x[-self.max_context :], x_idx[-self.max_context :]
        x_stamp = calc_time_stamps(x_idx).values.astype(np.float32)
        y_stamp = calc_time_stamps(y_idx).values.astype(np.float32)
        # statistics over the entire given history (Q7, MODEL_ARCHITECTURE_ANALYSIS.md §8), numpy float32,
        # population std.
        mean, std = np.mean(x, axis=0), np.std(x, axis=0)
        x = (x - mean) / norm_scale(std)
        x = np.clip(x, -self.clip, self.clip)
        y_index = y_timestamp if isinstance(y_timestamp, pd.Series) else y_idx
        last_close = float(frame["close"].iloc[-1])
        return PreparedContext(x, x_stamp, y_stamp, mean, std, pd.Index(y_index), last_close)

    def prepare_many(
        self,
        df_list: Sequence[pd.DataFrame],
        x_timestamp_list: Sequence[Timestamps],
        y_timestamp_list: Sequence[Timestamps],
        pred_len: int,
        where: str = "series {i}: ",
    ) -> list[PreparedContext]:
        """:meth:`prepare` of every series (``where`` formatted with the series' position ``i``), all at once with
        NumPy when :attr:`fast_prepare`; the first bad series raises the per-series message."""
        inputs = list(zip(df_list, x_timestamp_list, y_timestamp_list))
        if self.fast_prepare:
            series: list[SeriesInputs] = []
            for df, xt, yt in inputs:
                one = read_series(df, xt, yt, pred_len, self.keep_amount, MIN_HISTORY)
                if one is None:
                    break
                series.append(one)
            else:
                out: list[PreparedContext | None] = [None] * len(series)
                for batch in series_batches(series, self.clip, self.max_context if self.truncate_history else None):
                    for j, i in enumerate(batch.members):
                        out[i] = _context(batch, j, series[i].y_index, series[i].last_close)
                return out  # type: ignore[return-value]
        return [self.prepare(df, xt, yt, pred_len, where=where.format(i=i)) for i, (df, xt, yt) in enumerate(inputs)]

    @staticmethod
    def _check_args(pred_len: Any, T: Any, top_k: Any, top_p: Any, sample_count: Any) -> None:
        if isinstance(pred_len, bool) or not isinstance(pred_len, (int, np.integer)) or pred_len < 1:
            raise InputError(f"pred_len must be an integer >= 1, got {pred_len!r}")
        if isinstance(sample_count, bool) or not isinstance(sample_count, (int, np.integer)) or sample_count < 1:
            raise InputError(f"sample_count must be an integer >= 1, got {sample_count!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
        if not _is_real(top_p) or not 0 < top_p <= 1:
            raise InputError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r}")
        if not _is_real(T) or not 0 < T < float("inf"):
            raise InputError(f"temperature T must be a finite number > 0, got {T!r}")

    # ------------------------------------------------------------------ generation
    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None  # the global torch RNG, as the official code
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        return gen

    def _sample_paths(
        self,
        items: list[PreparedContext],
        pred_len: int,
        sample_count: int,
        sampling: SamplingConfig,
        verbose: bool,
        use_cache: bool,
        generator: torch.Generator | None,
        batch_size: int | None,
    ) -> list[np.ndarray]:
        """Normalised sample paths ``[S, P, 6]`` per series; series of equal length run as one batch."""
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(len(item.x), []).append(i)
        out: list[np.ndarray | None] = [None] * len(items)
        for members in groups.values():
            x = torch.from_numpy(np.stack([items[i].x for i in members])).to(self.device)
            xs = torch.from_numpy(np.stack([items[i].x_stamp for i in members])).to(self.device)
            ys = torch.from_numpy(np.stack([items[i].y_stamp for i in members])).to(self.device)
            samples = sample_forecasts(
                self.tokenizer, self.model, x, xs, ys, pred_len, self.max_context, self.clip, sample_count,
                sampling, use_cache=use_cache, generator=generator, verbose=verbose, batch_size=batch_size,
            ).cpu().numpy()  # fmt: skip
            for j, i in enumerate(members):
                out[i] = samples[j]
        return out  # type: ignore[return-value]

    def generate(
        self,
        x: np.ndarray,
        x_stamp: np.ndarray,
        y_stamp: np.ndarray,
        pred_len: int,
        T: float,
        top_k: int,
        top_p: float,
        sample_count: int,
        verbose: bool,
        *,
        use_cache: bool = True,
        seed: int | None = None,
    ) -> np.ndarray:
        """Official-compatible: normalised inputs ``[N, T, 6]`` -> mean normalised forecast ``[N, pred_len, 6]``."""
        samples = sample_forecasts(
            self.tokenizer, self.model,
            torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device),
            torch.as_tensor(np.asarray(x_stamp, dtype=np.float32), device=self.device),
            torch.as_tensor(np.asarray(y_stamp, dtype=np.float32), device=self.device),
            pred_len, self.max_context, self.clip, sample_count, SamplingConfig(T, top_k, top_p),
            use_cache=use_cache, generator=self._generator(seed), verbose=verbose,
        )  # fmt: skip
        return mean_over_samples(samples.cpu().numpy())

    @staticmethod
    def _mean_path(item: PreparedContext, paths: np.ndarray) -> np.ndarray:
        """Q11: the mean of the normalised paths ``[S, P, 6]``, de-normalised with the exact inverse (sigma+1e-5);
        Q10: zero-sigma columns come back as pred*1e-5 + mu."""
        return mean_over_samples(paths[None])[0] * norm_scale(item.std) + item.mean

    def _frames(self, item: PreparedContext, paths: np.ndarray, return_samples: bool, return_p_up: bool = False):
        preds = self._mean_path(item, paths)
        frame = pd.DataFrame(preds, columns=FEATURE_COLS, index=item.y_index)
        prices = paths * norm_scale(item.std) + item.mean if (return_samples or return_p_up) else None
        if return_p_up:
            assert prices is not None  # computed when return_p_up
            frame["p_up"] = prob_up(prices[..., FEATURE_COLS.index("close")], item.last_close)
        if not return_samples:
            return frame
        return frame, prices

    # ------------------------------------------------------------------ public API
    def predict(
        self,
        df: pd.DataFrame,
        x_timestamp: Timestamps,
        y_timestamp: Timestamps,
        pred_len: int,
        T: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.9,
        sample_count: int = 1,
        verbose: bool = True,
        *,
        use_cache: bool = True,
        seed: int | None = None,
        return_samples: bool = False,
        batch_size: int | None = None,
        top_k_then_top_p: bool = False,
        return_p_up: bool = False,
    ) -> pd.DataFrame | tuple[pd.DataFrame, np.ndarray]:
        """Forecast ``pred_len`` steps after ``df`` (columns open, high, low, close[, volume[, amount]]).

        Returns a DataFrame (columns open..amount, index ``y_timestamp``) holding the mean of ``sample_count``
        sampled paths; with ``return_samples=True`` returns ``(mean_df, samples)``, samples ``[S, pred_len, 6]``
        de-normalised. ``seed`` makes sampling reproducible; ``use_cache=False`` runs the official (slow) algorithm.
        ``return_p_up=True`` adds a column ``p_up``: per step, the share of the sample paths whose close is
        above the last close of ``df`` (:func:`prob_up`; it needs many paths, e.g. ``sample_count=32``).
        """
        self._check_args(pred_len, T, top_k, top_p, sample_count)
        item = self.prepare_many([df], [x_timestamp], [y_timestamp], pred_len, where="")[0]
        sampling = SamplingConfig(T, top_k, top_p, top_k_then_top_p)
        paths = self._sample_paths(
            [item], pred_len, sample_count, sampling, verbose, use_cache, self._generator(seed), batch_size
        )[0]
        return self._frames(item, paths, return_samples, return_p_up)

    def predict_batch(
        self,
        df_list: Sequence[pd.DataFrame],
        x_timestamp_list: Sequence[Timestamps],
        y_timestamp_list: Sequence[Timestamps],
        pred_len: int,
        T: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.9,
        sample_count: int = 1,
        verbose: bool = True,
        *,
        use_cache: bool = True,
        seed: int | None = None,
        return_samples: bool = False,
        batch_size: int | None = None,
        top_k_then_top_p: bool = False,
        return_p_up: bool = False,
    ) -> list:
        """Forecast many series at once; returns one DataFrame (or ``(mean_df, samples)``) per series, in order.

        Unlike the official method, histories may differ in length: series are grouped by length and each group
        runs as one batch (results equal one-by-one prediction under greedy decoding). ``return_p_up`` as in
        :meth:`predict`.
        """
        self._check_args(pred_len, T, top_k, top_p, sample_count)
        for name, value in (("df_list", df_list), ("x_timestamp_list", x_timestamp_list),
                            ("y_timestamp_list", y_timestamp_list)):  # fmt: skip
            if isinstance(value, (pd.DataFrame, pd.Series, str)) or not hasattr(value, "__len__"):
                raise InputError(f"{name} must be a list (one entry per series), got {type(value).__name__}")
        if not len(df_list):
            raise InputError("df_list is empty; give at least one series")
        if not len(df_list) == len(x_timestamp_list) == len(y_timestamp_list):
            raise InputError(
                f"df_list, x_timestamp_list and y_timestamp_list must have the same length, got "
                f"{len(df_list)}, {len(x_timestamp_list)}, {len(y_timestamp_list)}"
            )
        items = self.prepare_many(df_list, x_timestamp_list, y_timestamp_list, pred_len)
        sampling = SamplingConfig(T, top_k, top_p, top_k_then_top_p)
        paths = self._sample_paths(
            items, pred_len, sample_count, sampling, verbose, use_cache, self._generator(seed), batch_size
        )
        return [self._frames(item, p, return_samples, return_p_up) for item, p in zip(items, paths)]

    def predict_quantiles(
        self,
        df: pd.DataFrame,
        x_timestamp: Timestamps,
        y_timestamp: Timestamps,
        pred_len: int,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        sample_count: int = 32,
        T: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.9,
        verbose: bool = True,
        **kwargs: Any,
    ) -> dict[float | str, pd.DataFrame | pd.Series]:
        """Quantiles of ``sample_count`` sampled paths: ``{q: DataFrame}`` with the layout of :meth:`predict`.

        ``calibration=`` (keyword: a ``calibration.json`` path or a loaded :class:`~kronos.inference.bands.
        Calibration`) corrects the open/high/low/close bands as fitted on the validation split by ``kronos
        calibrate``; it must belong to this predictor, this context length and ``pred_len``.

        With ``return_p_up=True`` (keyword) the dict also holds ``"p_up"``: a Series (index ``y_timestamp``) of the
        per-step share of paths whose close is above the last close (:func:`prob_up`), and with a calibration also
        ``"p_up_calibrated"`` (its fitted correction of that share).
        """
        return self.predict_quantiles_batch(
            [df], [x_timestamp], [y_timestamp], pred_len, quantiles, sample_count, T, top_k, top_p, verbose, **kwargs
        )[0]

    def predict_quantiles_batch(
        self,
        df_list: Sequence[pd.DataFrame],
        x_timestamp_list: Sequence[Timestamps],
        y_timestamp_list: Sequence[Timestamps],
        pred_len: int,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        sample_count: int = 32,
        T: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.9,
        verbose: bool = True,
        **kwargs: Any,
    ) -> list[dict[float | str, pd.DataFrame | pd.Series]]:
        """Batch variant of :meth:`predict_quantiles`: one ``{q: DataFrame}`` per series."""
        qs = check_quantiles(quantiles)
        cal = kwargs.pop("calibration", None)
        if cal is not None:
            cal = load_calibration(cal)
            cal.check(self, horizon=pred_len)
            for i, df in enumerate(df_list):
                n = min(len(df), self.max_context) if self.truncate_history else len(df)
                cal.check(lookback=n, source=f"calibration (series {i})")
        kwargs["return_samples"] = True
        results = self.predict_batch(
            df_list, x_timestamp_list, y_timestamp_list, pred_len, T, top_k, top_p, sample_count, verbose, **kwargs
        )
        out = []
        for (mean_df, samples), df, x_ts in zip(results, df_list, x_timestamp_list):
            values = sample_quantiles(samples, qs)
            if cal is not None:  # price columns: the close-fitted correction relative to the last close
                last = np.array([float(df["close"].iloc[-1])])
                close = df["close"].to_numpy(dtype=float)
                vol = recent_volatility(close[-self.max_context :][None] if self.truncate_history else close[None])
                anchor = pd.DatetimeIndex(pd.to_datetime(x_ts))[-1:]  # adaptive bands: outcomes up to the last bar
                for c in range(4):
                    values[:, :, c] = cal.quantiles(samples[None, :, :, c], last, qs, vol, anchors=anchor)[:, 0]
            bands: dict = {q: pd.DataFrame(v, columns=FEATURE_COLS, index=mean_df.index) for q, v in zip(qs, values)}
            if "p_up" in mean_df.columns:
                bands["p_up"] = mean_df["p_up"].copy()
                if cal is not None:
                    fixed = cal.p_up_calibrated(samples[None, :, :, 3], np.array([float(df["close"].iloc[-1])]))[0]
                    bands["p_up_calibrated"] = pd.Series(fixed, index=mean_df.index, name="p_up_calibrated")
            out.append(bands)
        return out

    # ------------------------------------------------------------------ one front door
    _HUB_KEYS = ("revision", "cache_dir", "local_files_only", "token")

    @classmethod
    def from_pretrained(
        cls,
        tokenizer: str | os.PathLike[str] | KronosTokenizer,
        model: str | os.PathLike[str] | Kronos,
        device: str | torch.device | None = None,
        max_context: int = 512,
        **kw: Any,
    ) -> KronosPredictor:
        """Load a tokenizer and a predictor (local folders or hub ids, or already-loaded models) in one call.

        ``revision``, ``cache_dir``, ``local_files_only`` and ``token`` in ``kw`` go to both loads; every other
        keyword (``clip``, ``truncate_history``, ``keep_amount``) goes to the constructor.
        """
        hub = {k: kw.pop(k) for k in cls._HUB_KEYS if k in kw}
        tok = tokenizer if isinstance(tokenizer, KronosTokenizer) else KronosTokenizer.from_pretrained(tokenizer, **hub)
        mod = model if isinstance(model, Kronos) else Kronos.from_pretrained(model, **hub)
        return cls(mod, tok, device=device, max_context=max_context, **kw)

    def predict_df(
        self,
        frame: pd.DataFrame,
        *,
        id_column: str = "symbol",
        timestamp_column: str = "timestamps",
        pred_len: int,
        lookback: int | None = None,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        anchors: Any = None,
        future_timestamps: Any = None,
        calendar: str | None = None,
        sampling: SamplingConfig | None = None,
        sample_count: int = 32,
        T: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.9,
        seed: int | None = None,
        batch_size: int = 50,
        calibration: Any = None,
        progress: bool = True,
        use_cache: bool = True,
    ) -> pd.DataFrame:
        """Forecast every symbol of a long frame (many anchors each, if asked); long records out.

        ``frame`` holds ``id_column``, ``timestamp_column`` and ``open, high, low, close`` (``volume``/``amount``
        optional, filled by the Q10 rule). A forecast is made at each *anchor* from the history up to and including
        the anchor bar, for the ``pred_len`` bars after it. ``lookback`` fixes the context length (anchors with
        fewer bars are skipped, logged); ``None`` (default) uses the history each anchor has, up to
        ``max_context`` bars, and at least :data:`MIN_HISTORY` (shorter series are skipped with one log line naming
        them). With a ``calibration`` and no ``lookback`` the context is the calibration's lookback (it was fitted
        for that length).

        ``anchors``: ``None`` = each symbol's last bar; a DataFrame with ``id_column`` and ``timestamp_column``
        (or ``anchor``) columns, or a list of ``(symbol, timestamp)`` pairs; or a list/DatetimeIndex of timestamps
        used for every symbol that has a bar then. Future timestamps are the frame's next bars, continued by
        :func:`kronos.timeutil.future_timestamps` past its end; ``future_timestamps`` (only with ``anchors=None``)
        overrides them: one sequence of ``pred_len`` timestamps for every symbol, or ``{symbol: sequence}``.
        ``calendar`` (an ``exchange_calendars`` code such as ``"XSHG"``) makes those continued timestamps follow
        that exchange's trading days, so holidays are never forecast dates; ``None``: business days.

        ``sampling`` (a :class:`~kronos.inference.generate.SamplingConfig`, e.g. ``SamplingConfig.from_config(cfg)``)
        sets temperature, top-k/top-p, ``sample_count`` and ``seed`` in one value; without it the keyword
        arguments ``T``, ``top_k``, ``top_p``, ``sample_count``, ``seed`` do.

        Returns the forecast records (the package's one record schema): one row per (symbol, anchor, step), sorted
        so: ``symbol`` (named ``id_column``), ``anchor`` (the as-of timestamp), ``step`` (1..pred_len),
        ``timestamps`` (the forecast bar), the mean ``open, high, low, close, volume, amount`` over the sample
        paths, ``{column}_q{q}`` quantile columns for all six columns (:func:`~kronos.inference.bands.quantile_column`,
        by :func:`~kronos.inference.bands.sample_quantiles`), ``p_up`` (the share of paths whose close at that step
        is above the anchor bar's close), ``context_vol`` (the context's recent volatility), ``last_close`` (the
        anchor bar's close), ``close_scale`` (this predictor's normalisation scale of close over the context:
        population std + 1e-5, the unit of the official signals) and ``true_close`` (the realised close where the
        frame has it, else NaN). :meth:`predict_df_paths` returns the sample paths beside them.

        Each context is checked and normalised once (all at once with NumPy, see :attr:`fast_prepare`); forecasts
        run in chunks of ``batch_size`` series (tqdm bar when ``progress``); chunk ``k`` samples with seed
        ``seed + k``; :meth:`iter_predict_df` hands the records over chunk by chunk. ``calibration`` (optional) is
        handed with the records to :func:`kronos.inference.bands.apply_calibration`.
        """
        return self.predict_df_paths(
            frame,
            id_column=id_column,
            timestamp_column=timestamp_column,
            pred_len=pred_len,
            lookback=lookback,
            quantiles=quantiles,
            anchors=anchors,
            future_timestamps=future_timestamps,
            calendar=calendar,
            sampling=sampling,
            sample_count=sample_count,
            T=T,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            calibration=calibration,
            progress=progress,
            use_cache=use_cache,
            keep_paths=False,
        ).records

    def predict_df_paths(
        self,
        frame: pd.DataFrame,
        *,
        id_column: str = "symbol",
        timestamp_column: str = "timestamps",
        pred_len: int,
        lookback: int | None = None,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        anchors: Any = None,
        future_timestamps: Any = None,
        calendar: str | None = None,
        sampling: SamplingConfig | None = None,
        sample_count: int = 32,
        T: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.9,
        seed: int | None = None,
        batch_size: int = 50,
        calibration: Any = None,
        progress: bool = True,
        use_cache: bool = True,
        keep_paths: bool = True,
    ) -> DataFrameForecast:
        """:meth:`predict_df` with the de-normalised sample paths kept: a :class:`DataFrameForecast` whose
        ``samples [N, S, pred_len, 6]`` hold forecast ``n`` for records rows ``n * pred_len`` to
        ``(n + 1) * pred_len - 1`` (``keep_paths=False``: records only, ``samples`` None)."""
        run = self._df_run(frame, id_column, timestamp_column, pred_len, lookback, quantiles, anchors,
                           future_timestamps, calendar, sampling, sample_count, T, top_k, top_p, seed, batch_size,
                           calibration, progress, use_cache)  # fmt: skip
        parts = list(self._df_chunks(run, keep_paths, calibrate=False))
        records = pd.concat([part.records for part in parts], ignore_index=True) if len(parts) > 1 else parts[0].records
        if run.cal is not None:
            records = apply_calibration(records, run.cal, model=self, lookback=run.lookback)
        samples = [part.samples for part in parts if part.samples is not None]
        return DataFrameForecast(records, np.concatenate(samples) if keep_paths else None)

    def iter_predict_df(
        self,
        frame: pd.DataFrame,
        *,
        id_column: str = "symbol",
        timestamp_column: str = "timestamps",
        pred_len: int,
        lookback: int | None = None,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        anchors: Any = None,
        future_timestamps: Any = None,
        calendar: str | None = None,
        sampling: SamplingConfig | None = None,
        sample_count: int = 32,
        T: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.9,
        seed: int | None = None,
        batch_size: int = 50,
        calibration: Any = None,
        progress: bool = True,
        use_cache: bool = True,
        keep_paths: bool = False,
    ) -> Iterator[DataFrameForecast]:
        """:meth:`predict_df_paths` chunk by chunk (``batch_size`` forecasts each, in the records' order): a
        :class:`DataFrameForecast` per chunk, its records calibrated (a calibration corrects each row on its own,
        so the chunks concatenated equal :meth:`predict_df`'s records) and, with ``keep_paths``, its paths. Only
        one chunk's sample paths and contexts are held at a time; every input is checked by this call, before the
        first chunk is sampled."""
        run = self._df_run(frame, id_column, timestamp_column, pred_len, lookback, quantiles, anchors,
                           future_timestamps, calendar, sampling, sample_count, T, top_k, top_p, seed, batch_size,
                           calibration, progress, use_cache)  # fmt: skip
        return self._df_chunks(run, keep_paths, calibrate=True)

    def _df_run(
        self,
        frame: pd.DataFrame,
        id_column: str,
        timestamp_column: str,
        pred_len: int,
        lookback: int | None,
        quantiles: Sequence[float],
        anchors: Any,
        future_timestamps: Any,
        calendar: str | None,
        sampling: SamplingConfig | None,
        sample_count: int,
        T: float,
        top_k: int,
        top_p: float,
        seed: int | None,
        batch_size: int,
        calibration: Any,
        progress: bool,
        use_cache: bool,
    ) -> _DfRun:
        """Arguments checked and every forecast's input checked (and, on the per-series path, normalised)."""
        if sampling is None:
            sampling = SamplingConfig(T=T, top_k=top_k, top_p=top_p, sample_count=sample_count, seed=seed)
        self._check_args(pred_len, sampling.T, sampling.top_k, sampling.top_p, sampling.sample_count)
        qs = check_quantiles(quantiles)
        cal = load_calibration(calibration)
        if lookback is None and cal is not None:
            lookback = cal.lookback
        if lookback is not None and (
            isinstance(lookback, bool) or not isinstance(lookback, (int, np.integer)) or lookback < 1
        ):
            raise InputError(f"lookback must be an integer >= 1 (or None for the history there is), got {lookback!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1 (series per chunk), got {batch_size!r}")
        L = None if lookback is None else int(lookback)
        run = _DfRun(sampling, qs, cal, lookback, int(pred_len), int(batch_size), id_column, progress, use_cache)
        if self.fast_prepare:
            _check_frame(frame, id_column, timestamp_column, anchors, future_timestamps)
            lookup = None if anchors is None else _anchor_lookup(anchors, id_column, timestamp_column)
            run.fast = frame_tasks_or_none(
                frame, id_column, timestamp_column, L, self.max_context, int(pred_len), lookup, future_timestamps,
                calendar, self.keep_amount, MIN_HISTORY,
            )  # fmt: skip
            if run.fast is not None:
                _log_short(run.fast.short, L)
                return run
        run.tasks = _forecast_tasks(
            frame, id_column, timestamp_column, L, self.max_context, int(pred_len), anchors, future_timestamps, calendar
        )
        # every input checked (and normalised, once) before sampling
        run.items = [
            self.prepare(t.context, t.x_ts, t.y_ts, pred_len, where=f"{t.symbol} @ {t.anchor}: ") for t in run.tasks
        ]
        return run

    def _df_items(self, run: _DfRun, which: np.ndarray) -> list[PreparedContext]:
        if run.fast is None:
            assert run.items is not None  # the per-series path prepared every context
            return [run.items[i] for i in which]
        ft = run.fast
        out: list[PreparedContext | None] = [None] * len(which)
        for batch in frame_batches(ft, which, self.clip, self.max_context if self.truncate_history else None):
            for j, i in enumerate(batch.members):
                out[i] = _context(batch, j, None, float(ft.close[ft.pos[which[i]]]))
        return out  # type: ignore[return-value]

    def _df_chunks(self, run: _DfRun, keep_paths: bool, calibrate: bool) -> Iterator[DataFrameForecast]:
        sampling, P, bs = run.sampling, run.pred_len, run.batch_size
        tasks = run.tasks or []
        n = len(run.fast) if run.fast is not None else len(tasks)
        close = VALUE_COLUMNS.index("close")
        for k in tqdm(range(-(-n // bs)), desc="forecast", unit="batch", disable=not run.progress):
            which = np.arange(k * bs, min((k + 1) * bs, n))
            chunk = self._df_items(run, which)
            seed_k = None if sampling.seed is None else int(sampling.seed) + k
            paths = self._sample_paths(
                chunk, P, sampling.sample_count, sampling, False, run.use_cache, self._generator(seed_k), None
            )
            prices = np.stack([p * norm_scale(item.std) + item.mean for item, p in zip(chunk, paths)])  # [n,S,P,6]
            means = np.stack([self._mean_path(item, p) for item, p in zip(chunk, paths)])
            quants = sample_quantiles(prices, run.qs, axis=1)  # [Q, n, P, 6]
            ups = prob_up(prices[..., close], [item.last_close for item in chunk])
            scales = [norm_scale(float(item.std[close])) for item in chunk]
            if run.fast is not None:
                records = _fast_records(run.fast, which, means, quants, run.qs, scales, run.id_column, P, ups)
            else:
                records = _records([tasks[i] for i in which], means, quants, run.qs, scales, run.id_column, P, ups)
            if calibrate and run.cal is not None:
                records = apply_calibration(records, run.cal, model=self, lookback=run.lookback)
            yield DataFrameForecast(records, prices if keep_paths else None)


@dataclass
class DataFrameForecast:
    """What :meth:`KronosPredictor.predict_df_paths` returns: the forecast records and their sample paths."""

    records: pd.DataFrame
    samples: np.ndarray | None  # [N, S, P, 6] prices, forecast n = records rows n*P .. (n+1)*P - 1


@dataclass
class _DfRun:
    """One ``predict_df`` call after its checks: the forecasts to make, prepared fast or per series."""

    sampling: SamplingConfig
    qs: list[float]
    cal: Any
    lookback: int | None
    pred_len: int
    batch_size: int
    id_column: str
    progress: bool
    use_cache: bool
    fast: FrameTasks | None = None  # the NumPy path's tasks
    tasks: list[_Task] | None = None  # the per-series path's tasks and prepared contexts
    items: list[PreparedContext] | None = None


def _context(batch: Batch, j: int, y_index: pd.Index | None, last_close: float) -> PreparedContext:
    return PreparedContext(batch.x[j], batch.x_stamp[j], batch.y_stamp[j], batch.mean[j], batch.std[j], y_index,
                           last_close)  # fmt: skip


def _fast_records(
    ft: FrameTasks,
    which: np.ndarray,
    means: np.ndarray,
    quants: np.ndarray,
    qs: list[float],
    scales: list[float],
    id_column: str,
    P: int,
    p_up: np.ndarray,
) -> pd.DataFrame:
    """:func:`_records` of the NumPy path's tasks ``which`` (the same columns, values and dtypes)."""
    n = len(which)
    pos, start = ft.pos[which], ft.start[which]
    data: dict[str, Any] = {
        id_column: np.repeat(np.array([ft.symbols[i] for i in which], dtype=object), P),
        "anchor": np.repeat(ft.ts[pos].to_numpy(), P),
        "step": np.tile(np.arange(1, P + 1), n),
        "timestamps": to_index(ft.y_utc[which].ravel(), ft.tz).to_numpy(),
    }
    for j, c in enumerate(VALUE_COLUMNS):
        data[c] = means[:, :, j].reshape(-1)
    for j, c in enumerate(VALUE_COLUMNS):
        for qi, q in enumerate(qs):
            data[quantile_column(q, c)] = quants[qi, :, :, j].reshape(-1)
    data["p_up"] = p_up.reshape(-1)
    vol = np.empty(n)
    lengths = pos + 1 - start
    for length in np.unique(lengths):  # contexts of one length at once
        sel = np.flatnonzero(lengths == length)
        vol[sel] = recent_volatility(ft.close[start[sel, None] + np.arange(length)])
    data["context_vol"] = np.repeat(vol, P)
    data["last_close"] = np.repeat(ft.close[pos], P)
    data["close_scale"] = np.repeat(np.asarray(scales, dtype=np.float64), P)
    data["true_close"] = ft.true_close(P, which).reshape(-1)
    return pd.DataFrame(data)


@dataclass
class _Task:
    """One forecast of :meth:`KronosPredictor.predict_df`: a symbol's context up to an anchor bar."""

    symbol: Any
    anchor: pd.Timestamp
    context: pd.DataFrame
    x_ts: pd.Series
    y_ts: pd.Series
    last_close: float
    true_close: np.ndarray


def _anchor_lookup(anchors: Any, id_column: str, timestamp_column: str) -> tuple[dict | None, np.ndarray | None]:
    """``anchors`` as ``({symbol: int64 ns array}, None)`` for pairs or ``(None, int64 ns array)`` for timestamps."""
    if isinstance(anchors, pd.DataFrame):
        ts_col = "anchor" if "anchor" in anchors.columns else timestamp_column
        missing = [c for c in (id_column, ts_col) if c not in anchors.columns]
        if missing:
            raise InputError(
                f"anchors frame is missing column(s) {missing}; it needs '{id_column}' and '{timestamp_column}' "
                "(or 'anchor')"
            )
        pairs = list(zip(anchors[id_column], anchors[ts_col]))
    else:
        items = list(anchors)
        if items and all(isinstance(a, (tuple, list)) and len(a) == 2 for a in items):
            pairs = items
        else:
            idx = _to_datetime_index(items, "anchors")
            return None, np.unique(idx.as_unit("ns").asi8)
    out: dict = {}
    for symbol, ts in pairs:
        stamp = _to_datetime_index([ts], f"anchor of {symbol!r}")
        out.setdefault(symbol, []).append(stamp.as_unit("ns").asi8[0])
    return {k: np.unique(np.asarray(v, dtype=np.int64)) for k, v in out.items()}, None


def _check_frame(frame: Any, id_column: str, timestamp_column: str, anchors: Any, future: Any) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"frame must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in (id_column, timestamp_column, *PRICE_COLUMNS) if c not in frame.columns]
    if missing:
        raise InputError(
            f"frame is missing column(s) {missing}; predict_df needs '{id_column}' (id_column), "
            f"'{timestamp_column}' (timestamp_column) and {list(PRICE_COLUMNS)}"
        )
    if future is not None and anchors is not None:
        raise InputError("future_timestamps can only be given with anchors=None (forecasts after each last bar)")


def _log_short(short: list[str], L: int | None) -> None:
    if short:
        rule = f"lookback={L}" if L is not None else f"the minimum of {MIN_HISTORY}"
        logger.warning(
            "skipped %d anchor(s) with fewer than %s bars of history (e.g. %s)", len(short), rule, ", ".join(short[:3])
        )


def _forecast_tasks(
    frame: pd.DataFrame,
    id_column: str,
    timestamp_column: str,
    L: int | None,
    max_context: int,
    P: int,
    anchors: Any,
    future: Any,
    calendar: str | None = None,
) -> list[_Task]:
    """One task per anchor: a context of ``L`` bars (``None``: the history there is, up to ``max_context`` bars and
    at least :data:`MIN_HISTORY`)."""
    _check_frame(frame, id_column, timestamp_column, anchors, future)
    values_cols = [c for c in VALUE_COLUMNS if c in frame.columns]
    by_symbol, shared = (None, None) if anchors is None else _anchor_lookup(anchors, id_column, timestamp_column)
    tasks: list[_Task] = []
    short: list[str] = []
    seen: set = set()
    for symbol, g in frame.groupby(id_column, sort=True):
        seen.add(symbol)
        ts = _to_datetime_index(g[timestamp_column], f"'{timestamp_column}' of {symbol!r}").as_unit("ns")
        order = np.argsort(ts.asi8, kind="stable")
        ts = ts[order]
        _check_increasing(ts, f"'{timestamp_column}' of {symbol!r}")
        values = g[values_cols].iloc[order].reset_index(drop=True)
        if anchors is None:
            positions = np.array([len(ts) - 1])
        else:
            wanted = shared if by_symbol is None else by_symbol.get(symbol)
            if wanted is None or not len(wanted):
                continue
            positions = np.flatnonzero(np.isin(ts.asi8, wanted))
            if by_symbol is not None and len(positions) < len(wanted):
                absent = pd.Timestamp(np.setdiff1d(wanted, ts.asi8)[0])
                raise InputError(f"anchor {absent} of {symbol!r} is not a bar of that symbol in the frame")
        close = values["close"].to_numpy(dtype=np.float64)
        need = MIN_HISTORY if L is None else L
        for i in positions:
            if i + 1 < need:
                short.append(f"{symbol}@{ts[i]}")
                continue
            start = i + 1 - (min(i + 1, max_context) if L is None else L)
            ctx_ts = ts[start : i + 1]
            fut = ts[i + 1 : i + 1 + P]
            if future is not None:
                given = future.get(symbol) if isinstance(future, dict) else future
                if given is None:
                    raise InputError(f"future_timestamps has no entry for symbol {symbol!r}")
                fut = _to_datetime_index(given, f"future_timestamps of {symbol!r}")
            elif len(fut) < P:
                fut = fut.append(extend(ctx_ts.append(fut), P - len(fut), calendar=calendar))
            true_close = np.full(P, np.nan)
            n_known = min(P, len(ts) - i - 1)
            true_close[:n_known] = close[i + 1 : i + 1 + n_known]
            tasks.append(_Task(
                symbol, ts[i], values.iloc[start:i + 1].reset_index(drop=True), pd.Series(ctx_ts),
                pd.Series(fut), float(close[i]), true_close,
            ))  # fmt: skip
    if by_symbol is not None:
        unknown = [s for s in by_symbol if s not in seen]
        if unknown:
            raise InputError(f"anchors name symbol(s) not in the frame's '{id_column}' column: {unknown[:5]}")
    rule = f"lookback={L}" if L is not None else f"the minimum of {MIN_HISTORY}"
    _log_short(short, L)
    if not tasks:
        raise InputError(
            f"nothing to forecast: no anchor has {rule} bars of history in the frame "
            f"({frame[id_column].nunique()} symbol(s), {len(frame)} rows); give more history"
            + (" or a shorter lookback" if L is not None else "")
        )
    return tasks


def _records(
    tasks: list[_Task],
    means: np.ndarray,
    quants: np.ndarray,
    qs: list[float],
    scales: list[float],
    id_column: str,
    P: int,
    p_up: np.ndarray,
) -> pd.DataFrame:
    """Long records of :meth:`KronosPredictor.predict_df` (see its docstring for the columns)."""
    n = len(tasks)
    data: dict[str, Any] = {
        id_column: np.repeat(np.array([t.symbol for t in tasks], dtype=object), P),
        "anchor": np.repeat(pd.DatetimeIndex([t.anchor for t in tasks]).as_unit("ns").to_numpy(), P),
        "step": np.tile(np.arange(1, P + 1), n),
        "timestamps": np.concatenate([pd.DatetimeIndex(t.y_ts).as_unit("ns").to_numpy() for t in tasks]),
    }
    for j, c in enumerate(VALUE_COLUMNS):
        data[c] = means[:, :, j].reshape(-1)
    for j, c in enumerate(VALUE_COLUMNS):
        for qi, q in enumerate(qs):
            data[quantile_column(q, c)] = quants[qi, :, :, j].reshape(-1)
    data["p_up"] = p_up.reshape(-1)
    # the context's recent close log-return volatility (what the calibration scales its bands by)
    data["context_vol"] = np.repeat(
        [float(recent_volatility(t.context["close"].to_numpy(dtype=np.float64))) for t in tasks], P
    )
    data["last_close"] = np.repeat([t.last_close for t in tasks], P)
    data["close_scale"] = np.repeat(np.asarray(scales, dtype=np.float64), P)
    data["true_close"] = np.concatenate([t.true_close for t in tasks])
    return pd.DataFrame(data)
