"""The one place that writes files: atomic files and folders, strict JSON, and tables.

Every writer in the package goes through here, so a reader (or a crash) never sees half a file:

* :func:`write_file` / :func:`write_text` / :func:`write_bytes`: write a temporary file in the target's folder,
  ``fsync`` it, then ``os.replace`` it over the target.
* :func:`write_folder`: fill a temporary folder, then swap it into place. The previous folder survives as
  ``<name>.prev`` until the new one is in place, so at every instant either ``<name>`` or ``<name>.prev`` is
  complete (:func:`resolve_folder` finds it).
* :func:`to_jsonable` / :func:`dumps_json` / :func:`write_json`: strict JSON. NaN and +-inf become ``null``;
  numpy and pandas scalars, arrays, Timestamps, Paths, sets and dataclasses become plain JSON values.
* :func:`write_table`: a frame as Parquet and CSV side by side.

Every rename goes through :func:`_replace`. For crash tests only, the environment variable
``KRONOS_TEST_KILL_AFTER_RENAME=N`` makes the process SIGKILL itself right after its N-th rename, so a test can
stop a writer between any two renames and check that every configured path still loads.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike

PREV_SUFFIX = ".prev"
_TMP_MARK = ".tmp-"
KILL_ENV = "KRONOS_TEST_KILL_AFTER_RENAME"
_renames = 0


def _replace(src: PathLike, dst: PathLike) -> None:
    """``os.replace``, counted for the crash-test hook (see the module docstring)."""
    global _renames
    os.replace(src, dst)
    limit = os.environ.get(KILL_ENV)
    if limit:
        _renames += 1
        if _renames >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- files
def write_file(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Create ``path`` atomically: ``write(tmp_path)`` fills a temporary file beside it, which is then renamed.

    ``write`` receives the temporary path (e.g. ``lambda p: frame.to_parquet(p)``). On any failure the temporary
    file is removed and ``path`` is left as it was.
    """
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}{_TMP_MARK}{_token()}{target.suffix}")
    try:
        write(tmp)
        _fsync_file(tmp)
        _replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def write_bytes(path: PathLike, data: bytes) -> Path:
    return write_file(path, lambda p: p.write_bytes(data))


def write_text(path: PathLike, text: str) -> Path:
    return write_file(path, lambda p: p.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- JSON
def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON types; NaN and +-inf become ``None`` (never a huge number)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(v) for v in items]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    mod = type(value).__module__.split(".")[0]
    if mod == "numpy":
        # numpy/pandas load only when such a value is written: this module is imported by the CLI's parser path
        import numpy as np

        if isinstance(value, np.ndarray):
            return to_jsonable(value.tolist())
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return to_jsonable(float(value))
        if isinstance(value, np.datetime64):
            return None if np.isnat(value) else _timestamp(value)
    if mod == "pandas":
        import pandas as pd

        if value is pd.NaT:
            return None
        if isinstance(value, pd.Timestamp):
            return value.isoformat()
        if isinstance(value, pd.Timedelta):
            return str(value)
        if isinstance(value, (pd.Series, pd.Index)):
            return to_jsonable(value.tolist())
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors and the like
        try:
            return to_jsonable(value.item())
        except (TypeError, ValueError):
            pass
    raise TypeError(f"a value of type {type(value).__name__} cannot be written as JSON")


def _timestamp(value: Any) -> str:
    import pandas as pd

    return pd.Timestamp(value).isoformat()


