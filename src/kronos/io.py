"""The one place that writes files: atomic files and folders, strict JSON, and tables.

Every writer in the package goes through here, so a reader (or a crash) never sees half a file:

* :func:`write_file` / :func:`write_text` / :func:`write_bytes`: write a temporary file in the target's folder,
  ``fsync`` it, then ``os.replace`` it over the target.
* :func:`write_folder`: fill a temporary folder beside the target, then swap it into place in one step, so the
  configured path is a complete folder at every instant (plain readers, e.g. pandas or ``from_pretrained(path)``,
  never find it missing, even after a kill -9 at any point):

  - on Linux, ``renameat2(RENAME_EXCHANGE)`` exchanges the filled temporary folder with the existing one; the old
    one, now under the temporary's name, is removed after its kept entries are moved over;
  - where the kernel or filesystem refuses an exchange (non-Linux, some network filesystems), the configured path
    is a symbolic link to a versioned sibling ``.<name>.v-<n>-<token>``: a new link is made under a temporary
    name and renamed over the path (atomic), then the old version is removed. An existing real folder there
    (written by an older version of this module) is turned into such a link once; that one replacement goes
    through ``<name>.prev`` (see below), as does every replacement where symbolic links are refused too (the last
    resort: the old folder renamed to ``<name>.prev``, then the new one into place; logged).

  Entries of the old folder that the new one keeps (``keep``/``keep_others``, e.g. a raw-data cache beside a
  dataset) are moved over from the old copy after the swap; until then the old copy's name says so
  (``-k<inode>``) and no cleaner removes it (:func:`holds_kept_entries`): the next write of that folder finishes
  the move.
* :func:`heal_folder`: a writer killed by an older version of this module between its two renames left the path
  missing and its complete previous version at ``<name>.prev``; every command that touches such a path moves it
  back first (logged). :func:`resolve_folder` still reads ``<name>.prev`` when the path is missing.
* :func:`to_jsonable` / :func:`dumps_json` / :func:`write_json`: strict JSON. NaN and +-inf become ``null``;
  numpy and pandas scalars, arrays, Timestamps, Paths, sets and dataclasses become plain JSON values.
* :func:`write_table`: a frame as Parquet and CSV side by side.

Every rename and exchange goes through :func:`_replace` or :func:`_exchange`. For crash tests only, the environment
variable ``KRONOS_TEST_KILL_AFTER_RENAME=N`` makes the process SIGKILL itself right after its N-th rename or
exchange, so a test can stop a writer between any two of them and check that every configured path still loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as _dt
import errno
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import sys
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike

logger = logging.getLogger(__name__)

PREV_SUFFIX = ".prev"
_TMP_MARK = ".tmp-"
_VERSION_MARK = ".v-"
_KEEP_TAG = "-k"  # ends the temporary's name of a swap with kept entries: "-k<inode of the folder it replaces>"
KILL_ENV = "KRONOS_TEST_KILL_AFTER_RENAME"
_renames = 0

# Folder swaps by exchange (Linux renameat2). False forces the symbolic-link fallback (tests; never needed otherwise).
EXCHANGE = True
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_RENAMEAT2_SYSCALL = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}  # when libc lacks renameat2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
_renameat2_fn: Any = None  # resolved on first use: a callable, or False where there is none
_exchange_works: dict[int, bool] = {}  # st_dev of a folder -> whether an exchange works there


def _count_rename() -> None:
    """The crash-test hook (see the module docstring): SIGKILL after the N-th rename or exchange."""
    global _renames
    limit = os.environ.get(KILL_ENV)
    if limit:
        _renames += 1
        if _renames >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)


def _replace(src: PathLike, dst: PathLike) -> None:
    """``os.replace``, counted for the crash-test hook (see the module docstring)."""
    os.replace(src, dst)
    _count_rename()


def _renameat2() -> Any:
    """libc's ``renameat2`` (or a raw-syscall stand-in), or False where there is none."""
    global _renameat2_fn
    if _renameat2_fn is None:
        _renameat2_fn = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
            except OSError:
                return _renameat2_fn
            fn = getattr(libc, "renameat2", None)
            args = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            if fn is not None:
                fn.argtypes, fn.restype = args, ctypes.c_int
                _renameat2_fn = fn
            elif platform.machine().lower() in _RENAMEAT2_SYSCALL:  # glibc < 2.28, musl: the system call itself
                _renameat2_fn = _syscall_renameat2(libc, _RENAMEAT2_SYSCALL[platform.machine().lower()])
    return _renameat2_fn


