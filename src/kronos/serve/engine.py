"""The forecasting engine behind the REST API, the MCP server and the web page.

Models load once. Forecasts run on one worker thread, never on the event loop. Concurrent requests are gathered
for ``batch_wait_ms`` (up to 5x that while fewer requests came than in the previous batch) and run as one
:meth:`KronosPredictor.predict_batch` call per group of compatible settings
(same horizon and sampling settings; histories may differ in length). Each result says how long it waited in the
queue and how many series shared its batch.

Reproducibility: a request with a ``seed`` and random sampling runs in a batch of its own (the sampler's random
stream is shared by the rows of one call), so the same request with the same seed always gives the same numbers.
Greedy requests (``top_k=1``) and unseeded ones are batched freely; greedy results equal one-by-one results.

Bounded work: each request's compute time is estimated before it is queued (:func:`request_work`, the tokens the
model will process weighted by their attention length, over the engine's measured speed, corrected by what past
batches really took); over ``max_request_seconds`` it is refused with the estimate. Requests estimated under
``SMALL_LANE_SECONDS`` run on a lane (worker thread) of their own, so a large request never holds up a small one.
``max_queue`` bounds every admitted, unfinished request. A request whose client has gone (its awaiting task is
cancelled) is dropped from the queue, or stops between two decode steps if it is running alone or with other
abandoned ones; :meth:`ForecastEngine.close` stops the rest on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kronos.data.store import SPLITS, dataset_exists, load_split
from kronos.errors import DataError, InputError, KronosError
from kronos.inference import KronosPredictor, bands
from kronos.inference.bands import prob_up, recent_volatility, sample_quantiles
from kronos.inference.generate import Cancelled, cancel_when
from kronos.inference.outcomes import BandOutcomes, outcomes_path
from kronos.model import Kronos, KronosTokenizer
from kronos.serve.inputs import LimitError, Limits, check_history, check_limit, check_settings
from kronos.timeutil import future_timestamps

log = logging.getLogger(__name__)

VALUE_COLS = ("open", "high", "low", "close", "volume", "amount")
DEFAULT_QUANTILES = (0.1, 0.5, 0.9)
MAX_WAIT_FACTOR = 5.0  # longest gathering, in batch_wait units, while fewer requests came than last time
SMALL_LANE_SECONDS = 0.5  # requests estimated under this run on the small lane
ATTENTION_REF = 256.0  # a token attending over this many positions costs twice a token attending over none
LANES = ("small", "large")


class QueueFullError(KronosError):
    """The engine's queue is at its bound (``max_queue``), or the service is shutting down; retry later (503)."""


def request_work(lengths: list[int], horizon: int, samples: int, max_context: int) -> float:
    """The model work of forecasting series of ``lengths`` bars: tokens through the networks, each weighted by
    ``1 + attended positions / ATTENTION_REF``, following the decoding schedule of
    :func:`kronos.inference.generate.generate_tokens` (context once per series, generated tokens per path, the whole
    window recomputed at every step once it slides past ``max_context``) and the tokenizer's encode/decode."""
    total = 0.0
    steps = np.arange(horizon, dtype=np.float64)
    for t0 in lengths:
        n = t0 + steps  # the window's end at each step
        a = np.maximum(0.0, n - max_context)  # its start
        slid = a > 0
        window = n - a
        ctx = float(min(t0, max_context))
        w = ctx * (1 + ctx / 2 / ATTENTION_REF)  # the first window's context, once per series
        w += samples * float(np.sum(np.where(slid, 0.0, 1 + window / ATTENTION_REF)))  # one token per path
        # a slid window: its context part once per series, its generated part per path, all attending the window
        gen = np.minimum(n - t0, window)
        w += float(np.sum(np.where(slid, ((window - gen) + samples * gen) * (1 + window / ATTENTION_REF), 0.0)))
        dec = min(t0 + horizon, max_context)  # the tokenizer: encode the history, decode each path's window
        w += 0.5 * (t0 * (1 + t0 / ATTENTION_REF) + samples * dec * (1 + dec / ATTENTION_REF))
        total += w
    return total