def dumps_json(value: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``value`` (see :func:`to_jsonable`), ending with a newline when indented."""
    text = json.dumps(to_jsonable(value), indent=indent, ensure_ascii=False, allow_nan=False)
    return text + "\n" if indent is not None else text


def write_json(path: PathLike, value: Any) -> Path:
    """Write ``value`` as strict JSON, atomically."""
    return write_text(path, dumps_json(value))


def read_json(path: PathLike) -> Any:
    """Parse a JSON file (errors propagate as OSError/ValueError for the caller to word)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_json_object(path: PathLike, what: str = "file") -> dict | None:
    """An optional JSON object file: None when it is missing, unreadable or not an object (logged as ``what``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        logging.getLogger(__name__).warning("%s %s is not a valid JSON object; ignoring it", what, path)
        return None
    return data


# ---------------------------------------------------------------------------------------------- tables
def write_table(frame: Any, stem: PathLike, index: bool = False) -> Path:
    """Write ``frame`` as ``<stem>.parquet`` and ``<stem>.csv`` (each atomically); returns the Parquet path."""
    stem = Path(stem)
    pq = stem.with_name(stem.name + ".parquet")
    write_file(pq, lambda p: frame.to_parquet(p, index=index, engine="pyarrow"))
    write_file(stem.with_name(stem.name + ".csv"), lambda p: frame.to_csv(p, index=index))
    return pq


# ---------------------------------------------------------------------------------------------- folders
def write_folder(
    target: PathLike, fill: Callable[[Path], Any], keep: Iterable[str] | None = None, keep_others: bool = False
) -> Path:
    """Create the folder ``target`` by ``fill(tmp_folder)`` and swap it into place.

    The old ``target`` is renamed to ``target.prev`` just before the new one is renamed in, and removed after,
    so at every instant either ``target`` or ``target.prev`` is complete (see :func:`resolve_folder`). Entries of
    the old folder named in ``keep`` (or, with ``keep_others``, every entry the new folder does not have) are moved
    into the new one instead of being dropped, e.g. a raw-data cache beside a dataset. Temporary folders left by
    a killed writer are removed first.
    """
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"'{target}' exists and is not a folder")
    prev = target.with_name(target.name + PREV_SUFFIX)
    for stale in target.parent.glob(f".{target.name}{_TMP_MARK}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    if not target.exists() and prev.is_dir():
        _replace(prev, target)  # a crash between the two renames: the .prev copy is the complete one
    elif target.is_dir() and prev.is_dir():
        _carry_over(prev, target, keep, keep_others)  # a crash while carrying entries over: finish it
        shutil.rmtree(prev, ignore_errors=True)
    tmp = target.with_name(f".{target.name}{_TMP_MARK}{_token()}")
    tmp.mkdir()
    try:
        fill(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        if prev.exists():
            shutil.rmtree(prev)
        _replace(target, prev)
    _replace(tmp, target)
    _fsync_dir(target.parent)
    if prev.exists():
        _carry_over(prev, target, keep, keep_others)
        shutil.rmtree(prev, ignore_errors=True)
    return target


def _carry_over(prev: Path, target: Path, keep: Iterable[str] | None, keep_others: bool) -> None:
    """Move the entries of the old folder that the new one should keep (named in ``keep``, or all others)."""
    wanted = set(keep or ())
    for entry in list(prev.iterdir()):
        if (entry.name in wanted or keep_others) and not (target / entry.name).exists():
            _replace(entry, target / entry.name)


def resolve_folder(target: PathLike) -> Path | None:
    """The complete version of a folder written by :func:`write_folder` (``None`` if there is none)."""
    target = Path(target).expanduser()
    if target.is_dir():
        return target
    prev = target.with_name(target.name + PREV_SUFFIX)
    return prev if prev.is_dir() else None


# ---------------------------------------------------------------------------------------------- fsync
def final_path(path: PathLike) -> Path:
    """The path a temporary of :func:`write_file`/:func:`write_folder` (``.<name>.tmp-<token>[suffix]``) becomes
    once renamed; any other path unchanged. Logs name this, never the temporary."""
    p = Path(path)
    name = p.name
    if name.startswith(".") and _TMP_MARK in name:
        base, _, rest = name[1:].rpartition(_TMP_MARK)
        if base and "-" in rest:
            return p.with_name(base)
    return p


def _token() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # best effort: some filesystems refuse fsync
        pass
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    _fsync_file(folder)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            _fsync_file(p)
    for p in folder.rglob("*"):
        if p.is_dir():
            _fsync_dir(p)
    _fsync_dir(folder)


__all__ = [
    "write_file",
    "write_bytes",
    "write_text",
    "to_jsonable",
    "dumps_json",
    "write_json",
    "read_json",
    "write_table",
    "write_folder",
    "resolve_folder",
]
