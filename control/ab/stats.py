"""The statistics behind `sluice ab report`, on the standard library alone.

Two tests and their confidence intervals are all the report needs: Welch's t-test for
numeric scores and the two-proportion z-test for good/bad labels. The normal distribution
comes from `statistics.NormalDist`; Student's t comes from the regularized incomplete beta
function, evaluated by its continued fraction (Numerical Recipes, 3rd ed., section 6.4,
with the modified Lentz method). That is a few dozen lines instead of scipy's ~35 MB plus
numpy in the proxy's install; tests/apps/test_stats.py checks them against published tables.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.80  # the usual planning power behind "need ~N more"

_NORMAL = NormalDist()
_BETACF_EPS = 1e-15
_BETACF_TINY = 1e-300
_BETACF_MAX_ITER = 10_000  # convergence takes O(sqrt(max(a, b))) steps; df of 1e7 fits
# Beyond this many degrees of freedom Student's t and the normal differ by < 1e-7.
_NORMAL_DF = 1e7


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), by the modified Lentz method."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _BETACF_TINY else _BETACF_TINY)
    h = d
    for m in range(1, _BETACF_MAX_ITER + 1):
        m2 = 2 * m
        even = m * (b - m) * x / ((qam + m2) * (a + m2))
        odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        for aa in (even, odd):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _BETACF_TINY else _BETACF_TINY)
            c = 1.0 + aa / c
            c = c if abs(c) > _BETACF_TINY else _BETACF_TINY
            h *= d * c
        if abs(d * c - 1.0) < _BETACF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and x in [0, 1]."""
    if a <= 0 or b <= 0:
        raise ValueError("a and b must be > 0")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The fraction converges fast only below the mean; above it use I_x(a,b) = 1 - I_1-x(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError("df must be > 0")
    if math.isinf(t):
        return 0.0
    if df > _NORMAL_DF:
        return 2.0 * (1.0 - _NORMAL.cdf(abs(t)))
    return regularized_beta(df / (df + t * t), df / 2.0, 0.5)


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (for p in (0, 1)), by bisection on the two-sided tail."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if p == 0.5:
        return 0.0
    tail = 2.0 * min(p, 1.0 - p)  # two-sided tail probability of |t|
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    t = (lo + hi) / 2.0
    return t if p > 0.5 else -t


def z_quantile(p: float) -> float:
    return _NORMAL.inv_cdf(p)


def quantile(values: Sequence[float], q: float) -> float:
    """The q quantile in whole percents (0.5, 0.95), interpolated between closest ranks as
    numpy's default does (`method="inclusive"`); `values` non-empty."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


@dataclass(frozen=True, slots=True)
class MeanEstimate:
    """Sample mean with a t-based confidence interval (None below two values)."""

    n: int
    mean: float
    variance: float  # sample variance (n - 1); 0.0 below two values
    ci: tuple[float, float] | None


def estimate_mean(values: Sequence[float], confidence: float = CONFIDENCE) -> MeanEstimate | None:
    n = len(values)
    if n == 0:
        return None
    mean = math.fsum(values) / n
    if n < 2:
        return MeanEstimate(n, mean, 0.0, None)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * math.sqrt(variance / n)
    return MeanEstimate(n, mean, variance, (mean - half, mean + half))


@dataclass(frozen=True, slots=True)
class RateEstimate:
    """A proportion with its Wilson score interval (sound near 0 and 1, unlike Wald's)."""

    n: int
    successes: int
    rate: float
    ci: tuple[float, float]


def estimate_rate(successes: int, n: int, confidence: float = CONFIDENCE) -> RateEstimate | None:
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError("successes must be in [0, n]")
    p = successes / n
    z = z_quantile(0.5 + confidence / 2.0)
    z2 = z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At 0 or n successes the bound is exactly 0 or 1; the float sum would be 1e-17 off.
    low = 0.0 if successes == 0 else center - half
    high = 1.0 if successes == n else center + half
    return RateEstimate(n, successes, p, (low, high))


@dataclass(frozen=True, slots=True)
class TestResult:
    """A two-sided test of `b - a`; df is None for the z-test."""

    __test__ = False  # not a pytest class

    test: str  # "welch_t" | "two_proportion_z"
    difference: float
    statistic: float
    p_value: float
    df: float | None = None


def welch_t_test(a: MeanEstimate, b: MeanEstimate) -> TestResult | None:
    """Welch's unequal-variances t-test; None unless both groups have two or more values."""
    if a.n < 2 or b.n < 2:
        return None
    diff = b.mean - a.mean
    va, vb = a.variance / a.n, b.variance / b.n
    se2 = va + vb
    if se2 == 0.0:
        # Both groups constant: equal means are no evidence, different ones are certain.
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return TestResult("welch_t", diff, t, 1.0 if diff == 0 else 0.0, float(a.n + b.n - 2))
    t = diff / math.sqrt(se2)
    df = se2 * se2 / (va * va / (a.n - 1) + vb * vb / (b.n - 1))  # Welch-Satterthwaite
    return TestResult("welch_t", diff, t, t_two_sided_p(t, df), df)


def two_proportion_z_test(a: RateEstimate, b: RateEstimate) -> TestResult | None:
    """The pooled two-proportion z-test; None when no rating differs (all good or all bad)."""
    pooled = (a.successes + b.successes) / (a.n + b.n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / a.n + 1 / b.n))
    if se == 0.0:
        return None
    diff = b.rate - a.rate
    z = diff / se
    return TestResult("two_proportion_z", diff, z, 2.0 * (1.0 - _NORMAL.cdf(abs(z))))


def normal_approximation_holds(a: RateEstimate, b: RateEstimate) -> bool:
    """The z-test's rule of thumb: at least 5 expected successes and failures per group."""
    pooled = (a.successes + b.successes) / (a.n + b.n)
    return all(g.n * pooled >= 5 and g.n * (1 - pooled) >= 5 for g in (a, b))


def n_for_means(
    a: MeanEstimate, b: MeanEstimate, alpha: float = ALPHA, power: float = POWER
) -> int | None:
    """Values per group that would detect the observed difference (normal approximation);
    None when there is no difference to detect."""
    diff = b.mean - a.mean
    if diff == 0.0:
        return None
    z = z_quantile(1 - alpha / 2) + z_quantile(power)
    return math.ceil(z * z * (a.variance + b.variance) / (diff * diff))


def n_for_rates(
    a: RateEstimate, b: RateEstimate, alpha: float = ALPHA, power: float = POWER
) -> int | None:
    """Ratings per group that would detect the observed difference (Fleiss, without the
    continuity correction); None when there is no difference to detect."""
    diff = b.rate - a.rate
    if diff == 0.0:
        return None
    p1, p2 = a.rate, b.rate
    pbar = (p1 + p2) / 2
    za, zb = z_quantile(1 - alpha / 2), z_quantile(power)
    root = za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return math.ceil(root * root / (diff * diff))


__all__ = [
    "ALPHA",
    "CONFIDENCE",
    "MeanEstimate",
    "RateEstimate",
    "TestResult",
    "estimate_mean",
    "estimate_rate",
    "n_for_means",
    "n_for_rates",
    "normal_approximation_holds",
    "quantile",
    "regularized_beta",
    "t_quantile",
    "t_two_sided_p",
    "two_proportion_z_test",
    "welch_t_test",
    "z_quantile",
]
