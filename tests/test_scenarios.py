"""Scenarios: the paired flag after simulated missingness, missing-not-at-random rules, validation messages."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from magnet_core.cohort.data import DataError, load_for_seed
from magnet_core.cohort.generated import make_generated_cohort
from magnet_core.consortium.scenarios import (
    MissingByLabel,
    MissingByValue,
    Scenario,
    apply_missingness,
    build_consortium,
    builtin_scenarios,
    load_scenario,
)
from simulations.study import load_study


def complete_cohort(n: int = 600, num_classes: int = 3, seed: int = 0):
    return make_generated_cohort(n=n, num_classes=num_classes, missing={}, seed=seed)


def scenario(**kw) -> Scenario:
    return Scenario.model_validate({"name": "t", "num_sites": 2, **kw})


def test_paired_is_recomputed_after_missingness():
    cohort = complete_cohort()
    assert cohort.paired.all()
    sites = build_consortium(cohort, scenario(missing={"mRNA": 0.4}, sites={"1": {"miRNA": "absent"}}), seed=1,
                             log=lambda _: None)
    for site in sites:
        assert np.array_equal(site.paired, site.mask.all(axis=1))
    assert 0 < sites[0].paired.sum() < sites[0].n  # some complete, some not
    assert not sites[1].paired.any()  # nobody at site 1 has miRNA
    # the evaluation groups follow: test patients split into paired and unpaired both exist at site 0
    test0 = sites[0].split == "test"
    assert sites[0].paired[test0].any() and (~sites[0].paired[test0]).any()


def test_paired_flag_from_files_is_kept_for_untouched_patients():
    cohort = complete_cohort(n=60)
    flag = np.ones(cohort.n, dtype=bool)
    flag[:10] = False  # e.g. MAGNET's OV "paired" also requires the unreleased DNA assay
    cohort = dataclasses.replace(cohort, paired=flag)
    site = apply_missingness(cohort, scenario(num_sites=1, missing={"mRNA": 0.5}), 0, np.random.default_rng(0),
                             log=lambda _: None)
    assert np.array_equal(site.paired, flag & site.mask.all(axis=1))


def test_missing_by_label_hits_each_class_rate_exactly():
    cohort = complete_cohort(n=900)
    rule = {"by": "label", "rates": {"0": 0.9, "2": 0.5}, "default": 0.1}
    site = apply_missingness(cohort, scenario(num_sites=1, missing={"mRNA": rule}), 0, np.random.default_rng(3),
                             log=lambda _: None)
    lost = ~site.mask[:, site.modalities.index("mRNA")]
    for c, rate in ((0, 0.9), (1, 0.1), (2, 0.5)):
        in_c = cohort.labels == c
        assert lost[in_c].sum() == round(rate * in_c.sum())


def test_missing_by_value_prefers_high_values_at_the_exact_rate():
    cohort = complete_cohort(n=900)
    j = cohort.modalities.index("miRNA")
    score = cohort.X["miRNA"].mean(axis=1)
    for slope, sign in ((8.0, 1), (-8.0, -1)):
        rule = {"by": "value", "rate": 0.3, "slope": slope}
        site = apply_missingness(cohort, scenario(num_sites=1, missing={"miRNA": rule}), 0,
                                 np.random.default_rng(5), log=lambda _: None)
        lost = ~site.mask[:, j]
        assert lost.sum() == round(0.3 * cohort.n)
        gap = score[lost].mean() - score[~lost].mean()
        assert sign * gap > 0.5 * score.std()  # clearly depends on the patient's own values
    mar = {"by": "value", "rate": 0.3, "of": "DNA"}  # missing at random given another modality's values
    site = apply_missingness(cohort, scenario(num_sites=1, missing={"miRNA": mar}), 0, np.random.default_rng(5),
                             log=lambda _: None)
    lost = ~site.mask[:, j]
    dna = cohort.X["DNA"].mean(axis=1)
    assert dna[lost].mean() > dna[~lost].mean()


def test_not_at_random_rules_round_trip_and_name_their_errors(tmp_path):
    good = scenario(missing={"mRNA": {"by": "label", "rates": {"3": 0.8}}},
                    sites={"1": {"DNA": {"by": "value", "rate": 0.2}}})
    assert isinstance(good.missing["mRNA"], MissingByLabel) and isinstance(good.sites[1]["DNA"], MissingByValue)
    assert Scenario.model_validate(good.model_dump(mode="json")) == good
    cases = {
        'mRNA = { by = "label", rates = { 3 = 1.5 } }': "rate for class 3 must be in [0, 1], got 1.5",
        'mRNA = { by = "value", rate = 0.3, slop = 2 }': "slop: Extra inputs are not permitted",
        'mRNA = { by = "lable", rates = { 3 = 0.5 } }': "does not match any of the expected tags: 'label', 'value'",
        'mRNA = "absnt"': 'expected a fraction in [0, 1), "absent", "keep", or a table',
        "mRNA = 1.2": "a missing fraction must be in [0, 1), got 1.2",
    }
    for line, message in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(f'name = "bad"\nnum_sites = 2\n[missing]\n{line}\n')
        with pytest.raises(DataError) as err:
            load_scenario(path)
        text = str(err.value)
        assert str(path) in text and "missing.mRNA" in text and message in text, text
        assert text.count("validation error") == 1 and "1 validation error" in text  # one message, not one per type
    cohort = complete_cohort(n=60)
    with pytest.raises(DataError, match="names class \\[7\\] but the data has classes 0..2"):
        build_consortium(cohort, scenario(missing={"mRNA": {"by": "label", "rates": {"7": 0.5}}}), 1,
                         log=lambda _: None)
    with pytest.raises(DataError, match="names feature 'nope'"):
        build_consortium(cohort, scenario(missing={"mRNA": {"by": "value", "rate": 0.5, "feature": "nope"}}), 1,
                         log=lambda _: None)
    for name in builtin_scenarios():  # the existing files stay valid
        load_scenario(name)


def test_mnar_study_cells_have_the_same_overall_missing_rate(data_root):
    study = load_study("mnar")
    cohort = load_for_seed(data_root / study.dataset, 10, log=lambda _: None)
    j = cohort.modalities.index("mRNA")
    for seed in (10, 20):
        rates = {}
        for cell in study.cells:
            sites = build_consortium(cohort, study.scenario_of(cell), seed, log=lambda _: None)
            assert sum(s.n for s in sites) == cohort.n  # nobody dropped: every patient keeps DNA and miRNA
            rates[cell.id] = sum(int((~s.mask[:, j]).sum()) for s in sites) / cohort.n
        assert set(rates) == {"mcar", "by-site", "mnar-label", "mnar-value"}
        assert max(rates.values()) - min(rates.values()) < 0.02, rates
        assert all(abs(r - 0.4) < 0.02 for r in rates.values()), rates
