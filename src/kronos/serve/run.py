"""A pipeline run's folder seen by the service: its models, dataset and results (curves, evaluation, backtest).

``--run DIR`` names the run's output folder: the one holding ``pipeline_config.json`` (the config's ``save_path``)
or its parent (e.g. ``outputs`` for ``outputs/models/pipeline_config.json``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from kronos import io as kio
from kronos.config import Config
from kronos.errors import ConfigError
from kronos.inference.bands import calibration_path
from kronos.runs import latest_run

MAX_CURVE_POINTS = 2000


def _resolve(value: str, config_dir: Path) -> Path:
    """A path from the run's config: as written when it exists (relative to the current folder), else relative to
    the config's folder or one of its parents (where the pipeline ran)."""
    p = Path(value).expanduser()
    if p.exists() or p.is_absolute():
        return p
    for base in [config_dir, *list(config_dir.parents)[:3]]:
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

        self.dir = Path(path).expanduser().resolve()
        found = [self.dir / "pipeline_config.json", *sorted(self.dir.glob("*/pipeline_config.json"))]
        for runs in (self.dir, self.dir / "runs"):  # outputs/ or outputs/runs/: the latest finished run
            latest = latest_run(runs)
            if latest:
                found += sorted((runs / latest).glob("*/pipeline_config.json"))
        found = [f for f in found if f.is_file()]
        if not found:
            raise ConfigError(
                f"--run '{self.dir}' holds no pipeline_config.json (nor does a subfolder); point it "
                "at the output folder of a `kronos pipeline` run (e.g. outputs)"
            )
        cfg_file = found[0]
        self.config = Config.from_file(str(cfg_file))
        c = self.config
        base = cfg_file.parent
        self.tokenizer = str(_resolve(c.finetuned_tokenizer, base))
        self.predictor = str(_resolve(c.finetuned_predictor, base))
        self.dataset = str(_resolve(c.dataset_path, base)) if c.dataset_path else ""
        self.results = _resolve(c.backtest_dir, base)

        cal = calibration_path(self.predictor)  # written by the pipeline's calibrate step
        # the run's model in use: the starting pair when finetuning did not help on validation (keep_better)
        self.model_in_use = "finetuned"
        sel = kio.read_json_object(cal.with_name("model_selection.json"), "model selection") or {}
        if sel.get("model_in_use") == "zero_shot" and sel.get("predictor"):
            self.model_in_use = "zero_shot"
            self.tokenizer = str(_resolve(str(sel["tokenizer"]), base))
            self.predictor = str(_resolve(str(sel["predictor"]), base))
            cal = cal.with_name("zero_shot_calibration.json")
        self.calibration = str(cal) if cal.is_file() else ""
        self.stage_dirs = {"tokenizer": _resolve(c.tokenizer_dir, base), "predictor": _resolve(c.predictor_dir, base)}

    def summary(self) -> dict:
        """Training curves (``metrics.jsonl``), the evaluation metrics and the backtest curves, JSON-ready."""
        return {
            "run": str(self.dir),
            "curves": {k: self._curves(d) for k, d in self.stage_dirs.items()},
            "evaluation": self._evaluation(),
            "backtest": self._backtest(),
        }

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

    def _evaluation(self) -> dict | None:
        file = self.results / "metrics.json"
        if not file.is_file():
            return None
        try:
            data = kio.read_json(file)
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        # metrics.json: the report's headline for the model in use (top level) beside the baselines' (baselines)
        rows: dict[str, dict] = {}
        model = str(data.get("model") or "model")
        rows[model] = {
            k: _finite(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for name, scores in (data.get("baselines") or {}).items():
            if isinstance(scores, dict):
                rows[str(name)] = {
                    k: _finite(v) for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
        return {"file": str(file), "model": model, "rows": rows}

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
