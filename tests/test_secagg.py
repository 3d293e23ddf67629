"""Secure aggregation: the secure sum equals the plain modality-aware aggregate, the coordinator never holds an
unmasked individual vector, dropouts are recovered up to the threshold, and secure preprocessing decides as pooled."""

from __future__ import annotations

import numpy as np
import pytest
from reachable import reachable_arrays as _arrays

from magnet_core.federation.aggregate import SiteUpdate, aggregate_updates
from magnet_core.federation.secagg import (
    DEFAULT_FRAC_BITS,
    KeyAdvert,
    KeyBook,
    MaskedInput,
    SecAggError,
    SecAggServer,
    SecAggSetup,
    SecAggSite,
    ShareBundle,
    ShareInbox,
    StatsLayout,
    UnmaskRequest,
    UnmaskShares,
    UpdateLayout,
    decode_fixed,
    encode_fixed,
    run_local,
    shamir_combine,
    shamir_split,
)
from magnet_core.model.config import ModelConfig
from magnet_core.model.network import build_model

# Fixed-point tolerance (frac_bits = 32): each site's value is rounded to 2^-33, so a sum over n sites is off by at
# most n * 2^-33 per coordinate; divided by the summed weight (>= 1) and cast to float32 the aggregate equals the
# plain one up to one float32 rounding step: |secure - plain| <= 2^-24 |plain| + n * 2^-33.
FP = 2.0 ** -(DEFAULT_FRAC_BITS + 1)


def _leaks(server: SecAggServer, inputs: dict[int, np.ndarray]) -> list[str]:
    """Arrays held by the server that equal (ring) or approximate (float) a single site's input."""
    found = []
    for arr in _arrays(server):
        for i, x in inputs.items():
            if arr.shape != x.shape:
                continue
            ring = encode_fixed(x, DEFAULT_FRAC_BITS, 5)
            if arr.dtype == np.uint64:
                close = np.mean(arr == ring) > 0.01 or np.allclose(decode_fixed(arr), x, atol=1e-3)
            else:
                close = np.allclose(arr, x, atol=1e-3)
            if close:
                found.append(f"server holds site {i}'s input")
    return found


def test_shamir_any_threshold_subset_recovers_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir_split(secret, 3, [1, 2, 3, 4, 5])
    assert shamir_combine({x: shares[x] for x in (1, 3, 5)}) == secret
    assert shamir_combine({x: shares[x] for x in (2, 4, 5)}) == secret
    with pytest.raises(SecAggError):  # two shares interpolate a line through garbage
        assert shamir_combine({x: shares[x] for x in (1, 2)}) != secret


def test_fixed_point_round_trip_and_range_error():
    x = np.array([0.0, 1.5, -2.25, 1e-10, -123456.789])
    assert np.max(np.abs(decode_fixed(encode_fixed(x)) - x)) <= FP
    with pytest.raises(SecAggError, match="outside the fixed-point range"):
        encode_fixed(np.array([0.0, 2.0**31]), num_sites=1)
    with pytest.raises(SecAggError, match="position 1"):
        encode_fixed(np.array([0.0, np.nan]))


def test_setup_refuses_unsafe_thresholds():
    with pytest.raises(SecAggError, match="majority"):
        SecAggSetup.for_sites("r", [1, 2, 3, 4], 10, max_dropouts=2)  # t = 2 is not > 4 / 2
    with pytest.raises(SecAggError, match="at least 2 sites"):
        SecAggSetup.for_sites("r", [7], 10)
    assert SecAggSetup.for_sites("r", [1, 2, 3], 10, max_dropouts=1).threshold == 2


