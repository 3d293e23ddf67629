"""Study statistics: sample std, t intervals checked by hand, paired comparisons and the headline wording."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from simulations import statistics as st

T_975_DF4 = 2.7764451051977987  # Student t quantile 0.975 with 4 degrees of freedom (tables: 2.776)
T_975_DF2 = 4.302652729911275  # ... with 2 degrees of freedom (tables: 4.303)


def test_cell_stats_by_hand_with_sample_std():
    values = [0.6, 0.7, 0.8, 0.75, 0.65]  # mean 0.7; squared deviations sum to 0.025
    s = st.cell_stats(values)
    assert s.n == 5 and s.mean == pytest.approx(0.7)
    assert s.std == pytest.approx(math.sqrt(0.025 / 4))  # ddof = 1, not the population std
    assert s.std != pytest.approx(float(np.std(values)))
    half = T_975_DF4 * math.sqrt(0.025 / 4) / math.sqrt(5)
    assert (s.ci_low, s.ci_high) == (pytest.approx(0.7 - half), pytest.approx(0.7 + half))
    assert st.fmt_stats(s) == f"0.700 ± 0.079 (95% CI {0.7 - half:.3f} to {0.7 + half:.3f}, n = 5)"


def test_cell_stats_ignores_missing_values_and_handles_small_n():
    s = st.cell_stats([0.5, None, float("nan"), 0.7])
    assert s.n == 2 and s.mean == pytest.approx(0.6)
    one = st.cell_stats([0.4])
    assert one.n == 1 and one.mean == 0.4 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert st.fmt_stats(one) == "0.400 (n = 1)"
    assert st.cell_stats([]).n == 0 and st.fmt_stats(st.cell_stats([])) == "n/a"


def test_paired_comparison_by_hand_and_against_scipy():
    a = {10: 0.80, 20: 0.75, 30: 0.90, 40: 0.60}
    b = {10: 0.70, 20: 0.70, 30: 0.78, 50: 0.99}  # seed 40 / 50 have no partner: left out
    c = st.paired_comparison(a, b)
    d = np.array([0.10, 0.05, 0.12])
    assert c.n == 3 and c.units == (10, 20, 30)
    assert c.mean_diff == pytest.approx(d.mean()) and c.std_diff == pytest.approx(d.std(ddof=1))
    half = T_975_DF2 * d.std(ddof=1) / math.sqrt(3)
    assert (c.ci_low, c.ci_high) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    assert c.p_value == pytest.approx(stats.ttest_rel([0.80, 0.75, 0.90], [0.70, 0.70, 0.78]).pvalue)
    assert c.ci_low > 0 and c.verdict == "helps" and c.p_value < 0.05


def test_interval_and_test_agree_and_sign_logic():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = dict(enumerate(rng.normal(0.7, 0.05, size=5)))
        b = {k: v + rng.normal(0.02, 0.04) for k, v in a.items()}
        c = st.paired_comparison(a, b)
        excludes_zero = c.ci_low > 0 or c.ci_high < 0
        assert excludes_zero == (c.p_value < 0.05)  # the t interval and the paired t-test tell the same story
        assert c.verdict == ("helps" if c.ci_low > 0 else "hurts" if c.ci_high < 0 else "no difference detected")
    assert st.verdict(0.01, 0.2) == "helps" and st.verdict(-0.2, -0.01) == "hurts"
    assert st.verdict(-0.01, 0.2) == "no difference detected"
    assert st.verdict(math.nan, math.nan) == "no difference detected"


def test_headline_wording():
    helps = st.paired_comparison({1: 0.8, 2: 0.82, 3: 0.79}, {1: 0.7, 2: 0.71, 3: 0.70})
    text = st.comparison_sentence("modality-aware FedAvg", "local-only", helps)
    assert text.startswith("modality-aware FedAvg vs local-only: **helps** (+0.100 MCC, 95% CI +0.")
    assert "paired t-test p = 0.00" in text and text.endswith("n = 3 seeds)")
    hurts = st.paired_comparison({1: 0.6, 2: 0.62, 3: 0.59}, {1: 0.7, 2: 0.71, 3: 0.70})
    assert ": **hurts** (-0.100 MCC" in st.comparison_sentence("A", "B", hurts)
    assert ": **lower** (-0.100 MCC" in st.comparison_sentence("A", "B", hurts, words=("higher", "lower"))
    unclear = st.paired_comparison({1: 0.7, 2: 0.6, 3: 0.8}, {1: 0.65, 2: 0.66, 3: 0.7})
    text = st.comparison_sentence("A", "B", unclear)
    assert text.startswith("A vs B: no difference detected (+0.030 MCC, 95% CI -0.")
    assert "helps" not in text and "hurts" not in text
    same = st.paired_comparison({1: 0.7, 2: 0.6}, {1: 0.7, 2: 0.6})
    assert st.comparison_sentence("A", "B", same) == "A vs B: no difference detected (identical MCC on all 2 seeds)"
    single = st.paired_comparison({1: 0.9}, {1: 0.1})
    assert st.comparison_sentence("A", "B", single) == ("A vs B: no difference detected (+0.800 MCC, n = 1 seed: "
                                                        "no interval)")
    # +0.1 on every seed: no spread, so no t interval, no p-value and no verdict (issue 23: it used to read "helps"
    # with p = nan)
    constant = st.paired_comparison({1: 0.7, 2: 0.6, 3: 0.9}, {1: 0.6, 2: 0.5, 3: 0.8})
    assert constant.std_diff == 0.0 and math.isnan(constant.p_value)
    assert math.isnan(constant.ci_low) and math.isnan(constant.ci_high)
    assert constant.verdict == "no difference detected"
    assert st.comparison_sentence("A", "B", constant) == ("A vs B: no difference detected (+0.100 MCC on every one "
                                                          "of n = 3 seeds: no spread, so no interval and no test)")
    adjusted = st.comparison_sentence("A", "B", helps, adjusted=st.Adjusted(holm=0.5, bh=0.25, m=7))
    assert "(adjusted over 7 comparisons: Holm p = 0.500, Benjamini-Hochberg p = 0.250), n = 3 seeds)" in adjusted


def test_holm_and_benjamini_hochberg_by_hand():
    p = [0.01, 0.04, 0.03, float("nan"), 0.005]  # ascending: 0.005, 0.01, 0.03, 0.04 (m = 4; nan not counted)
    holm = st.holm(p)
    # Holm: 4 * 0.005 = 0.02, 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, 1 * 0.04 = 0.04 -> running max 0.06
    assert holm[[4, 0, 2, 1]] == pytest.approx([0.02, 0.03, 0.06, 0.06]) and math.isnan(holm[3])
    bh = st.benjamini_hochberg(p)
    # BH: 0.005 * 4/1 = 0.02, 0.01 * 4/2 = 0.02, 0.03 * 4/3 = 0.04, 0.04 * 4/4 = 0.04 -> running min from the top
    assert bh[[4, 0, 2, 1]] == pytest.approx([0.02, 0.02, 0.04, 0.04]) and math.isnan(bh[3])
    assert st.holm([0.9, 0.8]).tolist() == [1.0, 1.0]  # capped at 1
    assert np.isnan(st.holm([float("nan")])).all() and st.benjamini_hochberg([]).size == 0


def test_benjamini_hochberg_matches_scipy():
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 0.2, size=40)
    assert st.benjamini_hochberg(p) == pytest.approx(stats.false_discovery_control(p, method="bh"))
    holm = st.holm(p)
    assert (holm >= p).all() and (holm >= st.benjamini_hochberg(p) - 1e-15).all()  # Holm is never less strict


def test_frames():
    df = pd.DataFrame({"cell": ["c"] * 4, "method": ["m", "m", "n", "n"], "seed": [1, 2, 1, 2],
                       "mcc": [0.5, 0.7, 0.4, np.nan]})
    s = st.summarize_groups(df, ["cell", "method"], ["mcc"]).set_index("method")
    assert s.loc["m", "mcc_n"] == 2 and s.loc["m", "mcc_mean"] == pytest.approx(0.6)
    assert s.loc["m", "mcc_std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert s.loc["n", "mcc_n"] == 1 and math.isnan(s.loc["n", "mcc_std"])
    assert st.values_by_unit(df[df["method"] == "n"], "mcc") == {1: 0.4}
    with pytest.raises(ValueError, match="more than one row"):
        st.values_by_unit(df, "mcc")


def test_nadeau_bengio_corrected_interval_by_hand():
    # d = 0.10, 0.05, 0.12 over J = 3 resplits: mean 0.09, deviations 0.01, -0.04, 0.03, s^2 = 0.0026 / 2 = 0.0013.
    # 20 test and 80 training patients: corrected variance of the mean (1/3 + 20/80) x 0.0013 = 0.000758333...,
    # standard error 0.0275379, half-width t(0.975, 2) x 0.0275379 = 4.3027 x 0.0275379 = 0.118486.
    nb = st.corrected_resampled_t([0.10, 0.05, 0.12], n_train=80, n_test=20)
    assert nb.ratio == 0.25
    assert (nb.ci_low, nb.ci_high) == (pytest.approx(-0.028486, abs=1e-6), pytest.approx(0.208486, abs=1e-6))
    assert nb.p_value == pytest.approx(0.0822, abs=1e-4)  # t = 0.09 / 0.0275379 = 3.268 on 2 degrees of freedom
    plain = st.paired_comparison({1: 0.10, 2: 0.05, 3: 0.12}, {1: 0.0, 2: 0.0, 3: 0.0})
    assert plain.ci_low > 0 and nb.ci_low < 0  # the plain interval excludes 0, the corrected one does not
    assert plain.ci_high - plain.ci_low < nb.ci_high - nb.ci_low


def test_nadeau_bengio_equals_the_plain_interval_as_the_test_share_vanishes():
    rng = np.random.default_rng(3)
    a = dict(enumerate(rng.normal(0.7, 0.05, size=6)))
    b = {k: v - rng.normal(0.03, 0.04) for k, v in a.items()}
    plain = st.paired_comparison(a, b)
    d = [a[k] - b[k] for k in sorted(a)]
    zero = st.corrected_resampled_t(d, n_train=100, n_test=0)
    assert (zero.ci_low, zero.ci_high) == (pytest.approx(plain.ci_low), pytest.approx(plain.ci_high))
    assert zero.p_value == pytest.approx(plain.p_value)
    tiny = st.corrected_resampled_t(d, n_train=10**9, n_test=1)
    assert (tiny.ci_low, tiny.ci_high) == (pytest.approx(plain.ci_low), pytest.approx(plain.ci_high))
    widths = [st.corrected_resampled_t(d, 100, n).ci_high - st.corrected_resampled_t(d, 100, n).ci_low
              for n in (0, 10, 25, 50)]
    assert widths == sorted(widths) and widths[0] < widths[-1]  # wider as the test share grows


def test_paired_comparison_carries_the_corrected_interval_when_sizes_are_known():
    a = {10: 0.80, 20: 0.75, 30: 0.90}
    b = {10: 0.70, 20: 0.70, 30: 0.78}
    bare = st.paired_comparison(a, b)
    assert math.isnan(bare.nb_ci_low) and math.isnan(bare.test_train_ratio)
    assert "Nadeau-Bengio" not in st.fmt_difference(bare)
    c = st.paired_comparison(a, b, ratios={10: 0.2, 20: 0.3, 30: 0.25, 40: 9.0})  # seed 40 is not paired
    assert c.test_train_ratio == pytest.approx(0.25)
    nb = st.corrected_resampled_t([0.10, 0.05, 0.12], n_train=4, n_test=1)
    assert (c.nb_ci_low, c.nb_ci_high, c.nb_p_value) == (pytest.approx(nb.ci_low), pytest.approx(nb.ci_high),
                                                         pytest.approx(nb.p_value))
    assert "resampling-corrected (Nadeau-Bengio) 95% CI -0.028 to +0.208" in st.fmt_difference(c)
    missing = st.paired_comparison(a, b, ratios={10: 0.2, 20: 0.3})  # a paired seed without sizes: no correction
    assert math.isnan(missing.nb_ci_low)
    assert math.isnan(st.corrected_resampled_t([0.1], 80, 20).ci_low)
    assert math.isnan(st.corrected_resampled_t([0.1, 0.1], 80, 20).ci_low)  # no spread