# Seconds per unit of each request_cost term, fitted (relative errors) on ten request shapes of a 4-layer model on a
# 2-core CPU; measure_speed scales it to the loaded model and machine.
COST_SHAPE = np.array([4.6e-3, 9.0e-6, 8.3e-5])


def request_cost(lengths: list[int], horizon: int, samples: int, max_context: int) -> np.ndarray:
    """The terms a request's compute time is linear in: decode steps (per-step overhead), :func:`request_work`
    (model work) and paths x steps (sampling and per-row overhead); weighted by :meth:`ForecastEngine.measure_speed`."""
    work = request_work(lengths, horizon, samples, max_context)
    return np.array([float(horizon), work, float(len(lengths) * samples * horizon)])


@dataclass
class Settings:
    """Sampling settings of one request (the predictor's names: T, top_k, top_p, sample_count)."""

    horizon: int | None = None  # default: min(24, max_horizon)
    samples: int | None = None  # default: min(16, max_samples)
    T: float = 1.0
    top_k: int = 0
    top_p: float = 0.9
    seed: int | None = None
    quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    return_samples: bool = False

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    def check(self, limits: Limits) -> Settings:
        if self.horizon is None:
            self.horizon = min(24, limits.max_horizon)
        if self.samples is None:
            self.samples = min(16, limits.max_samples)
        self.quantiles = tuple(check_settings(self.horizon, self.samples, self.quantiles, limits))
        if isinstance(self.T, bool) or not isinstance(self.T, (int, float)) or not 0 < self.T <= 100:
            raise InputError(f"T (temperature) must be a number in (0, 100], got {self.T!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off, 1 = greedy), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise InputError(f"seed must be an integer >= 0, got {self.seed!r}")
        return self

    def batch_key(self, job_id: int) -> tuple:
        alone = job_id if (self.seed is not None and not self.greedy) else None
        return (self.horizon, self.samples, float(self.T), self.top_k, float(self.top_p), alone)


@dataclass
class _Job:
    frames: list[pd.DataFrame]
    settings: Settings
    future: asyncio.Future
    calibrate: list[bool]
    cost: Any = 0.0  # request_cost
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def abandoned(self) -> bool:
        return self.future.done()  # cancelled by its client's task (or already answered)


@dataclass
class _Lane:
    executor: ThreadPoolExecutor
    queue: asyncio.Queue | None = None
    task: asyncio.Task | None = None
    last_jobs: int = 1
    running: asyncio.Future | None = None


@dataclass
class ModelInfo:
    name: str
    tokenizer_path: str
    model_path: str
    parameters: int
    tokenizer_parameters: int
    max_context: int
    device: str
    calibration: dict | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "tokenizer": self.tokenizer_path,
            "model": self.model_path,
            "parameters": self.parameters,
            "tokenizer_parameters": self.tokenizer_parameters,
            "max_context": self.max_context,
            "device": self.device,
            "calibration": self.calibration,
        }


def _jsonable(values: np.ndarray) -> list:
    """Floats rounded to 6 significant digits for JSON; non-finite values become null."""
    out = np.asarray(values, dtype=np.float64)
    flat = [float(f"{v:.6g}") if math.isfinite(v) else None for v in out.ravel().tolist()]
    return np.array(flat, dtype=object).reshape(out.shape).tolist() if out.ndim > 1 else flat


