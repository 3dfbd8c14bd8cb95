"""Run folders: each pipeline run writes under its own folder, so runs never overwrite each other.

The seed's layout (``save_path`` for models, ``backtest_result_path`` for results) is kept *inside* the run
folder. With the defaults ``./outputs/models`` and ``./outputs/backtest_results`` a run writes to::

    outputs/runs/2026-12-02_013512/models/finetune_tokenizer_demo/...
    outputs/runs/2026-12-02_013512/backtest_results/finetune_backtest_demo/...
    outputs/runs/latest -> 2026-12-02_013512        (and outputs/runs/LATEST, a text file with the id)

The runs root is the common parent of ``save_path`` and ``backtest_result_path`` plus ``runs/``. A run id is
readable: the local date and time it started (a ``-2``, ``-3`` ... suffix when two start in the same second).
``run_folders: false`` writes straight into ``save_path``/``backtest_result_path`` as the official scripts do.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
import shutil
from pathlib import Path

from kronos.config import Config
from kronos.errors import ConfigError, DataError
from kronos.io import resolve_folder, write_text
from kronos.runlock import LOCK_NAME

log = logging.getLogger(__name__)

LATEST = "latest"
LATEST_FILE = "LATEST"


def runs_root(save_path: str, backtest_result_path: str) -> Path:
    """``<common parent of save_path and backtest_result_path>/runs``."""
    a = Path(save_path).expanduser().absolute()
    b = Path(backtest_result_path).expanduser().absolute()
    return Path(os.path.commonpath([a, b])) / "runs"


def new_run_id(root: Path, now: _dt.datetime | None = None, reserve: bool = False) -> str:
    """A readable id for a new run (its local start time), unique inside ``root``; ``reserve`` creates its folder
    (atomically, so two runs started in the same second get different ids)."""
    base = (now or _dt.datetime.now()).strftime("%Y-%m-%d_%H%M%S")
    run_id, k = base, 1
    while True:
        if reserve:
            root.mkdir(parents=True, exist_ok=True)
            try:
                (root / run_id).mkdir()
                return run_id
            except FileExistsError:
                pass
        elif not (root / run_id).exists():
            return run_id
        k += 1
        run_id = f"{base}-{k}"


def newest_run(root: Path) -> str | None:
    """The most recently started run under ``root`` (finished or not), or None."""
    if not root.is_dir():
        return None
    runs = [d for d in root.iterdir() if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")]
    return max(runs, key=lambda d: (d.stat().st_mtime, d.name)).name if runs else None


def latest_run(root: Path) -> str | None:
    """The id of the newest run under ``root`` (the ``latest`` link, else the ``LATEST`` file), or None."""
    link = root / LATEST
    if link.is_symlink() and (root / os.readlink(link)).is_dir():
        return Path(os.readlink(link)).name
    marker = root / LATEST_FILE
    if marker.is_file():
        run_id = marker.read_text(encoding="utf-8").strip()
        if run_id and (root / run_id).is_dir():
            return run_id
    return None


def mark_latest(root: Path, run_id: str) -> None:
    """Point ``latest`` (a relative symlink, swapped atomically) and ``LATEST`` (a text file) at ``run_id``."""
    write_text(root / LATEST_FILE, run_id + "\n")
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_id, tmp, target_is_directory=True)
        os.replace(tmp, root / LATEST)
    except OSError as exc:  # no symlinks (some Windows setups): the LATEST file still says it
        tmp.unlink(missing_ok=True)
        log.debug("no 'latest' symlink in %s (%s); LATEST names the newest run", root, exc)


def run_paths(save_path: str, backtest_result_path: str, run_id: str) -> dict[str, str]:
    """``save_path`` and ``backtest_result_path`` moved inside the run folder ``run_id``."""
    root = runs_root(save_path, backtest_result_path)
    common = root.parent
    run = root / run_id
    return {
        "save_path": str(run / Path(save_path).expanduser().absolute().relative_to(common)),
        "backtest_result_path": str(run / Path(backtest_result_path).expanduser().absolute().relative_to(common)),
    }


# keys a run owns: where its outputs and checkpoints are (a step command never moves them)
RUN_KEYS = ("save_path", "backtest_result_path", "run_id", "run_folders", "finetuned_tokenizer_path",
            "finetuned_predictor_path")  # fmt: skip
CONFIG_NAME = "pipeline_config.json"


def for_existing_run(config: Config) -> Config:
    """The config a single step (predict, evaluate, calibrate, backtest) uses on an existing run: ``run_id`` when
    set, else the latest finished run. It is the run's saved effective config (``pipeline_config.json``), with what
    the command itself set on top (its config file, ``--set``, flags: every key whose value differs from the
    default, except the run's own paths), and a log line naming each key that differs from the run's. Unchanged with
    ``run_folders: false`` or when there is no run yet; a run without a saved config gets its paths moved only."""
    if not config.run_folders:
        return config
    root = runs_root(config.save_path, config.backtest_result_path)
    run_id = config.run_id or latest_run(root)
    if not run_id:
        return config
    if not (root / run_id).is_dir():
        known = (
            sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.is_dir() else []
        )
        raise DataError(f"run_id '{run_id}': no such run in '{root}'; known runs: {known[-5:] or 'none yet'}")
    paths = run_paths(config.save_path, config.backtest_result_path, run_id)
    saved = Path(paths["save_path"]) / CONFIG_NAME
    if not saved.is_file():
        log.info("working on run %s (%s; no saved %s: the command's config with the run's paths)", run_id,
                 root / run_id, CONFIG_NAME)  # fmt: skip
        return copy.deepcopy(config).update({**paths, "run_id": run_id}, source="run folder", user=False)
    run_cfg = Config.from_file(saved)
    default = Config()
    own = {
        key: config.explicit(key)
        for key in Config.keys()
        if key not in RUN_KEYS and config.explicit(key) != default.explicit(key)
    }
    changed = {k: v for k, v in own.items() if v != run_cfg.explicit(k)}
    for key, value in changed.items():
        log.info("run %s: %s = %r here (the run used %r)", run_id, key, value, getattr(run_cfg, key))
    run_cfg.update({**changed, **paths, "run_id": run_id}, source="command line")
    log.info("working on run %s (%s) with its saved config %s%s", run_id, root / run_id, saved,
             f" and {len(changed)} key(s) of this command" if changed else "")  # fmt: skip
    return run_cfg


def pick_run_id(root: Path, run_id: str = "", resume: bool = False) -> str:
    """The id of the run a pipeline starts: ``run_id`` when set, with ``resume`` the newest run, else a new id
    (its folder reserved). Called on rank 0 only; the pipeline shares the choice with the other ranks."""
    if run_id:
        return run_id
    if resume and newest_run(root):
        return newest_run(root) or ""
    return new_run_id(root, reserve=True)


def has_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint folder (or its interrupted-swap ``.prev``) with a ``config.json``."""
    folder = resolve_folder(path)
    return folder is not None and (folder / "config.json").is_file()


def enter_run(config: Config, root: Path, run_id: str, skipped: list[str] | tuple[str, ...] = ()) -> Config:
    """``config`` with its output paths moved inside run ``run_id`` of ``root`` (a copy; the caller's config is not
    changed). A skipped training stage (``skipped``: 'tokenizer', 'predictor') with no explicit ``finetuned_*_path``
    and no checkpoint of its own reuses the checkpoint of the latest finished run, and says so in the log."""

    def in_run(rid: str, extra: dict | None = None) -> Config:
        paths = run_paths(config.save_path, config.backtest_result_path, rid)
        return copy.deepcopy(config).update({**paths, "run_id": rid, **(extra or {})}, source="run folder", user=False)

    overrides: dict[str, str] = {}
    moved = in_run(run_id)
    previous = latest_run(root)
    for stage in skipped:
        key = f"finetuned_{stage}_path"
        if config.is_set(key) or config.explicit(key) or has_checkpoint(getattr(moved, f"finetuned_{stage}")):
            continue
        if previous and previous != run_id:
            theirs = getattr(in_run(previous), f"finetuned_{stage}")
            if has_checkpoint(theirs):
                overrides[key] = theirs
                log.info("--skip-%s: reusing the %s of run %s (%s)", stage, stage, previous, theirs)
    return in_run(run_id, overrides)


def remove_if_empty(root: Path, run_id: str) -> None:
    """Remove the folder of a run that stopped before writing anything (lock files aside)."""
    folder = root / run_id
    if folder.is_dir() and not any(p.is_file() and not p.name.endswith(LOCK_NAME) for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def check_run_id(run_id: str) -> str:
    """A run id is a plain folder name (it may come from a user's flag)."""
    if not run_id or run_id in (".", "..") or "/" in run_id or "\\" in run_id or run_id == LATEST:
        raise ConfigError(f"run_id '{run_id}' must be a plain folder name such as 2026-12-02_013512")
    return run_id


def resolve_run(ref: str | os.PathLike, save_path: str, backtest_result_path: str) -> Path:
    """The run folder a user points at: a path to a run folder, a run id, or ``latest``."""
    p = Path(ref).expanduser()
    if p.is_dir() and (p / LATEST).exists() is False and any(p.iterdir()):
        return p.resolve()
    root = runs_root(save_path, backtest_result_path)
    run_id = latest_run(root) if str(ref) == LATEST else str(ref)
    if run_id and (root / run_id).is_dir():
        return (root / run_id).resolve()
    known = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.is_dir() else []
    raise DataError(f"no pipeline run '{ref}' in '{root}'; known runs: {known[-5:] or 'none yet (run the pipeline)'}")


__all__ = [
    "CONFIG_NAME",
    "RUN_KEYS",
    "enter_run",
    "has_checkpoint",
    "pick_run_id",
    "remove_if_empty",
    "runs_root",
    "new_run_id",
    "newest_run",
    "latest_run",
    "mark_latest",
    "run_paths",
    "check_run_id",
    "resolve_run",
    "for_existing_run",
]
