"""Processed datasets on disk: ``<dataset_path>/{train,val,test}.parquet`` and ``manifest.json``.

Each split file holds one long frame (see :data:`kronos.data.schema.SPLIT_COLUMNS`); the manifest records
where the data came from (source, config, symbols, rows and time range per split, skipped symbols).
Nothing is pickled. :func:`save_dataset` builds the new dataset in a temporary folder beside the target and
swaps it into place, so a failed run never leaves a half-written dataset or loses the previous one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import pandas as pd

from kronos.errors import DataError, InputError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DATASET_FILES: tuple[str, ...] = tuple(f"{s}.parquet" for s in SPLITS) + (MANIFEST_NAME,)

_RERUN = "run the data step first (e.g. `python finetune/qlib_data_preprocess.py --config-path CONFIG`) " \
         "or point config key 'dataset_path' at an existing dataset"

PathLike = Union[str, os.PathLike]


def split_file(path: PathLike, split: str) -> Path:
    """Path of one split's Parquet file inside the dataset folder ``path``."""
    if split not in SPLITS:
        raise InputError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    return Path(path).expanduser() / f"{split}.parquet"


def dataset_exists(path: PathLike) -> bool:
    """True when ``path`` holds all three split files and the manifest."""
    p = Path(path).expanduser()
    return all((p / name).is_file() for name in DATASET_FILES)


def _json_default(value: Any) -> Any:
    if isinstance(value, (pd.Timestamp, np.datetime64)):
        return pd.Timestamp(value).isoformat()
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (os.PathLike, set, tuple)):
        return os.fspath(value) if isinstance(value, os.PathLike) else list(value)
    raise TypeError(f"manifest value of type {type(value).__name__} is not JSON-serialisable")


def save_dataset(path: PathLike, splits: Mapping[str, pd.DataFrame], manifest: Mapping[str, Any]) -> None:
    """Write ``splits`` (train, val, test long frames) and ``manifest`` to the folder ``path`` atomically.

    Everything is written into a temporary folder beside ``path`` first; only then is the old folder moved
    aside and the new one renamed into place. Files in ``path`` that are not part of a dataset (a raw-data
    cache, notes) are carried over into the new folder.
    """
    from kronos.data.schema import SPLIT_COLUMNS, VALUE_COLUMNS, check_split_frame

    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise InputError(f"save_dataset needs the splits {list(SPLITS)}; missing {missing}")
    frames = {}
    for split in SPLITS:
        frame = check_split_frame(splits[split], f"split '{split}'")
        if frame[list(VALUE_COLUMNS)].isna().any().any():
            raise DataError(f"split '{split}' holds NaN feature values; clean the data before saving")
        if frame.duplicated(["symbol", "timestamps"]).any():
            raise DataError(f"split '{split}' repeats a (symbol, timestamps) pair; each bar must appear once")
        frames[split] = frame.sort_values(["symbol", "timestamps"], kind="mergesort").reset_index(drop=True)
    manifest_text = json.dumps(dict(manifest), indent=2, ensure_ascii=False, default=_json_default) + "\n"

    target = Path(path).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise DataError(f"dataset path '{target}' is a file; set config key 'dataset_path' to a folder")
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.with_name(f".{target.name}.tmp-{token}")
    old = target.with_name(f".{target.name}.old-{token}")
    try:
        try:
            tmp.mkdir(parents=True)
            for split, frame in frames.items():
                frame[list(SPLIT_COLUMNS)].to_parquet(tmp / f"{split}.parquet", index=False, engine="pyarrow")
            (tmp / MANIFEST_NAME).write_text(manifest_text, encoding="utf-8")
        except OSError as exc:
            raise DataError(f"cannot write the dataset beside '{target}': {exc.strerror or exc}") from None
        if target.exists():
            try:
                os.rename(target, old)
            except OSError as exc:
                raise DataError(f"cannot replace the dataset folder '{target}': {exc.strerror or exc}") from None
            try:
                os.rename(tmp, target)
            except OSError as exc:
                os.rename(old, target)  # put the previous dataset back
                raise DataError(f"cannot replace the dataset folder '{target}': {exc.strerror or exc}") from None
            _carry_over(old, target)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("dataset written to %s (%s)", target,
                ", ".join(f"{s}: {len(frames[s])} rows" for s in SPLITS))


def _carry_over(old: Path, target: Path) -> None:
    """Move entries of the previous folder that are not dataset files into the new one, then drop it."""
    left = []
    for entry in old.iterdir():
        if entry.name in DATASET_FILES:
            continue
        try:
            os.rename(entry, target / entry.name)
        except OSError:
            left.append(entry.name)
    if left:
        logger.warning("could not move %s from the previous dataset folder; they remain in %s", left, old)
    else:
        shutil.rmtree(old, ignore_errors=True)


def load_split(path: PathLike, split: str) -> pd.DataFrame:
    """Read one split's long frame (columns and dtypes as in :data:`~kronos.data.schema.SPLIT_COLUMNS`)."""
    from kronos.data.schema import check_split_frame

    file = split_file(path, split)
    if not file.is_file():
        raise DataError(f"dataset split '{split}' not found at '{file}'; {_RERUN}")
    try:
        frame = pd.read_parquet(file, engine="pyarrow")
    except Exception as exc:  # pyarrow raises several unrelated types for damaged files
        raise DataError(f"cannot read dataset file '{file}' ({type(exc).__name__}: {exc}); re-run the data step") from None
    return check_split_frame(frame, f"dataset file '{file}'")


def load_manifest(path: PathLike) -> dict[str, Any]:
    """Read ``manifest.json`` of the dataset folder ``path``."""
    file = Path(path).expanduser() / MANIFEST_NAME
    if not file.is_file():
        raise DataError(f"dataset manifest not found at '{file}'; {_RERUN}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read dataset manifest '{file}' ({exc}); re-run the data step") from None
    if not isinstance(data, dict):
        raise DataError(f"dataset manifest '{file}' is not a JSON object; re-run the data step")
    return data


__all__ = [
    "SPLITS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "DATASET_FILES",
    "split_file",
    "dataset_exists",
    "save_dataset",
    "load_split",
    "load_manifest",
]