def summarize(
    history: pd.DataFrame,
    mean: pd.DataFrame,
    samples: np.ndarray,
    settings: Settings,
    timestamps: pd.DatetimeIndex,
    calibration: Any = None,
) -> dict:
    """One forecast as JSON: mean OHLCV, quantile bands per column, P(up) per step (close above the last close).

    Uses the package's rules (:func:`~kronos.inference.bands.sample_quantiles`,
    :func:`~kronos.inference.bands.prob_up`); with a calibration (a fitted
    :class:`kronos.inference.bands.Calibration` that applies to this request) the price bands and P(up) are
    the calibrated ones and ``p_up_raw`` keeps the share of paths.
    """
    last_close = float(history["close"].iloc[-1])
    out: dict[str, Any] = {
        "timestamps": [t.isoformat() for t in pd.DatetimeIndex(timestamps)],
        "last_timestamp": pd.Timestamp(history["timestamps"].iloc[-1]).isoformat(),
        "last_close": last_close,
        "mean": {c: _jsonable(mean[c].to_numpy()) for c in VALUE_COLS},
    }
    qs = list(settings.quantiles)
    bands = {}
    if qs:
        values = sample_quantiles(samples, qs)  # [Q, P, 6]
        if calibration is not None:
            last = np.array([last_close])
            vol = recent_volatility(history["close"].to_numpy(dtype=float)[None])  # the history is its lookback
            anchor = pd.DatetimeIndex(history["timestamps"].iloc[-1:])  # adaptive bands: outcomes up to this bar
            for c in range(4):  # open/high/low/close: the close-fitted correction relative to the last close
                values[:, :, c] = calibration.quantiles(samples[None, :, :, c], last, qs, vol, anchors=anchor)[:, 0]
        for q, v in zip(qs, values):
            bands[f"{q:g}"] = {c: _jsonable(v[:, i]) for i, c in enumerate(VALUE_COLS)}
    out["quantiles"] = bands
    p_up = prob_up(samples[:, :, 3], last_close)
    if calibration is not None:
        out["p_up_raw"] = _jsonable(p_up)
        p_up = calibration.p_up_calibrated(samples[None, :, :, 3], np.array([last_close]))[0]
    out["p_up"] = _jsonable(p_up)
    out["calibrated"] = calibration is not None
    if settings.return_samples:
        out["samples"] = {c: _jsonable(samples[:, :, i]) for i, c in enumerate(VALUE_COLS)}
    return out


def load_calibration(path: str, predictor) -> Any:
    """The fitted calibration of ``path`` (``kronos calibrate``), checked to belong to the loaded predictor."""
    cal = bands.load_calibration(path).check(predictor, source=f"calibration file '{path}'")
    kept = outcomes_path(path)  # the realised outcomes the pipeline saved beside it: adaptive bands
    if cal.method == "vol_scaled" and kept.is_file():
        try:
            cal = cal.with_outcomes(BandOutcomes.load(kept))
            cal.outcomes.prepare_regimes(cal.params.get("vol_cuts"))  # at start-up, not on the first request
        except KronosError as exc:
            log.warning("%s: the service's bands are the static validation fit", exc)
    return cal


def calibration_info(cal: Any, path: str) -> dict:
    """What /models shows of a calibration: the method, its horizon/lookback and the validation coverage."""
    return {
        "file": str(path),
        "method": cal.method,
        "levels": cal.levels,
        "horizon": cal.horizon,
        "lookback": cal.lookback,
        "coverage_before": cal.coverage_before,
        "coverage_after": cal.coverage_after,
        "n_anchors": cal.n_anchors,
        "adaptive": None
        if cal.outcomes is None
        else {
            "outcomes": len(cal.outcomes),
            "last_outcome": str(pd.Timestamp(cal.outcomes.target.max())) if len(cal.outcomes) else None,
            "half_life_bars": cal.outcomes.half_life,
        },
    }


