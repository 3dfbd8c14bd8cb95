"""One run per output folder at a time: advisory run locks, and cleanup of temporaries dead runs left behind.

A run (the pipeline, one training stage) locks the folders it writes before it writes anything. The lock is an
``fcntl.flock`` on a small file holding the owner's pid, host, start time and run id: the kernel drops it when
the owner exits or is killed, so a lock left by a dead process is simply taken over (and the file rewritten).
A second run into the same folders stops at once with a one-line :class:`~kronos.errors.BusyError` naming the
owner, or waits up to ``wait_s`` seconds for it.

A folder's lock file is ``<folder>/.kronos-run.lock``; a folder that is replaced as a whole (the dataset) is
locked by ``.<name>.kronos-run.lock`` beside it, where its swap temporaries live too. Locks are re-entrant within
a process (the pipeline holds ``save_path`` while its training stages lock it again).

Once the locks are held no other live run writes there, so every temporary (``.<name>.tmp-*``) found in the
locked folders is a leftover of a killed run: :func:`clean_stale_temporaries` removes them (except the old copy of
a swapped folder whose kept entries are not moved over yet, see :func:`kronos.io.holds_kept_entries`), and
:func:`heal_interrupted_swaps` moves back a folder that a killed writer of an older version left at ``<name>.prev``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from kronos import io as kio
from kronos.errors import BusyError

logger = logging.getLogger(__name__)

LOCK_NAME = ".kronos-run.lock"
_TMP_RE = re.compile(r"^\..+\.tmp-")
_held: dict[str, list] = {}  # resolved lock path -> [fd, count]
_held_lock = threading.Lock()
RUN_ID = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"  # this process's run id


def lock_file_for(folder: str | os.PathLike, whole: bool = False) -> Path:
    """The lock file of ``folder``: inside it, or beside it when the folder is replaced as a whole."""
    f = Path(folder).expanduser()
    return f.parent / f".{f.name}{LOCK_NAME}" if whole else f / LOCK_NAME


def _read_owner(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096).decode("utf-8", "replace")
        owner = json.loads(data) if data.strip() else {}
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(owner: dict) -> str:
    if not owner:
        return "another Kronos run"
    return (
        f"another Kronos run (pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started "
        f"{owner.get('started', '?')}, run id {owner.get('run_id', '?')})"
    )


class RunLock:
    """An advisory lock on one lock file; use :func:`run_locks` for a run's folders."""

    def __init__(self, path: str | os.PathLike, folder: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        self.folder = Path(folder) if folder is not None else self.path.parent
        self._key: str | None = None

    def acquire(self, wait_s: float = 0.0, poll_s: float = 0.2) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            key = str(self.path.resolve())
        except OSError as exc:
            raise BusyError(
                f"cannot create the run lock {self.path}: {exc.strerror or exc}; "
                "check that the output folder is writable"
            ) from None
        with _held_lock:
            if key in _held:
                _held[key][1] += 1
                self._key = key
                return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise BusyError(
                f"cannot open the run lock {self.path}: {exc.strerror or exc}; check that the output folder is writable"
            ) from None
        deadline = time.monotonic() + max(wait_s, 0.0)
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                owner = _read_owner(fd)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise BusyError(
                        f"{_describe(owner)} is writing into {self.folder}; wait for it to finish or point this "
                        "run at other folders (save_path, backtest_result_path, dataset_path)"
                    ) from None
                if not waited:
                    logger.info("waiting up to %.0fs for %s to finish with %s", wait_s, _describe(owner), self.folder)
                    waited = True
                time.sleep(poll_s)
            except OSError as exc:
                os.close(fd)
                raise BusyError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        previous = _read_owner(fd)
        if previous:
            logger.info("taking over the run lock of %s, which is no longer running", _describe(previous))
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run_id": RUN_ID,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode("utf-8"))
        with _held_lock:
            _held[key] = [fd, 1]
        self._key = key

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _held_lock:
            entry = _held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[key]
        fd = entry[0]
        try:
            os.ftruncate(fd, 0)  # the file stays (unlinking a lock file races with waiters); empty = free
        except OSError:
            pass
        os.close(fd)  # closing drops the flock


def clean_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove ``.<x>.tmp-*`` leftovers of killed runs under ``folder`` (only ``.<name>.tmp-*`` when given).

    Call it only while holding the folder's run lock: then no live run owns any of them.
    """
    root = Path(folder).expanduser()
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    if name is not None:
        candidates: Iterable[Path] = root.glob(f".{name}.tmp-*")
    else:
        candidates = _walk(root, depth=4)
    for path in list(candidates):
        if not _TMP_RE.match(path.name) or not os.path.lexists(path):
            continue
        if kio.holds_kept_entries(path):  # the next write of its folder moves the kept entries, then removes it
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError as exc:
            logger.warning("cannot remove the stale temporary %s: %s", path, exc)
    if removed:
        logger.info(
            "removed %d temporary file(s)/folder(s) left by an earlier, killed run under %s", len(removed), root
        )
    return removed


def heal_interrupted_swaps(folder: str | os.PathLike, whole: bool = False) -> list[Path]:
    """Move back every folder under ``folder`` (``folder`` itself with ``whole``) that is missing while its complete
    previous version ``<name>.prev`` is there (:func:`kronos.io.heal_folder`, which logs it); the folders healed."""
    root = Path(folder).expanduser()
    if whole:
        candidates: Iterable[Path] = [root.with_name(root.name + kio.PREV_SUFFIX)]
    elif root.is_dir():
        candidates = _walk(root, depth=4)
    else:
        candidates = []
    healed = []
    for prev in list(candidates):
        if not prev.name.endswith(kio.PREV_SUFFIX) or prev.name == kio.PREV_SUFFIX:
            continue
        target = prev.with_name(prev.name[: -len(kio.PREV_SUFFIX)])
        if not os.path.lexists(target) and prev.is_dir() and not prev.is_symlink():
            kio.heal_folder(target)
            if target.is_dir():
                healed.append(target)
    return healed


def _place(folder: Path) -> Path:
    return folder.parent.resolve() / folder.name


def _walk(root: Path, depth: int) -> Iterator[Path]:
    """Entries under ``root`` down to ``depth`` levels (temporaries are yielded, never entered)."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        path = Path(entry.path)
        yield path
        if depth > 1 and not _TMP_RE.match(entry.name) and entry.is_dir(follow_symlinks=False):
            yield from _walk(path, depth - 1)


@contextlib.contextmanager
def run_locks(
    folders: Iterable[str | os.PathLike],
    whole: Iterable[str | os.PathLike] = (),
    wait_s: float = 0.0,
    clean: bool = True,
) -> Iterator[list[RunLock]]:
    """Hold the run locks of ``folders`` (lock inside) and ``whole`` (lock beside) for the ``with`` block.

    Locks are taken in a fixed order (no deadlock between two runs); with ``clean``, once all locks are held,
    folders a killed run left at ``<name>.prev`` are moved back and its temporaries in those folders removed.
    """
    inside = {str(Path(f).expanduser().resolve()): Path(f).expanduser() for f in folders if str(f)}
    # a folder replaced as a whole may be a link to its current version: its key is its place, not the version
    beside = {str(_place(Path(f).expanduser())): Path(f).expanduser() for f in whole if str(f)}
    plan = sorted([(k, f, False) for k, f in inside.items()] + [(k, f, True) for k, f in beside.items()])
    held: list[RunLock] = []
    try:
        for _, folder, is_whole in plan:
            lock = RunLock(lock_file_for(folder, is_whole), folder)
            lock.acquire(wait_s=wait_s)
            held.append(lock)
        if clean:
            for _, folder, is_whole in plan:
                heal_interrupted_swaps(folder, whole=is_whole)
                if is_whole:
                    clean_stale_temporaries(folder.parent, folder.name)
                else:
                    clean_stale_temporaries(folder)
        yield held
    finally:
        for lock in reversed(held):
            lock.release()


__all__ = [
    "LOCK_NAME",
    "RUN_ID",
    "RunLock",
    "clean_stale_temporaries",
    "heal_interrupted_swaps",
    "lock_file_for",
    "run_locks",
]
