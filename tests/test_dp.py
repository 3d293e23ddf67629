"""Differential privacy: sensitivity under the aggregation used, noise sized by the sites aggregated, accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from magnet_core.federation.aggregate import SiteUpdate, aggregate_updates
from magnet_core.federation.dp import (
    DPConfig,
    PrivacyAccountant,
    add_central_noise,
    clip_update,
    dp_aggregate,
    dp_decode,
    dp_site_vector,
    effective_noise_multiplier,
    exact_epsilon,
    gdp_delta,
    noise_piece_std,
    rdp_epsilon,
    update_of,
)
from magnet_core.federation.secagg import SecAggSetup, UpdateLayout, run_local
from magnet_core.model.config import ModelConfig
from magnet_core.model.network import build_model


def test_rdp_epsilon_matches_a_hand_computation():
    # Gaussian mechanism, z = 1, one round, delta = 1e-5: RDP(a) = a / 2; eps = min_a a/2 + ln(1e5)/(a - 1),
    # minimised at a = 1 + sqrt(2 ln 1e5) = 5.7985, giving eps = 1/2 + sqrt(2 ln 1e5) = 0.5 + 4.79853 = 5.29853
    assert rdp_epsilon([1.0], 1e-5, "classical") == pytest.approx(0.5 + math.sqrt(2 * math.log(1e5)), rel=1e-12)
    assert rdp_epsilon([1.0], 1e-5, "classical") == pytest.approx(5.29853, abs=1e-5)
    # 20 rounds at z = 1.1: rho = 20 / (2 * 1.21) = 8.26446; eps = rho + 2 sqrt(rho ln 1e5) = 27.77324
    assert rdp_epsilon([1.1] * 20, 1e-5, "classical") == pytest.approx(27.77324, abs=1e-5)
    # the classical conversion is the minimum over orders, checked on a grid
    a = np.linspace(1.01, 50, 200_000)
    assert rdp_epsilon([1.1] * 20, 1e-5, "classical") == pytest.approx(
        np.min(a * 20 / (2 * 1.21) + math.log(1e5) / (a - 1)), rel=1e-6)


def test_exact_epsilon_matches_the_hockey_stick_divergence_and_dp_accounting():
    z, delta = 1.0, 1e-5
    eps = exact_epsilon([z], delta)
    # independent check: delta(eps) = int max(0, p(x) - e^eps q(x)) dx for p = N(1, z^2), q = N(0, z^2)
    def integrand(x):
        return max(0.0, stats.norm.pdf(x, 1.0, z) - math.exp(eps) * stats.norm.pdf(x, 0.0, z))

    num, _ = integrate.quad(integrand, eps * z * z + 0.5, 40, epsabs=1e-14, limit=200)
    assert num == pytest.approx(delta, rel=1e-6)
    # reference values from dp-accounting 0.6.0 (GaussianDpEvent composed T times, delta = 1e-5):
    #   PLDAccountant 4.37717810 (z=1, T=1), 24.92254616 (z=1.1, T=20), 3.84861029 (z=5, T=20)
    #   RdpAccountant 4.72850707 (z=1, T=1), 26.50055212 (z=1.1, T=20), 4.16162431 (z=5, T=20)
    for (zz, t), pld, rdp in [((1.0, 1), 4.37717810, 4.72850707), ((1.1, 20), 24.92254616, 26.50055212),
                              ((5.0, 20), 3.84861029, 4.16162431)]:
        assert exact_epsilon([zz] * t, delta) == pytest.approx(pld, rel=1e-7)
        ours = rdp_epsilon([zz] * t, delta)  # real orders: at most the grid accountant's value, and close to it
        assert ours <= rdp + 1e-9 and ours == pytest.approx(rdp, rel=1e-3)
        assert exact_epsilon([zz] * t, delta) < ours
    assert gdp_delta(1.0, eps) == pytest.approx(delta, rel=1e-9)


def test_accountant_composes_rounds_and_round_trips():
    acc = PrivacyAccountant(1e-5)
    first = acc.add_round(1.0)
    second = acc.add_round(2.0)
    assert first["epsilon"] == pytest.approx(4.37717810, rel=1e-7) and second["rounds"] == 2
    assert second["epsilon"] > first["epsilon"]
    # rounds at z = 1 and z = 2 compose as one Gaussian with 1/z^2 = 1 + 1/4
    assert second["epsilon"] == pytest.approx(exact_epsilon([1 / math.sqrt(1.25)], 1e-5), rel=1e-9)
    assert PrivacyAccountant.from_dict(acc.to_dict()).spent() == acc.spent()
    assert acc.add_round(0.0)["epsilon"] == math.inf  # a round without noise has no guarantee


def _setup(seed=0):
    cfg = ModelConfig(hidden=8, heads=2, dropout=0.0)
    glob = {k: v.detach().numpy().copy()
            for k, v in build_model({"mRNA": 10, "miRNA": 6}, 2, cfg, seed).state_dict().items()}
    return glob, UpdateLayout.from_params(glob)


def test_sensitivity_of_the_dp_sum_is_the_clip_norm_whatever_the_site_size():
    glob, layout = _setup()
    rng = np.random.default_rng(0)
    C = 0.5
    cfg = DPConfig(clip_norm=C, noise_multiplier=1.0)
    sites, norms = [], []
    for scale, counts in [(0.01, {"mRNA": 5, "miRNA": 5}), (3.0, {"mRNA": 0, "miRNA": 900}),
                          (0.2, {"mRNA": 40, "miRNA": 0})]:
        params = {k: g + rng.normal(0, scale, g.shape).astype(g.dtype) for k, g in glob.items()}
        vec, norm = dp_site_vector(layout, params, glob, counts, cfg)
        sites.append(vec)
        norms.append(norm)
    assert norms[0] < C < norms[1]  # the small update passes unchanged, the large one is clipped
    total = np.sum(sites, axis=0)
    for i, v in enumerate(sites):
        # removing any one site moves the summed parameter vector by at most C (the 900-patient site included)
        without = np.sum([w for j, w in enumerate(sites) if j != i], axis=0)
        assert np.linalg.norm((total - without)[:layout.param_size]) <= C + 1e-9
    assert np.linalg.norm(sites[1][:layout.param_size]) == pytest.approx(C)
    # the weight slots count sites holding each block, not patients
    assert layout.split(total)[1] == {"mRNA": 2.0, "miRNA": 2.0, None: 3.0}
    # count-weighted FedAvg has no such bound: a 900-patient site moves the shared layers by 900/920 of its update
    # (Flower's noise sigma * C / sites assumes 1/3)
    shared = [k for k in glob if not k.startswith("encoders.")]
    upd = [SiteUpdate("a", {k: g + 0.1 for k, g in glob.items()}, 900, {"miRNA": 900}),
           SiteUpdate("b", glob, 10, {"miRNA": 10}), SiteUpdate("c", glob, 10, {"miRNA": 10})]
    weighted = aggregate_updates(glob, upd, modality_aware=True)
    for k in shared:
        np.testing.assert_allclose(weighted[k] - glob[k], 0.1 * 900 / 920, rtol=1e-4)


def test_noise_free_dp_aggregate_is_the_uniform_modality_aware_mean():
    glob, layout = _setup(1)
    rng = np.random.default_rng(1)
    counts = [{"mRNA": 7, "miRNA": 9}, {"mRNA": 0, "miRNA": 30}, {"mRNA": 12, "miRNA": 12}]
    params = [{k: g + rng.normal(0, 0.01, g.shape).astype(g.dtype) for k, g in glob.items()} for _ in counts]
    cfg = DPConfig(clip_norm=1e6, noise_multiplier=0.0)  # nothing clipped, no noise
    vecs = [dp_site_vector(layout, p, glob, c, cfg)[0] for p, c in zip(params, counts)]
    got = dp_aggregate(layout, glob, vecs, cfg, np.random.default_rng(0))
    # uniform weights: aggregate_updates with every holding site weighted 1
    ones = [SiteUpdate(str(i), p, 1, {m: int(c[m] > 0) for m in c}) for i, (p, c) in enumerate(zip(params, counts))]
    want = aggregate_updates(glob, ones, modality_aware=True)
    for k in glob:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_clip_update_bounds_the_norm():
    delta = {"a": np.full(4, 3.0), "b": np.full(2, 4.0)}
    clipped, norm = clip_update(delta, 1.0)
    assert norm == pytest.approx(math.sqrt(36 + 32))
    assert math.sqrt(sum(float((v ** 2).sum()) for v in clipped.values())) == pytest.approx(1.0)
    same, _ = clip_update(delta, 100.0)
    assert all(np.array_equal(same[k], delta[k]) for k in delta)


def test_distributed_noise_sums_to_the_target_variance_and_is_accounted_by_the_sites_aggregated():
    cfg = DPConfig(clip_norm=2.0, noise_multiplier=1.5, noise="distributed")
    t, n_sites = 3, 5
    piece = noise_piece_std(cfg, t)
    rng = np.random.default_rng(0)
    s = rng.normal(0, piece, (t, 200_000)).sum(axis=0)  # the fewest pieces a recoverable sum holds
    assert s.std() == pytest.approx(cfg.sigma, rel=0.01)
    assert effective_noise_multiplier(cfg, t, t) == pytest.approx(1.5)
    assert effective_noise_multiplier(cfg, n_sites, t) == pytest.approx(1.5 * math.sqrt(5 / 3))
    colluding = DPConfig(clip_norm=2.0, noise_multiplier=1.5, noise="distributed", colluding_sites=1)
    assert effective_noise_multiplier(colluding, t, t) == pytest.approx(1.5 * math.sqrt(2 / 3))
    assert effective_noise_multiplier(DPConfig(clip_norm=1, noise_multiplier=0.7), 2) == 0.7
    assert effective_noise_multiplier(DPConfig(clip_norm=1, noise_multiplier=0.7, relation="replace"), 2) == 0.35


def test_distributed_dp_through_secure_aggregation():
    glob, layout = _setup(2)
    rng = np.random.default_rng(2)
    cfg = DPConfig(clip_norm=0.1, noise_multiplier=1.0, noise="distributed")
    setup = SecAggSetup.for_sites("dp-1", [1, 2, 3], layout.length, max_dropouts=1)
    piece = noise_piece_std(cfg, setup.threshold)
    vecs = {}
    for i in (1, 2, 3):
        params = {k: g + rng.normal(0, 0.05, g.shape).astype(g.dtype) for k, g in glob.items()}
        vecs[i] = dp_site_vector(layout, params, glob, {"mRNA": 3, "miRNA": 4}, cfg, piece,
                                 np.random.default_rng(100 + i))[0]
    total, server = run_local(setup, vecs, drop_before_mask=[2])
    assert np.allclose(total, vecs[1] + vecs[3], atol=1e-8)
    new = dp_decode(layout, total, glob)
    arrays, counts = layout.split(vecs[1] + vecs[3])
    assert counts == {"mRNA": 2.0, "miRNA": 2.0, None: 2.0}
    for k in glob:
        np.testing.assert_allclose(new[k], (glob[k] + arrays[k] / 2).astype(glob[k].dtype), rtol=1e-6, atol=1e-8)
    # the achieved multiplier: two pieces sized for t = 2
    assert effective_noise_multiplier(cfg, len(server.u3), setup.threshold) == pytest.approx(1.0)


def test_central_noise_has_std_sigma_on_parameters_only():
    glob, layout = _setup(3)
    cfg = DPConfig(clip_norm=0.5, noise_multiplier=2.0)
    out = add_central_noise(layout, np.zeros(layout.length), cfg, np.random.default_rng(0))
    assert out[:layout.param_size].std() == pytest.approx(1.0, rel=0.05)
    assert np.all(out[layout.param_size:] == 0)
    assert update_of(glob, glob)[layout.names[0]].sum() == 0


def test_distributed_noise_must_fit_the_fixed_point_range():
    """A site's clipped update plus its piece (bounded at NOISE_TAIL stds) must stay below 2^(63 - f) / n."""
    from magnet_core.federation.dp import NOISE_TAIL, distributed_noise_fits
    from magnet_core.federation.secagg import SecAggError, encode_fixed

    bound = 2.0 ** (63 - 32) / 3
    assert distributed_noise_fits(1.0, 1.0, 3, 32) is None
    assert distributed_noise_fits(1.0, (bound - 1.0) / NOISE_TAIL * 0.999, 3, 32) is None
    msg = distributed_noise_fits(1.0, (bound - 1.0) / NOISE_TAIL * 1.001, 3, 32)
    assert msg is not None and "fixed-point range" in msg and "3 sites" in msg
    assert distributed_noise_fits(1.0, 1e6, 3, 40) is not None  # fewer integer bits: refused sooner
    # and the encoder itself refuses (never wraps) a value beyond the range
    with pytest.raises(SecAggError, match="outside the fixed-point range"):
        encode_fixed(np.array([0.0, bound * 1.01]), 32, 3)


def test_site_noise_is_seeded_per_round_and_site_or_drawn_from_the_os():
    from magnet_core.federation.dp import site_noise_rng

    a = site_noise_rng(3, 2, 1).normal(size=8)
    assert np.array_equal(a, site_noise_rng(3, 2, 1).normal(size=8))
    assert not np.array_equal(a, site_noise_rng(3, 3, 1).normal(size=8))
    assert not np.array_equal(a, site_noise_rng(3, 2, 2).normal(size=8))
    assert not np.array_equal(site_noise_rng(-1, 2, 1).normal(size=8), site_noise_rng(-1, 2, 1).normal(size=8))