class Dataset:
    """A processed dataset's bars per symbol (all splits, time-ordered), for ``/symbols`` and symbol forecasts."""

    def __init__(self, path: str) -> None:

        if not dataset_exists(path):
            raise DataError(
                f"no processed dataset at '{path}' (train/val/test.parquet + manifest.json); "
                "run `kronos data` first or pass the dataset folder"
            )
        self.path = str(Path(path).expanduser().resolve())
        parts = [load_split(path, s)[["symbol", "timestamps", *VALUE_COLS]] for s in SPLITS]
        frame = pd.concat(parts, ignore_index=True)
        frame = frame.drop_duplicates(["symbol", "timestamps"], keep="last")
        frame = frame.sort_values(["symbol", "timestamps"], kind="mergesort")
        self.bars = {str(s): g.drop(columns="symbol").reset_index(drop=True) for s, g in frame.groupby("symbol")}

    def symbols(self) -> list[dict]:
        return [
            {
                "symbol": s,
                "bars": len(g),
                "first": g["timestamps"].iloc[0].isoformat(),
                "last": g["timestamps"].iloc[-1].isoformat(),
            }
            for s, g in self.bars.items()
        ]

    def history(self, symbol: str, lookback: int) -> pd.DataFrame:
        if symbol not in self.bars:
            sample = ", ".join(list(self.bars)[:5])
            raise InputError(f"unknown symbol '{symbol}'; GET /symbols lists the loaded ones (e.g. {sample})")
        return self.bars[symbol].iloc[-lookback:].reset_index(drop=True)