def _small_model_updates(seed: int = 0):
    cfg = ModelConfig(hidden=16, heads=2, dropout=0.0)
    model = build_model({"mRNA": 30, "miRNA": 12}, 2, cfg, seed)
    glob = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    counts = [(40, {"mRNA": 25, "miRNA": 40}), (31, {"mRNA": 0, "miRNA": 31}), (57, {"mRNA": 57, "miRNA": 50})]
    updates = []
    for i, (n, mc) in enumerate(counts):
        params = {}
        for k, g in glob.items():
            untouched = k.startswith("encoders.mRNA") and mc["mRNA"] == 0  # a site never changes an encoder it lacks
            params[k] = g.copy() if untouched else (g + rng.normal(0, 0.05, g.shape)).astype(g.dtype)
        updates.append(SiteUpdate(f"site{i}", params, n, mc))
    return glob, updates


@pytest.mark.parametrize("modality_aware", [True, False])
def test_secure_sum_equals_plain_modality_aware_aggregate(modality_aware):
    glob, updates = _small_model_updates()
    layout = UpdateLayout.from_params(glob)
    assert layout.modalities == ("mRNA", "miRNA")
    vectors = {i + 1: layout.encode_update(u.params, u.num_train, u.modality_counts, modality_aware)
               for i, u in enumerate(updates)}
    setup = SecAggSetup.for_sites("round-1", list(vectors), layout.length, max_dropouts=1)
    total, server = run_local(setup, vectors)
    assert np.max(np.abs(total - sum(vectors.values()))) <= 3 * FP + 1e-12 * np.abs(total).max()
    secure = layout.decode_mean(total, glob)
    plain = aggregate_updates(glob, updates, modality_aware=modality_aware, robust="mean")
    assert set(secure) == set(plain)
    for k in plain:
        assert secure[k].dtype == plain[k].dtype
        np.testing.assert_allclose(secure[k], plain[k], rtol=2.0**-23, atol=3 * FP)
    # the weight slots are exactly the summed counts (integers survive the fixed point exactly)
    _, wsum = layout.split(total)
    assert wsum == ({"mRNA": 82.0, "miRNA": 121.0, None: 128.0} if modality_aware
                    else {"mRNA": 128.0, "miRNA": 128.0, None: 128.0})
    assert not _leaks(server, vectors)


def test_ov_sized_model_secure_aggregate_with_a_dropout_equals_plain():
    from magnet_core.model.config import get_preset

    model = build_model({"mRNA": 1000, "miRNA": 448}, 2, get_preset("ov").model, 0)
    glob = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    layout = UpdateLayout.from_params(glob)
    rng = np.random.default_rng(5)
    updates = [SiteUpdate(f"s{i}", {k: (g + rng.normal(0, 0.01, g.shape)).astype(g.dtype) for k, g in glob.items()},
                          n, {"mRNA": n - 30, "miRNA": n}) for i, n in enumerate((70, 95, 61))]
    vectors = {i + 1: layout.encode_update(u.params, u.num_train, u.modality_counts) for i, u in enumerate(updates)}
    setup = SecAggSetup.for_sites("ov", [1, 2, 3], layout.length, max_dropouts=1)
    total, _ = run_local(setup, vectors, drop_after_mask=[2])  # site 2's input is in the sum
    secure = layout.decode_mean(total, glob)
    plain = aggregate_updates(glob, updates, modality_aware=True, robust="mean")
    assert layout.param_size > 1_000_000
    for k in plain:
        np.testing.assert_allclose(secure[k], plain[k], rtol=2.0**-23, atol=3 * FP)


