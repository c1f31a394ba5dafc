"""Statistics of a comparison (scipy.stats): per-variant means with t-intervals, and paired per-seed differences to a
baseline with their t-interval, the paired t-test, and the smallest difference the run could have detected.

The minimum detectable difference (MDE) answers "could this run have seen an effect?": the true mean paired
difference at which a two-sided paired t-test at level alpha rejects with probability `power`, given the observed
standard deviation of the per-seed differences. It is solved exactly with the noncentral t distribution (the test
statistic under a true difference delta is noncentral t with df = n - 1 and noncentrality delta * sqrt(n) / sd). A
paired interval that contains 0 is then reported as "not detectable at +-MDE", not as "no effect".

Intervals and tests need `MIN_SEEDS` seeds: with 2 seeds the t quantile is 12.7 and a 95% interval spans several
times the data's range, which reads as a broken table rather than as uncertainty.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

MIN_SEEDS = 3
NO_INTERVAL_REASON = (f"no intervals or tests: fewer than {MIN_SEEDS} seeds (a 95% t-interval from 2 seeds is "
                      "12.7 standard errors wide)")


def _clean(values: Iterable) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                      dtype=np.float64)


def describe(values: Iterable, level: float = 0.95) -> dict[str, float]:
    """n, mean, std (ddof 1) and the `level` t-interval of the mean (NaN with fewer than MIN_SEEDS values)."""
    from scipy import stats

    x = _clean(values)
    n = len(x)
    out = {"n": n, "mean": float(x.mean()) if n else math.nan, "std": float(x.std(ddof=1)) if n >= 2 else math.nan,
           "ci95_low": math.nan, "ci95_high": math.nan}
    if n >= MIN_SEEDS:
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * out["std"] / math.sqrt(n))
        out.update(ci95_low=out["mean"] - half, ci95_high=out["mean"] + half)
    return out


def minimum_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean paired difference a two-sided paired t-test (level `alpha`, `n` pairs, per-pair standard
    deviation `sd`) detects with probability `power`. NaN for n < 2; 0 when sd is 0."""
    from scipy import optimize, stats

    if n < 2 or sd is None or math.isnan(sd):
        return math.nan
    if sd == 0:
        return 0.0
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def power_at(delta: float) -> float:
        nc = delta * math.sqrt(n) / sd
        return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))

    hi = sd
    while power_at(hi) < power:
        hi *= 2
    return float(optimize.brentq(lambda d: power_at(d) - power, 0.0, hi, xtol=1e-12 * max(sd, 1.0)))


def paired(values: dict, baseline: dict, alpha: float = 0.05, power: float = 0.8) -> dict[str, float]:
    """Per-seed differences (values - baseline) over the seeds both have: mean, std, 95% t-interval, paired t-test
    p-value and the minimum detectable difference (NaN where fewer than MIN_SEEDS pairs)."""
    from scipy import stats

    seeds = sorted(s for s in values if s in baseline and values[s] is not None and baseline[s] is not None)
    a = np.asarray([values[s] for s in seeds], dtype=np.float64)
    b = np.asarray([baseline[s] for s in seeds], dtype=np.float64)
    d = describe(a - b)
    p = mde = math.nan
    if len(seeds) >= MIN_SEEDS:
        mde = minimum_detectable_difference(d["std"], len(seeds), alpha, power)
        p = float(stats.ttest_rel(a, b).pvalue) if np.std(a - b) > 0 else (1.0 if d["mean"] == 0 else 0.0)
    return {"n": d["n"], "diff_mean": d["mean"], "diff_std": d["std"], "diff_ci95_low": d["ci95_low"],
            "diff_ci95_high": d["ci95_high"], "p_value": p, "mde80": mde}


def excludes_zero(pr: dict[str, float]) -> bool:
    lo, hi = pr.get("diff_ci95_low", math.nan), pr.get("diff_ci95_high", math.nan)
    return not (math.isnan(lo) or math.isnan(hi)) and (lo > 0 or hi < 0)
