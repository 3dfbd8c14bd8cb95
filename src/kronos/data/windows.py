"""Sliding-window training data: an index-based Dataset and the epoch sampler that feeds it.

:class:`WindowDataset` turns a processed long frame (``symbol``, ``timestamps``, prices, volume, amount, time
features; see :mod:`kronos.data.store`) into two contiguous float32 arrays once, plus an implicit index of every
window start that stays inside one symbol. Fetching a window is then pure NumPy slicing -- no pandas on the hot
path -- and a whole batch is one fancy-indexing gather (``get_batch`` / ``__getitems__``).

One copy per node: :meth:`WindowDataset.from_config` (what the trainer uses) does not load the split into each
process. The split's arrays are written once, atomically, into an array cache beside the split
(``<dataset>/.arrays/<split>/``: NumPy ``.npy`` files and a JSON ``meta.json``, keyed by the split file's size,
mtime and inode and the manifest's hash; :func:`split_arrays`), by the first process that needs them while it holds
a file lock; every process then maps those files read-only, so all ranks of a node share the same pages of the page
cache. Windows are gathered out of the maps into fresh arrays and normalised there, bit-identical to a dataset built
from the frame.

Each window has ``W = lookback + predict + 1`` rows. It is normalised with the mean and population standard
deviation (float32) of its first ``lookback`` rows only, then clipped (MODEL_ARCHITECTURE_ANALYSIS.md §5.1)::

    x_norm = clip((x - mu) / (sigma + 1e-5), -clip, clip)

:class:`WindowSampler` decides *which* windows an epoch sees. It runs in the main process and draws the epoch's
indices from a generator seeded by ``(seed, epoch)``; the DataLoader hands each index to exactly one worker, so
workers never produce duplicate samples (the official dataset drew from a per-copy RNG inside ``__getitem__``,
so every worker replayed the same stream -- Q15). Ranks take interleaved, disjoint slices of the same global
sequence, and ``set_start`` skips the samples a resumed run has already consumed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from kronos import io as kio
from kronos.data.schema import NORM_EPS, TIME_FEATURES, time_features
from kronos.errors import ConfigError, DataError, InputError

try:
    import fcntl
except ImportError:  # no flock (Windows): no shared array cache, each process loads its split
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = [
    "WindowDataset",
    "SplitArrays",
    "frame_arrays",
    "split_arrays",
    "ARRAY_CACHE_DIR",
    "WindowSampler",
    "window_loader",
    "split_target_range",
    "normalise_windows",
    "FEATURE_ALIASES",
    "DEFAULT_FEATURES",
    "DEFAULT_TIME_FEATURES",
]

#: The seed's feature names; ``vol``/``amt`` are its short names for the frame's ``volume``/``amount`` columns.
DEFAULT_FEATURES = ["open", "high", "low", "close", "vol", "amt"]
DEFAULT_TIME_FEATURES = list(TIME_FEATURES)
FEATURE_ALIASES = {"vol": "volume", "amt": "amount", "volume": "vol", "amount": "amt"}


IndexLike: TypeAlias = "Sequence[int] | np.ndarray | torch.Tensor"


def normalise_windows(x: np.ndarray, lookback: int, clip: float) -> np.ndarray:
    """Normalise windows laid out feature-major, ``x [F, B, W]`` float32, in place; returns ``x``.

    Population mean/std (float32) of each window's first ``lookback`` rows, applied to all ``W`` rows, then
    clipped to ``[-clip, clip]`` (analysis §5.1). Time is the last, contiguous axis: NumPy's reductions and
    broadcasts are several times faster that way than over a middle axis of length 6.
    """
    past = x[..., :lookback]
    mu = np.add.reduce(past, axis=-1, keepdims=True)
    mu /= np.float32(lookback)
    dev = past - mu
    dev *= dev
    sigma = np.add.reduce(dev, axis=-1, keepdims=True)
    sigma /= np.float32(lookback)
    np.sqrt(sigma, out=sigma)  # ddof=0, like np.std in the official dataset
    sigma += np.float32(NORM_EPS)
    x -= mu
    x /= sigma
    np.clip(x, -clip, clip, out=x)
    return x


@dataclass(frozen=True)
class SplitArrays:
    """The arrays a :class:`WindowDataset` indexes, sorted by (symbol, timestamps), each symbol one block.

    Either private arrays converted from a frame (:func:`frame_arrays`) or read-only memory maps of a split's array
    cache (:func:`split_arrays`; ``folder`` and ``token`` then name that cache).
    """

    features: np.ndarray  # float32 [F, N], feature-major (time contiguous)
    stamps: np.ndarray  # float32 [N, T]
    timestamps: np.ndarray | None  # datetime64[ns] [N] (wall time), None without a timestamps column
    run_start: np.ndarray  # int64 [S]: first row of each symbol's block
    run_symbols: list[str]  # [S]
    feature_columns: list[str]  # the frame columns behind ``features`` (aliases resolved)
    folder: Path | None = None  # the array cache these arrays map, None for private arrays
    token: str = ""  # the cache's build token (a rebuilt cache has another one)

    @property
    def rows(self) -> int:
        return int(self.stamps.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the per-row arrays (features, stamps, timestamps)."""
        ts = 0 if self.timestamps is None else self.timestamps.nbytes
        return int(self.features.nbytes + self.stamps.nbytes + ts)


