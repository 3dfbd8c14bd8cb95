"""A pipeline run's folder seen by the service: its models, dataset and results (curves, evaluation, backtest).

``--run DIR`` names the folder holding ``pipeline_config.json`` (the parent of the config's ``save_path``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from kronos.errors import ConfigError

MAX_CURVE_POINTS = 2000


def _resolve(value: str, run_dir: Path) -> Path:
    """A path from the run's config: as written when it exists, else relative to the run folder's parent."""
    p = Path(value).expanduser()
    if p.exists() or p.is_absolute():
        return p
    for base in (run_dir, run_dir.parent):
        if (base / p).exists():
            return base / p
    return p


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class RunFolder:
    """Paths and results of one pipeline run (read on demand, so a page refresh shows new results)."""

    def __init__(self, path: str) -> None:
        from kronos.config import Config

        self.dir = Path(path).expanduser().resolve()
        cfg_file = self.dir / "pipeline_config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"--run '{self.dir}' holds no pipeline_config.json; point it at the folder a "
                              "`kronos pipeline` run wrote (the parent of its save_path)")
        self.config = Config.from_file(str(cfg_file))
        c = self.config
        self.tokenizer = str(_resolve(c.finetuned_tokenizer, self.dir))
        self.predictor = str(_resolve(c.finetuned_predictor, self.dir))
        self.dataset = str(_resolve(c.dataset_path, self.dir)) if c.dataset_path else ""
        self.results = _resolve(c.backtest_dir, self.dir)
        self.stage_dirs = {"tokenizer": _resolve(c.tokenizer_dir, self.dir),
                           "predictor": _resolve(c.predictor_dir, self.dir)}

    def summary(self) -> dict:
        """Training curves (``metrics.jsonl``), the evaluation metrics and the backtest curves, JSON-ready."""
        return {"run": str(self.dir), "curves": {k: self._curves(d) for k, d in self.stage_dirs.items()},
                "evaluation": self._evaluation(), "backtest": self._backtest()}

    @staticmethod
    def _curves(stage_dir: Path) -> dict:
        file = stage_dir / "metrics.jsonl"
        series: dict[str, list] = {}
        if not file.is_file():
            return series
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = row.get("step")
            if not isinstance(step, (int, float)):
                continue
            for key, value in row.items():
                if key.endswith("loss") and isinstance(value, (int, float)) and math.isfinite(value):
                    series.setdefault(key, []).append([step, value])
        for key, points in series.items():
            if len(points) > MAX_CURVE_POINTS:
                stride = math.ceil(len(points) / MAX_CURVE_POINTS)
                series[key] = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
        return series

    def _evaluation(self) -> Optional[dict]:
        file = self.results / "metrics.json"
        if not file.is_file():
            return None
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        rows: dict[str, dict] = {}
        for key, value in data.items() if isinstance(data, dict) else []:
            if "/" in key and isinstance(value, (int, float)):
                model, metric = key.split("/", 1)
                rows.setdefault(model, {})[metric] = _finite(value)
        return {"file": str(file), "rows": rows}

    def _backtest(self) -> dict:
        curves = {}
        for daily in sorted(self.results.glob("**/daily.csv")):
            try:
                frame = pd.read_csv(daily, index_col=0, parse_dates=True)
            except Exception:  # a half-finished or foreign file: skip it
                continue
            name = daily.parent.relative_to(self.results).as_posix() or "backtest"
            out = {}
            for col in ("excess_return_with_cost", "excess_return_without_cost"):
                if col in frame.columns:
                    curve = frame[col].fillna(0.0).cumsum()
                    out[col] = [[t.strftime("%Y-%m-%d"), _finite(float(v))] for t, v in curve.items()]
            if out:
                curves[name] = out
        return curves
