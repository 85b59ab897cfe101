"""Statistics over seeds, against scipy on fixed numbers."""

import math

import numpy as np
import pytest
from scipy import stats

from sharpscope.errors import SharpscopeError
from sharpscope.stats import kendall, kendall_tau_b, summary, welch

A = [0.91, 0.87, 0.95, 0.89, 0.93]
B = [0.97, 1.04, 0.99, 1.10]


def test_summary_is_the_mean_with_its_standard_error():
    s = summary(A)
    assert s.mean == pytest.approx(np.mean(A), rel=1e-15)
    assert s.std == pytest.approx(np.std(A, ddof=1), rel=1e-14)
    assert s.stderr == pytest.approx(stats.sem(A), rel=1e-14)
    assert s.n == 5
    one = summary([2.5])
    assert (one.mean, one.std, one.stderr, one.n) == (2.5, None, None, 1)
    assert str(one) == "2.5"


def test_welch_equals_scipy():
    r = welch(A, B)
    ref = stats.ttest_ind(B, A, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert r.difference == pytest.approx(np.mean(B) - np.mean(A), rel=1e-14)
    assert r.t == pytest.approx(ref.statistic, rel=1e-12)
    assert r.df == pytest.approx(ref.df, rel=1e-12)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-10)
    assert (r.low, r.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    r90 = welch(A, B, confidence=0.9)
    ci90 = ref.confidence_interval(0.9)
    assert (r90.low, r90.high) == pytest.approx((ci90.low, ci90.high), rel=1e-10)


def test_welch_refuses_what_has_no_test():
    with pytest.raises(SharpscopeError, match="at least 2"):
        welch([1.0], B)
    with pytest.raises(SharpscopeError, match="no spread"):
        welch([1.0, 1.0], [2.0, 2.0])
    with pytest.raises(SharpscopeError, match="finite"):
        welch([1.0, math.nan], B)


@pytest.mark.parametrize(
    "x, y",
    [
        ([1, 2, 3, 4, 5, 6], [2.0, 1.0, 4.0, 3.0, 6.0, 5.0]),
        ([1, 1, 2, 3, 3, 4, 5], [3, 1, 2, 2, 5, 4, 4]),  # ties in both: tau-b
        (
            list(np.random.default_rng(0).normal(size=40)),
            list(np.random.default_rng(1).normal(size=40)),
        ),
    ],
)
def test_kendall_tau_b_equals_scipy(x, y):
    ref = stats.kendalltau(x, y)  # tau-b by default
    assert kendall_tau_b(x, y) == pytest.approx(ref.statistic, rel=1e-12, abs=1e-15)
    r = kendall(x, y, resamples=200)
    assert r.tau == pytest.approx(ref.statistic, rel=1e-12, abs=1e-15)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-12)
    assert r.low <= r.tau <= r.high


def test_kendall_interval_is_seeded_and_narrows_with_more_models():
    rng = np.random.default_rng(3)
    x = rng.normal(size=60)
    y = x + rng.normal(size=60)
    wide = kendall(x[:10], y[:10], resamples=500)
    narrow = kendall(x, y, resamples=500)
    assert narrow.high - narrow.low < wide.high - wide.low
    assert kendall(x, y, resamples=500) == narrow  # the same seed, the same interval
    with pytest.raises(SharpscopeError, match="at least 3"):
        kendall([1, 2], [2, 1])


def test_correlations_of_measure_documents_with_the_generalization_gap(tmp_path):
    """Kendall's tau of each measure against the accuracy gap, from documents as measure
    writes them; equal to scipy's on the same numbers."""
    from sharpscope.groups import correlations, format_correlations

    eig = [1.0, 3.0, 2.0, 5.0, 4.0]
    gap_values = [0.01, 0.03, 0.04, 0.05, 0.02]
    docs = [
        {
            "loss": {"train": 0.1, "test": 0.2},
            "accuracy": {"train": 0.99, "test": 0.99 - g},
            "sharpness": [{"rho": 0.05, "value": e / 10}],
            "hessian": {"eigenvalues": [e], "trace": {"value": 3 * e}},
        }
        for e, g in zip(eig, gap_values, strict=True)
    ]
    result = correlations(docs)
    assert result["generalization"] == "accuracy gap (train - test)"
    assert result["gaps"] == pytest.approx(gap_values)
    ref = stats.kendalltau(eig, gap_values)
    for name in ("top eigenvalue", "trace", "sharpness (rho 0.05)"):
        assert result["measures"][name]["tau"] == pytest.approx(ref.statistic, rel=1e-12)
        assert result["measures"][name]["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert "top eigenvalue" in format_correlations(result)
    from sharpscope.figures import plot_correlation

    fig = plot_correlation(result, tmp_path / "scatter.png")
    assert (tmp_path / "scatter.png").stat().st_size > 0
    panels = {ax.get_xlabel(): ax for ax in fig.axes}
    assert set(panels) == set(result["measures"])
    ax = panels["top eigenvalue"]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), np.column_stack([eig, gap_values]))
    assert ax.get_title().startswith(f"τ = {ref.statistic:+.2f}")
    assert fig.axes[0].get_ylabel() == "accuracy gap (train - test)"
    with pytest.raises(SharpscopeError, match="at least 3"):
        correlations(docs[:2])
