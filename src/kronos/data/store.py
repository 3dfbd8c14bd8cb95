"""Processed datasets on disk: ``<dataset_path>/{train,val,test}.parquet`` and ``manifest.json``.

Each split is one long frame (see :data:`kronos.data.schema.SPLIT_COLUMNS`), sorted by symbol and time. Since
``format_version`` 2 a split is a Parquet dataset: the folder ``<split>.parquet/`` holding ``part-00000.parquet``,
``part-00001.parquet``, ... (one per chunk of symbols the data step wrote, in symbol order), which plain readers
(``pandas.read_parquet(folder)``) read as one table; version 1 datasets hold one file ``<split>.parquet``, and
:func:`load_split` reads both. The manifest records where the data came from (source, config, symbols, rows and
time range per split, skipped symbols). Nothing is pickled. :func:`save_dataset` (and the streaming data step,
:func:`kronos.data.processing.stream_dataset`) build the new dataset in a temporary folder beside the target and
swap it into place in one atomic step (:func:`kronos.io.write_folder`), so a failed or killed run never leaves a
half-written dataset, loses the previous one, or leaves ``dataset_path`` missing for plain readers (pandas).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kronos import io as kio
from kronos.errors import DataError, InputError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMAT_VERSION = 2  # 1: one file per split; 2: one folder of part files per split (both are read)
MANIFEST_NAME = "manifest.json"
DATASET_FILES: tuple[str, ...] = tuple(f"{s}.parquet" for s in SPLITS) + (MANIFEST_NAME,)
PART_PREFIX = "part-"


def part_name(index: int) -> str:
    """File name of the ``index``-th part of a split folder (sorting by name = sorting by index)."""
    return f"{PART_PREFIX}{index:05d}.parquet"


_RERUN = (
    "run the data step first (e.g. `python finetune/qlib_data_preprocess.py --config-path CONFIG`) "
    "or point config key 'dataset_path' at an existing dataset"
)

PathLike = str | os.PathLike


def split_file(path: PathLike, split: str) -> Path:
    """Path of one split inside the dataset folder ``path``: a folder of part files (format 2) or one file (1)."""
    if split not in SPLITS:
        raise InputError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    return dataset_folder(path) / f"{split}.parquet"


def dataset_folder(path: PathLike) -> Path:
    """The complete copy of the dataset folder ``path``: itself, or ``<path>.prev`` when a swap was killed."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    return kio.resolve_folder(p) or p


# the official scripts' dataset: pickled dicts of DataFrames (refused: unpickling a file can run any code)
OFFICIAL_PICKLES = ("train_data.pkl", "val_data.pkl", "test_data.pkl")


def refuse_official_pickles(path: PathLike) -> None:
    """One-line :class:`~kronos.errors.DataError` when ``path`` holds the official pickle dataset instead of ours."""
    folder = Path(path).expanduser()
    found = [name for name in OFFICIAL_PICKLES if (folder / name).is_file()]
    if found and not (folder / MANIFEST_NAME).is_file():
        raise DataError(
            f"dataset_path '{folder}' holds the official scripts' pickle dataset ({', '.join(found)}); this package "
            "never unpickles data (loading a pickle can run any code): rebuild it as Parquet from the raw data with "
            "`kronos data --config-path <your config>` (or train_complete_pipeline.py without --skip-data-process)"
        )


def dataset_exists(path: PathLike) -> bool:
    """True when ``path`` (or its ``.prev`` copy after a killed swap) holds all three splits and the manifest."""
    p = dataset_folder(path)
    return (p / MANIFEST_NAME).is_file() and all(_is_split(p / f"{s}.parquet") for s in SPLITS)


def _is_split(entry: Path) -> bool:
    return entry.is_file() or (entry.is_dir() and any(split_parts(entry)))


def split_parts(entry: Path) -> list[Path]:
    """The part files of a split folder, in order (empty when ``entry`` is no such folder)."""
    if not entry.is_dir():
        return []
    return sorted(p for p in entry.iterdir() if p.name.startswith(PART_PREFIX) and p.name.endswith(".parquet"))


