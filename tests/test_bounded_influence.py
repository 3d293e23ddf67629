"""Bounded influence by default (issue 22, items 2 and 3), on small synthetic steps through the real screen
(magnet_core/federation/screening.py) and the real aggregation (magnet_core/federation/aggregate.py), applied as the
strategy applies them (clip, then weight by enrolled share): an in-band model replacer moves the aggregate by at
most its share x the bound, colluders of half the consortium stop nobody, honest steps that point in different
directions (label skew) are never rejected, the robust aggregators equal numpy's, and under DP no site's decision
depends on another site (neighbouring consortia)."""

from __future__ import annotations

import numpy as np
import pytest

from magnet_core.federation.aggregate import SiteUpdate, aggregate_updates
from magnet_core.federation.screening import ScreenMemory, SiteDecision, screen_updates, shrink

DIM = 400
GLOBAL = {"w": np.full(DIM, 40.0)}  # norm 800: steps of norm 0.08-400 lie in the band
G = GLOBAL["w"]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _skewed(rng: np.random.Generator, n: int, cos: float, norm: float = 1.0, jitter: float = 0.3
            ) -> list[np.ndarray]:
    """n steps of norms within ``norm`` x [1 - jitter, 1 + jitter] whose pairwise cosines are about ``cos`` (a
    shared direction of weight sqrt(cos) plus independent site directions): label skew when ``cos`` is near 0."""
    common = _unit(rng.normal(size=DIM))
    out = []
    for _ in range(n):
        own = rng.normal(size=DIM)
        own = _unit(own - (own @ common) * common)
        step = np.sqrt(max(cos, 0.0)) * common + np.sqrt(1 - max(cos, 0.0)) * own
        out.append(norm * rng.uniform(1 - jitter, 1 + jitter) * _unit(step))
    return out


def _aggregate(steps: dict[int, np.ndarray], weights: dict[int, int], decisions, robust: str = "mean",
               trim: float = 0.2) -> np.ndarray:
    """The new global step as the strategy computes it: each accepted step clipped (``shrink``), weighted by its
    enrolled count x the screen's trust, aggregated by ``aggregate_updates``."""
    updates = []
    for node, step in steps.items():
        d = decisions[node]
        if d.accepted:
            params = shrink(GLOBAL, {"w": G + step}, d.scale)
            updates.append(SiteUpdate(str(node), params, weights[node], {}, d.trust))
    new = aggregate_updates(GLOBAL, updates, modality_aware=False, robust=robust, trim=trim)
    return new["w"].astype(np.float64) - G


def _replacer(honest_own: np.ndarray, others: list[np.ndarray], toward: np.ndarray) -> np.ndarray:
    """The in-band model replacement of issue 22: 9.5x the site's honest norm, cosine 0.05 with its own honest step,
    the rest along ``toward`` (made orthogonal to its own step)."""
    own = _unit(honest_own)
    toward = toward - (toward @ own) * own
    return 9.5 * np.linalg.norm(honest_own) * (0.05 * own + np.sqrt(1 - 0.05**2) * _unit(toward))


# ------------------------------------------------------------------------------------------- item 2: influence


@pytest.mark.parametrize("honest_cos", [0.5, 0.05])
def test_an_in_band_model_replacer_moves_the_aggregate_by_at_most_its_share_of_the_bound(honest_cos):
    """One site of three replaces its step (the issue's attack: in band, 9.5x its honest norm, cosine 0.05 with its
    own honest step), toward a target that shares some direction with one honest site, with iid-like (cosine 0.5)
    and label-skew-like (cosine 0.05) honest steps. Both honest sites keep their full enrolled weight, and the
    aggregate lies within share x B of the aggregate where the attacker sent a zero step (share = its enrolled
    fraction, B = the round's bound), within share x (B + |honest step|) of the honest sites' own aggregate."""
    rng = np.random.default_rng(11)
    weights = {1: 40, 2: 55, 3: 35}
    share = weights[3] / sum(weights.values())
    for trial in range(25):
        h1, h2, h3 = _skewed(rng, 3, honest_cos)
        target = 0.6 * _unit(h1) + 0.8 * _unit(rng.normal(size=DIM))  # where the attacker wants the model
        attack = _replacer(h3, [h1, h2], target)
        memory = ScreenMemory(norms=[[float(np.linalg.norm(v)) for v in _skewed(rng, 3, honest_cos)]])
        steps = {1: h1, 2: h2, 3: attack}
        decisions = screen_updates(GLOBAL, steps, memory)
        assert decisions[1].accepted and decisions[2].accepted, (trial, decisions)
        assert decisions[1].trust == decisions[2].trust == 1.0
        bound = decisions[1].bound
        honest_norms = [*(np.linalg.norm(v) for v in (h1, h2, h3)), *memory.past_norms()]
        assert bound <= max(honest_norms) + 1e-9  # B comes from the honest spread
        if decisions[3].accepted:
            assert decisions[3].norm * decisions[3].scale <= bound * (1 + 1e-9)
        attacked = _aggregate(steps, weights, decisions)
        zero = _aggregate({**steps, 3: np.zeros(DIM)}, weights, {**decisions, 3: SiteDecision(0.0)})
        honest_only = _aggregate({1: h1, 2: h2}, weights, decisions)
        tol = 1e-4 * bound  # float32 parameters
        assert np.linalg.norm(attacked - zero) <= share * bound + tol, trial
        assert np.linalg.norm(attacked - honest_only) <= share * (bound + np.linalg.norm(honest_only)) + tol, trial


