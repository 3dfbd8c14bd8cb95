"""`kronos serve` against its worst legal requests (issue 22): figures measured in one run, printed as a table.

Starts `kronos serve` (the starter pair, default limits: max_request_seconds 4, max_context 512) on a loopback port
and measures:

* the largest request the service accepts (a ladder of 32 series x horizon 256 x 64 samples x 4096 bars, halving
  samples, then series, then horizon, until one is accepted): the refusals' latency and the accepted one's wall time
  (goal: < 10 s);
* a small greedy forecast sent while that request runs (goal: < 2 s);
* a client that gives up after 1 s on a large request: how long its work went on (the next large request's queue
  wait; goal: < 1 s);
* a Parquet bomb (30M constant rows, zstd) under the body limit: status, latency and the server's resident memory
  before/after (goal: 413, < 100 MB);
* JSON nested 100,000 deep, a cross-site text/plain POST and a foreign Host header: statuses.

    python benchmarks/serve_limits.py
    python benchmarks/serve_limits.py --tokenizer ./tok --model ./pred --max-context 512 --threads 2
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
STARTER = REPO / "examples" / "models" / "starter"


def bars(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    close = 10 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    ts = pd.date_range("2010-01-01", periods=n, freq="D").strftime("%Y-%m-%d")
    return [
        {"timestamps": t, "open": c, "high": c * 1.01, "low": c * 0.99, "close": c, "volume": 1e6, "amount": 1e7 * c}
        for t, c in zip(ts, close)
    ]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bomb() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 30_000_000
    idx = pa.array(np.zeros(n, dtype=np.int32))
    cols = {c: pa.DictionaryArray.from_arrays(idx, pa.array([1.0])) for c in ("open", "high", "low", "close")}
    cols["timestamps"] = pa.DictionaryArray.from_arrays(idx, pa.array(["2024-01-02"]))
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, compression="zstd", row_group_size=n)
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=str(STARTER / "tokenizer"))
    ap.add_argument("--model", default=str(STARTER / "predictor"))
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the service (0: its default)")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "kronos.cli", "serve", "--tokenizer", args.tokenizer, "--model", args.model,
           "--max-context", str(args.max_context), "--port", str(args.port), "--device", "cpu"]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{args.port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    print(proc.stderr.read() if proc.stderr else "", file=sys.stderr)
                    return 1
            time.sleep(0.2)
        rows: list[tuple[str, str]] = [("start (load + speed probe)", f"{time.perf_counter() - started:.1f} s")]
        limits = httpx.get(url + "/models").json()["limits"]
        history = bars(limits["max_bars"])
        shape = {"series": limits["max_batch_series"], "horizon": limits["max_horizon"],
                 "samples": limits["max_samples"]}  # fmt: skip
        refusals = []
        while True:
            body = {"series": [{"bars": history}] * shape["series"], "horizon": shape["horizon"],
                    "samples": shape["samples"], "seed": 1, "quantiles": []}  # fmt: skip
            t = time.perf_counter()
            r = httpx.post(url + "/forecast/batch", json=body, timeout=120)
            if r.status_code not in (413, 422):
                break
            refusals.append((r.json().get("limit"), time.perf_counter() - t))  # refused before any work
            key = "series" if r.status_code == 413 or shape["samples"] == 1 else "samples"
            if shape[key] == 1:
                key = "horizon"
            shape[key] //= 2
            if shape[key] == 0:
                print("nothing accepted", file=sys.stderr)
                return 1
        kinds = ", ".join(sorted({str(k) for k, _ in refusals}))
        slowest = max((s for _, s in refusals), default=0.0)
        rows.append(("refusals before the accepted one", f"{len(refusals)} ({kinds}), slowest {slowest:.3f} s"))

        result: dict = {}

        def big() -> None:
            t = time.perf_counter()
            result["status"] = httpx.post(url + "/forecast/batch", json=body, timeout=120).status_code
            result["seconds"] = time.perf_counter() - t

        worker = threading.Thread(target=big)
        worker.start()
        time.sleep(0.5)
        t = time.perf_counter()
        small = httpx.post(url + "/forecast", json={"bars": bars(64, 1), "horizon": 4, "top_k": 1}, timeout=60)
        small_s = time.perf_counter() - t
        worker.join()
        rows.append((f"largest accepted: {shape['series']} series x horizon {shape['horizon']} x "
                     f"{shape['samples']} samples x {limits['max_bars']} bars",
                     f"{result['seconds']:.2f} s (HTTP {result['status']}; goal < 10 s)"))  # fmt: skip
        rows.append(("small greedy forecast meanwhile", f"{small_s:.2f} s (HTTP {small.status_code}; goal < 2 s)"))

        try:
            httpx.post(url + "/forecast/batch", json=body, timeout=1.0)
        except httpx.ReadTimeout:
            pass
        t = time.perf_counter()
        again = httpx.post(url + "/forecast/batch", json=body, timeout=120).json()["forecasts"][0]
        rows.append(("abandoned after 1 s: its work went on for",
                     f"{again['queue_wait_ms'] / 1000:.2f} s (goal < 1 s)"))  # fmt: skip

        data = bomb()
        before = rss_mb(proc.pid)
        t = time.perf_counter()
        r = httpx.post(url + "/forecast", files={"file": ("bomb.parquet", data)}, timeout=60)
        rows.append((f"Parquet bomb ({len(data) / 1e6:.2f} MB, 30M rows)",
                     f"HTTP {r.status_code} in {time.perf_counter() - t:.3f} s, RSS {before:.0f} -> "
                     f"{rss_mb(proc.pid):.0f} MB"))  # fmt: skip
        deep = b"[" * 100_000 + b"]" * 100_000
        r1 = httpx.post(url + "/forecast", content=deep, headers={"content-type": "application/json"})
        r2 = httpx.post(url + "/forecast", content=b'{"bars": []}', headers={"content-type": "text/plain"})
        r3 = httpx.get(url + "/models", headers={"host": "attacker.example"})
        rows.append(("JSON 100k deep / text/plain POST / foreign Host",
                     f"{r1.status_code} / {r2.status_code} / {r3.status_code}"))  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