def _syscall_renameat2(libc: Any, number: int) -> Callable[[int, bytes, int, bytes, int], int]:
    """``renameat2`` through ``syscall(number, ...)`` (every argument passed as a full register)."""
    syscall = libc.syscall
    syscall.restype = ctypes.c_long

    def call(fd1: int, src: bytes, fd2: int, dst: bytes, flags: int) -> int:
        args = (ctypes.c_long(fd1), ctypes.c_char_p(src), ctypes.c_long(fd2), ctypes.c_char_p(dst))
        return int(syscall(ctypes.c_long(number), *args, ctypes.c_ulong(flags)))

    return call


def _raw_exchange(a: Path, b: Path) -> bool:
    """Exchange ``a`` and ``b`` atomically; False (nothing changed) where the system or filesystem cannot."""
    fn: Any = _renameat2() if EXCHANGE else False
    if not fn:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        if err in _UNSUPPORTED:
            return False
        raise OSError(err, os.strerror(err), str(a), None, str(b))
    return True


def _exchange(a: PathLike, b: PathLike) -> bool:
    """Exchange two paths atomically (counted for the crash-test hook); False where that is not possible."""
    if not _raw_exchange(Path(a), Path(b)):
        return False
    _count_rename()
    return True


def _can_exchange(folder: Path, name: str) -> bool:
    """Whether exchanges work in ``folder`` (tried once per filesystem on two empty scratch folders)."""
    if not EXCHANGE or not _renameat2():
        return False
    dev = folder.stat().st_dev
    if dev not in _exchange_works:
        a = folder / f".{name}{_TMP_MARK}{_token()}-xa"
        b = folder / f".{name}{_TMP_MARK}{_token()}-xb"
        a.mkdir()
        try:
            b.mkdir()
            _exchange_works[dev] = _raw_exchange(a, b)
        finally:
            for p in (a, b):
                with contextlib.suppress(OSError):
                    p.rmdir()
    return _exchange_works[dev]


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
    """Create the folder ``target`` by ``fill(tmp_folder)`` and swap it into place (see the module docstring).

    At every instant ``target`` is a complete folder, the old one or the new one. Entries of the old folder
    named in ``keep`` (or, with ``keep_others``, every entry the new folder does not have) are moved into the new
    one instead of being dropped, e.g. a raw-data cache beside a dataset; a kill before they are all moved leaves
    them in the old copy, and the next write of ``target`` moves them. Leftovers of killed writers (temporary
    folders, old versions, a ``.prev`` from an older version of this module) are settled first.
    A symbolic link at ``target`` that this module did not make is followed: the folder it points to is replaced.
    """
    given = Path(target).expanduser()
    target = _own_path(given)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"'{target}' exists and is not a folder")
    keep = set(keep or ())
    _settle(target, keep, keep_others)
    tag = ""
    if (keep or keep_others) and target.is_dir() and not target.is_symlink():
        tag = f"{_KEEP_TAG}{target.stat().st_ino}"  # after the exchange this name holds the old folder: kept
    tmp = target.with_name(f".{target.name}{_TMP_MARK}{_token()}{tag}")
    tmp.mkdir()
    try:
        fill(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        old = _swap_in(tmp, target)
    except BaseException:
        if not holds_kept_entries(tmp):  # the swap did not happen: the new folder goes
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None and old.is_dir() and not old.is_symlink():
        _carry_over(old, target, keep, keep_others)
        _remove(old)
    return given


def _swap_in(tmp: Path, target: Path) -> Path | None:
    """Put the filled folder ``tmp`` at ``target`` in one atomic step; returns the old folder's copy, if any."""
    if target.is_symlink():  # a versioned folder (the fallback): flip the link
        return _flip(tmp, target)
    if not target.exists():
        if not _can_exchange(target.parent, target.name):  # a link from the start: later swaps have no window
            return _flip(tmp, target)
        _replace(tmp, target)
        _fsync_dir(target.parent)
        return None
    if _exchange(tmp, target):
        _fsync_dir(target.parent)
        return tmp  # the old folder, now under the temporary's name
    if EXCHANGE and _renameat2():  # the filesystem refused: later new folders here are links from the start
        _exchange_works[target.parent.stat().st_dev] = False
    return _convert(tmp, target)


def _flip(tmp: Path, target: Path) -> Path | None:
    """The fallback swap: ``tmp`` becomes the next version, then a new link to it is renamed over ``target``."""
    current = _current_version(target)
    seq = (_version_seq(current) or 0) + 1 if current else 1
    version = target.with_name(f".{target.name}{_VERSION_MARK}{seq}-{_token()}")
    link = _new_link(version, target)
    if link is None:
        return _two_renames(tmp, target)
    try:
        _replace(tmp, version)
    except BaseException:
        link.unlink(missing_ok=True)
        raise
    _put_link(link, target)
    return target.with_name(current) if current else None


def _new_link(version: Path, target: Path) -> Path | None:
    """A link to the sibling folder ``version`` under a temporary name beside ``target`` (None where the
    filesystem has no symbolic links)."""
    link = target.with_name(f".{target.name}{_TMP_MARK}{_token()}-link")
    try:
        os.symlink(version.name, link, target_is_directory=True)  # relative: the pair can be moved together
    except (OSError, NotImplementedError):
        return None
    return link


def _put_link(link: Path, target: Path) -> None:
    """Rename the new link over ``target`` (one atomic step)."""
    try:
        _replace(link, target)
    except BaseException:
        link.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _two_renames(tmp: Path, target: Path) -> Path | None:
    """The last resort, where neither exchanges nor symbolic links work: the old folder moves to ``<name>.prev``,
    then the new one into place (in between, only ``<name>.prev`` is complete: :func:`heal_folder`)."""
    if not target.exists():
        _replace(tmp, target)
        _fsync_dir(target.parent)
        return None
    logger.warning(
        "%s: this filesystem can neither exchange folders nor hold symbolic links; it is replaced by two renames "
        "(for an instant only %s%s is complete)",
        target,
        target.name,
        PREV_SUFFIX,
    )
    prev = target.with_name(target.name + PREV_SUFFIX)
    _replace(target, prev)
    try:
        _replace(tmp, target)
    except BaseException:
        _replace(prev, target)
        raise
    _fsync_dir(target.parent)
    return prev


def _convert(tmp: Path, target: Path) -> Path | None:
    """A real folder where exchanges are refused: it becomes a link to a versioned folder. A folder cannot be
    replaced by a link in one step, so this one time the old folder waits at ``<name>.prev`` (:func:`heal_folder`)
    for as long as one rename takes."""
    prev = target.with_name(target.name + PREV_SUFFIX)
    version = target.with_name(f".{target.name}{_VERSION_MARK}1-{_token()}")
    link = _new_link(version, target)
    if link is None:
        return _two_renames(tmp, target)
    logger.warning(
        "%s is on a filesystem that cannot exchange folders atomically: it becomes a link to a versioned folder "
        "(this once through %s%s)",
        target,
        target.name,
        PREV_SUFFIX,
    )
    try:
        _replace(tmp, version)
        _replace(target, prev)
    except BaseException:
        link.unlink(missing_ok=True)
        raise
    try:
        _put_link(link, target)
    except BaseException:
        _replace(prev, target)
        raise
    return prev


def _own_path(target: Path) -> Path:
    """``target``, or where it points when it is a symbolic link this module did not make."""
    if target.is_symlink() and _current_version(target) is None:
        return Path(os.path.realpath(target))
    return target


def _current_version(target: Path) -> str | None:
    """The name of the versioned folder the link ``target`` points to (None when it is not such a link)."""
    try:
        dest = os.readlink(target)
    except OSError:
        return None
    ok = dest.startswith(f".{target.name}{_VERSION_MARK}") and os.sep not in dest and _version_seq(dest)
    return dest if ok else None


def _version_seq(name: str) -> int | None:
    match = re.search(re.escape(_VERSION_MARK) + r"(\d+)-", name)
    return int(match.group(1)) if match else None


def holds_kept_entries(path: PathLike) -> bool:
    """True for the old copy of a folder that :func:`write_folder` swapped out and whose kept entries are not all
    moved over yet (a writer was killed): cleaners of stale temporaries leave it to the next write of that folder."""
    p = Path(path)
    match = re.search(re.escape(_KEEP_TAG) + r"(\d+)$", p.name)
    if not match or _TMP_MARK not in p.name:
        return False
    try:
        st = p.lstat()
    except OSError:
        return False
    return not p.is_symlink() and st.st_ino == int(match.group(1))


def _settle(target: Path, keep: set[str], keep_others: bool) -> None:
    """Finish or undo what a killed writer of ``target`` left beside it (the caller's ``keep`` rules apply)."""
    heal_folder(target)
    prev = target.with_name(target.name + PREV_SUFFIX)
    if target.is_dir() and prev.is_dir() and not prev.is_symlink():
        _carry_over(prev, target, keep, keep_others)  # killed while carrying entries over (or converting): finish
        _remove(prev)
    for stale in list(target.parent.glob(f".{target.name}{_TMP_MARK}*")):
        if stale.is_symlink():  # a link not renamed into place
            stale.unlink(missing_ok=True)
        elif stale.is_dir():
            if holds_kept_entries(stale):  # the old copy after an exchange: its kept entries move first
                _carry_over(stale, target, keep, keep_others)
            _remove(stale)
    current = _current_version(target) if target.is_symlink() else None
    for version in list(target.parent.glob(f".{target.name}{_VERSION_MARK}*")):
        if version.name == current or not version.is_dir() or version.is_symlink():
            continue
        seq = _version_seq(version.name)
        if current and seq is not None and seq < (_version_seq(current) or 0):  # an old version: kept entries
            _carry_over(version, target, keep, keep_others)
        _remove(version)  # old, or a new one never linked in


def _carry_over(old: Path, target: Path, keep: Iterable[str] | None, keep_others: bool) -> None:
    """Move the entries of the old folder that the new one should keep (named in ``keep``, or all others)."""
    wanted = set(keep or ())
    if not (wanted or keep_others):
        return
    for entry in list(old.iterdir()):
        if (entry.name in wanted or keep_others) and not os.path.lexists(target / entry.name):
            _replace(entry, target / entry.name)


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def heal_folder(target: PathLike) -> Path | None:
    """Move a complete ``<target>.prev`` back to ``target`` when ``target`` is missing, with a log line; returns the
    complete version (:func:`resolve_folder`).

    That state is left by a writer of an older version of this module killed between its two renames (this one
    never leaves ``target`` missing). Safe to call from any command: when another process heals or writes the
    folder at the same moment, this one leaves it alone.
    """
    target = Path(target).expanduser()
    prev = target.with_name(target.name + PREV_SUFFIX)
    if not os.path.lexists(target) and prev.is_dir() and not prev.is_symlink():
        try:
            _replace(prev, target)
        except OSError:  # healed (or written) by another process in between
            pass
        else:
            _fsync_dir(target.parent)
            logger.warning(
                "%s was missing (a folder swap was killed between its renames, e.g. by an older version of kronos); "
                "moved its complete previous version %s back into place",
                target,
                prev.name,
            )
    return resolve_folder(target)


def resolve_folder(target: PathLike) -> Path | None:
    """The complete version of a folder written by :func:`write_folder` (``None`` if there is none): the folder
    itself, or, when it is missing after a swap by an older version was killed, ``<target>.prev``."""
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
    "heal_folder",
    "holds_kept_entries",
    "resolve_folder",
]