class ForecastEngine:
    """One loaded tokenizer + predictor, an optional dataset and calibration, and the micro-batching queue."""

    def __init__(
        self,
        predictor,
        info: ModelInfo,
        *,
        dataset: Dataset | None = None,
        calibration: Any = None,
        limits: Limits | None = None,
        batching: bool = True,
        batch_wait_ms: float = 20.0,
        max_batch: int = 64,
        run_dir: str | None = None,
    ) -> None:
        self.predictor = predictor
        self.info = info
        self.dataset = dataset
        self.calibration = calibration
        self.limits = limits or Limits()
        self.batching = bool(batching)
        self.batch_wait = max(0.0, float(batch_wait_ms)) / 1000.0
        self.max_batch = max(1, int(max_batch)) if batching else 1
        self.run_dir = run_dir
        # bars of a dataset symbol's history used for its forecast (the calibration's lookback when one is loaded)
        self.lookback = int(calibration.lookback) if calibration is not None else info.max_context
        self._lanes = {
            name: _Lane(ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kronos-forecast-{name}"))
            for name in LANES
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._job_ids = 0
        self._admitted = 0  # requests admitted and not yet finished (queued, gathered or running)
        self._closing = False  # no new requests (shutdown began)
        self._abort = False  # running work stops at its next decode step
        # seconds per unit of each request_cost term: measured by measure_speed(), corrected by finished batches
        self.speed: np.ndarray | None = None
        self._slowdown = 1.5  # the probe runs warm and alone: real batches have measured 1.2-1.7x its speed
        self.stats = {"requests": 0, "batches": 0, "series": 0, "cancelled": 0}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        tokenizer: str,
        model: str,
        *,
        device: str | None = None,
        max_context: int = 512,
        name: str = "",
        calibration: str = "",
        dataset: str = "",
        run_dir: str | None = None,
        **kwargs: Any,
    ) -> ForecastEngine:

        tok = KronosTokenizer.from_pretrained(tokenizer)
        mdl = Kronos.from_pretrained(model)
        predictor = KronosPredictor(mdl, tok, device=device, max_context=max_context)
        cal = load_calibration(calibration, predictor) if calibration else None
        info = ModelInfo(
            name=name or Path(str(model).rstrip("/")).name or "model",
            tokenizer_path=str(tokenizer),
            model_path=str(model),
            parameters=sum(p.numel() for p in mdl.parameters()),
            tokenizer_parameters=sum(p.numel() for p in tok.parameters()),
            max_context=int(max_context),
            device=str(predictor.device),
            calibration=calibration_info(cal, calibration) if cal else None,
        )
        data = Dataset(dataset) if dataset else None
        log.info(
            "loaded model '%s' (%d parameters) on %s%s",
            info.name,
            info.parameters,
            info.device,
            f", dataset {data.path} ({len(data.bars)} symbols)" if data else "",
        )
        engine = cls(predictor, info, dataset=data, calibration=cal, run_dir=run_dir, **kwargs)
        if engine.limits.max_request_seconds:
            engine.measure_speed()
        return engine

    def models(self) -> list[dict]:
        return [self.info.to_dict()]

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.info.name):
            raise InputError(f"unknown model '{name}'; loaded: ['{self.info.name}'] (GET /models)")

    # ------------------------------------------------------------------ cost
    def measure_speed(self) -> np.ndarray:
        """Time two forecasts on synthetic bars (a growing and a sliding window) and scale :data:`COST_SHAPE` (the
        relative weight of the :func:`request_cost` terms, fitted once on a grid of request shapes) to this model and
        machine: about a second on a laptop CPU for a small model. Finished batches keep correcting it."""
        rng = np.random.default_rng(0)
        m = self.info.max_context
        expected = spent = 0.0
        for length, horizon, samples in ((min(64, m), 16, 16), (m, 8, 8)):
            close = 10 * np.exp(np.cumsum(rng.normal(0, 0.01, length)))
            frame = pd.DataFrame(
                {
                    "timestamps": pd.date_range("2024-01-01", periods=length, freq="D"),
                    "open": close,
                    "high": close * 1.01,
                    "low": close * 0.99,
                    "close": close,
                    "volume": 1e6,
                    "amount": 1e7 * close,
                }
            )
            job = _Job([frame], Settings(horizon=horizon, samples=samples, seed=0), None, [False])  # type: ignore[arg-type]
            best = math.inf
            for _ in range(2):  # the first call also allocates: keep the faster
                started = time.perf_counter()
                self._run_group([job])
                best = min(best, time.perf_counter() - started)
            expected += float(request_cost([length], horizon, samples, m) @ COST_SHAPE)
            spent += best
        self.speed = COST_SHAPE * (spent / expected)
        log.info("measured speed: %.3g x the reference cost model", spent / expected)
        return self.speed

    def estimate_seconds(self, cost: np.ndarray) -> float | None:
        """The expected compute time of a request of ``cost`` (:func:`request_cost`) on this engine (None before
        :meth:`measure_speed`)."""
        if self.speed is None:
            return None
        return float(cost @ self.speed) * self._slowdown

    def _learn(self, cost: np.ndarray, seconds: float) -> None:
        """Correct the speed by a finished batch: a running mean of observed/estimated time (kept in [0.2, 20])."""
        if self.speed is None:
            return
        expected = float(cost @ self.speed)
        if expected <= 0:
            return
        self._slowdown = float(min(20.0, max(0.2, 0.7 * self._slowdown + 0.3 * seconds / expected)))

    # ------------------------------------------------------------------ requests
    async def forecast(self, histories: list[pd.DataFrame], settings: Settings) -> list[dict]:
        """Forecast each (already checked) history; results in order, each with ``queue_wait_ms``/``batch_size``.

        Refused before any work when the engine is shutting down or ``max_queue`` requests are unfinished (503), or
        when the estimated compute time is over ``max_request_seconds`` (422). Cancelling the awaiting task (a
        client that went away) drops the request; running work stops at the next decode step when nobody waits."""
        settings.check(self.limits)
        check_limit(len(histories), "max_batch_series", self.limits, "number of series")
        if not histories:
            raise InputError("no series given; send at least one")
        if self._closing:
            raise QueueFullError("the service is shutting down; retry on another instance or after its restart")
        histories, flags = self._apply_calibration_context(histories, settings)
        assert settings.horizon is not None and settings.samples is not None  # filled in by check()
        cost = request_cost([len(h) for h in histories], settings.horizon, settings.samples, self.info.max_context)
        seconds = self.estimate_seconds(cost)
        bound = self.limits.max_request_seconds
        if bound and seconds is not None and seconds > bound:
            raise LimitError(
                f"this request would take about {seconds:.1f} s of compute on this service ({len(histories)} series "
                f"x horizon {settings.horizon} x {settings.samples} samples over {max(map(len, histories))} bars), "
                f"over the service limit max_request_seconds={bound:g}; ask for fewer samples or series, a shorter "
                "horizon or history, or split it into several requests",
                "max_request_seconds",
            )
        if self._admitted >= self.limits.max_queue:
            raise QueueFullError(
                f"the forecast queue is full (max_queue={self.limits.max_queue} unfinished requests); retry shortly"
            )
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (a new app/client): fresh queues and batchers
            self._loop = loop
            for lane in self._lanes.values():
                lane.queue, lane.task = asyncio.Queue(), None
        small = seconds is not None and seconds <= SMALL_LANE_SECONDS
        lane = self._lanes["small" if small or seconds is None else "large"]
        assert lane.queue is not None
        if lane.task is None or lane.task.done():
            lane.task = loop.create_task(self._batch_loop(lane))
        job = _Job(histories, settings, loop.create_future(), flags, cost)
        self._admitted += 1
        lane.queue.put_nowait(job)
        self.stats["requests"] += 1
        try:
            return await job.future
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1
            raise

    def _apply_calibration_context(self, histories: list[pd.DataFrame], settings: Settings):
        """With a calibration: a request for its horizon with enough bars uses its lookback and gets calibrated
        bands; any other request gets the raw bands (and a note saying why)."""
        cal = self.calibration
        if cal is None:
            return histories, [False] * len(histories)
        out, flags = [], []
        for h in histories:
            ok = settings.horizon == cal.horizon and len(h) >= cal.lookback
            out.append(h.iloc[-cal.lookback :].reset_index(drop=True) if ok else h)
            flags.append(ok)
        return out, flags

    def history_for(self, table: pd.DataFrame, where: str = "bars") -> pd.DataFrame:
        """The checked history of a request, whole (the predictor uses all of it, as the official one)."""
        return check_history(table, self.limits, where)

    def symbol_history(self, symbol: str) -> pd.DataFrame:
        if self.dataset is None:
            raise InputError("no dataset is loaded; start the service with --dataset PATH or --run DIR")
        return self.dataset.history(symbol, self.lookback)

    def begin_shutdown(self) -> None:
        """Refuse new requests and drop queued ones (each gets a 503); running batches go on (see :meth:`close`)."""
        self._closing = True
        for lane in self._lanes.values():
            while lane.queue is not None and not lane.queue.empty():
                job = lane.queue.get_nowait()
                self._admitted -= 1
                if not job.future.done():
                    job.future.set_exception(QueueFullError("the service is shutting down; the request was not run"))

    async def close(self, grace: float = 0.0) -> None:
        """Shut down: refuse and drop queued work, let running batches finish for at most ``grace`` seconds, then
        stop them at their next decode step and end the batchers."""
        self.begin_shutdown()
        running = [lane.running for lane in self._lanes.values() if lane.running is not None]
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)
        self._abort = True
        for lane in self._lanes.values():
            if lane.task is not None:
                lane.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await lane.task
            lane.task, lane.queue = None, None
        self._loop = None
        self._closing, self._abort, self._admitted = False, False, 0  # a later event loop may use it again

    def shutdown(self) -> None:
        self._abort = True
        for lane in self._lanes.values():
            lane.executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ batching
    async def _batch_loop(self, lane: _Lane) -> None:
        assert lane.queue is not None
        queue = lane.queue
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            rows = len(jobs[0].frames)
            # Gather for batch_wait; while fewer requests than in the previous batch have come, keep gathering up
            # to MAX_WAIT_FACTOR x batch_wait (steady concurrent clients come back together, a little apart).
            start = loop.time()
            while rows < self.max_batch:
                factor = MAX_WAIT_FACTOR if len(jobs) < lane.last_jobs else 1.0
                try:
                    remaining = start + self.batch_wait * factor - loop.time()
                    job = queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(queue.get(), remaining)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                jobs.append(job)
                rows += len(job.frames)
            lane.last_jobs = len(jobs)
            live = [job for job in jobs if not job.abandoned]  # clients gone while queued: never run
            self._admitted -= len(jobs) - len(live)
            groups: dict[tuple, list[_Job]] = {}
            for job in live:
                self._job_ids += 1
                groups.setdefault(job.settings.batch_key(self._job_ids), []).append(job)
            for group in groups.values():
                await self._run_on(lane, group)

    async def _run_on(self, lane: _Lane, group: list[_Job]) -> None:
        """Run one group on the lane's worker; answer its requests; count them finished whatever happens."""
        loop = asyncio.get_running_loop()
        try:
            if all(job.abandoned for job in group):
                return
            started = time.perf_counter()
            lane.running = loop.run_in_executor(lane.executor, self._run_group, group)
            try:
                results = await asyncio.shield(lane.running)
            except Cancelled:  # every client of the group went away, or the service is stopping
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(QueueFullError("the service is shutting down; the forecast stopped"))
                return
            except Exception as exc:  # every error goes to the waiting requests, the loop lives on
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(exc)
                return
            done = time.perf_counter()
            n = sum(len(j.frames) for j in group)
            self.stats["batches"] += 1
            self.stats["series"] += n
            self._learn(sum(j.cost for j in group), done - started)
            for job, res in zip(group, results):
                for r in res:
                    r["queue_wait_ms"] = round((started - job.enqueued) * 1000, 2)
                    r["compute_ms"] = round((done - started) * 1000, 2)
                    r["batch_size"] = n
                if not job.future.done():
                    job.future.set_result(res)
        finally:
            lane.running = None
            self._admitted -= len(group)

    def _run_group(self, group: list[_Job]) -> list[list[dict]]:
        """Worker thread: one ``predict_batch`` call for every series of the group."""

        s = group[0].settings
        assert s.horizon is not None  # Settings.check filled it in before the job was queued
        frames = [f for job in group for f in job.frames]
        y_ts = [pd.Series(future_timestamps(f["timestamps"], s.horizon)) for f in frames]
        waiting = [job for job in group if job.future is not None]  # (measure_speed's probe has no client)

        def stop() -> bool:
            return self._abort or (bool(waiting) and all(job.abandoned for job in waiting))

        with cancel_when(stop):
            outputs = self.predictor.predict_batch(
                [f[list(VALUE_COLS)] for f in frames],
                [f["timestamps"] for f in frames],
                y_ts,
                pred_len=s.horizon,
                T=float(s.T),
                top_k=s.top_k,
                top_p=float(s.top_p),
                sample_count=s.samples,
                verbose=False,
                seed=s.seed,
                return_samples=True,
            )
        results, k = [], 0
        for job in group:
            res = []
            for f, calibrate in zip(job.frames, job.calibrate):
                mean, samples = outputs[k]
                cal = self.calibration if calibrate else None
                res.append(summarize(f, mean, samples, job.settings, pd.DatetimeIndex(y_ts[k]), cal))
                res[-1]["model"] = self.info.name
                res[-1]["history_bars"] = len(f)  # the bars given: normalisation statistics use them all
                res[-1]["context_bars"] = min(len(f), self.info.max_context)  # the bars the model's window sees
                if self.calibration is not None and not calibrate:
                    res[-1]["calibration_note"] = (
                        f"bands not calibrated: the calibration was fitted for horizon {self.calibration.horizon} "
                        f"with at least {self.calibration.lookback} bars of history"
                    )
                k += 1
            results.append(res)
        return results


__all__ = ["ForecastEngine", "Settings", "Limits", "LimitError", "QueueFullError", "Dataset"]
