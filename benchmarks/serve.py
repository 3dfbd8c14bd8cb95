"""`kronos serve` under load: requests/s and p50/p99 latency with micro-batching on and off.

Starts the service (a `kronos serve` subprocess on a loopback port, the tiny test checkpoints by default) once with
batching and once with ``--no-batching``, then N concurrent clients each send R ``POST /forecast`` requests (real
5-minute bars from tests/fixtures/kline_5min.csv, one window per request, equal lengths). Prints one table row per
(mode, clients) and the ratio of batched to one-at-a-time requests/s (goal: >= 3x at 16 clients), and checks that
both modes return identical forecasts for the same requests (greedy decoding, ``top_k=1``, with a fixed seed).

    python benchmarks/serve.py                       # 1 and 16 clients, 4 requests each, horizon 48
    python benchmarks/serve.py --clients 16 --requests 8 --threads 2
    python benchmarks/serve.py --tokenizer ./tok --model ./pred --max-context 512
    python benchmarks/serve.py --sampled --samples 16 --clients 16 --requests 2   # sampled 16-path requests
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "parity-tiny" / "tiny"
CSV = REPO / "tests" / "fixtures" / "kline_5min.csv"
GOAL = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, batching: bool) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "kronos.cli",
        "-q",
        "serve",
        "--tokenizer",
        args.tokenizer,
        "--model",
        args.model,
        "--max-context",
        str(args.max_context),
        "--device",
        "cpu",
        "--port",
        str(port),
        "--batch-wait-ms",
        str(args.wait_ms),
        "--max-queue",
        "4096",
    ]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit(f"server did not start: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        time.sleep(0.2)


def payloads(args) -> list[dict]:
    frame = pd.read_csv(CSV)
    out = []
    for i in range(args.clients * args.requests):
        start = (i * 37) % (len(frame) - args.lookback)
        bars = frame.iloc[start : start + args.lookback].to_dict("records")
        if args.sampled:  # the API's usual request: sampled paths, no seed (outputs differ run to run)
            out.append({"bars": bars, "horizon": args.horizon, "samples": args.samples, "quantiles": [0.1, 0.9]})
        else:
            out.append(
                {
                    "bars": bars,
                    "horizon": args.horizon,
                    "samples": args.samples,
                    "top_k": 1,
                    "seed": 7,
                    "quantiles": [0.1, 0.9],
                }
            )
    return out


async def load(url: str, bodies: list[dict], clients: int) -> tuple[float, list[float], list[dict]]:
    import httpx

    results: list = [None] * len(bodies)
    latencies: list[float] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)

    async def client(http):
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            r = await http.post(url + "/forecast", json=bodies[i])
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            results[i] = r.json()

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await http.post(url + "/forecast", json=bodies[0])  # warm-up (first call pays one-off costs)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return wall, latencies, results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(TINY / "tokenizer"))
    p.add_argument("--model", default=str(TINY / "predictor"))
    p.add_argument("--max-context", type=int, default=128)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--lookback", type=int, default=96)
    p.add_argument("--horizon", type=int, default=48)
    p.add_argument("--wait-ms", type=float, default=20.0, help="the server's --batch-wait-ms")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--samples", type=int, default=1, help="sample paths per request")
    p.add_argument(
        "--sampled",
        action="store_true",
        help="random sampling (top_p 0.9, no seed) instead of greedy; no identical-output check",
    )
    args = p.parse_args()
    print(
        f"# kronos serve benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"server threads {args.threads}; lookback {args.lookback}, horizon {args.horizon}, {args.samples} path(s), "
        f"{'sampled, no seed' if args.sampled else 'greedy, seed 7'}, "
        f"batch wait {args.wait_ms} ms"
    )
    rows, outputs = [], {}
    for batching in (False, True):
        proc, url = start_server(args, batching)
        try:
            for clients in args.clients:
                a = argparse.Namespace(**{**vars(args), "clients": clients})
                bodies = payloads(a)
                wall, lat, res = asyncio.run(load(url, bodies, clients))
                lat_ms = np.array(lat) * 1000
                rows.append(
                    {
                        "batching": "on" if batching else "off",
                        "clients": clients,
                        "requests": len(bodies),
                        "req/s": len(bodies) / wall,
                        "p50 ms": np.percentile(lat_ms, 50),
                        "p99 ms": np.percentile(lat_ms, 99),
                        "mean batch": np.mean([r["batch_size"] for r in res]),
                    }
                )
                outputs[(batching, clients)] = [(r["mean"], r["quantiles"]) for r in res]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    ok = True
    for clients in args.clients:
        off = table[(table.batching == "off") & (table.clients == clients)]["req/s"].iloc[0]
        on = table[(table.batching == "on") & (table.clients == clients)]["req/s"].iloc[0]
        same = outputs[(False, clients)] == outputs[(True, clients)] or args.sampled
        goal = f" (goal >= {GOAL:g}x: {'met' if on / off >= GOAL else 'NOT met'})" if clients == 16 else ""
        print(
            f"{clients:>3} clients: batching on/off = {on / off:.2f}x requests/s{goal}; "
            f"identical outputs: {'n/a (random sampling)' if args.sampled else 'yes' if same else 'NO'}"
        )
        ok = ok and same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