def check_part(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    """``frame`` in canonical columns/dtypes, sorted by (symbol, timestamps); DataError on NaN values or a
    repeated (symbol, timestamps) pair."""
    from kronos.data.schema import SPLIT_COLUMNS, VALUE_COLUMNS, check_split_frame

    frame = check_split_frame(frame, what)
    if frame[list(VALUE_COLUMNS)].isna().any().any():
        raise DataError(f"{what} holds NaN feature values; clean the data before saving")
    if frame.duplicated(["symbol", "timestamps"]).any():
        raise DataError(f"{what} repeats a (symbol, timestamps) pair; each bar must appear once")
    frame = frame.sort_values(["symbol", "timestamps"], kind="mergesort").reset_index(drop=True)
    return frame[list(SPLIT_COLUMNS)]


def write_part(folder: Path, split: str, index: int, frame: pd.DataFrame) -> Path:
    """Write one part of ``split`` into the (temporary) dataset folder ``folder``; returns the file."""
    file = folder / f"{split}.parquet" / part_name(index)
    file.parent.mkdir(exist_ok=True)
    check_part(frame, f"split '{split}'").to_parquet(file, index=False, engine="pyarrow")
    return file


@functools.cache
def _split_schema() -> Any:
    """The Arrow schema (with pandas' metadata) of a split frame as ``DataFrame.to_parquet`` writes it."""
    import pyarrow as pa

    from kronos.data.schema import SPLIT_COLUMNS, check_split_frame

    one = pd.DataFrame(
        {c: ["x"] if c == "symbol" else [pd.Timestamp(0)] if c == "timestamps" else [0] for c in SPLIT_COLUMNS}
    )
    return pa.Schema.from_pandas(check_split_frame(one, "split"), preserve_index=False)


def split_table(symbols: list[str], lengths: np.ndarray, times: np.ndarray, values: np.ndarray) -> Any:
    """A split part as an Arrow table, straight from arrays: symbol ``symbols[i]`` owns the next ``lengths[i]`` rows
    of ``times`` (int64 ns, sorted within a symbol) and ``values`` (float64, one column per value column); the
    calendar features are computed here. Read back, it is the frame :func:`write_part` would have written."""
    import pyarrow as pa

    from kronos.data.schema import TIME_FEATURES, VALUE_COLUMNS, time_features

    schema = _split_schema()
    codes = pa.array(np.repeat(np.arange(len(symbols), dtype="int32"), lengths))
    stamps = times.view("datetime64[ns]")
    features = time_features(stamps)
    columns = [pa.array(symbols, type=schema.field("symbol").type).take(codes), pa.array(stamps)]
    columns += [pa.array(np.ascontiguousarray(values[:, j])) for j in range(len(VALUE_COLUMNS))]
    columns += [pa.array(features[c].to_numpy()) for c in TIME_FEATURES]
    return pa.Table.from_arrays(columns, schema=schema)


def write_table_part(folder: Path, split: str, index: int, table: Any) -> Path:
    """Write one part of ``split`` (an Arrow table from :func:`split_table`) into the dataset folder ``folder``."""
    import pyarrow.parquet as pq

    file = folder / f"{split}.parquet" / part_name(index)
    file.parent.mkdir(exist_ok=True)
    pq.write_table(table, file)
    return file


def save_dataset(path: PathLike, splits: Mapping[str, pd.DataFrame], manifest: Mapping[str, Any]) -> None:
    """Write ``splits`` (train, val, test long frames) and ``manifest`` to the folder ``path`` atomically.

    Everything is written into a temporary folder beside ``path`` first; only then is it swapped with the old
    folder in one step. Files in ``path`` that are not part of a dataset (a raw-data cache, notes) are carried
    over into the new folder (by the next write, when a kill interrupts the move).
    """
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise InputError(f"save_dataset needs the splits {list(SPLITS)}; missing {missing}")
    frames = {split: check_part(splits[split], f"split '{split}'") for split in SPLITS}
    manifest_text = kio.dumps_json(dict(manifest))

    given = Path(path).expanduser()
    target = given.parent.resolve() / given.name  # not the folder itself: it may be a link to its current version
    if target.exists() and not target.is_dir():
        raise DataError(f"dataset path '{target}' is a file; set config key 'dataset_path' to a folder")

    def fill(folder: Path) -> None:
        for split, frame in frames.items():
            write_part(folder, split, 0, frame)
        (folder / MANIFEST_NAME).write_text(manifest_text, encoding="utf-8")

    try:
        # entries of the old folder that are not dataset files (a raw-data cache, notes) move into the new one
        kio.write_folder(target, fill, keep_others=True)
    except OSError as exc:
        raise DataError(f"cannot write the dataset folder '{target}': {exc.strerror or exc}") from None
    logger.info("dataset written to %s (%s)", target, ", ".join(f"{s}: {len(frames[s])} rows" for s in SPLITS))


def load_split(path: PathLike, split: str) -> pd.DataFrame:
    """Read one split's long frame (columns and dtypes as in :data:`~kronos.data.schema.SPLIT_COLUMNS`)."""
    from kronos.data.schema import check_split_frame

    entry = split_file(path, split)
    files = split_parts(entry) if entry.is_dir() else [entry] if entry.is_file() else []
    if not files:
        refuse_official_pickles(path)
        raise DataError(f"dataset split '{split}' not found at '{entry}'; {_RERUN}")
    frames = [_read_part(file) for file in files]
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return check_split_frame(frame, f"dataset split '{entry}'")


def _read_part(file: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(file, engine="pyarrow")
    except Exception as exc:  # pyarrow raises several unrelated types for damaged files
        raise DataError(
            f"cannot read dataset file '{file}' ({type(exc).__name__}: {exc}); re-run the data step"
        ) from None


def load_manifest(path: PathLike) -> dict[str, Any]:
    """Read ``manifest.json`` of the dataset folder ``path``."""
    file = dataset_folder(path) / MANIFEST_NAME
    if not file.is_file():
        refuse_official_pickles(path)
        raise DataError(f"dataset manifest not found at '{file}'; {_RERUN}")
    try:
        data = kio.read_json(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read dataset manifest '{file}' ({exc}); re-run the data step") from None
    if not isinstance(data, dict):
        raise DataError(f"dataset manifest '{file}' is not a JSON object; re-run the data step")
    return data


__all__ = [
    "SPLITS",
    "dataset_folder",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "DATASET_FILES",
    "split_file",
    "split_parts",
    "part_name",
    "check_part",
    "write_part",
    "split_table",
    "write_table_part",
    "dataset_exists",
    "save_dataset",
    "load_split",
    "load_manifest",
]