def _colluders(h: list[np.ndarray], how: str) -> list[np.ndarray]:
    flipped = [-v for v in h]
    if how == "flipped":
        return flipped
    if how == "flipped, long":  # in band, as long as the band allows
        return [0.45 * np.linalg.norm(G) * _unit(v) for v in flipped]
    if how == "flipped, tiny":  # in band, as short as the band allows
        return [2e-4 * np.linalg.norm(G) * _unit(v) for v in flipped]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flipped", "flipped, long", "flipped, tiny"])
@pytest.mark.parametrize("honest_cos", [0.5, 0.05])
def test_two_sign_flipping_colluders_of_four_never_stop_the_other_two(how, honest_cos):
    """Colluders 3 and 4 send the sign-flipped honest direction (as long as their honest step, or at the band's
    top or bottom); over rounds with the screen's memory, sites 1 and 2 are aggregated in every round with their
    full weight, and every accepted step is clipped to a bound no larger than the honest spread allows."""
    rng = np.random.default_rng(12)
    weights = {1: 30, 2: 30, 3: 30, 4: 30}
    memory = ScreenMemory()
    for rnd in range(6):
        h = _skewed(rng, 4, honest_cos)
        c3, c4 = _colluders(h[2:], how)
        steps = {1: h[0], 2: h[1], 3: c3, 4: c4}
        decisions = screen_updates(GLOBAL, steps, memory)
        assert decisions[1].accepted and decisions[2].accepted, (rnd, decisions)
        assert decisions[1].trust == decisions[2].trust == 1.0
        accepted = [n for n, d in decisions.items() if d.accepted]
        for n in accepted:
            assert decisions[n].norm * decisions[n].scale <= decisions[n].bound * (1 + 1e-9)
        new = _aggregate(steps, weights, decisions)
        assert np.linalg.norm(new) <= decisions[1].bound * (1 + 1e-4)
        memory.remember([decisions[n].norm * decisions[n].scale for n in accepted], new, 5)


@pytest.mark.parametrize("num_sites", [3, 4, 5])
def test_honest_steps_pointing_in_different_directions_are_never_rejected_nor_down_weighted(num_sites):
    """Label-skew-like honest rounds: similar norms (within 1.6x), pairwise cosines from about -0.3 to 0.3, with
    and without past rounds; nobody is rejected and every weight stays the enrolled one."""
    rng = np.random.default_rng(13)
    memory = ScreenMemory()
    for trial in range(60):
        cos = rng.choice([0.0, 0.02, 0.1])
        steps = dict(enumerate(_skewed(rng, num_sites, cos), start=1))
        if trial % 3 == 0:  # one site's step nearly opposite to another's: honest under strong label skew
            steps[num_sites] = -0.7 * steps[1] + 0.3 * np.linalg.norm(steps[1]) * _unit(rng.normal(size=DIM))
        decisions = screen_updates(GLOBAL, steps, memory)
        rejected = {n: d.reason for n, d in decisions.items() if not d.accepted}
        assert not rejected, (trial, rejected)
        assert all(d.trust == 1.0 for d in decisions.values())
        memory.remember([d.norm * d.scale for d in decisions.values()], sum(steps.values()), 5)


