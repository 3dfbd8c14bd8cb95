"""Inference speed: KV-cached generation vs the official (uncached) algorithm, with identical greedy outputs.

Random weights with the Kronos-small shape and the Kronos-Tokenizer-base shape (the numbers depend only on the
shapes). For each case (lookback/pred_len) and batch size it times ``KronosPredictor.predict_batch`` with
``use_cache=True`` and ``use_cache=False`` (greedy, ``top_k=1``), prints seconds per forecast and the ratio, and
checks that both paths return identical forecasts.

    python benchmarks/inference.py              # full table (several minutes: the uncached path is slow)
    python benchmarks/inference.py --quick      # batch 1 only
    python benchmarks/inference.py --cases 400/100 --batch-sizes 1 8 --threads 2

With max_context 512, lookback 400 and pred_len 120 the window slides for the last steps (each of those steps
recomputes a full 512-token window, by design: positions restart at 0 for each window); pred_len 100 never slides.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import pandas as pd
import torch

from kronos.inference import KronosPredictor
from kronos.model import build_predictor, build_tokenizer

TARGETS = {(400, 120): 7.0, (400, 100): 10.0}  # minimum cached/uncached ratio at batch 1


def synthetic_series(n: int, pred_len: int, seed: int):
    """A random-walk 5-minute K-line frame with its context and future timestamps."""
    rng = np.random.default_rng(seed)
    close = 10 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    open_ = np.r_[close[0], close[:-1]]
    spread = np.abs(rng.normal(0, 0.001, n)) * close
    volume = rng.lognormal(8, 0.5, n)
    df = pd.DataFrame({"open": open_, "high": np.maximum(open_, close) + spread,
                       "low": np.minimum(open_, close) - spread, "close": close,
                       "volume": volume, "amount": volume * close})  # fmt: skip
    ts = pd.Series(pd.date_range("2024-01-02 09:30", periods=n + pred_len, freq="5min"))
    return df, ts[:n].reset_index(drop=True), ts[n:].reset_index(drop=True)


def timed(predictor: KronosPredictor, inputs, pred_len: int, use_cache: bool):
    dfs, xts, yts = inputs
    start = time.perf_counter()
    out = predictor.predict_batch(dfs, xts, yts, pred_len, T=1.0, top_k=1, top_p=1.0, sample_count=1,
                                  verbose=False, use_cache=use_cache)  # fmt: skip
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["400/120", "400/100", "256/32"], help="lookback/pred_len")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--quick", action="store_true", help="batch size 1 only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [1] if args.quick else args.batch_sizes
    cases = [tuple(int(v) for v in c.split("/")) for c in args.cases]

    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer("base")
    model = build_predictor("small")
    predictor = KronosPredictor(model, tokenizer, device="cpu", max_context=args.max_context)
    print(f"Kronos-small shape ({sum(p.numel() for p in model.parameters()):,} params) + Tokenizer-base shape, "
          f"random weights; max_context {args.max_context}")  # fmt: skip
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.2f}")  # fmt: skip
    timed(predictor, tuple([v] for v in synthetic_series(64, 4, 99)), 4, True)  # warm-up (one-time costs)

    header = (f"{'lookback':>8} {'pred_len':>8} {'batch':>5} {'slides':>6} {'cached s/fc':>12} "
              f"{'uncached s/fc':>14} {'speedup':>8} {'identical':>9} {'load':>5}")  # fmt: skip
    print(header)
    print("-" * len(header))
    all_identical, misses = True, []
    for lookback, pred_len in cases:
        for batch in batch_sizes:
            series = [synthetic_series(lookback, pred_len, args.seed + i) for i in range(batch)]
            inputs = tuple(list(v) for v in zip(*series))
            t_cached, out_cached = timed(predictor, inputs, pred_len, True)
            t_plain, out_plain = timed(predictor, inputs, pred_len, False)
            identical = all(a.equals(b) for a, b in zip(out_cached, out_plain))
            all_identical &= identical
            ratio = t_plain / t_cached
            slides = max(0, lookback + pred_len - 1 - args.max_context)
            print(f"{lookback:>8} {pred_len:>8} {batch:>5} {slides:>6} {t_cached / batch:>12.3f} "
                  f"{t_plain / batch:>14.3f} {ratio:>7.1f}x {str(identical):>9} {os.getloadavg()[0]:>5.2f}",
                  flush=True)  # fmt: skip
            target = TARGETS.get((lookback, pred_len))
            if batch == 1 and target and ratio < target:
                misses.append(f"{lookback}/{pred_len}: {ratio:.1f}x < {target}x")
    print("greedy outputs identical (cached vs uncached):", all_identical)
    if misses:
        print("speed-up targets missed (machine load affects this):", "; ".join(misses))
    return 0 if all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