def test_server_never_holds_an_unmasked_individual_vector_at_any_stage():
    rng = np.random.default_rng(1)
    vectors = {i: rng.normal(0, 1, 500) for i in (1, 2, 3)}
    setup = SecAggSetup.for_sites("r", list(vectors), 500, max_dropouts=1)
    sites = {i: SecAggSite(setup, i) for i in vectors}
    server = SecAggServer(setup)
    book = server.collect_keys([s.advertise() for s in sites.values()])
    inboxes = server.route_shares([s.share(book) for s in sites.values()])
    assert not _leaks(server, vectors)
    for i in (2, 3):  # site 1 drops out after sharing: the sum is over sites 2 and 3
        server.add_masked(sites[i].mask(inboxes[i], vectors[i]))
        assert not _leaks(server, vectors), f"after site {i}'s masked input"
    req = server.unmask_request()
    assert req == UnmaskRequest((2, 3), (1,))
    total = server.finish([sites[i].unmask(req) for i in req.survivors])
    assert np.max(np.abs(total - vectors[2] - vectors[3])) <= 2 * FP + 1e-12
    assert not _leaks(server, vectors)  # holds the sum of two sites, never one site's vector
    # the inspection does find a vector when one is there (in the ring or as floats)
    from types import SimpleNamespace

    assert _leaks(SimpleNamespace(a={"x": [encode_fixed(vectors[2], DEFAULT_FRAC_BITS, 5)]}), vectors)
    assert _leaks(SimpleNamespace(b=vectors[3] + 1e-6), vectors)
    # the ciphertexts it relayed do not contain the plain shares
    for inbox in inboxes.values():
        for ct in inbox.ciphertexts.values():
            assert all(share[0] not in ct for s in sites.values() for share in s._shares.values())


def test_sum_recovered_with_dropouts_up_to_the_threshold_and_clear_failure_beyond():
    rng = np.random.default_rng(2)
    vectors = {i: rng.normal(0, 10, 64) for i in (3, 5, 8, 13, 21)}
    setup = SecAggSetup.for_sites("r", list(vectors), 64, max_dropouts=2)  # t = 3
    # one site drops after sending its masked input: its input is still in the sum
    total, server = run_local(setup, vectors, drop_after_mask=[8])
    assert server.u3 == [3, 5, 8, 13, 21] and np.allclose(total, sum(vectors.values()), atol=5 * FP)
    # one before masking, one after: the sum is over the four that sent masked input
    total, server = run_local(setup, vectors, drop_before_mask=[21], drop_after_mask=[3])
    assert np.allclose(total, sum(v for i, v in vectors.items() if i != 21), atol=5 * FP)
    with pytest.raises(SecAggError, match=r"only 2 of 5 sites sent their masked input .*threshold 3.*\[5, 8, 21\]"):
        run_local(setup, vectors, drop_before_mask=[5, 8, 21])
    with pytest.raises(SecAggError, match=r"only 2 of 5 sites answered the unmask request"):
        run_local(setup, vectors, drop_before_mask=[5], drop_after_mask=[8, 21])


def test_stage_by_stage_through_records_and_serialised_site_state():
    """What a Flower round carries: every message as a ConfigRecord-style dict, each site's secrets in its state."""
    rng = np.random.default_rng(3)
    vectors = {i: rng.normal(0, 1, 32) for i in (1, 2, 3)}
    setup = SecAggSetup.from_record(SecAggSetup.for_sites("r", [1, 2, 3], 32, 1).to_record())
    state = {i: SecAggSite(setup, i).to_state() for i in vectors}
    server = SecAggServer(setup)

    def step(i, fn):
        site = SecAggSite.from_state(state[i])
        out = fn(site)
        state[i] = site.to_state()
        return out

    adverts = [KeyAdvert.from_record(step(i, lambda s: s.advertise()).to_record()) for i in vectors]
    book = KeyBook.from_record(server.collect_keys(adverts).to_record())
    bundles = [ShareBundle.from_record(step(i, lambda s: s.share(book)).to_record()) for i in vectors]
    inboxes = {v: ShareInbox.from_record(x.to_record()) for v, x in server.route_shares(bundles).items()}
    for i in vectors:
        server.add_masked(step(i, lambda s: s.mask(inboxes[i], vectors[i])))
    req = UnmaskRequest.from_record(server.unmask_request().to_record())
    replies = [UnmaskShares.from_record(step(i, lambda s: s.unmask(req)).to_record()) for i in vectors]
    assert np.allclose(server.finish(replies), sum(vectors.values()), atol=3 * FP)


