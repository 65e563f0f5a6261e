"""control/ab/stats.py against published values: Student's t tables, R's and Rosetta Code's
Welch t-tests, closed forms of the incomplete beta function, Wilson's interval."""

from __future__ import annotations

import math
import random

import pytest
from sluice.control.ab import stats

# Two-sided 5% critical values of Student's t (any statistics textbook's table, e.g.
# NIST/SEMATECH e-Handbook 1.3.6.7.2).
T_975 = [
    (1, 12.706),
    (2, 4.303),
    (3, 3.182),
    (5, 2.571),
    (10, 2.228),
    (20, 2.086),
    (30, 2.042),
    (60, 2.000),
    (120, 1.980),
]
# One-sided 0.5% critical values (two-sided 1%).
T_995 = [(1, 63.657), (5, 4.032), (10, 3.169), (30, 2.750), (100, 2.626)]


@pytest.mark.parametrize(("df", "t"), T_975)
def test_t_table_975(df: int, t: float) -> None:
    assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=6e-4)
    assert stats.t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4)


@pytest.mark.parametrize(("df", "t"), T_995)
def test_t_table_995(df: int, t: float) -> None:
    assert stats.t_quantile(0.995, df) == pytest.approx(t, abs=6e-4)
    assert stats.t_quantile(0.005, df) == pytest.approx(-t, abs=6e-4)


def test_t_tends_to_the_normal() -> None:
    assert stats.t_two_sided_p(1.959964, 1e9) == pytest.approx(0.05, abs=1e-6)
    assert stats.t_two_sided_p(1.959964, 1e6) == pytest.approx(0.05, abs=1e-5)
    assert stats.t_quantile(0.975, 1e5) == pytest.approx(1.959964, abs=1e-4)


def test_t_with_one_degree_of_freedom_is_cauchy() -> None:
    for t in (0.1, 1.0, 3.0, 40.0):
        cauchy = 1 - 2 * math.atan(t) / math.pi
        assert stats.t_two_sided_p(t, 1) == pytest.approx(cauchy, rel=1e-10)


def test_t_with_two_degrees_of_freedom_closed_form() -> None:
    for t in (0.3, 2.0, 9.0):
        assert stats.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)


@pytest.mark.parametrize("x", [0.01, 0.2, 0.5, 0.77, 0.999])
def test_incomplete_beta_closed_forms(x: float) -> None:
    assert stats.regularized_beta(x, 1, 1) == pytest.approx(x, rel=1e-12)
    assert stats.regularized_beta(x, 3.5, 1) == pytest.approx(x**3.5, rel=1e-10)
    assert stats.regularized_beta(x, 1, 2.5) == pytest.approx(1 - (1 - x) ** 2.5, rel=1e-10)
    # Symmetry: I_x(a, b) = 1 - I_(1-x)(b, a).
    left = stats.regularized_beta(x, 7.0, 2.5)
    assert left == pytest.approx(1 - stats.regularized_beta(1 - x, 2.5, 7.0), abs=1e-12)


def test_incomplete_beta_at_the_middle_of_a_symmetric_beta() -> None:
    for a in (0.5, 2, 30, 1000):
        assert stats.regularized_beta(0.5, a, a) == pytest.approx(0.5, abs=1e-12)


def test_t_with_large_df_converges() -> None:
    # Welch df for thousands of records: the continued fraction must still converge.
    p = stats.t_two_sided_p(2.0, 5_000_000)
    assert p == pytest.approx(0.0455003, abs=1e-6)


def test_welch_matches_rosetta_code() -> None:
    # Rosetta Code, "Welch's t-test", first data set: p = 0.021378001462867.
    a = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    b = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    ea, eb = stats.estimate_mean(a), stats.estimate_mean(b)
    assert ea is not None and eb is not None
    result = stats.welch_t_test(ea, eb)
    assert result is not None
    assert result.p_value == pytest.approx(0.021378001462867, rel=1e-9)
    assert result.statistic == pytest.approx(2.46, abs=0.005)
    assert result.df == pytest.approx(24.99, abs=0.01)


def test_welch_matches_r_t_test() -> None:
    # R: t.test(c(11,9,10,11,10,12,9,11,12,9), c(11,13,10,13,12,9,11,12,12,11))
    # Welch Two Sample t-test: t = -1.8325, df = 17.9, p-value = 0.08356;
    # 95 percent confidence interval of the difference: -2.1469104 0.1469104.
    x = [11, 9, 10, 11, 10, 12, 9, 11, 12, 9]
    y = [11, 13, 10, 13, 12, 9, 11, 12, 12, 11]
    ex, ey = stats.estimate_mean(x), stats.estimate_mean(y)
    assert ex is not None and ey is not None
    result = stats.welch_t_test(ey, ex)  # difference x - y, as R reports it
    assert result is not None and result.df is not None
    assert result.statistic == pytest.approx(-1.8325, abs=5e-5)
    assert result.df == pytest.approx(17.9, abs=0.05)
    assert result.p_value == pytest.approx(0.08356, abs=5e-6)
    half = stats.t_quantile(0.975, result.df) * abs(result.difference / result.statistic)
    assert result.difference - half == pytest.approx(-2.1469104, abs=1e-6)


