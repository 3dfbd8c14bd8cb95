"""Where training metrics go: ``metrics.jsonl`` always, TensorBoard and Comet when enabled (rank 0 only).

Each metrics row is one JSON object, e.g. ``{"step": 120, "epoch": 1, "train/loss": 0.41, "lr": 1.9e-4}``;
validation rows carry ``"val/loss"``. Comet is imported lazily; without an API key (``COMET_API_KEY`` or
``comet_config["api_key"]``), or when Comet cannot be reached, it runs as an ``OfflineExperiment`` writing an
archive under the stage folder (upload it later with ``comet upload``), so a run never waits on the network.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from kronos import io as kio
from kronos.config import REDACTED, Config
from kronos.errors import DependencyError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def truncate_metrics(path: Path, max_step: int) -> None:
    """Drop rows logged after ``max_step`` (the resumed checkpoint) so a resumed run does not duplicate them."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if int(row.get("step", 0)) <= max_step:
            kept.append(line)
    kio.write_text(path, "".join(k + "\n" for k in kept))


class Tracker:
    """Fan-out of metric rows to the JSONL file, TensorBoard and Comet. Inactive (no-op) off rank 0."""

    def __init__(
        self, config: Config, stage_dir: Path, stage: str, active: bool = True, resume_step: int | None = None
    ) -> None:
        self.active = active
        self.stage = stage
        self._file = None
        self._tb = None
        self._comet = None
        if not active:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        path = stage_dir / METRICS_FILE
        if resume_step is None:
            if path.exists():
                path.unlink()
        else:
            truncate_metrics(path, resume_step)
        self._file = open(path, "a", encoding="utf-8")
        if config.use_tensorboard:
            self._tb = _open_tensorboard(stage_dir / "tensorboard")
        if config.use_comet:
            self._comet = _open_comet(config, stage_dir, stage)

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (must contain ``step``); numeric entries also go to TensorBoard/Comet."""
        if not self.active:
            return
        row = kio.to_jsonable(row)  # strict JSON: NaN/inf become null
        assert self._file is not None
        self._file.write(kio.dumps_json(row, indent=None) + "\n")
        self._file.flush()
        step = int(row.get("step", 0))
        numeric = {
            k: float(v)
            for k, v in row.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(f"{self.stage}/{k}", v, step)
        if self._comet is not None:
            try:
                self._comet.log_metrics(numeric, step=step, epoch=row.get("epoch"))
            except Exception as exc:  # tracking must never stop training
                logger.warning("Comet logging failed (%s); continuing without Comet", exc)
                self._comet = None

    def log_params(self, params: dict[str, Any]) -> None:
        if self._comet is not None:
            try:
                self._comet.log_parameters(params)
            except Exception as exc:
                logger.warning("Comet parameter logging failed (%s)", exc)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._comet is not None:
            try:
                self._comet.end()
            except Exception as exc:
                logger.warning("Comet end failed (%s)", exc)
            self._comet = None


def _open_tensorboard(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DependencyError(
            "use_tensorboard is true but tensorboard is not installed; run `pip install tensorboard` "
            "(or `pip install 'kronos-kline[tracking]'`) or set use_tensorboard to false"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))


COMET_HOST = "www.comet.com"


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Quick TCP probe, so a machine without network never waits on Comet's HTTP retries."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _open_comet(config: Config, stage_dir: Path, stage: str) -> Any:
    try:
        import comet_ml
    except ImportError:
        raise DependencyError(
            "use_comet is true but comet_ml is not installed; run `pip install comet_ml` or set use_comet to false"
        ) from None
    cc = dict(config.comet_config or {})
    api_key = os.environ.get("COMET_API_KEY") or cc.get("api_key") or ""
    if api_key == REDACTED:  # a config saved by a run (secrets written as "***"): the key itself is not there
        logger.warning(
            "comet_config.api_key is the redacted placeholder %r; set COMET_API_KEY or the real key", REDACTED
        )
        api_key = ""
    project = cc.get("project_name") or None
    workspace = cc.get("workspace") or None
    if api_key and not _reachable(COMET_HOST):
        logger.warning("Comet (%s) cannot be reached; logging offline instead", COMET_HOST)
        api_key = ""
    if api_key:
        exp = comet_ml.Experiment(api_key=api_key, project_name=project, workspace=workspace)
        logger.info("Comet experiment %s", getattr(exp, "url", ""))
    else:
        offline_dir = stage_dir / "comet"
        offline_dir.mkdir(parents=True, exist_ok=True)
        exp = comet_ml.OfflineExperiment(project_name=project, workspace=workspace, offline_directory=str(offline_dir))
        logger.info("no Comet API key (COMET_API_KEY or comet_config.api_key): logging offline to %s", offline_dir)
    if config.comet_tag:
        exp.add_tag(config.comet_tag)
    if config.comet_name:
        exp.set_name(f"{config.comet_name}-{stage}")
    return exp