def test_crude_steps_are_still_rejected():
    """Out of band (1e4 x, or the global model sent back) and opposed-and-large (a sign flip ten times longer than
    the others) are rejected; a long step along the others' direction is only clipped."""
    rng = np.random.default_rng(14)
    h = _skewed(rng, 5, 0.3)
    decisions = screen_updates(GLOBAL, {1: h[0], 2: h[1], 3: h[2], 4: 1e4 * h[3], 5: 1e-6 * h[4]}, ScreenMemory())
    assert [n for n, d in decisions.items() if not d.accepted] == [4, 5]
    decisions = screen_updates(GLOBAL, {1: h[0], 2: h[1], 3: h[2], 4: -20 * h[3], 5: 20 * h[4]}, ScreenMemory())
    assert [n for n, d in decisions.items() if not d.accepted] == [4]
    assert "opposed and large" in decisions[4].reason
    assert decisions[5].norm * decisions[5].scale == pytest.approx(decisions[5].bound)


# ------------------------------------------------------------------------------------------- robust aggregators


def test_trimmed_mean_and_median_equal_numpy_and_refuse_too_few_sites():
    from magnet_core.federation.aggregate import robust_refusal

    rng = np.random.default_rng(15)
    n = 7
    params = [{"w": G + rng.normal(size=DIM).astype(np.float64)} for _ in range(n)]
    updates = [SiteUpdate(str(i), p, int(rng.integers(10, 90)), {}) for i, p in enumerate(params)]
    stack = np.stack([p["w"] for p in params])
    median = aggregate_updates(GLOBAL, updates, modality_aware=False, robust="median")["w"]
    np.testing.assert_allclose(median, np.median(stack, axis=0), rtol=1e-12)
    for trim, b in ((0.2, 1), (0.3, 2), (0.45, 3)):  # b = floor(trim x 7) dropped each side
        got = aggregate_updates(GLOBAL, updates, modality_aware=False, robust="trimmed-mean", trim=trim)["w"]
        np.testing.assert_allclose(got, np.sort(stack, axis=0)[b:n - b].mean(axis=0), rtol=1e-12)
    weights = np.array([u.num_train for u in updates], float)
    mean = aggregate_updates(GLOBAL, updates, modality_aware=False)["w"]
    np.testing.assert_allclose(mean, weights @ stack / weights.sum(), rtol=1e-12)
    # 3 sites at trim 0.2 trim nobody: refused (a plain mean in disguise), with the sites it would need
    assert robust_refusal("trimmed-mean", 0.2, 5) is None and robust_refusal("median", 0.2, 2) is None
    reason = robust_refusal("trimmed-mean", 0.2, 3)
    assert reason and "at least 5 sites" in reason and "3 site(s)" in reason
    with pytest.raises(ValueError, match="2b \\+ 1 sites"):
        aggregate_updates(GLOBAL, updates[:3], modality_aware=False, robust="trimmed-mean", trim=0.2)
    got = aggregate_updates(GLOBAL, updates[:3], modality_aware=False, robust="trimmed-mean", trim=0.34)["w"]
    np.testing.assert_allclose(got, np.median(stack[:3], axis=0), rtol=1e-12)


def test_a_minority_of_colluders_moves_a_median_or_trimmed_mean_within_the_honest_range():
    """Two colluders of five at the band's top, sign-flipped: after clipping, the median and the trimmed mean
    (b = 2) of every coordinate lie within the honest sites' clipped values."""
    rng = np.random.default_rng(16)
    h = _skewed(rng, 5, 0.3)
    c4, c5 = _colluders(h[3:], "flipped, long")
    steps = {1: h[0], 2: h[1], 3: h[2], 4: c4, 5: c5}
    decisions = screen_updates(GLOBAL, steps, ScreenMemory())
    assert all(decisions[n].accepted for n in (1, 2, 3))
    clipped = np.stack([decisions[n].scale * steps[n] for n in (1, 2, 3)])
    for robust in ("median", "trimmed-mean"):
        new = _aggregate(steps, dict.fromkeys(steps, 30), decisions, robust=robust, trim=0.4)
        tol = 1e-4
        assert np.all(new >= clipped.min(axis=0) - tol) and np.all(new <= clipped.max(axis=0) + tol), robust


# ------------------------------------------------------------------------------------------- item 3: DP


def _decision_key(d):
    return d.accepted, d.bound, d.scale, d.trust


