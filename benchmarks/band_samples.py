"""How many sample paths a forecast band needs: bias of sample quantiles against the sample count.

Draws ``n`` paths from N(0, 1) many times and reports, for the 10%-90% band, how far the mean q0.9 of the ``n``
samples falls short of the true q0.9 (the band pulled inward), its mean width against the true width, and how often a
fresh draw lands inside the band (nominal 0.8). Two quantile rules: NumPy's default ``linear`` (what
:func:`kronos.inference.predictor.sample_quantiles` uses) and ``normal_unbiased`` (Hyndman-Fan type 9).
The cost side is in ``benchmarks/inference.py`` (sampling table).

    python benchmarks/band_samples.py
    python benchmarks/band_samples.py --counts 5 20 32 64 --trials 50000
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from scipy.stats import norm


def band_stats(n: int, trials: int, method: str, rng: np.random.Generator) -> tuple[float, float, float]:
    """(relative bias of q0.9, mean width / true width, coverage of a fresh draw) for ``n`` N(0, 1) samples."""
    x = rng.standard_normal((trials, n))
    lo, hi = np.quantile(x, [0.1, 0.9], axis=1, method=method)
    y = rng.standard_normal(trials)
    true = norm.ppf(0.9)
    return float(hi.mean() / true - 1), float(np.mean(hi - lo) / (2 * true)), float(np.mean((y >= lo) & (y <= hi)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", nargs="+", type=int, default=[4, 5, 8, 16, 20, 32, 64, 128])
    parser.add_argument("--trials", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    header = f"{'paths':>5} {'rule':>16} {'q0.9 bias':>10} {'width ratio':>11} {'coverage (0.8)':>14}"
    print(header)
    print("-" * len(header))
    for n in args.counts:
        for method in ("linear", "normal_unbiased"):
            bias, width, cover = band_stats(n, args.trials, method, rng)
            print(f"{n:>5} {method:>16} {bias:>+10.1%} {width:>11.3f} {cover:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