def test_welch_edge_cases() -> None:
    one = stats.estimate_mean([3.0])
    assert one is not None and one.ci is None
    same = stats.estimate_mean([2.0, 2.0, 2.0])
    higher = stats.estimate_mean([3.0, 3.0])
    assert same is not None and higher is not None
    assert stats.welch_t_test(one, same) is None
    equal = stats.welch_t_test(same, same)
    assert equal is not None and equal.p_value == 1.0
    certain = stats.welch_t_test(same, higher)
    assert certain is not None and certain.p_value == 0.0 and certain.statistic == math.inf
    assert stats.estimate_mean([]) is None


def test_mean_confidence_interval_uses_t() -> None:
    e = stats.estimate_mean([1.0, 2.0, 3.0, 4.0, 5.0])
    assert e is not None and e.ci is not None
    # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776: 3 +- 1.963
    assert e.ci == pytest.approx((3 - 1.9632, 3 + 1.9632), abs=1e-4)


def test_wilson_interval() -> None:
    zero = stats.estimate_rate(0, 10)
    assert zero is not None
    assert zero.ci[0] == 0.0
    assert zero.ci[1] == pytest.approx(0.2775, abs=1e-4)  # z^2 / (n + z^2)
    # Wilson (1927) / Newcombe (1998), example: 81 of 263 -> [0.2553, 0.3662].
    e = stats.estimate_rate(81, 263)
    assert e is not None
    assert e.ci == pytest.approx((0.2553, 0.3662), abs=1e-4)
    full = stats.estimate_rate(10, 10)
    assert full is not None and full.ci[1] == 1.0
    assert stats.estimate_rate(0, 0) is None


def test_two_proportion_z_test() -> None:
    a, b = stats.estimate_rate(50, 100), stats.estimate_rate(65, 100)
    assert a is not None and b is not None
    result = stats.two_proportion_z_test(a, b)
    assert result is not None
    pooled = 115 / 200
    z = 0.15 / math.sqrt(pooled * (1 - pooled) * (2 / 100))
    assert result.statistic == pytest.approx(z)
    assert result.statistic == pytest.approx(2.1455, abs=1e-4)
    assert result.p_value == pytest.approx(0.0319, abs=1e-4)
    assert stats.normal_approximation_holds(a, b)
    all_good = stats.estimate_rate(5, 5)
    assert all_good is not None and stats.two_proportion_z_test(all_good, all_good) is None


def test_sample_sizes() -> None:
    # 0.5 vs 0.6 at 5% / 80% power: the closed form behind R's power.prop.test gives
    # (1.96 * sqrt(2 * .55 * .45) + 0.8416 * sqrt(.25 + .24))^2 / 0.01 = 387.3 per group.
    a, b = stats.estimate_rate(50, 100), stats.estimate_rate(60, 100)
    assert a is not None and b is not None
    assert stats.n_for_rates(a, b) == 388
    # Means: difference 0.5 with sd 1 in each group -> 2 * (1.96 + 0.8416)^2 / 0.25 = 63.
    ma = stats.MeanEstimate(10, 0.0, 1.0, None)
    mb = stats.MeanEstimate(10, 0.5, 1.0, None)
    assert stats.n_for_means(ma, mb) == 63
    assert stats.n_for_means(ma, ma) is None


def test_quantile_interpolates_like_numpy() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert stats.quantile(values, 0.5) == 3.0
    assert stats.quantile(values, 0.95) == pytest.approx(4.8)
    assert stats.quantile([7.0], 0.95) == 7.0


def test_p_values_are_uniform_under_the_null() -> None:
    # A test of the test: with no real difference, p < 0.05 about 5% of the time.
    rng = random.Random(11)
    hits = 0
    trials = 400
    for _ in range(trials):
        a = stats.estimate_mean([rng.gauss(0, 1) for _ in range(30)])
        b = stats.estimate_mean([rng.gauss(0, 2) for _ in range(20)])
        assert a is not None and b is not None
        result = stats.welch_t_test(a, b)
        assert result is not None
        hits += result.p_value < 0.05
    assert 8 <= hits <= 36  # binomial(400, 0.05): mean 20, sd 4.4