@pytest.mark.parametrize("num_sites", [1, 2, 3, 5])
def test_dp_neighbouring_consortia_adding_or_removing_a_site_changes_no_other_decision(num_sites):
    """Under DP (clip C = 3) every site's decision is the same in the consortium with and without one more site,
    whatever that site sends (honest, flipped, out of band, tiny, orthogonal) and whatever the past rounds held;
    and the bound is C. The same pairs without DP do change decisions (the test can tell)."""
    rng = np.random.default_rng(17)
    C = 3.0
    changed_without_dp = 0
    for trial in range(30):
        steps = dict(enumerate(_skewed(rng, num_sites, float(rng.choice([0.0, 0.5])),
                                       norm=float(rng.uniform(0.5, 6))), start=1))
        extra = float(rng.choice([1.0, -1.0, 1e4, 1e-6, 0.0])) * steps[1] if trial % 2 else \
            float(rng.uniform(0.1, 300)) * _unit(rng.normal(size=DIM))
        memory = ScreenMemory(norms=[list(rng.uniform(0.5, 6, num_sites))],
                              direction=rng.normal(size=DIM) if trial % 3 else None)
        other_memory = ScreenMemory(norms=[[*memory.norms[0], 99.0]], direction=-extra if trial % 3 else None)
        without = screen_updates(GLOBAL, steps, memory, dp_clip=C)
        with_one = screen_updates(GLOBAL, {**steps, 99: extra}, other_memory, dp_clip=C)
        for node in steps:
            assert _decision_key(without[node]) == _decision_key(with_one[node]), (trial, node)
            if without[node].accepted:
                assert without[node].bound == C and without[node].trust == 1.0
        plain = screen_updates(GLOBAL, steps, memory)
        plain_one = screen_updates(GLOBAL, {**steps, 99: extra}, other_memory)
        changed_without_dp += any(_decision_key(plain[n]) != _decision_key(plain_one[n]) for n in steps)
    assert changed_without_dp > 0


def test_the_strategy_refuses_a_round_it_cannot_trim(tmp_path):
    """Through the real strategy and round loop (generated cohort, 3 sites, 1 epoch): a trimmed mean at trim 0.2
    trims nobody of 3, so the round is refused (reason recorded, model unchanged), never a plain mean in disguise.
    (The trimmed mean itself is checked against numpy above.)"""
    from test_adversarial import _run

    grid, params, history = _run(tmp_path, 3, {}, robust="trimmed-mean", trim=0.2)
    agg = history[0]["screening"]["aggregator"]
    assert agg["rule"] == "trimmed-mean" and agg["sites"] == 3 and "2b + 1 sites" in agg["refused"]
    for k, v in grid.sent[1].items():
        np.testing.assert_array_equal(params[k], v)


# ------------------------------------------------------------------------------------------- the default rule


def test_auto_is_the_median_of_blocks_held_by_three_or_more_sites_and_the_weighted_mean_below():
    """robust='auto' (opt-in): modality-aware, an encoder held by two sites is their weighted mean, a block
    every one of three sites holds is the coordinate-wise median; plain FedAvg layout with two sites: the mean."""
    from magnet_core.federation.aggregate import applied_rule

    glob = {"encoders.mRNA.net.0.weight": np.zeros(4), "attention.att": np.zeros(4)}

    def params(enc: float, shared: float) -> dict[str, np.ndarray]:
        return {"encoders.mRNA.net.0.weight": np.full(4, enc), "attention.att": np.full(4, shared)}

    ups = [SiteUpdate("a", params(1.0, 1.0), 30, {"mRNA": 30}), SiteUpdate("b", params(4.0, 2.0), 10, {"mRNA": 10}),
           SiteUpdate("c", params(99.0, 50.0), 20, {"mRNA": 0})]
    new = aggregate_updates(glob, ups, modality_aware=True, robust="auto")
    np.testing.assert_allclose(new["encoders.mRNA.net.0.weight"], (30 * 1 + 10 * 4) / 40)  # two holders: mean
    np.testing.assert_allclose(new["attention.att"], 2.0)  # three sites: median (the mean would be 18.5)
    two = aggregate_updates(glob, ups[:2], modality_aware=False, robust="auto")
    np.testing.assert_allclose(two["attention.att"], (30 * 1 + 10 * 2) / 40)
    assert [applied_rule("auto", n) for n in (1, 2, 3, 7)] == ["mean", "mean", "median", "median"]
    assert applied_rule("mean", 9) == "mean" and applied_rule("trimmed-mean", 3) == "trimmed-mean"


