import math
import statistics

import pytest

from pcam_pipeline.experiments.stats import spread, t_quantile


@pytest.mark.parametrize(
    ("df", "expected"),  # tables of Student's t, 0.975 quantile
    [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)],
)
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_spread_is_the_sample_mean_std_and_t_interval():
    values = [0.81, 0.84, 0.79]
    result = spread(values)
    assert result.mean == pytest.approx(statistics.mean(values))
    assert result.std == pytest.approx(statistics.stdev(values))
    half = 4.302652729749752 * statistics.stdev(values) / math.sqrt(3)
    assert result.ci95 == pytest.approx((result.mean - half, result.mean + half))


def test_one_value_has_no_spread():
    result = spread([0.5])
    assert (result.mean, result.std, result.ci95) == (0.5, None, None)
    assert result.text() == "0.5000"
