"""Run folders: each pipeline run under its own readable id, `latest` pointing at the newest."""

import datetime as dt

import pytest

from kronos.errors import ConfigError, DataError
from kronos.runs import check_run_id, latest_run, mark_latest, new_run_id, resolve_run, run_paths, runs_root


def test_run_paths_keep_the_seed_layout_inside_the_run(tmp_path):
    save, results = str(tmp_path / "outputs" / "models"), str(tmp_path / "outputs" / "backtest_results")
    root = runs_root(save, results)
    assert root == tmp_path / "outputs" / "runs"
    paths = run_paths(save, results, "2026-12-02_013512")
    assert paths["save_path"] == str(root / "2026-12-02_013512" / "models")
    assert paths["backtest_result_path"] == str(root / "2026-12-02_013512" / "backtest_results")


def test_run_ids_are_readable_unique_and_latest_follows(tmp_path):
    root = tmp_path / "runs"
    when = dt.datetime(2026, 12, 2, 1, 35, 12)
    first = new_run_id(root, when)
    assert first == "2026-12-02_013512"
    (root / first).mkdir(parents=True)
    second = new_run_id(root, when)
    assert second == "2026-12-02_013512-2"
    assert latest_run(root) is None
    mark_latest(root, first)
    (root / second).mkdir()
    mark_latest(root, second)
    assert latest_run(root) == second
    assert (root / "latest").resolve() == (root / second).resolve()
    (root / "latest").unlink()  # no symlink (e.g. Windows): the LATEST file still names it
    assert latest_run(root) == second


def test_resolve_run_by_id_latest_or_path_and_clear_errors(tmp_path):
    save, results = str(tmp_path / "o" / "models"), str(tmp_path / "o" / "backtest_results")
    root = runs_root(save, results)
    (root / "r1" / "models").mkdir(parents=True)
    mark_latest(root, "r1")
    assert resolve_run("latest", save, results) == (root / "r1").resolve()
    assert resolve_run("r1", save, results) == (root / "r1").resolve()
    assert resolve_run(root / "r1", save, results) == (root / "r1").resolve()
    with pytest.raises(DataError, match="no pipeline run 'nope'.*r1"):
        resolve_run("nope", save, results)
    for bad in ("../x", "a/b", "", "latest"):
        with pytest.raises(ConfigError, match="run_id"):
            check_run_id(bad)