def test_sites_refuse_inconsistent_or_tampered_messages():
    vectors = {i: np.ones(8) for i in (1, 2, 3)}
    setup = SecAggSetup.for_sites("r", [1, 2, 3], 8, 1)
    sites = {i: SecAggSite(setup, i) for i in vectors}
    server = SecAggServer(setup)
    book = server.collect_keys([s.advertise() for s in sites.values()])
    inboxes = server.route_shares([s.share(book) for s in sites.values()])
    bad = dict(inboxes[1].ciphertexts)
    bad[2] = bad[2][:-1] + bytes([bad[2][-1] ^ 1])
    with pytest.raises(SecAggError, match="fail authentication"):
        sites[1].mask(ShareInbox(1, bad), vectors[1])
    for i in vectors:
        server.add_masked(sites[i].mask(inboxes[i], vectors[i]))
    with pytest.raises(SecAggError, match="both survivors and dropped"):
        sites[1].unmask(UnmaskRequest((1, 2, 3), (3,)))  # would reveal both secrets of site 3
    with pytest.raises(SecAggError, match="sent twice"):
        server.add_masked(MaskedInput(1, np.zeros(8, np.uint64)))
    with pytest.raises(SecAggError, match="masked input from site 9"):
        server.add_masked(MaskedInput(9, np.zeros(8, np.uint64)))
    with pytest.raises(SecAggError, match="already has this site's masked input"):
        sites[2].mask(inboxes[2], vectors[2])


@pytest.mark.parametrize("lacking", [None, (1, "mRNA", 5)], ids=["same-features", "site1-lacks-5-mRNA"])
def test_secure_preprocessing_statistics_select_the_pooled_features(data_root, tmp_path, lacking):
    from magnet_core.cohort.preprocess import (
        PrepareConfig,
        combine_sites,
        derive_all,
        load_raw_site_dir,
        prepare_pooled_decisions,
    )
    from magnet_core.federation.privacy import protected_ranges, release_site_stats
    from simulations.prepare_federated import write_simulated_sites

    dirs = write_simulated_sites(data_root / "tcga-brca-mixomics", tmp_path, 3, missing_cells=0.01, lacking=lacking)
    cfg = PrepareConfig(n_features=40)
    sites = [load_raw_site_dir(d, cfg, log=lambda *_: None) for d in dirs]
    _, pooled, _ = prepare_pooled_decisions(sites, cfg)
    released, reports = zip(*(release_site_stats(s.stats(3), k=5) for s in sites))
    # on these data no class and no (class, feature) cell of any site falls below k = 5
    assert all(not r[m]["withheld_classes"] and r[m]["withheld_cells"] == 0 for r in reports for m in r)
    layout = StatsLayout.from_feature_lists([{m: st.features for m, st in r.items()} for r in released], 3)
    layout = StatsLayout.from_record(layout.to_record())  # as the sites receive it
    vectors = {i + 1: layout.encode(r) for i, r in enumerate(released)}
    setup = SecAggSetup.for_sites("prepare", list(vectors), layout.length, max_dropouts=1, frac_bits=24)
    total, server = run_local(setup, vectors)
    assert not _leaks(server, vectors)
    secure = layout.decode(total)
    clear = combine_sites(list(released))
    for m in clear:  # counts exact, sums to the fixed-point tolerance
        assert np.array_equal(secure[m].n_per_class, clear[m].n_per_class)
        assert np.array_equal(secure[m].count, clear[m].count)
        np.testing.assert_allclose(secure[m].total_sq, clear[m].total_sq, rtol=1e-12, atol=3 * 2.0**-25)
    decided = derive_all({m: protected_ranges(s, 0.0, 1.0) for m, s in secure.items()}, cfg)
    for m, p in pooled.items():
        assert decided[m].features == p.features, m
        assert decided[m].dropped_missing == p.dropped_missing
        np.testing.assert_allclose(decided[m].impute_means, p.impute_means, rtol=0, atol=3 * 2.0**-25)
    if lacking:
        assert len(layout.features["mRNA"]) == len(sites[0].frames["mRNA"].columns)  # the union of the sites'
        assert (secure["mRNA"].count.sum(axis=0) < clear["mRNA"].n_per_class.sum()).sum() >= 5