class WindowDataset(Dataset):
    """All ``lookback + predict + 1``-row windows of a processed frame, normalised per window.

    ``ds[i]`` returns ``(x, stamp)`` -- float32 tensors ``[W, 6]`` and ``[W, 5]`` -- or ``(x, stamp, i)`` when
    ``return_index`` is set. Windows never cross a symbol boundary; symbols shorter than ``W`` rows contribute
    none. ``get_batch(indices)`` computes a whole batch at once, and ``__getitems__`` lets a standard
    ``DataLoader`` (torch >= 2.1) use that vectorised path with its default collate.

    Built from a frame, the dataset holds private arrays. :meth:`from_config` (the trainer) instead maps the split's
    array cache read-only (:func:`split_arrays`), so every process on a node shares one copy of the data in the page
    cache; a window is gathered into a fresh array and normalised there, never in the mapped data.

    Args:
        frame: long frame with ``symbol`` (optional: absent = one series), ``timestamps`` (optional), the feature
            columns and the time-feature columns (derived from ``timestamps`` when missing), sorted or not.
        lookback: rows whose statistics normalise the window (config ``lookback_window``).
        predict: rows after the lookback (config ``predict_window``); the window has one extra row (analysis §5.1).
        clip: normalised values are clipped to ``[-clip, clip]``.
        feature_list: six feature columns; ``vol``/``amt`` are aliases of ``volume``/``amount``.
        time_feature_list: five time-feature columns.
        return_index: also return the window index (for checks and per-sample bookkeeping).
        name: label used in error messages (the split name, e.g. ``"train"``).
        target_range: ``(first, last)`` timestamps of the split's own bars (the manifest's ``first``/``last``):
            only windows whose target bars -- every row after the lookback -- lie in it are used, so no window
            reaches past the split's end and none scores bars of an earlier split; the lookback may reach back
            (history). ``None`` = every window. Needs a ``timestamps`` column.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        lookback: int,
        predict: int,
        clip: float = 5.0,
        feature_list: Sequence[str] | None = None,
        time_feature_list: Sequence[str] | None = None,
        return_index: bool = False,
        name: str = "data",
        target_range: tuple[Any, Any] | None = None,
    ) -> None:
        self._configure(lookback, predict, clip, feature_list, time_feature_list, return_index, name)
        if not isinstance(frame, pd.DataFrame):
            raise InputError(f"WindowDataset needs a pandas DataFrame, got {type(frame).__name__}")
        self._index(frame_arrays(frame, self.feature_list, self.time_feature_list, self.name), target_range)

    @classmethod
    def from_arrays(
        cls,
        arrays: SplitArrays,
        lookback: int,
        predict: int,
        clip: float = 5.0,
        feature_list: Sequence[str] | None = None,
        time_feature_list: Sequence[str] | None = None,
        return_index: bool = False,
        name: str = "data",
        target_range: tuple[Any, Any] | None = None,
    ) -> WindowDataset:
        """The dataset over ``arrays`` (from :func:`frame_arrays` or :func:`split_arrays`), used as they are."""
        ds = cls.__new__(cls)
        WindowDataset._configure(ds, lookback, predict, clip, feature_list, time_feature_list, return_index, name)
        if not isinstance(arrays, SplitArrays):
            raise InputError(f"WindowDataset.from_arrays needs SplitArrays, got {type(arrays).__name__}")
        WindowDataset._index(ds, arrays, target_range)
        return ds

    def _configure(
        self,
        lookback: int,
        predict: int,
        clip: float,
        feature_list: Sequence[str] | None,
        time_feature_list: Sequence[str] | None,
        return_index: bool,
        name: str,
    ) -> None:
        for key, value in (("lookback_window", lookback), ("predict_window", predict)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"config key '{key}' must be an integer >= 1, got {value!r}")
        if not clip > 0:
            raise ConfigError(f"config key 'clip' must be > 0, got {clip!r}")
        self.name = str(name)
        self.lookback = int(lookback)
        self.predict = int(predict)
        self.window = self.lookback + self.predict + 1
        self.clip = float(clip)
        self.return_index = bool(return_index)
        self.feature_list = list(feature_list or DEFAULT_FEATURES)
        self.time_feature_list = list(time_feature_list or DEFAULT_TIME_FEATURES)

    def _index(self, arrays: SplitArrays, target_range: tuple[Any, Any] | None) -> None:
        """Take ``arrays`` (kept as they are: memory maps stay maps) and build the window index over them."""
        # Features are kept feature-major ([6, N], time contiguous) for fast per-window statistics.
        self._feat_t = arrays.features  # [6, N]
        self.timestamps = arrays.timestamps
        self.stamps = arrays.stamps  # [N, 5]
        self._cache = (arrays.folder, arrays.token) if arrays.folder is not None else None
        run_start, run_symbols = arrays.run_start, arrays.run_symbols
        # Symbol runs: row offsets and lengths of each symbol's contiguous block.
        run_len = np.diff(np.concatenate([run_start, [arrays.rows]])).astype(np.int64)

        n_win = run_len - self.window + 1
        first_row = np.zeros_like(run_start)  # offset of each run's first usable window start
        self.target_range: tuple[pd.Timestamp, pd.Timestamp] | None
        if target_range is not None:
            first_row, n_win = self._target_limits(target_range, run_start, run_len)  # sets self.target_range
        else:
            self.target_range = None
        keep = n_win > 0
        if not keep.any():
            if self.target_range is not None and (run_len >= self.window).any():
                raise DataError(
                    f"split '{self.name}' has no window whose {self.predict + 1} target bars lie in its own dates "
                    f"{self.target_range[0]} .. {self.target_range[1]}; re-run the data step or widen the split"
                )
            self._raise_too_short(run_symbols, run_len)
        skipped = [s for s, k in zip(run_symbols, keep) if not k]
        if skipped:
            logger.info(
                "%s: %d of %d symbols have fewer than %d rows and give no window (e.g. %s)",
                self.name,
                len(skipped),
                len(run_symbols),
                self.window,
                ", ".join(skipped[:5]),
            )
        #: symbols that contribute at least one window, in row order
        self.symbols = [s for s, k in zip(run_symbols, keep) if k]
        self._sym_row0 = (run_start + first_row)[keep]
        counts = n_win[keep]
        self._win_cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._n = int(self._win_cum[-1])
        self._offsets = np.arange(self.window, dtype=np.int64)

    def _target_limits(
        self, target_range: tuple[Any, Any], run_start: np.ndarray, run_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per symbol run: first usable window start (offset) and number of windows inside ``target_range``."""
        if self.timestamps is None:
            raise InputError(f"{self.name}: target_range needs a 'timestamps' column")
        first, last = (pd.Timestamp(t) for t in target_range)
        if first.tzinfo is not None or last.tzinfo is not None:
            first, last = first.tz_localize(None), last.tz_localize(None)
        self.target_range = (first, last)
        lo_t, hi_t = np.datetime64(first, "ns"), np.datetime64(last, "ns")
        offset = np.zeros_like(run_start)
        count = np.zeros_like(run_start)
        for k, (r0, n) in enumerate(zip(run_start.tolist(), run_len.tolist())):
            ts = self.timestamps[r0 : r0 + n]  # sorted within the run
            own_start = int(np.searchsorted(ts, lo_t, side="left"))  # first row the split owns
            own_stop = int(np.searchsorted(ts, hi_t, side="right"))  # one past its last
            lo = max(0, own_start - self.lookback)  # the first target row (index lookback) must be owned
            hi = own_stop - self.window  # the last row must be owned
            offset[k], count[k] = lo, max(0, hi - lo + 1)
        return offset, count

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_config(cls, config: Any, split: str, return_index: bool = False, memmap: bool = True) -> WindowDataset:
        """Load ``split`` from ``config.dataset_path`` (see :func:`kronos.data.store.load_split`).

        Windows are limited to the split's own dates recorded in the dataset manifest (see
        :func:`split_target_range`), so training never sees validation bars and validation never test bars.

        With ``memmap`` (the default) the split's arrays are read through memory maps of its array cache
        (:func:`split_arrays`, built once from the split file), so the processes of a node share one copy; where
        there is no cache to use (a read-only dataset folder, no file locks) the split is loaded into this
        process's memory, as with ``memmap=False``. The windows are the same either way, bit for bit.
        """
        kw: dict[str, Any] = dict(cls.config_options(config), return_index=return_index, name=split)
        arrays = None
        if memmap:
            features = list(config.feature_list or DEFAULT_FEATURES)
            time_list = list(config.time_feature_list or DEFAULT_TIME_FEATURES)
            arrays = split_arrays(config.dataset_path, split, features, time_list)
        if arrays is not None:
            return cls.from_arrays(arrays, target_range=split_target_range(config.dataset_path, split), **kw)
        from kronos.data.store import load_split  # data store is optional for users who build frames themselves

        frame = load_split(config.dataset_path, split)
        return cls(frame, target_range=split_target_range(config.dataset_path, split), **kw)

    @staticmethod
    def config_options(config: Any) -> dict[str, Any]:
        """The window shape a config asks for (lookback, predict, clip, feature lists), as keyword arguments."""
        return dict(
            lookback=config.lookback_window,
            predict=config.predict_window,
            clip=config.clip,
            feature_list=config.feature_list,
            time_feature_list=config.time_feature_list,
        )

    @property
    def memory_mapped(self) -> bool:
        """True when the data arrays are read-only maps of a split's array cache (shared between processes)."""
        return self._cache is not None

    def __getstate__(self) -> dict:
        """Pickled (e.g. for spawned DataLoader workers): a memory-mapped dataset sends its cache's path, not the
        data, and the receiver maps the same files."""
        state = self.__dict__.copy()
        if self._cache is not None:
            state["_feat_t"] = state["stamps"] = state["timestamps"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._cache is not None:
            folder, token = self._cache
            arrays = _open_cache(Path(folder))
            if arrays is None or arrays.token != token:
                raise DataError(
                    f"{self.name}: the array cache {folder} changed or vanished while the dataset was in use "
                    "(the dataset was rewritten); restart the run"
                )
            self._feat_t, self.stamps, self.timestamps = arrays.features, arrays.stamps, arrays.timestamps

    def _raise_too_short(self, symbols: list[str], lengths: np.ndarray) -> None:
        need = f"{self.window} rows (lookback_window {self.lookback} + predict_window {self.predict} + 1)"
        if len(lengths) == 0:
            raise DataError(f"split '{self.name}' is empty; a window needs {need}; check the split's time range")
        k = int(np.argmax(lengths))
        names = ", ".join(symbols[:5]) + (f" and {len(symbols) - 5} more" if len(symbols) > 5 else "")
        raise DataError(
            f"split '{self.name}' has no window: every symbol ({names}) has fewer than {need}; longest is "
            f"{symbols[k]} with {int(lengths[k])} rows; lower lookback_window/predict_window or widen the split"
        )

    # ------------------------------------------------------------------ index arithmetic
    def __len__(self) -> int:
        return self._n

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map window indices to (symbol position, first row), checking bounds."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -self._n or idx.max() >= self._n):
            raise IndexError(f"window index out of range for {self._n} windows")
        idx = np.where(idx < 0, idx + self._n, idx)
        sym = np.searchsorted(self._win_cum, idx, side="right") - 1
        return sym, self._sym_row0[sym] + (idx - self._win_cum[sym])

    def window_rows(self, i: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` of window ``i`` in the (sorted) frame's arrays."""
        _, row = self._locate(np.array([i]))
        return int(row[0]), int(row[0]) + self.window

    def window_symbol(self, i: int) -> str:
        sym, _ = self._locate(np.array([i]))
        return self.symbols[int(sym[0])]

    def window_start_time(self, i: int) -> pd.Timestamp:
        if self.timestamps is None:
            raise InputError(f"{self.name}: the frame has no 'timestamps' column")
        return pd.Timestamp(self.timestamps[self.window_rows(i)[0]])

    # ------------------------------------------------------------------ fetching
    @property
    def features(self) -> np.ndarray:
        """Raw (un-normalised) float32 features ``[N, 6]`` of the sorted frame (a view)."""
        return self._feat_t.T

    def _windows(self, rows0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised features ``[B, W, 6]`` and stamps ``[B, W, 5]`` of windows starting at rows ``rows0``."""
        rows = rows0[:, None] + self._offsets  # [B, W]
        x = normalise_windows(np.take(self._feat_t, rows, axis=1), self.lookback, self.clip)  # [6, B, W]
        return np.ascontiguousarray(x.transpose(1, 2, 0)), np.take(self.stamps, rows, axis=0)

    def __getitem__(self, i: int | IndexLike) -> tuple:
        """Window ``i`` as ``(x [W, 6], stamp [W, 5])`` (+ ``i``); a list/array of indices gives ``get_batch``."""
        if isinstance(i, (list, tuple, np.ndarray)) or (isinstance(i, torch.Tensor) and i.dim() > 0):
            return self.get_batch(i)  # DataLoader(batch_size=None, sampler=BatchSampler(...)) path
        if isinstance(i, (np.integer, torch.Tensor)):
            i = int(i)
        if not isinstance(i, int):
            raise InputError(f"window index must be an int or a list/array of ints, got {type(i).__name__}")
        if not -self._n <= i < self._n:
            raise IndexError(f"window index {i} out of range for {self._n} windows")
        if i < 0:
            i += self._n
        k = int(np.searchsorted(self._win_cum, i, side="right")) - 1
        row = self._sym_row0[k : k + 1] + (i - self._win_cum[k])
        x, stamp = self._windows(row)
        if self.return_index:
            return torch.from_numpy(x[0]), torch.from_numpy(stamp[0]), i
        return torch.from_numpy(x[0]), torch.from_numpy(stamp[0])

    def get_batch(self, indices: IndexLike) -> tuple:
        """Windows ``indices`` as batched tensors ``x [B, W, 6]``, ``stamp [B, W, 5]`` (+ ``index [B]``).

        One gather and one vectorised normalisation for the whole batch; values equal ``ds[i]`` for each i.
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        _, row = self._locate(idx)
        x, stamp = self._windows(row)
        if self.return_index:
            index = torch.from_numpy(np.where(idx < 0, idx + self._n, idx))
            return torch.from_numpy(x), torch.from_numpy(stamp), index
        return torch.from_numpy(x), torch.from_numpy(stamp)

    def __getitems__(self, indices: list) -> list:
        """Batch fetch used by ``DataLoader`` (torch >= 2.1): per-sample views of one vectorised batch.

        Returning per-sample tuples keeps the default collate (and any custom one) working unchanged.
        """
        batch = self.get_batch(indices)
        xs, stamps = batch[0].unbind(0), batch[1].unbind(0)
        if self.return_index:
            return list(zip(xs, stamps, batch[2].tolist()))
        return list(zip(xs, stamps))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, windows={self._n}, symbols={len(self.symbols)}, "
            f"rows={len(self.features)}, window={self.window}, lookback={self.lookback})"
        )


def split_target_range(dataset_path: Any, split: str) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """``(first, last)`` own dates of ``split`` from the dataset manifest (``None`` for a dataset written before
    they were recorded; its windows are then not limited, and a warning says to re-run the data step)."""
    from kronos.data.store import load_manifest

    info = (load_manifest(dataset_path).get("splits") or {}).get(split) or {}
    if "first" not in info or "last" not in info:
        logger.warning(
            "dataset '%s' predates per-split dates in its manifest: %s windows may overlap other "
            "splits; re-run the data step",
            dataset_path,
            split,
        )
        return None
    return pd.Timestamp(info["first"]), pd.Timestamp(info["last"])


# ---------------------------------------------------------------------- frame -> arrays
def frame_arrays(
    frame: pd.DataFrame,
    feature_list: Sequence[str] | None = None,
    time_feature_list: Sequence[str] | None = None,
    name: str = "data",
) -> SplitArrays:
    """Convert a long frame into the private arrays of a :class:`WindowDataset` (sorted, checked for gaps).

    Feature values go through float64 to float32, time features likewise; missing time-feature columns are
    derived from ``timestamps``. Raises :class:`~kronos.errors.DataError` for non-numeric or non-finite values.
    """
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"WindowDataset needs a pandas DataFrame, got {type(frame).__name__}")
    feature_list = list(feature_list or DEFAULT_FEATURES)
    time_feature_list = list(time_feature_list or DEFAULT_TIME_FEATURES)
    frame = _sorted(frame, name)
    feat_cols = _resolve(frame, feature_list, "feature_list", name)
    feat_t = _float_block(frame, feat_cols, "feature", name)  # [6, N]
    timestamps = _datetimes(frame, name) if "timestamps" in frame.columns else None
    stamps = _stamp_block(frame, time_feature_list, timestamps, name)  # [N, 5]
    if "symbol" in frame.columns:
        codes, uniques = pd.factorize(frame["symbol"], sort=False)
        bounds = np.flatnonzero(np.diff(codes)) + 1
        run_start = np.concatenate([[0], bounds] if len(codes) else [[]]).astype(np.int64)
        run_symbols = [str(uniques[c]) for c in codes[run_start]] if len(codes) else []
    else:
        run_start = np.zeros(1 if len(frame) else 0, dtype=np.int64)
        run_symbols = [str(name)] if len(frame) else []
    arrays = SplitArrays(feat_t, stamps, timestamps, run_start, run_symbols, feat_cols)
    _check_finite(arrays, time_feature_list, name)
    return arrays


def _sorted(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Return ``frame`` ordered by (symbol, timestamps) with each symbol in one block (stable)."""
    keys = [k for k in ("symbol", "timestamps") if k in frame.columns]
    if not keys or len(frame) == 0:
        return frame
    ok = True
    if "symbol" in frame.columns:
        codes = pd.factorize(frame["symbol"], sort=False)[0]
        ok = (np.count_nonzero(np.diff(codes)) + 1) == (codes.max() + 1)
    if ok and "timestamps" in frame.columns:
        ts = _datetimes(frame, name).view(np.int64)
        step = np.diff(ts)
        if "symbol" in frame.columns:
            step = step[np.diff(codes) == 0]
        ok = bool((step >= 0).all())
    if ok:
        return frame
    logger.debug("%s: sorting frame by %s", name, keys)
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def _datetimes(frame: pd.DataFrame, name: str) -> np.ndarray:
    """The ``timestamps`` column as naive datetime64[ns] (wall time for tz-aware columns)."""
    try:
        ts = pd.to_datetime(frame["timestamps"])
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name}: column 'timestamps' cannot be read as dates ({exc})") from None
    if ts.dt.tz is not None:
        ts = ts.dt.tz_localize(None)
    return ts.to_numpy(dtype="datetime64[ns]")


def _resolve(frame: pd.DataFrame, names: Sequence[str], key: str, name: str) -> list[str]:
    cols = []
    for col in names:
        if col in frame.columns:
            cols.append(col)
        elif FEATURE_ALIASES.get(col) in frame.columns:
            cols.append(FEATURE_ALIASES[col])
        else:
            raise ConfigError(
                f"{name}: config key '{key}' names '{col}', which is not a column of the data; "
                f"columns are {list(map(str, frame.columns))}"
            )
    return cols


def _float_block(frame: pd.DataFrame, cols: list[str], what: str, name: str) -> np.ndarray:
    try:
        block = np.empty((len(cols), len(frame)), dtype=np.float32)
        for j, c in enumerate(cols):
            block[j] = frame[c].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        bad = next(c for c in cols if not pd.api.types.is_numeric_dtype(frame[c]))
        raise DataError(
            f"{name}: {what} column '{bad}' must be numeric, got dtype {frame[bad].dtype}; re-run data processing"
        ) from None
    return block


def _stamp_block(frame: pd.DataFrame, names: list[str], timestamps: np.ndarray | None, name: str) -> np.ndarray:
    block = np.empty((len(frame), len(names)), dtype=np.float32)
    derived = None
    for j, col_name in enumerate(names):
        if col_name in frame.columns:
            col = frame[col_name]
            if not pd.api.types.is_numeric_dtype(col):
                raise DataError(f"{name}: time feature column '{col_name}' must be numeric, got dtype {col.dtype}")
            block[:, j] = col.to_numpy(dtype=np.float64)
        elif col_name in TIME_FEATURES and timestamps is not None:
            if derived is None:
                derived = time_features(timestamps)
            block[:, j] = derived[col_name].to_numpy(dtype=np.float64)
        else:
            raise ConfigError(
                f"{name}: config key 'time_feature_list' names '{col_name}', which is not a column of the "
                f"data (and cannot be derived from 'timestamps'); columns are {list(map(str, frame.columns))}"
            )
    return block


def _check_finite(arrays: SplitArrays, time_feature_list: list[str], name: str) -> None:
    blocks = ((arrays.features.T, arrays.feature_columns), (arrays.stamps, time_feature_list))
    for block, names in blocks:
        bad = ~np.isfinite(block)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            sym = arrays.run_symbols[int(np.searchsorted(arrays.run_start, row, side="right")) - 1]
            ts = arrays.timestamps
            when = f" at {pd.Timestamp(ts[row])}" if ts is not None else f" row {row}"
            raise DataError(
                f"{name}: {int(bad.sum())} missing/non-finite values, first in column '{names[col]}' of "
                f"symbol {sym}{when}; drop or fill them during processing"
            )


# ---------------------------------------------------------------------- the split's array cache
#: Folder of the array caches inside a dataset folder: ``<dataset>/.arrays/<split>/``.
ARRAY_CACHE_DIR = ".arrays"
_CACHE_FORMAT = 1
_CACHE_META = "meta.json"
_CACHE_FILES = {"features": "features.npy", "stamps": "stamps.npy", "timestamps": "timestamps.npy"}
_CACHE_OFFSETS = "symbol_offsets.npy"


def split_arrays(
    dataset_path: Any,
    split: str,
    feature_list: Sequence[str] | None = None,
    time_feature_list: Sequence[str] | None = None,
) -> SplitArrays | None:
    """The arrays of ``split`` as read-only memory maps of its array cache, built first when needed.

    The cache, ``<dataset>/.arrays/<split>/``, holds the split's contiguous arrays as NumPy ``.npy`` files
    (``features.npy`` float32 ``[F, N]`` feature-major, ``stamps.npy`` float32 ``[N, T]``, ``timestamps.npy`` int64
    ns ``[N]``, ``symbol_offsets.npy`` int64 ``[S + 1]``) and ``meta.json`` (symbols, columns, and the fingerprint
    of the split file and manifest it was built from: size, mtime and inode of the split file, a SHA-256 of the
    manifest). A cache whose fingerprint or columns differ -- a rewritten dataset, another ``feature_list`` -- is
    rebuilt; a valid one is only mapped. Nothing is pickled; every file is read with ``allow_pickle=False``.

    The first process to need a cache builds it (through :func:`kronos.data.store.load_split` and the same
    conversion as a frame-built :class:`WindowDataset`, so the values are bit-identical) while holding an exclusive
    file lock beside it; the others wait on the lock and then map what it wrote. The folder appears in one atomic
    swap (:func:`kronos.io.write_folder`), so a build killed at any point leaves no partial cache that is used.
    Since every process maps the same files read-only, the data sits once in the node's page cache, however many
    ranks read it.

    Returns None where no cache can be used (the dataset folder or split file is missing, not writable, or the
    system has no file locks): the caller then loads the split into its own memory.
    """
    features = list(feature_list or DEFAULT_FEATURES)
    time_list = list(time_feature_list or DEFAULT_TIME_FEATURES)
    source = _split_fingerprint(dataset_path, split)
    if source is None or fcntl is None:
        return None
    folder = Path(source.pop("folder")) / ARRAY_CACHE_DIR
    cache = folder / split
    want = {"source": source, "features": features, "time_features": time_list}
    arrays = _open_cache(cache, want)
    if arrays is not None:
        return arrays
    try:
        folder.mkdir(exist_ok=True)
        lock_fd = os.open(folder / f".{split}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        logger.warning(
            "%s: cannot write the array cache under %s (%s); loading the split into this process's memory",
            split,
            folder,
            exc.strerror or exc,
        )
        return None
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s: waiting for another process building the array cache %s", split, cache)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        except OSError as exc:  # e.g. ENOLCK on a filesystem without locks
            logger.warning("%s: cannot lock the array cache %s (%s); loading the split into memory", split, cache, exc)
            return None
        arrays = _open_cache(cache, want)  # built by the process we waited for
        if arrays is None:
            if not _build_cache(dataset_path, split, cache, want):
                return None
            arrays = _open_cache(cache, want)
    finally:
        os.close(lock_fd)  # releases the lock
    if arrays is None:  # rewritten again in between: the caller reads the split itself
        logger.warning("%s: the array cache %s changed while it was built; loading the split into memory", split, cache)
    return arrays


def _split_fingerprint(dataset_path: Any, split: str) -> dict[str, Any] | None:
    """What identifies the split's current content: size, mtime and inode of each file of the split (the split
    file, or every file under it if it is a folder) and the manifest's SHA-256; None when there is nothing to key."""
    try:
        from kronos.data.store import MANIFEST_NAME, dataset_folder, split_file

        folder = Path(dataset_folder(dataset_path)).resolve()
        path = Path(split_file(dataset_path, split))
        manifest = folder / MANIFEST_NAME
        if not folder.is_dir() or not manifest.is_file():
            return None
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            return None
        entries = []
        for file in files:
            st = file.stat()
            entries.append([file.resolve().relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns, st.st_ino])
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    except (ImportError, OSError, ValueError):  # a store without these functions, a file that vanished
        return None
    if not entries:
        return None
    return {"folder": str(folder), "files": entries, "manifest_sha256": digest}


def _open_cache(cache: Path, want: dict[str, Any] | None = None) -> SplitArrays | None:
    """Map the arrays of ``cache`` read-only; None when it is missing, damaged, or does not match ``want``."""
    try:
        meta = kio.read_json(cache / _CACHE_META)
        if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
            return None
        if want is not None and any(meta.get(k) != v for k, v in want.items()):
            return None
        rows, symbols = int(meta["rows"]), [str(s) for s in meta["symbols"]]
        n_feat, n_time = len(meta["feature_columns"]), len(meta["time_features"])
        features = _map(cache / _CACHE_FILES["features"], np.float32, (n_feat, rows))
        stamps = _map(cache / _CACHE_FILES["stamps"], np.float32, (rows, n_time))
        timestamps = None
        if meta["has_timestamps"]:
            timestamps = _map(cache / _CACHE_FILES["timestamps"], np.int64, (rows,)).view("datetime64[ns]")
        offsets = np.array(_map(cache / _CACHE_OFFSETS, np.int64, (len(symbols) + 1,)))  # small: a private copy
        if offsets[0] != 0 or offsets[-1] != rows or (np.diff(offsets) <= 0).any():
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return SplitArrays(
        features,
        stamps,
        timestamps,
        offsets[:-1].copy(),
        symbols,
        [str(c) for c in meta["feature_columns"]],
        folder=cache,
        token=str(meta.get("token", "")),
    )


def _map(file: Path, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only, C-ordered map of the ``.npy`` file (no pickles), checked for dtype and shape."""
    if 0 in shape:
        arr = np.load(file, allow_pickle=False)  # an empty file cannot be mapped
    else:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    if arr.dtype != np.dtype(dtype) or arr.shape != shape or not arr.flags.c_contiguous:
        raise ValueError(f"{file.name}: {arr.dtype}{arr.shape}, expected {np.dtype(dtype)}{shape}")
    return np.asarray(arr)  # a plain ndarray view: slices and gathers are plain arrays, the map stays alive


def _build_cache(dataset_path: Any, split: str, cache: Path, want: dict[str, Any]) -> bool:
    """Convert the split file into the cache folder (atomically); False when it cannot be written."""
    from kronos.data.store import load_split

    started = time.perf_counter()
    frame = load_split(dataset_path, split)
    arrays = frame_arrays(frame, want["features"], want["time_features"], split)  # DataError propagates
    del frame
    meta = {
        "format": _CACHE_FORMAT,
        **want,
        "feature_columns": arrays.feature_columns,
        "rows": arrays.rows,
        "symbols": arrays.run_symbols,
        "has_timestamps": arrays.timestamps is not None,
        "token": uuid.uuid4().hex,
    }

    def fill(tmp: Path) -> None:
        np.save(tmp / _CACHE_FILES["features"], np.ascontiguousarray(arrays.features), allow_pickle=False)
        np.save(tmp / _CACHE_FILES["stamps"], np.ascontiguousarray(arrays.stamps), allow_pickle=False)
        if arrays.timestamps is not None:
            ns = np.ascontiguousarray(arrays.timestamps).view(np.int64)
            np.save(tmp / _CACHE_FILES["timestamps"], ns, allow_pickle=False)
        offsets = np.concatenate([arrays.run_start, [arrays.rows]]).astype(np.int64)
        np.save(tmp / _CACHE_OFFSETS, offsets, allow_pickle=False)
        (tmp / _CACHE_META).write_text(kio.dumps_json(meta), encoding="utf-8")

    try:
        kio.write_folder(cache, fill)
    except OSError as exc:
        logger.warning(
            "%s: cannot write the array cache %s (%s); loading the split into this process's memory",
            split,
            cache,
            exc.strerror or exc,
        )
        return False
    logger.info(
        "%s: built the array cache %s (%d rows, %.1f MB) in %.1fs",
        split,
        cache,
        arrays.rows,
        arrays.nbytes / 1e6,
        time.perf_counter() - started,
    )
    return True


class WindowSampler(Sampler[int]):
    """Reproducible per-epoch draw of ``num_samples`` window indices, split over ranks.

    Each epoch's global sequence comes from a NumPy generator seeded by ``(seed, epoch)``: indices are drawn
    without replacement while ``num_samples <= n_windows`` (further rounds of fresh permutations when more
    are asked). Rank ``r`` of ``world_size`` takes positions ``r, r + world_size, ...``, so ranks are disjoint;
    like ``DistributedSampler(drop_last=True)`` every rank gets ``num_samples // world_size`` (at least 1).

    The sampler lives in the main process and the DataLoader gives each index to one worker, so workers
    never duplicate samples (unlike the official per-worker RNG copies, Q15).

    Resume: ``set_start(k)`` skips the first ``k`` samples of this rank's current epoch; it holds until
    ``set_epoch`` moves to another epoch (calling ``set_epoch`` with the same epoch keeps it), so
    ``load_state_dict`` followed by the usual ``set_epoch(epoch)`` resumes exactly.
    """

    def __init__(self, n_windows: int, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        for key, value, low in (
            ("n_windows", n_windows, 1),
            ("num_samples", num_samples, 1),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise InputError(f"WindowSampler: '{key}' must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise InputError(f"WindowSampler: rank {rank} must be < world_size {world_size}")
        self.n_windows = int(n_windows)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.per_rank = max(1, self.num_samples // self.world_size)
        self.total = self.per_rank * self.world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's sequence; moving to a different epoch clears ``set_start``."""
        if epoch < 0:
            raise InputError(f"WindowSampler: epoch must be >= 0, got {epoch}")
        if int(epoch) != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def set_start(self, k: int) -> None:
        """Skip the first ``k`` samples of this rank's current epoch (samples already consumed)."""
        if not 0 <= k <= self.per_rank:
            raise InputError(f"WindowSampler: start must be in [0, {self.per_rank}], got {k}")
        self.start = int(k)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """The global sequence (all ranks interleaved) of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed % 2**64, epoch])
        out = np.empty(self.total, dtype=np.int64)
        pos = 0
        while pos < self.total:
            m = min(self.n_windows, self.total - pos)
            out[pos : pos + m] = rng.choice(self.n_windows, size=m, replace=False)
            pos += m
        return out

    def rank_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's full sequence for ``epoch`` (ignores ``set_start``)."""
        return self.epoch_indices(epoch)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start :].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "start": self.start,
            "n_windows": self.n_windows,
            "num_samples": self.num_samples,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore epoch and start; warn when the sampling setup differs (the resume would not be exact)."""
        for key in ("seed", "n_windows", "num_samples", "world_size"):
            if key in state and int(state[key]) != getattr(self, key):
                logger.warning(
                    "sampler state has %s=%s but this run uses %s; the resumed epoch will see a different "
                    "sample sequence",
                    key,
                    state[key],
                    getattr(self, key),
                )
        self.epoch = int(state.get("epoch", 0))
        self.start = 0
        self.set_start(min(int(state.get("start", 0)), self.per_rank))


def window_loader(
    dataset: WindowDataset,
    sampler: Sampler,
    batch_size: int,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader that fetches each batch with one vectorised ``dataset.get_batch`` call.

    The sampler's indices are grouped by a ``BatchSampler`` and the loader runs with ``batch_size=None``, so
    no per-sample tensors are built and no collate stacking happens (faster than the ``__getitems__`` path
    of a plain ``DataLoader(dataset, batch_size=...)``, which also works). ``len(loader)`` is the number of
    batches; a resumed sampler (``set_start``) shortens it accordingly. Extra ``kwargs`` go to DataLoader.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"config key 'batch_size' must be an integer >= 1, got {batch_size!r}")
    if num_workers > 0:
        kwargs.setdefault("persistent_workers", False)
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=BatchSampler(sampler, batch_size, drop_last),
        num_workers=num_workers,
        pin_memory=pin_memory,
        **kwargs,
    )