@pytest.mark.parametrize("honest_cos", [0.5, 0.05])
def test_under_auto_one_in_band_replacer_of_three_moves_each_coordinate_only_within_the_honest_values(honest_cos):
    """Yin et al. 2018 (coordinate-wise median): with three sites and one dishonest, the median of every coordinate
    lies between the two honest sites' (clipped) values, whatever the third sends, with iid-like and label-skew-like
    honest steps; under the weighted mean the same replacer moves coordinates outside that range (its clipped step
    still counts with its share of the weight)."""
    rng = np.random.default_rng(21)
    weights = {1: 40, 2: 55, 3: 35}
    outside_with_mean = 0
    for trial in range(25):
        h1, h2, h3 = _skewed(rng, 3, honest_cos)
        attack = _replacer(h3, [h1, h2], 0.6 * _unit(h1) + 0.8 * _unit(rng.normal(size=DIM)))
        steps = {1: h1, 2: h2, 3: attack}
        decisions = screen_updates(GLOBAL, steps, ScreenMemory())
        honest = np.stack([decisions[n].scale * steps[n] for n in (1, 2)])
        new = _aggregate(steps, weights, decisions, robust="auto")
        tol = 1e-4
        assert np.all(new >= honest.min(axis=0) - tol) and np.all(new <= honest.max(axis=0) + tol), trial
        mean = _aggregate(steps, weights, decisions, robust="mean")
        outside_with_mean += bool(np.any((mean < honest.min(axis=0) - tol) | (mean > honest.max(axis=0) + tol)))
    assert outside_with_mean > 0


def test_near_median_keeps_the_n_minus_f_steps_nearest_the_coordinate_median():
    """near-median (an option, not the default): f = floor((n - 1) / 2) steps farthest (L2) from the
    coordinate-wise median are left out, the rest weighted-averaged (modality-aware)."""
    from magnet_core.federation.aggregate import dropped_per_round, near_median

    glob = {"encoders.mRNA.net.0.weight": np.zeros(4), "attention.att": np.zeros(4)}

    def params(enc: float, shared: float) -> dict[str, np.ndarray]:
        return {"encoders.mRNA.net.0.weight": np.full(4, enc), "attention.att": np.full(4, shared)}

    ups = [SiteUpdate("a", params(1.0, 1.0), 30, {"mRNA": 30}), SiteUpdate("b", params(1.5, 2.0), 10, {"mRNA": 10}),
           SiteUpdate("c", params(99.0, -50.0), 20, {"mRNA": 20})]
    assert [u.site for u in near_median(glob, ups)] == ["a", "b"]
    new = aggregate_updates(glob, ups, modality_aware=True, robust="near-median")
    np.testing.assert_allclose(new["encoders.mRNA.net.0.weight"], (30 * 1 + 10 * 1.5) / 40)
    np.testing.assert_allclose(new["attention.att"], (30 * 1 + 10 * 2) / 40)
    assert [dropped_per_round(n) for n in (1, 2, 3, 4, 5, 7)] == [0, 0, 1, 1, 2, 3]


def test_near_median_leaves_one_in_band_replacer_of_three_out_when_honest_steps_agree():
    """The issue's replacer (toward a target unrelated to the honest steps, as a constant-class model is), after
    clipping, is the step farthest from the coordinate-wise median: near-median leaves it out and the new model is
    exactly the weighted mean of the two honest (clipped) steps, in every trial (honest cosines 0.5). Why it is not
    the default: when honest steps are themselves nearly orthogonal (cosine 0.05, strong label skew) the replacer
    looks like one of them and an honest step is the one left out in 4 of these 25 trials; on BRCA label-skew-3
    (tuning seed 1) near-median left the most distinct honest site out and cost 0.21 held-out MCC."""
    rng = np.random.default_rng(21)
    weights = {1: 40, 2: 55, 3: 35}
    for trial in range(25):
        h1, h2, h3 = _skewed(rng, 3, 0.5)
        attack = _replacer(h3, [h1, h2], rng.normal(size=DIM))
        steps = {1: h1, 2: h2, 3: attack}
        decisions = screen_updates(GLOBAL, steps, ScreenMemory())
        assert all(d.accepted for d in decisions.values())
        honest_pair = _aggregate({1: h1, 2: h2}, weights, decisions, robust="mean")
        new = _aggregate(steps, weights, decisions, robust="near-median")
        np.testing.assert_allclose(new, honest_pair, atol=1e-4, err_msg=str(trial))
        mean = _aggregate(steps, weights, decisions, robust="mean")
        assert np.linalg.norm(mean - honest_pair) > 0.1 * decisions[3].bound


def test_auto_is_allowed_under_dp_and_secure_aggregation_and_the_robust_rules_are_not():
    from server.config import FederatedConfig, RunConfigError

    assert FederatedConfig().robust == "mean"  # the default until auto's honest cost is measured (issue 22)
    assert FederatedConfig(dp_clip_norm=1.0, dp_noise_multiplier=1.0, robust="auto").robust == "auto"
    assert FederatedConfig(secagg=True, robust="auto").robust == "auto"
    for bad in ({"dp-clip-norm": 1.0, "robust": "median"}, {"secagg": True, "robust": "trimmed-mean"}):
        with pytest.raises(RunConfigError, match="robust"):
            FederatedConfig.from_run_config(bad)
