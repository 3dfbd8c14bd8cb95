"""DataProcessorFactory: built-in names, unknown names, custom sources via register(), lazy imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import kronos
from kronos.config import Config
from kronos.data.schema import validate_kline_frame
from kronos.data.sources import BaseDataProcessor, DataProcessorFactory
from kronos.data.store import load_manifest, load_split
from kronos.errors import ConfigError, DependencyError

ROOT = Path(__file__).resolve().parents[2]
CSV = ROOT / "tests" / "fixtures" / "kline_5min.csv"


class HalvesProcessor(BaseDataProcessor):
    """A custom source: the real 5-minute bars as two symbols (first and second half)."""

    name = "halves"

    def load_raw(self) -> dict[str, pd.DataFrame]:
        bars = validate_kline_frame(pd.read_csv(CSV), "kline_5min.csv")
        self.source_info["origin"] = self.options.get("origin", "?")
        return {"H1": bars.iloc[:1250], "H2": bars.iloc[1250:].reset_index(drop=True)}


@pytest.fixture
def registry():
    saved = dict(DataProcessorFactory._registry)
    yield DataProcessorFactory
    DataProcessorFactory._registry.clear()
    DataProcessorFactory._registry.update(saved)


def test_unknown_source_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown data source 'yahoo'.*csv, qlib, sina"):
        DataProcessorFactory.create_processor("yahoo", Config())


def test_builtin_names_resolve_to_their_classes():
    from kronos.data.sources.csv import CsvDataProcessor

    proc = DataProcessorFactory.create_processor("CSV", Config(csv_data_path=str(CSV)))
    assert isinstance(proc, CsvDataProcessor) and proc.name == "csv"
    qlib_cls = DataProcessorFactory.get_class("qlib")
    assert issubclass(qlib_cls, BaseDataProcessor) and qlib_cls.name == "qlib"
    assert kronos.DataProcessorFactory is DataProcessorFactory


def test_register_custom_source_runs_the_whole_pipeline(registry, tmp_path):
    registry.register("halves", HalvesProcessor)
    assert "halves" in registry.available()
    cfg = Config(dataset_path=str(tmp_path / "ds"), lookback_window=20, predict_window=5, split_ratios=[0.6, 0.2, 0.2])
    manifest = registry.create_processor("halves", cfg, origin="test").run_pipeline()
    assert manifest["source"] == "halves" and manifest["symbols"] == ["H1", "H2"]
    assert load_manifest(tmp_path / "ds")["source_info"] == {"origin": "test"}
    # One global cut date: H1 (the first half of the calendar) lies wholly before it, so only H2 has test bars.
    assert set(load_split(tmp_path / "ds", "train")["symbol"]) == {"H1", "H2"}
    assert set(load_split(tmp_path / "ds", "test")["symbol"]) == {"H2"}
    with pytest.raises(ConfigError, match="subclass of BaseDataProcessor"):
        registry.register("bad", dict)


def test_a_broken_source_module_affects_only_that_source(registry, monkeypatch):
    monkeypatch.setitem(registry._registry, "ghost", "kronos.data.sources.no_such_module:Ghost")
    with pytest.raises(DependencyError, match="data source 'ghost' cannot be loaded"):
        registry.create_processor("ghost", Config())
    monkeypatch.setitem(sys.modules, "kronos.data.sources.sina", None)  # e.g. a module failing to import
    registry._registry["sina"] = "kronos.data.sources.sina:SinaDataProcessor"
    with pytest.raises(DependencyError, match="'sina'"):
        registry.create_processor("sina", Config())
    assert registry.create_processor("csv", Config()).name == "csv"


@pytest.mark.slow
def test_seed_import_paths_work_from_finetune_folder():
    code = (
        "from sina_data_processor import DataProcessorFactory, BaseDataProcessor, CsvDataProcessor; "
        "import qlib_data_preprocess; "
        "assert DataProcessorFactory.get_class('csv') is CsvDataProcessor; print('ok')"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "finetune", capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


@pytest.mark.slow
def test_importing_sources_does_not_import_qlib():
    code = "import sys, kronos.data, kronos.data.sources; assert 'qlib' not in sys.modules; print('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
